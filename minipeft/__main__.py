"""Command line: ``python -m minipeft pretrain`` (re-make the shipped base model)."""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the base model on copy/reverse/sort/add and save it")
    p.add_argument("--out", default=None, help="output folder (default: data/base)")
    p.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)

    if args.command == "pretrain":
        from .base import BASE_DIR, pretrain
        overrides = {} if args.steps is None else {"steps": args.steps}
        report = pretrain(args.out or BASE_DIR, **overrides)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
