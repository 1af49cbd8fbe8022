"""NF4 speed, measured side by side in one run.

1. quantise and dequantise throughput: ``minipeft.nf4`` (pure PyTorch) vs bitsandbytes' CPU backend
   (whose ``quantize_4bit`` is also PyTorch, and whose ``dequantize_4bit`` is a compiled C kernel);
2. the forward time of ``minipeft.Linear4bit`` (dequantise, then matmul) vs an fp32 ``nn.Linear``.

    python benchmarks/nf4.py            # prints a table of times and ratios
    python benchmarks/nf4.py --size 1024 --repeat 5

Timings are the median of ``--repeat`` runs after a warm-up; use ``OMP_NUM_THREADS`` to fix the threads.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from minipeft import nf4
from minipeft.qlora import Linear4bit, NF4Config


def timeit(*fns, repeat: int) -> list[float]:
    """Median seconds of each function; the functions take turns, so a busy machine slows all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def row(name: str, ours: float, theirs: float | None, n: int, theirs_name: str) -> None:
    if theirs is None:
        print(f"{name:34s} {1e3 * ours:9.2f} ms  {n / ours / 1e6:8.1f} M/s   ({theirs_name}: not installed)")
    else:
        print(f"{name:34s} {1e3 * ours:9.2f} ms  {n / ours / 1e6:8.1f} M/s   {theirs_name} {1e3 * theirs:9.2f} ms"
              f"   ours/theirs time = {ours / theirs:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="the weight is size x size")
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--batch", type=int, default=64, help="rows of x for the forward benchmark")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size)
    n = w.numel()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), weight {args.size} x {args.size}")
    try:
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns about optional CPU kernels
        import bitsandbytes.functional as bnbf
        print(f"bitsandbytes {__import__('bitsandbytes').__version__}")
    except ImportError:
        bnbf = None

    for dq in (False, True):
        tag = " + double quant" if dq else ""
        packed, state = nf4.quantize(w, 64, double_quant=dq)
        quant = [lambda: nf4.quantize(w, 64, double_quant=dq)]
        dequant = [lambda: nf4.dequantize(packed, state, check=False)]
        if bnbf is not None:
            p, s = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            quant.append(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq))
            dequant.append(lambda: bnbf.dequantize_4bit(p, s))
        with torch._dynamo.config.patch(disable=True):  # bitsandbytes eager, as ours: no compile time
            ours_q, theirs_q = (timeit(*quant, repeat=args.repeat) + [None])[:2]
            ours_d, theirs_d = (timeit(*dequant, repeat=args.repeat) + [None])[:2]
        row(f"quantize nf4{tag}", ours_q, theirs_q, n, "bitsandbytes")
        row(f"dequantize nf4{tag}", ours_d, theirs_d, n, "bitsandbytes")

    linear = nn.Linear(args.size, args.size)
    layer = Linear4bit.from_linear(linear, NF4Config(double_quant=True))
    x = torch.randn(args.batch, args.size)
    with torch.no_grad():
        t_4bit, t_fp32 = timeit(lambda: layer(x), lambda: linear(x), repeat=args.repeat)
    print(f"{'forward, batch ' + str(args.batch):34s} Linear4bit {1e3 * t_4bit:9.2f} ms   nn.Linear fp32 "
          f"{1e3 * t_fp32:9.2f} ms   4bit/fp32 time = {t_4bit / t_fp32:5.2f}")
    fp32_bytes = linear.weight.numel() * 4
    print(f"{'weight bytes':34s} Linear4bit {layer.storage_bits() * n / 8:9.0f} B    nn.Linear fp32 "
          f"{fp32_bytes:9d} B    ratio = {layer.storage_bits() / 32:5.3f}")


if __name__ == "__main__":
    main()
