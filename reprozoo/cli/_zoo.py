"""``python cli.py zoo {list,info,export,upgrade}``: the model zoo's subcommand, parsed with plain argparse."""

from __future__ import annotations

import argparse
import json
import sys

from reprozoo import _checks
from reprozoo.cli._errors import _debug, _user_message
from reprozoo.zoo import registry


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
            print(f"wrote {registry.upgrade_checkpoint(args.ckpt, args.out)}")
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
    except (registry.WeightsError, _checks.CheckpointError, OSError) as err:
        if _debug():
            raise
        print(f"reprozoo zoo {args.command}: {_user_message(err)}", file=sys.stderr)
        return 2
    return 0
