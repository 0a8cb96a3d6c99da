"""``python cli.py zoo {list,info,export,upgrade}``: the model zoo's subcommand, parsed with plain argparse."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reprozoo import _checks
from reprozoo.cli._errors import _debug, _user_message
from reprozoo.zoo import export, registry


class _ZooParser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, like the other commands' errors (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` shows the usage)\n")


def _zoo_parser() -> argparse.ArgumentParser:
    parser = _ZooParser(prog="reprozoo zoo", description="The reprozoo model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered entries")
    p.add_argument("pattern", nargs="?", help="only names containing this")
    p = sub.add_parser("info", help="show an entry's card")
    p.add_argument("name")
    p = sub.add_parser(
        "export",
        help="write a zoo entry (weights .safetensors, card .json, Lightning .ckpt) from a checkpoint or an entry",
    )
    p.add_argument("source", help="a Lightning checkpoint (.ckpt), or a zoo name, card (.json) or hf:// card")
    p.add_argument("--name", help="zoo name, 'method_arch.data' (required for a checkpoint; default: the entry's)")
    p.add_argument("--out", help="output folder (default: zoo_exports, or the --hub-folder)")
    p.add_argument("--hub-folder", metavar="DIR", help="write a Hugging Face model repository: the files and README.md")
    p.add_argument("--hub-repo", metavar="ORG/REPO", help="the Hub repository the README's examples name")
    p.add_argument("--module", help="class path, if the checkpoint does not record it")
    p.add_argument("--url", help="where the weights file will be published: https://... or hf://org/repo[@rev]/file")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE", help="a measured metric (repeat)")
    p.add_argument("--recipe", help="the config that produced the checkpoint")
    p.add_argument("--license", help="SPDX licence id of the weights (default: MIT, or the entry's)")
    p.add_argument("--description", help="what the model is and how it was trained")
    p = sub.add_parser("upgrade", help="convert a checkpoint written before the layout of issue 15, once")
    p.add_argument("ckpt", help="path of the Lightning checkpoint (.ckpt)")
    p.add_argument("--out", help="where to write the converted checkpoint (default: over the input)")
    return parser


def _parse_metric(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise registry.WeightsError(f"--metric expects KEY=NUMBER, got {text!r}") from None


def _export(args: argparse.Namespace):
    if args.out and args.hub_folder:
        raise registry.WeightsError("give --out or --hub-folder, not both (--hub-folder is the output folder)")
    out = args.hub_folder or args.out or "zoo_exports"
    metrics = dict(map(_parse_metric, args.metric)) or None
    card = dict(url=args.url, metrics=metrics, recipe=args.recipe, license=args.license, description=args.description)
    hub = dict(model_card=args.hub_folder is not None, hub_repo=args.hub_repo)
    source = str(args.source)
    if source.endswith((".ckpt", ".pt", ".pth")) or (Path(source).is_file() and not registry.is_card_path(source)):
        if not args.name:
            raise registry.WeightsError("--name is required when exporting a checkpoint ('method_arch.data')")
        card = {k: v for k, v in card.items() if v is not None}
        return export.export_checkpoint(args.source, args.name, out, module=args.module, **card, **hub)
    if args.module:
        raise registry.WeightsError("--module is only for a checkpoint; a zoo entry's card names its class")
    return export.export_entry(args.source, out, name=args.name, **card, **hub)


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
        elif args.command == "upgrade":
            print(f"wrote {export.upgrade_checkpoint(args.ckpt, args.out)}")
        else:
            weights_file, card_file = _export(args)
            print(f"wrote {weights_file}, {card_file} and {card_file.with_suffix('.ckpt')}")
    except (registry.WeightsError, _checks.CheckpointError, OSError) as err:
        if _debug():
            raise
        print(f"reprozoo zoo {args.command}: {_user_message(err)}", file=sys.stderr)
        return 2
    return 0
