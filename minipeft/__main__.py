"""Command line: ``python -m minipeft pretrain`` (re-make the shipped base model; ``--family``: the
smaller bases of notebook 12 instead),
``python -m minipeft compare`` (every method on one task: the comparison table),
``python -m minipeft cache clear`` (forget every cached training run) and
``python -m minipeft warm`` (run every notebook once, filling the cache: the lecture path)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def notebooks(folder=NOTEBOOKS) -> list[Path]:
    """The course's notebooks in order: ``NN_name.ipynb``."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


def execute(path):
    """Run the notebook at ``path`` top to bottom in a fresh kernel (in its own folder, with this process's
    environment) and return it with its outputs and widget state; the file is not changed."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=3600, store_widget_state=True,
                   resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    return nb


def warm(paths=None) -> dict[str, float]:
    """Execute every notebook in default mode with the cache on (nothing saved): afterwards Run All of
    any of them loads its training runs from the cache. Prints and returns each one's wall time."""
    os.environ.update(MINIPEFT_QUICK="0", MINIPEFT_CACHE="1")  # the kernels inherit this environment
    times = {}
    for path in paths or notebooks():
        t0 = time.perf_counter()
        execute(path)
        times[Path(path).name] = time.perf_counter() - t0
        print(f"{Path(path).name}: {times[Path(path).name] / 60:.1f} min", flush=True)
    print(f"all {len(times)} notebooks: {sum(times.values()) / 60:.1f} min")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the base model on copy/reverse/sort/add and save it")
    p.add_argument("--out", default=None, help="output folder (default: data/base)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--family", nargs="*", default=None, metavar="NAME",
                   help="pretrain the family of smaller bases (all, or those named) into data/family/<name>/")
    c = sub.add_parser("compare", help="run every method on one task and print the comparison table")
    c.add_argument("--quick", action="store_true", help="a small budget, the same code path (numbers mean little)")
    c.add_argument("--seeds", type=int, default=None, help="reported seeds per method (default 3)")
    c.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU if there is one)")
    c.add_argument("--out", default=None, help="folder for comparison.md, comparison.csv and comparison.png")
    c.add_argument("--steps", type=int, default=None, help="training steps per run (the search's runs too)")
    c.add_argument("--task", default=None, help="downstream task (default sortdesc)")
    c.add_argument("--methods", nargs="+", default=None, help="a subset of the methods, by key")
    c.add_argument("--eval-examples", type=int, default=None,
                   help="examples per evaluation (the task, and each pretraining task for forgetting)")
    k = sub.add_parser("cache", help="the results cache of training runs (.minipeft_cache/)")
    k.add_argument("action", choices=["clear"], help="clear: delete every cached run")
    w = sub.add_parser("warm", help="run every notebook in default mode with the cache on (nothing saved)")
    w.add_argument("notebooks", nargs="*", help="only these notebook files (default: all of notebooks/)")
    args = parser.parse_args(argv)

    if args.command == "pretrain":
        from .base import BASE_DIR, pretrain, pretrain_family
        overrides = {} if args.steps is None else {"steps": args.steps}
        if args.family is not None:
            if args.out is not None:
                parser.error("--out and --family do not go together: the family goes to data/family/<name>/")
            print(json.dumps(pretrain_family(args.family or None, **overrides), indent=2))
        else:
            print(json.dumps(pretrain(args.out or BASE_DIR, **overrides), indent=2))
    if args.command == "cache":
        from .cache import clear_cache
        clear_cache()
    if args.command == "warm":
        warm(args.notebooks or None)
    if args.command == "compare":
        from .report import main as compare
        return compare(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
