"""The comparison: every method on one downstream task, measured side by side (``python -m minipeft compare``).

The lecture closes with a table (trainable parameters, GPU memory, performance, stability). This module
fills it with measurements on the toy model, the same way for every method:

* the same task (``sortdesc`` by default: it separates the methods best), the same step budget and
  batch size, from a fresh copy of the shipped base each run;
* a learning rate chosen per method by a short sweep over its usual range, judged on a *selection*
  split (the task drawn with another seed), never on the split that is reported;
* several seeds at that learning rate: accuracy mean +- std, and failed runs (a non-finite loss, or an
  accuracy under half the method's median);
* forgetting: the drop of exact match on the pretraining tasks, with the adapter switched on; and
  whether the base's own tensors are bit-for-bit those before training (then switching the adapter off
  gives back the base exactly: no forgetting at all);
* trainable parameters (% of the base model), training memory of one step (measured, batch 32 at the
  task's longest sequence), checkpoint bytes (``save_adapter``), step time.
"""
from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .base import load_base
from .full import full_finetune
from .adapter import add_adapters
from .lora import add_lora
from .memory import MemoryBreakdown, measure_memory
from .memory_formula import predict_memory
from .io import save_adapter
from .io_methods import base_fingerprint
from .prefix import add_prefix_tuning, fold_prefix
from .prompt import add_prompt_tuning
from .qlora import quantize_nf4
from .tasks import PRETRAIN_TASKS, encode_batch, make_task
from .train import QUICK, evaluate, train


@dataclass(frozen=True)
class Method:
    """One row of the table: how to apply the method, its learning-rate range, its formula options."""
    key: str
    label: str
    apply: Callable                 # apply(model, seed) -> model
    lrs: tuple[float, ...]          # the sweep
    formula: tuple[str, dict]       # (method, options) for predict_memory


def _qlora(model, seed):
    return add_lora(quantize_nf4(model), r=8, alpha=16, targets="all-linear")


METHODS = {m.key: m for m in [
    Method("full", "Full fine-tuning", lambda m, s: full_finetune(m), (1e-3, 3e-3, 1e-2), ("full", {})),
    Method("prompt", "Prompt tuning (20 tokens)", lambda m, s: add_prompt_tuning(m, n_tokens=20, seed=s),
           (3e-2, 1e-1, 3e-1), ("prompt", {"n_tokens": 20})),  # 0.3 is Lester et al.'s rate
    Method("prefix", "Prefix tuning (10, reparam)", lambda m, s: add_prefix_tuning(m, n_prefix=10, seed=s),
           (3e-3, 1e-2, 3e-2), ("prefix", {"n_prefix": 10})),
    Method("adapter", "Adapters (Houlsby, 16)", lambda m, s: add_adapters(m, bottleneck=16, seed=s),
           (1e-2, 3e-2, 1e-1), ("adapter", {"bottleneck": 16})),
    Method("lora_qv", "LoRA r=8 (q, v)", lambda m, s: add_lora(m, r=8, alpha=16), (3e-3, 1e-2, 3e-2),
           ("lora", {"r": 8})),
    Method("lora_all", "LoRA r=8 (all linear)", lambda m, s: add_lora(m, r=8, alpha=16, targets="all-linear"),
           (3e-3, 1e-2, 3e-2), ("lora", {"r": 8, "targets": "all-linear"})),
    Method("qlora", "QLoRA r=8 (NF4, all linear)", _qlora, (3e-3, 1e-2, 3e-2),
           ("qlora", {"r": 8, "targets": "all-linear"})),
]}


@dataclass
class CompareConfig:
    task: str = "sortdesc"
    steps: int = 300                # per run, every method alike
    seeds: int = 3
    sweep_steps: int = 100          # per learning rate of the sweep (seed 0)
    batch_size: int = 32
    methods: tuple[str, ...] = tuple(METHODS)
    device: str | None = None       # default: the GPU if there is one
    eval_examples: int = 500        # validation examples for the accuracy
    forgetting_examples: int = 200  # per pretraining task

    @classmethod
    def quick(cls, **overrides) -> "CompareConfig":
        """A small budget with the same code path (CI, ``--quick``)."""
        return cls(**{**dict(steps=100, seeds=2, sweep_steps=30, eval_examples=200, forgetting_examples=100),
                      **overrides})

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        for name in ("steps", "seeds", "sweep_steps", "batch_size", "eval_examples", "forgetting_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        make_task(self.task)  # raises for an unknown task


@dataclass
class MethodResult:
    key: str
    label: str
    lr: float
    sweep: dict[float, tuple]           # lr -> (accuracy on the selection split, final training loss)
    accuracies: list[float]             # one per seed
    final_losses: list[float]
    forgetting: list[float]             # drop of mean pretraining exact match, one per seed
    base_unchanged: list[bool]          # the base's tensors bit-for-bit as before training, one per seed
    trainable: int
    base_params: int
    memory: MemoryBreakdown
    predicted: MemoryBreakdown
    checkpoint_bytes: int
    step_time: float                    # seconds, mean over seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    @property
    def failed(self) -> int:
        median = statistics.median(self.accuracies)
        return sum(not math.isfinite(loss) or acc < 0.5 * median
                   for acc, loss in zip(self.accuracies, self.final_losses))

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.base_params


def checkpoint_bytes(model, key: str) -> int:
    """Bytes on disk of what one task needs: the two files of ``save_adapter`` (a prefix is folded
    first: the reparameterisation MLP is dropped after training, as in the paper)."""
    kind = {"lora_qv": "lora", "lora_all": "lora", "qlora": "lora"}.get(key, key)
    if kind == "prefix":
        model = fold_prefix(copy.deepcopy(model))
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d, method=kind)
        return sum(f.stat().st_size for f in Path(d).iterdir())


def pretrain_accuracy(model, n: int, tasks=None) -> float:
    """Mean exact match over the pretraining tasks (``n`` validation examples each)."""
    tasks = tasks or [make_task(t, 0) for t in PRETRAIN_TASKS]
    return statistics.fmean(evaluate(model, t, max_examples=n) for t in tasks)


def _fresh(method: Method, seed: int, device):
    torch.manual_seed(seed)  # the random parts a method adds (LoRA's A, adapters) follow the seed
    return method.apply(load_base(device=device), seed)


def run_comparison(config: CompareConfig | None = None, progress: bool = True) -> list[MethodResult]:
    """Run every method of ``config`` (sweep, then seeds) and return one :class:`MethodResult` each."""
    config = config or (CompareConfig.quick() if QUICK else CompareConfig())
    device = torch.device(config.device) if config.device else None
    task, selection = make_task(config.task, 0), make_task(config.task, 100)
    seq_len = encode_batch(task.train)[0].shape[1]       # the longest training sequence
    base = load_base(device=device)
    base_params = sum(p.numel() for p in base.parameters())
    pretrain = [make_task(t, 0) for t in PRETRAIN_TASKS]
    base_pretrain = pretrain_accuracy(base, config.forgetting_examples, pretrain)
    methods = [METHODS[k] for k in config.methods]
    total = sum(len(m.lrs) * config.sweep_steps + config.seeds * config.steps for m in methods)
    bar = tqdm(total=total, desc="compare", unit="step", disable=not progress)
    results = []
    for method in methods:
        bar.set_postfix_str(f"{method.key}: sweep")
        sweep = {}
        for lr in method.lrs:
            model = _fresh(method, 0, device)
            hist = train(model, task, config.sweep_steps, lr, config.batch_size, seed=0, device=device, progress=False)
            loss = statistics.fmean(hist.loss[-10:])
            sweep[lr] = (evaluate(model, selection, max_examples=config.eval_examples), loss) \
                if math.isfinite(loss) else (-1.0, math.inf)
            bar.update(config.sweep_steps)
        # the best selection accuracy; equal accuracies (all 0 early on) go to the lower training loss
        lr = max(method.lrs, key=lambda k: (sweep[k][0], -sweep[k][1]))
        bar.set_postfix_str(f"{method.key}: lr {lr:g}")
        accs, losses, forgot, kept, seconds = [], [], [], [], []
        for seed in range(config.seeds):
            model = _fresh(method, seed, device)
            before = base_fingerprint(model)   # SHA-256 of the base's own tensors, bytes included
            hist = train(model, task, config.steps, lr, config.batch_size, seed=seed, device=device, progress=False)
            accs.append(evaluate(model, task, max_examples=config.eval_examples))
            losses.append(statistics.fmean(hist.loss[-10:]))
            forgot.append(base_pretrain - pretrain_accuracy(model, config.forgetting_examples, pretrain))
            kept.append(base_fingerprint(model) == before)
            seconds.append(hist.step_time)
            bar.update(config.steps)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        name, options = method.formula
        results.append(MethodResult(
            method.key, method.label, lr, sweep, accs, losses, forgot, kept, trainable, base_params,
            measure_memory(model, config.batch_size, seq_len),
            predict_memory(model.config, name, config.batch_size, seq_len, compute_dtype="fp32", **options),
            checkpoint_bytes(model, method.key), statistics.fmean(seconds)))
    bar.close()
    return results


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
    import os
    import platform
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (f"{device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def write_outputs(results: list[MethodResult], out_dir, config: CompareConfig, command: str,
                  seconds: float) -> dict[str, Path]:
    """Write ``comparison.md`` (table, command, machine), ``comparison.csv`` and ``comparison.png`` to ``out_dir``."""
    import csv
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
    import matplotlib.pyplot as plt
    plt.close(fig)
    return paths


def main(args, argv=None) -> int:
    """The ``compare`` subcommand (arguments parsed in ``minipeft/__main__.py``)."""
    import sys
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
