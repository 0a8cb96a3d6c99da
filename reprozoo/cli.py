"""Command line: ``python cli.py {fit,validate,test,predict} --config ...`` (LightningCLI) and ``python cli.py zoo ...``.

Models and datamodules are chosen in subclass mode (``model: {class_path: ..., init_args: ...}``), so any
LightningModule / LightningDataModule importable by its class path works, ours or the user's. Trainer presets in
``configs/trainer/`` compose with an experiment config: ``--config configs/trainer/gpu.yaml --config configs/X.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

# Imported so that their classes resolve by short name in configs and on the command line.
from reprozoo import callbacks, datamodules
from reprozoo.zoo import _checks, classifier, distillation, engression, nca, nets, registry, tent, trm

_IMPORTED_FOR_CLASS_PATHS = (callbacks, datamodules, classifier, distillation, engression, nca, nets, tent, trm)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "reprozoo"},
    },
}


class ReprozooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always checkpoint; `--checkpoint.monitor val/...` etc. configure it, last.ckpt is kept for resuming.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: after training, run the test loop on the final weights",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)

    def parse_arguments(self, parser, args) -> None:
        # jsonargparse reports a YAML syntax error as being in "<unicode string>": name the file first.
        words = sys.argv[1:] if args is None else args
        if isinstance(words, (list, tuple)):
            for path in _config_files(words):
                problem = _yaml_problem(path)
                if problem:
                    parser.error(problem)
        super().parse_arguments(parser, args)
        self._check_ckpt_path()  # before LightningCLI reads the checkpoint's hyperparameters into the config

    def _check_ckpt_path(self) -> None:
        """``--ckpt_path``: a truncated or damaged file, or one written by another model class than the config's,
        stops here with its name (torch would say only "failed finding central directory", or load a damaged file
        without noticing; LightningCLI would merge another method's hyperparameters into the config)."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not ckpt_path or not os.path.isfile(ckpt_path):  # "last", "best", URLs: Lightning resolves those
            return
        _checks.check_checkpoint_file(ckpt_path)
        model = config.get("model")
        class_path = model.get("class_path") if hasattr(model, "get") else None
        if isinstance(class_path, str):
            _checks.check_checkpoint_class(ckpt_path, class_path)


def _config_files(words: list) -> list[str]:
    """The existing files given to ``--config`` / ``-c`` (a config may also be given inline, as YAML text)."""
    found = []
    for i, word in enumerate(map(str, words)):
        value = None
        if word in ("--config", "-c") and i + 1 < len(words):
            value = str(words[i + 1])
        elif word.startswith("--config="):
            value = word.split("=", 1)[1]
        if value is not None and os.path.isfile(value):
            found.append(value)
    return found


def _yaml_problem(path: str) -> str | None:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            yaml.compose(fh, Loader=yaml.SafeLoader)  # syntax only: no tags are constructed
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return f"config file {path} is not valid YAML: {err}"
    return None


def run_lightning(args: list[str] | None = None) -> ReprozooCLI:
    return ReprozooCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Persistent: with the resumable training loaders, a resumed run continues exactly (same random draws).
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [callbacks.RNGStateCheckpoint()]},
        args=args,
    )


# ---------------------------------------------------------------------------------------------------- zoo commands


def _zoo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reprozoo zoo", description="The reprozoo model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered entries")
    p.add_argument("pattern", nargs="?", help="only names containing this")
    p = sub.add_parser("info", help="show an entry's card")
    p.add_argument("name")
    p = sub.add_parser("export", help="turn a Lightning checkpoint into a zoo weights file and card")
    p.add_argument("ckpt", help="path of the Lightning checkpoint (.ckpt)")
    p.add_argument("--name", required=True, help="zoo name, 'method_arch.data'")
    p.add_argument("--out", default="zoo_exports", help="output folder (default: zoo_exports)")
    p.add_argument("--module", help="class path, if the checkpoint does not record it")
    p.add_argument("--url", help="where the weights file will be published (omit: shipped in the package)")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE", help="a measured metric (repeat)")
    p.add_argument("--recipe", help="the config that produced the checkpoint")
    p.add_argument("--license", default="MIT")
    p.add_argument("--description", default="")
    return parser


def _parse_metric(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise SystemExit(f"reprozoo zoo export: --metric expects KEY=NUMBER, got {text!r}") from None


def zoo_main(argv: list[str]) -> int:
    args = _zoo_parser().parse_args(argv)
    try:
        if args.command == "list":
            names = registry.list_weights(args.pattern)
            if not names:
                print("no zoo entries" + (f" matching {args.pattern!r}" if args.pattern else ""))
            for name in names:
                entry = registry.get_weights(name)
                metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(entry.metrics.items()))
                where = "packaged" if entry.url is None else "download"
                print(f"{name:<40} {entry.module.rsplit('.', 1)[-1]:<22} {where:<9} {metrics}")
        elif args.command == "info":
            print(json.dumps(registry.get_weights(args.name).to_card(), indent=2, sort_keys=True))
        else:
            weights_file, card_file = registry.export_checkpoint(
                args.ckpt,
                args.name,
                args.out,
                module=args.module,
                url=args.url,
                metrics=dict(map(_parse_metric, args.metric)),
                recipe=args.recipe,
                license=args.license,
                description=args.description,
            )
            print(f"wrote {weights_file} and {card_file}")
    except registry.WeightsError as err:
        print(f"reprozoo zoo {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] == "zoo":
        return zoo_main(words[1:])
    run_lightning(None if argv is None else words)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
