"""The whole course, timed: every notebook in default mode, cold cache then warm, one after another.

    python benchmarks/course.py                      # cold (a new, empty cache) then warm (the same cache)
    python benchmarks/course.py --store              # ... and save the cold run's outputs into the notebooks
    python benchmarks/course.py 06_lora.ipynb        # some notebooks only

Each notebook runs in a fresh kernel with ``MINIPEFT_QUICK=0`` and the results cache on, in a cache folder of
its own (``--cache``, default a new temporary folder), so "cold" means no training run of this code, torch and
thread count was ever cached, and "warm" is the second pass over the same folder: what a lecturer meets after
``make warm``. Training steps are counted by ``MINIPEFT_STEP_LOG`` (one line per training run: steps and batch
size); ``steps at batch 32`` weighs a run by its batch size, its cost relative to the course's usual batch.
The machine's load average is printed before and after: a busy machine makes every figure slower.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat
import torch

from minipeft.__main__ import NOTEBOOKS, execute, notebooks


def run_notebook(path: Path, cache_dir: Path, store: bool = False) -> tuple[float, int, float]:
    """Execute ``path`` in default mode with the cache in ``cache_dir``; return (seconds, steps, steps at
    batch 32). ``store``: write the executed notebook (outputs and widget state) back to ``path``."""
    with tempfile.NamedTemporaryFile("r", suffix=".steps") as log:
        os.environ.update(MINIPEFT_QUICK="0", MINIPEFT_CACHE="1", MINIPEFT_CACHE_DIR=str(cache_dir),
                          MINIPEFT_STEP_LOG=log.name)  # the kernel inherits this environment
        t0 = time.perf_counter()
        nb = execute(path)
        seconds = time.perf_counter() - t0
        runs = [tuple(int(v) for v in line.split("\t")[:2]) for line in log.read().splitlines() if line.strip()]
    if store:
        nbformat.write(nb, path)
    return seconds, sum(s for s, _ in runs), sum(s * b / 32 for s, b in runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every NN_*.ipynb of notebooks/)")
    parser.add_argument("--cache", default=None, help="the cache folder (default: a new temporary one)")
    parser.add_argument("--store", action="store_true", help="save the cold run's outputs into the notebooks")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm pass")
    args = parser.parse_args(argv)
    paths = [Path(p) if Path(p).exists() else NOTEBOOKS / p for p in args.notebooks] or notebooks()
    cache_dir = Path(args.cache or tempfile.mkdtemp(prefix="minipeft-course-cache-"))
    print(f"{len(paths)} notebooks | cache {cache_dir} | torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads ({os.environ.get('OMP_NUM_THREADS', 'OMP_NUM_THREADS unset')}) | "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for path in paths:
        cold = run_notebook(path, cache_dir, store=args.store)
        print(f"  cold {path.name}: {cold[0] / 60:.2f} min, {cold[1]:,} steps ({cold[2]:,.0f} at batch 32)", flush=True)
        rows.append((path.name, cold))
    if not args.cold_only:
        for i, path in enumerate(paths):
            warm = run_notebook(path, cache_dir)
            print(f"  warm {path.name}: {warm[0] / 60:.2f} min, {warm[1]:,} steps trained", flush=True)
            rows[i] += (warm,)
    print(f"load average after {os.getloadavg()[0]:.2f}\n")
    print("| notebook | steps (cold) | at batch 32 | cold (min) | warm (min) | steps trained warm |")
    print("|---|---|---|---|---|---|")
    for name, cold, *warm in rows:
        w = f"{warm[0][0] / 60:.2f} | {warm[0][1]:,}" if warm else "– | –"
        print(f"| `{name[:-6]}` | {cold[1]:,} | {cold[2]:,.0f} | {cold[0] / 60:.2f} | {w} |")
    total_warm = f"{sum(r[2][0] for r in rows) / 60:.2f}" if not args.cold_only else "–"
    print(f"| all {len(rows)} | {sum(r[1][1] for r in rows):,} | {sum(r[1][2] for r in rows):,.0f} | "
          f"{sum(r[1][0] for r in rows) / 60:.2f} | {total_warm} | |")


if __name__ == "__main__":
    main()
