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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import load_base
from .io import base_fingerprint, save_adapter
from .memory import MemoryBreakdown, measure_memory
from .memory_formula import predict_memory
from .methods import METHODS
from .prefix import fold_prefix
from .qlora import quantize_nf4
from .tasks import PRETRAIN_TASKS, encode_batch, make_task
from .train import QUICK, evaluate, train


@dataclass(frozen=True)
class Setting:
    """One row of the table: a method of the registry (``minipeft.METHODS``) with its options, on a
    full-precision or a 4-bit base, and the learning rates its sweep tries."""
    key: str
    label: str
    method: str                                  # a key of minipeft.METHODS
    lrs: tuple[float, ...]
    options: dict = field(default_factory=dict)  # for its add_* function (its config's other fields: defaults)
    nf4: bool = False                            # quantise the base first: LoRA on it is QLoRA

    def apply(self, model, seed: int):
        """Apply the setting to ``model``; ``seed`` seeds what the method initialises at random."""
        if self.nf4:
            quantize_nf4(model)
        config = METHODS[self.method].config
        seeded = config is not None and "seed" in config.__dataclass_fields__
        return METHODS[self.method].add(model, **self.options, **({"seed": seed} if seeded else {}))

    @property
    def formula(self) -> tuple[str, dict]:
        """``(method, options)`` for :func:`minipeft.predict_memory`."""
        return ("qlora" if self.nf4 else self.method), dict(self.options)


SETTINGS = {s.key: s for s in [
    Setting("full", "Full fine-tuning", "full", (1e-3, 3e-3, 1e-2)),
    Setting("prompt", "Prompt tuning (20 tokens)", "prompt", (3e-2, 1e-1, 3e-1),  # 0.3: Lester et al.'s rate
            {"n_tokens": 20}),
    Setting("prefix", "Prefix tuning (10, reparam)", "prefix", (3e-3, 1e-2, 3e-2), {"n_prefix": 10}),
    Setting("adapter", "Adapters (Houlsby, 16)", "adapter", (1e-2, 3e-2, 1e-1), {"bottleneck": 16}),
    Setting("lora_qv", "LoRA r=8 (q, v)", "lora", (3e-3, 1e-2, 3e-2), {"r": 8}),
    Setting("lora_all", "LoRA r=8 (all linear)", "lora", (3e-3, 1e-2, 3e-2), {"r": 8, "targets": "all-linear"}),
    Setting("qlora", "QLoRA r=8 (NF4, all linear)", "lora", (3e-3, 1e-2, 3e-2), {"r": 8, "targets": "all-linear"},
            nf4=True),
]}


@dataclass
class CompareConfig:
    task: str = "sortdesc"
    steps: int = 300                # per run, every method alike
    seeds: int = 3
    sweep_steps: int = 100          # per learning rate of the sweep (seed 0)
    batch_size: int = 32
    methods: tuple[str, ...] = tuple(SETTINGS)  # keys of SETTINGS
    device: str | None = None       # default: the GPU if there is one
    eval_examples: int = 500        # validation examples for the accuracy
    forgetting_examples: int = 200  # per pretraining task

    @classmethod
    def quick(cls, **overrides) -> "CompareConfig":
        """A small budget with the same code path (CI, ``--quick``)."""
        return cls(**{**dict(steps=100, seeds=2, sweep_steps=30, eval_examples=200, forgetting_examples=100),
                      **overrides})

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(SETTINGS)}")
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


def checkpoint_bytes(model, method: str) -> int:
    """Bytes on disk of what one task needs: the two files of ``save_adapter`` (a prefix is folded
    first: the reparameterisation MLP is dropped after training, as in the paper)."""
    if method == "prefix":
        model = fold_prefix(copy.deepcopy(model))
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d, method=method)
        return sum(f.stat().st_size for f in Path(d).iterdir())


def pretrain_accuracy(model, n: int, tasks=None) -> float:
    """Mean exact match over the pretraining tasks (``n`` validation examples each)."""
    tasks = tasks or [make_task(t, 0) for t in PRETRAIN_TASKS]
    return statistics.fmean(evaluate(model, t, max_examples=n) for t in tasks)


def _fresh(setting: Setting, seed: int, device):
    torch.manual_seed(seed)  # the random parts a method adds (LoRA's A, adapters) follow the seed
    return setting.apply(load_base(device=device), seed)


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
    methods = [SETTINGS[k] for k in config.methods]
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
            checkpoint_bytes(model, method.method), statistics.fmean(seconds)))
    bar.close()
    return results
