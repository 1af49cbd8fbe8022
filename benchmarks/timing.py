"""The one timing harness of the benchmarks: functions timed side by side, in turn, over many rounds.

Each round calls every function ``number`` times in turn and records its seconds per call, so a burst of
other work on the machine slows every variant of that round alike; the median of the per-round ratios
(:func:`ratio`) is then a fair comparison even on a busy machine.

    times = interleaved({"full": step_full, "lora": step_lora}, rounds=21)
    print(ratio(times, "lora", "full"), median(times, "full"))
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, number: int | None = None,
                seconds: float = 0.05, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
                ) -> dict[str, list[float]]:
    """Seconds per call of each function, ``{name: [one figure per round]}``, functions timed in turn.

    ``number`` calls per figure; ``None`` sizes it per function so that a figure takes about ``seconds``.
    ``warmup`` untimed calls of each function first (allocator, caches, lazy initialisation).
    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU time instead, which
    other programs on a crowded machine barely disturb (on one thread; with more it adds the threads up).
    """
    if not fns or rounds < 1:
        raise ValueError("need at least one function and one round")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    counts = {}
    for name, fn in fns.items():
        if number is not None:
            counts[name] = number
            continue
        t0 = clock()
        fn()
        _sync()
        counts[name] = max(1, int(seconds / max(clock() - t0, 1e-9)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(counts[name]):
                fn()
            _sync()
            times[name].append((clock() - t0) / counts[name])
    return times


def median(times: dict[str, list[float]], name: str) -> float:
    """Median seconds per call of ``name``."""
    return statistics.median(times[name])


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``time(a) / time(b)``, each ratio taken within one round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))
