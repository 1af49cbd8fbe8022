"""The comparison's report: the table as markdown, CSV and a plot, and the ``compare`` command that writes them.

:mod:`minipeft.compare` runs the experiments and returns :class:`~minipeft.compare.MethodResult` s; this
module only turns them into what a reader sees (``python -m minipeft compare --out docs``).
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .compare import CompareConfig, MethodResult, run_comparison
from .tasks import PRETRAIN_TASKS

# --- the table ------------------------------------------------------------------------------------

COLUMNS = ("method", "trainable params", "trainable %", "train memory (MB)", "accuracy", "std across seeds",
           "failed runs", "forgetting", "base unchanged", "checkpoint (kB)", "step time (ms)", "lr")


def table_rows(results: list[MethodResult]) -> list[dict]:
    """One dict per method with the table's columns, as printed."""
    return [{
        "method": r.label,
        "trainable params": f"{r.trainable:,}",
        "trainable %": f"{r.percent:.3g}",
        "train memory (MB)": f"{r.memory.total / 2 ** 20:.1f}",
        "accuracy": f"{r.mean:.3f} ± {r.std:.3f}",
        "std across seeds": f"{r.std:.3f}",
        "failed runs": f"{r.failed}/{len(r.accuracies)}",
        "forgetting": f"{statistics.fmean(r.forgetting):+.3f}",
        "base unchanged": f"{sum(r.base_unchanged)}/{len(r.base_unchanged)}",
        "checkpoint (kB)": f"{r.checkpoint_bytes / 1000:,.1f}",
        "step time (ms)": f"{1000 * r.step_time:.1f}",
        "lr": f"{r.lr:g}",
    } for r in results]


def markdown_table(results: list[MethodResult]) -> str:
    rows = table_rows(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the numbers were measured."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (f"{device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def write_outputs(results: list[MethodResult], out_dir, config: CompareConfig, command: str,
                  seconds: float) -> dict[str, Path]:
    """Write ``comparison.md`` (table, command, machine), ``comparison.csv`` and ``comparison.png`` to ``out_dir``."""
    from .plots import plot_comparison
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv", "png": out / "comparison.png"}
    paths["md"].write_text(
        f"{markdown_table(results)}\n\nTask `{config.task}`, {config.steps} steps of batch {config.batch_size} "
        f"per run, {config.seeds} seeds, learning rate from a sweep of {config.sweep_steps} steps per value. "
        f"Memory: one measured training step (weights + gradients + AdamW state + activations) at batch "
        f"{config.batch_size}. Forgetting: drop of mean exact match on {', '.join(PRETRAIN_TASKS)} with the "
        f"adapter on. Base unchanged: runs whose base tensors are bit-for-bit those before training (the "
        f"adapter switched off gives back the base, forgetting 0).\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nWall time: {seconds / 60:.1f} min\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "key", "trainable", "trainable_percent", "memory_bytes", "weights_bytes",
                         "gradients_bytes", "optimizer_bytes", "activations_bytes", "predicted_memory_bytes",
                         "accuracy_mean", "accuracy_std", "accuracies", "failed", "forgetting_mean",
                         "base_unchanged", "checkpoint_bytes", "step_time_s", "lr", "sweep"])
        for r in results:
            m = r.memory
            writer.writerow([r.label, r.key, r.trainable, f"{r.percent:.4f}", m.total, m.weight_bytes, m.gradients,
                             m.optimizer, m.activations, r.predicted.total, f"{r.mean:.4f}", f"{r.std:.4f}",
                             " ".join(f"{a:.4f}" for a in r.accuracies), r.failed,
                             f"{statistics.fmean(r.forgetting):.4f}", sum(r.base_unchanged), r.checkpoint_bytes, f"{r.step_time:.5f}",
                             r.lr, " ".join(f"{k:g}:{a:.3f}" for k, (a, _) in r.sweep.items())])
    fig = plot_comparison(results)
    fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def main(args, argv=None) -> int:
    """The ``compare`` subcommand (arguments parsed in ``minipeft/__main__.py``)."""
    overrides = {k: v for k, v in dict(seeds=args.seeds, device=args.device, steps=args.steps,
                                       sweep_steps=args.sweep_steps, task=args.task,
                                       eval_examples=args.eval_examples, forgetting_examples=args.eval_examples,
                                       methods=tuple(args.methods) if args.methods else None).items()
                 if v is not None}
    config = CompareConfig.quick(**overrides) if args.quick else CompareConfig(**overrides)
    t0 = time.perf_counter()
    results = run_comparison(config, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    print(markdown_table(results))
    print(f"\n{len(results)} methods in {seconds / 60:.1f} min on {machine()}")
    if args.out:
        command = "python -m minipeft " + " ".join(sys.argv[1:] if argv is None else argv)
        paths = write_outputs(results, args.out, config, command, seconds)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
