"""The comparison: every method on one downstream task, measured the same way (``python -m minipeft compare``).

The lecture closes with a table (trainable parameters, GPU memory, performance, stability). This module
fills it with measurements on the toy model, through the experiment protocol (:mod:`minipeft.protocol`):

* one task that separates the methods (``sortdesc``), one step budget and batch size, a fresh base per run;
* per setting, the learning rate searched **at the final budget** on a log grid of at least 5 points
  (widened at an edge), chosen on ``val``; the chosen rate trained on ``seeds`` seeds, reported on ``test``
  (mean, sample std, 95 % interval, n); every run through the results cache, so notebooks share them;
* *failed runs* and *stable*, defined before anything is measured (:data:`STABLE_RULE`);
* *forgetting*: the change of exact match on the pretraining tasks that training caused, trained method
  against the same method untrained (same seed), both switched on (:func:`pretrain_accuracy`);
* trainable % (PEFT's: of the adapted model), memory of one training step (measured and predicted),
  checkpoint bytes (``save_adapter``), step time.

Each :class:`Setting` has a JSON ``spec`` and a ``build(seed)``: a notebook that trains the same setting
with the same task, steps and batch (``protocol.run(s.spec, s.build, ...)``) shares the cached runs.
"""
from __future__ import annotations

import copy
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .base import load_base
from .io import save_adapter
from .memory import MemoryBreakdown, measure_memory
from .memory_formula import predict_memory
from .methods import METHODS
from .prefix import fold_prefix
from .full import trainable_parameters
from .protocol import RunResult, Search, Summary, _build, log_grid, lr_search, run, summary
from .qlora import quantize_nf4
from .tasks import PRETRAIN_TASKS, Task, encode_batch, make_task
from .train import QUICK, evaluate


@dataclass(frozen=True)
class Setting:
    """One row of the table: a method of the registry (``minipeft.METHODS``) with its options, on a
    full-precision or a 4-bit base, and the learning-rate grid its search starts from."""
    key: str
    label: str
    method: str                                  # a key of minipeft.METHODS
    grid: tuple[float, ...]                      # >= 5 log-spaced rates; widened by the search at an edge
    options: dict = field(default_factory=dict)  # for its add_* function (its config's other fields: defaults)
    nf4: bool = False                            # quantise the base first: LoRA on it is QLoRA

    @property
    def spec(self) -> dict:
        """``{"method": <registry key>, **options}``, plus ``"nf4": True`` on a 4-bit base (QLoRA): the
        convention every notebook uses, so that the same run is cached once."""
        return {"method": self.method, **self.options, **({"nf4": True} if self.nf4 else {})}

    def apply(self, model, seed: int = 0):
        """Apply the setting to ``model``; ``seed`` seeds what the method initialises (its ``seed`` option)."""
        if self.nf4:
            quantize_nf4(model)
        config = METHODS[self.method].config
        seeded = config is not None and "seed" in config.__dataclass_fields__
        return METHODS[self.method].add(model, **self.options, **({"seed": seed} if seeded else {}))

    def builder(self, base: Callable = load_base) -> Callable:
        """``build(seed)`` for :func:`minipeft.protocol.run`: a fresh ``base()`` with the setting applied."""
        return lambda seed: self.apply(base(), seed)

    def build(self, seed: int = 0):
        """A fresh shipped base with the setting applied (the ``build`` of every run of this setting)."""
        return self.apply(load_base(), seed)

    @property
    def formula(self) -> tuple[str, dict]:
        """``(method, options)`` for :func:`minipeft.predict_memory`."""
        return ("qlora" if self.nf4 else self.method), dict(self.options)


# Each setting's spec, grid, task, steps (200) and batch (32) are those of the chapter that teaches the method
# (02 full, 03 prompt, 04 prefix, 05 adapters, 08 LoRA all / QLoRA, 11 LoRA q, v): a course run trains each
# run once and the table reuses it from the results cache.
LORA_GRID = tuple(log_grid(1e-3, 1e-1))  # 0.001, 0.00316, 0.01, 0.0316, 0.1
SETTINGS = {s.key: s for s in [
    Setting("full", "Full fine-tuning", "full", tuple(log_grid(1e-4, 1e-2))),
    Setting("prompt", "Prompt tuning (20 tokens)", "prompt", (0.01, 0.03, 0.1, 0.3, 1.0),
            {"n_tokens": 20, "init": "vocab"}),
    Setting("prefix", "Prefix tuning (10, reparam)", "prefix", LORA_GRID, {"n_prefix": 10, "reparam": True}),
    Setting("adapter", "Adapters (Houlsby, 16)", "adapter", LORA_GRID, {"bottleneck": 16, "placement": "houlsby"}),
    Setting("lora_qv", "LoRA r=8 (q, v)", "lora", LORA_GRID, {"r": 8}),
    Setting("lora_all", "LoRA r=8 (all linear)", "lora", LORA_GRID, {"r": 8, "targets": "all-linear"}),
    Setting("qlora", "QLoRA r=8 (NF4, all linear)", "lora", LORA_GRID, {"r": 8, "targets": "all-linear"}, nf4=True),
]}


@dataclass
class CompareConfig:
    task: str = "sortdesc"
    steps: int = 200                # per run, every method and every point of the search alike
    seeds: int = 3                  # reported seeds at the chosen rate (seed 0 is the search's run)
    batch_size: int = 32
    methods: tuple[str, ...] = tuple(SETTINGS)  # keys of SETTINGS
    device: str | None = None       # default: the GPU if there is one
    eval_examples: int = 500        # val (chooses) and test (reports) examples per run
    forgetting_examples: int = 200  # per pretraining task
    max_widen: int = 4              # grid steps the search may add beyond the grid's edges

    @classmethod
    def quick(cls, **overrides) -> "CompareConfig":
        """A small budget with the same code path (CI, ``--quick``): the numbers mean little."""
        return cls(**{**dict(steps=20, eval_examples=100, forgetting_examples=50, max_widen=0), **overrides})

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(SETTINGS)}")
        for name in ("steps", "seeds", "batch_size", "eval_examples", "forgetting_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.max_widen, bool) or not isinstance(self.max_widen, int) or self.max_widen < 0:
            raise ValueError(f"max_widen must be a non-negative integer, got {self.max_widen!r}")
        make_task(self.task)  # raises for an unknown task


FAILED_RULE = ("a run failed when its training loss became non-finite, or its test exact match is below half "
               "the median of the setting's seeds")
STABLE_RULE = ("stable: no failed run, a mean test exact match above 0 (a method that learned nothing is not "
               "'stable'), and the sample std across seeds <= 0.05 and <= 10 % of the mean; otherwise unstable")


@dataclass
class MethodResult:
    setting: Setting
    search: Search                       # the learning-rate search and the reported runs
    untrained_pretrain: list[float]      # per reported seed: pretraining exact match, method applied, untrained
    trained_pretrain: list[float]        # per reported seed: the same after training
    trainable: int
    total: int                           # parameters of the adapted model (PEFT's denominator)
    memory: MemoryBreakdown
    predicted: MemoryBreakdown
    checkpoint_bytes: int
    step_time: float                     # seconds, mean over the reported runs

    key = property(lambda self: self.setting.key)
    label = property(lambda self: self.setting.label)
    lr = property(lambda self: self.search.lr)
    runs = property(lambda self: self.search.reported)

    @property
    def accuracies(self) -> list[float]:
        return [r.test for r in self.runs]

    @property
    def test(self) -> Summary:
        return summary(self.accuracies)

    @property
    def mean(self) -> float:
        return self.test.mean

    @property
    def std(self) -> float:
        return self.test.std if len(self.runs) > 1 else 0.0

    @property
    def failed(self) -> int:
        """Failed runs by :data:`FAILED_RULE`."""
        median = statistics.median(self.accuracies)
        return sum(not math.isfinite(r.final_loss) or r.test < 0.5 * median for r in self.runs)

    @property
    def stable(self) -> bool:
        """:data:`STABLE_RULE`."""
        return self.failed == 0 and self.mean > 0 and self.std <= 0.05 and self.std <= 0.1 * self.mean

    @property
    def percent(self) -> float:
        """PEFT's trainable %: trainable / all parameters of the adapted model."""
        return 100 * self.trainable / self.total

    @property
    def forgetting(self) -> Summary:
        """Pretraining exact match lost to training: untrained minus trained, per seed (positive: forgot)."""
        return summary([u - t for u, t in zip(self.untrained_pretrain, self.trained_pretrain)])


def checkpoint_bytes(model, method: str) -> int:
    """Bytes on disk of what one task needs: the two files of ``save_adapter`` (a prefix is folded
    first: the reparameterisation MLP is dropped after training, as in the paper)."""
    if method == "prefix":
        model = fold_prefix(copy.deepcopy(model))
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d, method=method)
        return sum(f.stat().st_size for f in Path(d).iterdir())


def pretrain_tasks() -> dict[str, Task]:
    return {t: make_task(t, 0) for t in PRETRAIN_TASKS}


def pretrain_accuracy(model, n: int, tasks: dict[str, Task] | None = None) -> float:
    """Mean exact match over the pretraining tasks (``n`` validation examples each), whatever is switched on."""
    tasks = tasks or pretrain_tasks()
    return statistics.fmean(evaluate(model, t, max_examples=n) for t in tasks.values())


def run_setting(setting: Setting, config: CompareConfig, task: Task, base: Callable = load_base, cache=None,
                pretrain: dict[str, Task] | None = None) -> MethodResult:
    """One row: the search, the seeds, forgetting, memory, checkpoint size."""
    device = torch.device(config.device) if config.device else None
    build = setting.builder(base)
    search = lr_search(setting.spec, build, task, grid=setting.grid, steps=config.steps, seeds=config.seeds,
                       max_widen=config.max_widen, batch_size=config.batch_size, eval_examples=config.eval_examples,
                       device=device, keep_tensors=True, cache=cache)
    print(f"{setting.key}: lr {search.lr:g} chosen among {len(search.runs)} rates; test {search.test}")
    pretrain = pretrain or pretrain_tasks()
    untrained, trained = [], []
    for r in search.reported:
        untrained.append(pretrain_accuracy(_build(build, r.seed), config.forgetting_examples, pretrain))
        trained.append(pretrain_accuracy(r.restore(build), config.forgetting_examples, pretrain))
    model = _build(build, 0)
    seq_len = encode_batch(task.train)[0].shape[1]  # the longest training sequence
    name, options = setting.formula
    predicted = predict_memory(model.config, name, config.batch_size, seq_len, compute_dtype="fp32", **options)
    size = checkpoint_bytes(model, setting.method)
    memory = measure_memory(model, config.batch_size, seq_len)
    trainable, total = trainable_parameters(model)  # PEFT's count (a packed 4-bit byte holds two weights)
    return MethodResult(setting, search, untrained, trained, trainable, total, memory, predicted, size,
                        statistics.fmean(r.history.step_time for r in search.reported))


def run_comparison(config: CompareConfig | None = None, base: Callable | None = None, cache=None) -> list[MethodResult]:
    """Run every setting of ``config`` and return one :class:`MethodResult` each. ``base``: a function that
    returns a fresh base model (default: the shipped one; another base turns the cache off, since the
    cache key knows only the shipped checkpoint)."""
    config = config or (CompareConfig.quick() if QUICK else CompareConfig())
    if base is not None:
        cache = False
    task, pretrain = make_task(config.task, 0), pretrain_tasks()
    return [run_setting(SETTINGS[k], config, task, base or load_base, cache, pretrain) for k in config.methods]


# --- forgetting along training ----------------------------------------------------------------------

FORGETTING_RANKS = (2, 8, 32)


def forgetting_settings(ranks=FORGETTING_RANKS) -> dict[str, Setting]:
    """Full fine-tuning and LoRA (all linear layers) at several ranks, alpha = 2 r (scaling 2 at every rank)."""
    lora = {f"lora_r{r}": Setting(f"lora_r{r}", f"LoRA r={r} (all linear)", "lora", LORA_GRID,
                                  {"r": r, "alpha": 2 * r, "targets": "all-linear"}) for r in ranks}
    return {"full": SETTINGS["full"], **lora}


def forgetting_curves(settings: dict[str, Setting], lrs: dict[str, float], config: CompareConfig,
                      every: int, seed: int = 0, base: Callable | None = None, cache=None) -> dict[str, RunResult]:
    """Train each setting at its rate and score the new task and every pretraining task (val splits,
    ``config.forgetting_examples`` each) at step 0 (the method applied, untrained) and every ``every``
    steps: the learning-forgetting trade-off of Biderman et al. (2024). Returns the runs (``.track``)."""
    task = make_task(config.task, 0)
    track = {config.task: task, **pretrain_tasks()}
    device = torch.device(config.device) if config.device else None
    if base is not None:
        cache = False
    return {k: run(s.spec, s.builder(base or load_base), task, seed=seed, lr=lrs[k], steps=config.steps,
                   batch_size=config.batch_size, eval_examples=config.eval_examples, device=device,
                   track=track, track_every=every, track_examples=config.forgetting_examples, cache=cache)
            for k, s in settings.items()}
