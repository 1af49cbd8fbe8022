"""Command line: ``python -m minipeft pretrain`` (re-make the shipped base model),
``python -m minipeft compare`` (every method on one task: the comparison table) and
``python -m minipeft cache clear`` (forget every cached training run)."""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the base model on copy/reverse/sort/add and save it")
    p.add_argument("--out", default=None, help="output folder (default: data/base)")
    p.add_argument("--steps", type=int, default=None)
    c = sub.add_parser("compare", help="run every method on one task and print the comparison table")
    c.add_argument("--quick", action="store_true", help="a small budget (a few minutes on 2 CPU cores)")
    c.add_argument("--seeds", type=int, default=None, help="training seeds per method (default 3, quick 2)")
    c.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU if there is one)")
    c.add_argument("--out", default=None, help="folder for comparison.md, comparison.csv and comparison.png")
    c.add_argument("--steps", type=int, default=None, help="training steps per run")
    c.add_argument("--sweep-steps", type=int, default=None, help="steps per learning rate of the sweep")
    c.add_argument("--task", default=None, help="downstream task (default sortdesc)")
    c.add_argument("--methods", nargs="+", default=None, help="a subset of the methods, by key")
    c.add_argument("--eval-examples", type=int, default=None,
                   help="examples per evaluation (the task, and each pretraining task for forgetting)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    k = sub.add_parser("cache", help="the results cache of training runs (.minipeft_cache/)")
    k.add_argument("action", choices=["clear"], help="clear: delete every cached run")
    args = parser.parse_args(argv)

    if args.command == "pretrain":
        from .base import BASE_DIR, pretrain
        overrides = {} if args.steps is None else {"steps": args.steps}
        report = pretrain(args.out or BASE_DIR, **overrides)
        print(json.dumps(report, indent=2))
    if args.command == "cache":
        from .cache import clear_cache
        clear_cache()
    if args.command == "compare":
        from .report import main as compare
        return compare(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
