"""The experiment protocol that the notebooks and ``compare`` share: runs, learning-rate search, seeds,
intervals, paired comparisons and verdicts.

* **splits**: ``train`` learns, ``val`` chooses (the learning rate), ``test`` reports (``make_task``);
* **a run** (:func:`run`): a fresh model from ``build()`` under ``torch.manual_seed(seed)``, trained by
  :func:`minipeft.train`, scored by exact match on val and test; loaded from the cache when it was made
  before (:mod:`minipeft.cache`);
* **learning-rate search at the final budget** (:func:`lr_search`): a log grid of at least 5 points,
  widened by one grid step beyond an edge while the best point is at that edge; chosen on val; the
  search's runs at the chosen rate are reused as the first seeds of the reported point;
* **summary**: mean, sample std ``s = sqrt(sum (x - mean)^2 / (n - 1))`` and the Student-t 95 % interval
  ``mean +- t_{0.975, n-1} s / sqrt(n)``;
* **paired comparison** of two settings run on the same seeds: the interval of the differences;
* **verdict**: a measured interval against a claimed range, by the rule in :func:`verdict`;
* **trainable %**: PEFT's, ``100 * trainable / all parameters`` of the adapted model.

A run is described by a JSON-able ``spec`` (what the cache key records) and a ``build`` that makes it
(``build()``, or ``build(seed)`` for a method with its own ``seed`` option, such as adapters)::

    spec = {"method": "lora", "r": 8, "alpha": 16}
    build = lambda: mp.add_lora(mp.load_base(), r=8, alpha=16)
    search = lr_search(spec, build, mp.make_task("rotate"), grid=log_grid(1e-3, 1e-1), steps=400, seeds=3)
    search.lr, search.test          # chosen on val; test exact match: mean, std, 95 % interval
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .cache import Cache, canonical, run_inputs
from .full import trainable_parameters
from .tasks import Task
from .train import History, NonFiniteStep, default_device, evaluate, train


def trainable_percent(model: nn.Module) -> float:
    """PEFT's trainable %: ``100 * trainable / total``, both counted on the adapted model."""
    trainable, total = trainable_parameters(model)
    return 100 * trainable / total


# --- statistics ------------------------------------------------------------------------------------

# t_{0.975, df} for df = 1..30: NIST/SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.2,
# "Critical values of the Student's t distribution" (upper-tail probability 0.025).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
Z975 = 1.959964  # the normal quantile Phi^{-1}(0.975)


def t975(df: int) -> float:
    """Student's t quantile t_{0.975, df}: the table up to df 30, then the expansion around the normal
    quantile z of Abramowitz & Stegun 26.7.5: ``t = z + g1(z)/df + g2(z)/df^2 + g3(z)/df^3``."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof 1) and the 95 % t-interval ``[lo, hi]`` of ``n`` values (n = 1: no interval)."""
    mean: float
    std: float
    lo: float
    hi: float
    n: int

    def __str__(self):
        if self.n < 2:
            return f"{self.mean:.3f} (n=1, no interval)"
        return f"{self.mean:.3f} ± {self.std:.3f} (95 % CI {self.lo:.3f} to {self.hi:.3f}, n={self.n})"


def summary(values) -> Summary:
    """:class:`Summary` of ``values``: ``summary([0.8, 0.9, 1.0])`` is 0.900 ± 0.100, CI 0.652 to 1.148."""
    xs = [float(v) for v in values]
    if not xs or not all(math.isfinite(x) for x in xs):
        raise ValueError(f"values must be a non-empty list of finite numbers, got {values!r}")
    n, mean = len(xs), math.fsum(xs) / len(xs)
    if n == 1:
        return Summary(mean, math.nan, -math.inf, math.inf, 1)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return Summary(mean, std, mean - half, mean + half, n)


@dataclass(frozen=True)
class Paired:
    """Setting A against setting B on the same seeds: the verdict and the summary of ``a_i - b_i``."""
    verdict: str
    difference: Summary
    names: tuple[str, str]

    @property
    def n(self) -> int:
        return self.difference.n

    def __str__(self):
        d = self.difference
        return (f"{self.verdict}: {self.names[0]} - {self.names[1]} = {d.mean:+.3f} "
                f"(95 % CI {d.lo:+.3f} to {d.hi:+.3f}, n={d.n} paired)")


def paired(a, b, names: tuple[str, str] = ("A", "B")) -> Paired:
    """Compare ``a`` and ``b`` (higher is better; pair i is the same seed) by the interval of ``a - b``.

    Rule: the 95 % t-interval of the mean difference entirely above 0 -> "<A> better"; entirely below
    0 -> "<B> better"; containing 0 -> "no measurable difference at this n".
    """
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be paired: the same non-zero number of values, got {len(a)} and {len(b)}")
    d = summary([x - y for x, y in zip(a, b)])
    if d.lo > 0:
        word = f"{names[0]} better"
    elif d.hi < 0:
        word = f"{names[1]} better"
    else:
        word = "no measurable difference at this n"
    return Paired(word, d, tuple(names))


VERDICT_RULE = ("agrees: the 95 % interval lies inside the claimed range; better than claimed / differs: "
                "it lies wholly on the better / the other side of it; inconclusive: it overlaps the range "
                "but reaches outside")


def verdict(measured, claimed: tuple[float, float], higher_is_better: bool | None = True) -> str:
    """Judge a claim from a measurement. ``measured``: a :class:`Summary`, a ``(lo, hi)`` interval or
    one exact number; ``claimed``: the range ``(c_lo, c_hi)`` the claim allows (``math.inf`` for one side).

    Rule, with the measured 95 % interval ``[lo, hi]``:
    "agrees" if ``c_lo <= lo`` and ``hi <= c_hi``; "better than claimed" if the whole interval is on the
    better side of the range (``lo > c_hi`` when higher is better, ``hi < c_lo`` when lower is better);
    "differs" if it is wholly on the other side (either side when ``higher_is_better`` is None);
    "inconclusive" otherwise: it overlaps the claimed range but reaches outside it (more seeds can tell).
    """
    if isinstance(measured, Summary):
        lo, hi = measured.lo, measured.hi
    elif isinstance(measured, numbers.Real):
        lo = hi = float(measured)
    else:
        lo, hi = (float(v) for v in measured)
    c_lo, c_hi = (float(v) for v in claimed)
    if not (lo <= hi and c_lo <= c_hi):
        raise ValueError(f"intervals must have lo <= hi, got measured ({lo}, {hi}) and claimed ({c_lo}, {c_hi})")
    if c_lo <= lo and hi <= c_hi:
        return "agrees"
    above, below = lo > c_hi, hi < c_lo
    if (above and higher_is_better is True) or (below and higher_is_better is False):
        return "better than claimed"
    if above or below:
        return "differs"
    return "inconclusive"


def print_verdict(claim: str, measured, claimed: tuple[float, float], higher_is_better: bool | None = True) -> str:
    """Print one line ``verdict: <word> | <claim> | measured ... | claimed ...`` with the rule; return the word."""
    word = verdict(measured, claimed, higher_is_better)
    if isinstance(measured, float):          # 4 significant digits, not float noise (-0.0010000000000000009)
        measured = f"{measured:.4g}"
    elif isinstance(measured, tuple):
        measured = "(" + ", ".join(f"{v:.4g}" for v in measured) + ")"
    print(f"verdict: {word} | {claim} | measured {measured} | claimed {claimed[0]:g} to {claimed[1]:g} "
          f"| rule: {VERDICT_RULE}")
    return word


# --- runs --------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One training run: its history, exact match on val (chooses) and test (reports), and optionally
    its trainable tensors by name (``keep_tensors=True``). ``cached``: loaded rather than trained."""
    spec: dict
    seed: int
    lr: float
    history: History
    val: float
    test: float | None             # None when the task has no test split
    seconds: float                 # training time
    trainable: int
    total: int
    tensors: dict[str, torch.Tensor] | None = None
    cached: bool = False
    track: dict[str, list] | None = None  # with ``track=``: "step" and each tracked task's val exact match

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last 10 steps (nan or inf if the run diverged)."""
        return sum(self.history.loss[-10:]) / max(len(self.history.loss[-10:]), 1)

    def restore(self, build: Callable[[], nn.Module]) -> nn.Module:
        """``build()`` again (same seed) and load the kept tensors into it: the trained model."""
        if self.tensors is None:
            raise ValueError("this run kept no tensors; run it with keep_tensors=True")
        model = _build(build, self.seed)
        params = dict(model.named_parameters())
        missing = sorted(set(self.tensors) - set(params))
        if missing:
            raise ValueError(f"the built model has no parameters {missing}; is it the same method?")
        with torch.no_grad():
            for name, t in self.tensors.items():
                params[name].copy_(t)
        return model


def _build(build: Callable, seed: int) -> nn.Module:
    """``build(seed)`` if it takes an argument (for a method's own ``seed`` option), else ``build()``;
    under ``torch.manual_seed(seed)`` either way (LoRA's A follows it)."""
    torch.manual_seed(seed)
    return build(seed) if inspect.signature(build).parameters else build()


def _cache(cache) -> Cache:
    if isinstance(cache, Cache):
        return cache
    return Cache() if cache is None else Cache(enabled=bool(cache))


def run(spec: dict, build: Callable[[], nn.Module], task: Task, *, seed: int, lr: float, steps: int,
        batch_size: int = 32, warmup: int | None = None, weight_decay: float = 0.0, eval_every: int = 0,
        eval_examples: int | None = 1000, device=None, keep_tensors: bool = False, cache=None,
        progress: bool = False, track: dict[str, Task] | None = None, track_every: int = 0,
        track_examples: int = 200, announce: bool = True) -> RunResult:
    """Train ``build()`` (a fresh model with the method applied; ``spec`` describes it as JSON) on
    ``task`` and score it, or load the same run from the cache. ``cache``: None = the default
    :class:`~minipeft.cache.Cache` (off when ``MINIPEFT_CACHE=0``), False = off, or a Cache.
    ``announce``: print a line when the run is loaded from the cache (a search says it once for all its runs).

    ``track``: tasks by name, scored (exact match on ``track_examples`` val examples each) before the
    first step, every ``track_every`` steps and at the end, into ``RunResult.track`` (the steps' time
    then includes these evaluations). A run whose loss or gradient became non-finite stops there
    (the weights as before that step); its final loss is nan and it is scored as it stands."""
    if not isinstance(spec, dict):
        raise TypeError(f"spec must be a dict describing the method, got {type(spec).__name__}")
    try:
        canonical(spec)
    except (TypeError, ValueError) as e:
        raise TypeError(f"spec must be JSON-able (numbers, strings, lists, dicts): {e}") from None
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task from make_task(), got {type(task).__name__}")
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    device = torch.device(device) if device is not None else default_device()
    warmup = max(1, steps // 10) if warmup is None else warmup  # train()'s default, made explicit for the key
    largest = max(len(task.val), len(task.test))
    eval_examples = largest if eval_examples is None else min(eval_examples, largest)  # more changes nothing
    args = dict(seed=seed, lr=float(lr), steps=steps, batch_size=batch_size, warmup=warmup,
                weight_decay=float(weight_decay), eval_every=eval_every, eval_examples=eval_examples)
    if track:
        if not (isinstance(track, dict) and all(isinstance(t, Task) for t in track.values())):
            raise TypeError("track must be a dict of name -> Task")
        if not isinstance(track_every, int) or track_every <= 0:
            raise ValueError(f"track_every must be a positive integer with track, got {track_every!r}")
        args["track"] = {k: [t.name, t.seed, len(t.val)] for k, t in track.items()}
        args.update(track_every=track_every, track_examples=track_examples)
    inputs, cache = run_inputs(spec, task, args, device), _cache(cache)
    hit = cache.load(inputs, need_tensors=keep_tensors)
    if hit is not None:
        record, tensors = hit
        m = record["metrics"]
        if announce:
            print(f"loaded from cache: {canonical(spec)} on {task.name} (seed {seed}, lr {lr:g}, {steps} steps)")
        return RunResult(spec, seed, float(lr), History(**record["history"]), m["val"], m["test"], m["seconds"],
                         m["trainable"], m["total"], tensors if keep_tensors else None, cached=True,
                         track=m.get("track"))
    model = _build(build, seed)
    curve, hook = _tracker(model, track, track_every, track_examples) if track else (None, None)
    try:
        hist = train(model, task, steps, lr, batch_size, seed=seed, warmup=warmup, weight_decay=weight_decay,
                     eval_every=eval_every, device=device, progress=progress)
    except NonFiniteStep as e:
        print(f"run {canonical(spec)} seed {seed} lr {lr:g}: diverged ({e})"[:300])
        hist = History(loss=[math.nan])
    finally:
        if hook is not None:
            hook.remove()
    if curve is not None and curve["step"][-1] != steps:
        _score(model, track, track_examples, curve, steps)
    val = evaluate(model, task, "val", max_examples=eval_examples)
    test = evaluate(model, task, "test", max_examples=eval_examples) if task.test else None
    trainable, total = trainable_parameters(model)
    tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = dict(val=val, test=test, seconds=hist.seconds, trainable=trainable, total=total, track=curve)
    cache.save(inputs, {"history": dataclasses.asdict(hist), "metrics": metrics}, tensors)  # always: any later
    # caller may restore the run (a few MiB at most on the toy model)
    return RunResult(spec, seed, float(lr), hist, val, test, hist.seconds, trainable, total,
                     tensors if keep_tensors else None, track=curve)


def _score(model, tasks, n, curve, step):
    curve["step"].append(step)
    for name, t in tasks.items():
        curve[name].append(evaluate(model, t, "val", max_examples=n))


def _tracker(model, tasks, every, n):
    """A forward pre-hook that scores ``tasks`` before training forward number 0, every, 2 every, ...
    (evaluation runs the model in eval mode, which the hook ignores)."""
    curve, calls = {"step": [], **{name: [] for name in tasks}}, [0]

    def hook(module, args):
        if module.training and torch.is_grad_enabled():
            if calls[0] % every == 0:
                _score(module, tasks, n, curve, calls[0])
            calls[0] += 1
    return curve, model.register_forward_pre_hook(hook)


# --- learning-rate search -------------------------------------------------------------------------


def log_grid(lo: float, hi: float, n: int = 5) -> list[float]:
    """``n`` points from ``lo`` to ``hi`` evenly spaced in log, to 3 significant digits:
    ``log_grid(1e-3, 1e-1)`` is ``[0.001, 0.00316, 0.01, 0.0316, 0.1]``."""
    if not (0 < lo < hi) or n < 2:
        raise ValueError(f"need 0 < lo < hi and n >= 2, got lo={lo}, hi={hi}, n={n}")
    return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)]


def grid_search(grid, score: Callable[[float], object], max_widen: int = 4):
    """Score every point of ``grid`` (at least 5 increasing positive values); while the best point is the
    lowest (highest), add one grid step below (above) it, at most ``max_widen`` times. A grid step is the
    grid's mean ratio ``(grid[-1] / grid[0]) ** (1 / (len(grid) - 1))``; new points keep 3 significant
    digits. Returns ``(scores by point, best point, best still at an edge)``."""
    grid = [float(g) for g in grid]
    if len(grid) < 5 or grid[0] <= 0 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"grid must hold at least 5 increasing positive values, got {grid}")
    step = (grid[-1] / grid[0]) ** (1 / (len(grid) - 1))
    scores = {g: score(g) for g in grid}
    below = above = 0  # grid steps added beyond each edge
    while True:
        points = sorted(scores)
        best = max(points, key=lambda p: scores[p])  # a tie goes to the lowest point
        if best not in (points[0], points[-1]):
            return scores, best, False
        if below + above == max_widen:
            return scores, best, True
        if best == points[0]:
            below += 1
            new = grid[0] / step ** below
        else:
            above += 1
            new = grid[-1] * step ** above
        scores[float(f"{new:.3g}")] = score(float(f"{new:.3g}"))


@dataclass
class Search:
    """A learning-rate search: the runs at each rate, the rate chosen on val, the reported seeds."""
    spec: dict
    lr: float                                # chosen on the validation split
    runs: dict[float, list[RunResult]]       # the search: each rate and its runs (the first seeds)
    reported: list[RunResult]                # every seed at ``lr`` (the search's runs there reused)
    at_edge: bool                            # the best rate was still at an edge when widening stopped

    @property
    def test(self) -> Summary:
        """The reported number: exact match on the test split over the seeds at the chosen rate."""
        if any(r.test is None for r in self.reported):
            raise ValueError("the task has no test split (make_task(..., n_test=0)): nothing to report")
        return summary([r.test for r in self.reported])

    def __repr__(self):
        vals = ", ".join(f"{lr:g}: {statistics.fmean(r.val for r in rs):.3f}" for lr, rs in self.runs.items())
        edge = " (still at the grid's edge)" if self.at_edge else ""
        test = self.test if all(r.test is not None for r in self.reported) else "n/a"
        return f"Search(val by lr {{{vals}}}, chosen lr {self.lr:g}{edge}, test {test})"


def lr_search(spec: dict, build: Callable[[], nn.Module], task: Task, *, grid, steps: int, seeds=3,
              search_seeds: int = 1, max_widen: int = 4, **run_args) -> Search:
    """Search the learning rate at the final budget ``steps`` and report the chosen one over ``seeds``.

    Every rate of ``grid`` (widened by :func:`grid_search`) trains on the first ``search_seeds`` seeds;
    the rate with the best mean val exact match wins (a tie goes to the lower final training loss; a
    diverged run scores -1). The chosen rate's search runs are the first of its ``seeds`` (an int n
    means seeds 0..n-1); only the rest are trained. ``run_args`` go to :func:`run`.
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not 1 <= search_seeds <= len(seeds):
        raise ValueError(f"search_seeds must be between 1 and the number of seeds ({len(seeds)}), got {search_seeds}")
    runs: dict[float, list[RunResult]] = {}

    def score(lr):
        runs[lr] = [run(spec, build, task, seed=s, lr=lr, steps=steps, announce=False, **run_args)
                    for s in seeds[:search_seeds]]
        loss = statistics.fmean(r.final_loss for r in runs[lr])
        if not math.isfinite(loss):
            return (-1.0, -math.inf)
        return (statistics.fmean(r.val for r in runs[lr]), -loss)

    _, lr, at_edge = grid_search(grid, score, max_widen)
    reported = runs[lr] + [run(spec, build, task, seed=s, lr=lr, steps=steps, announce=False, **run_args)
                           for s in seeds[search_seeds:]]
    every = [r for rs in runs.values() for r in rs] + reported[search_seeds:]
    if any(r.cached for r in every):
        print(f"loaded from cache: {sum(r.cached for r in every)} of the {len(every)} runs of the search "
              f"{canonical(spec)} on {task.name} ({steps} steps)")
    if at_edge:
        print(f"lr_search: the best learning rate {lr:g} is still at the edge of the grid after "
              f"{max_widen} widenings; the optimum may lie beyond it")
    return Search(spec, lr, dict(sorted(runs.items())), reported, at_edge)
