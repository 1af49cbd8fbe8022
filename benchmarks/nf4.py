"""NF4 speed, measured side by side in one run.

1. quantise and dequantise time: ``minipeft.nf4`` (pure PyTorch) vs bitsandbytes' CPU backend (whose
   ``quantize_4bit`` is also PyTorch, and whose ``dequantize_4bit`` is a compiled C kernel), and vs
   the quantiser as it was before it was made faster (kept here only, for the comparison);
2. what a pure-PyTorch dequantise can reach: its two unavoidable steps (one look-up per byte, one
   multiply by the block's absmax) timed alone;
3. the forward time of ``minipeft.Linear4bit`` (dequantise, then matmul) vs an fp32 ``nn.Linear``.

    python benchmarks/nf4.py            # prints a table of times and ratios
    python benchmarks/nf4.py --size 4096 --repeat 5

Timings are the median of ``--repeat`` runs after a warm-up; use ``OMP_NUM_THREADS`` to fix the threads.
Our quantiser's comparisons run on one thread (small cache-sized chunks), bitsandbytes' ``bucketize``
on all of them: compare at ``OMP_NUM_THREADS=1`` for the work done, at the default for wall time.
Dequantise times depend a lot on the allocator (a fresh 4-byte-per-value output each call) and on
other load on the machine: read them as ranges over a few runs.
Every quantiser's bytes are compared with bitsandbytes' and the line says whether they are identical.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft import nf4
from minipeft.qlora import Linear4bit, NF4Config


def quantize_before(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False, quant_type: str = "nf4"):
    """``nf4.quantize`` before the speed-up: ``abs().amax``, counting in bool/uint8 (15 comparisons per
    64K chunk), a byte-sum checksum. Same bytes, same rounding; double quantisation as now (1/64 of the work)."""
    flat = x.reshape(-1).float()
    flat = F.pad(flat, (0, -flat.numel() % blocksize))
    blocks = flat.view(-1, blocksize)                                  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("x contains NaN or infinite values")
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)[: x.numel()]
    scaled = F.pad(scaled, (0, x.numel() % 2))
    code = nf4.CODEBOOKS[quant_type]
    order = torch.argsort(code, stable=True)
    levels = code[order]
    edges = (levels[:-1] + levels[1:]) / 2
    idx = torch.zeros(scaled.shape, dtype=torch.uint8)
    for chunk, out in zip(scaled.split(1 << 16), idx.split(1 << 16)):
        for edge in edges.tolist():
            out += chunk > edge
    codes = idx if torch.equal(order, torch.arange(16)) else order.to(torch.uint8)[idx.long()]
    packed = (codes[0::2] << 4) | codes[1::2]
    checksum = int(packed.sum(dtype=torch.int64))
    if double_quant:
        offset = absmax.mean()
        absmax, absmax2 = nf4.quantize_blockwise_8bit(absmax - offset)
    return packed, checksum


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


def row(name: str, ours: float, theirs: float | None, n: int, theirs_name: str, note: str = "") -> None:
    if theirs is None:
        print(f"{name:34s} {1e3 * ours:9.2f} ms  {n / ours / 1e6:8.1f} M/s   ({theirs_name}: not installed){note}")
    else:
        print(f"{name:34s} {1e3 * ours:9.2f} ms  {n / ours / 1e6:8.1f} M/s   {theirs_name} {1e3 * theirs:9.2f} ms"
              f"   time ratio = {ours / theirs:5.2f}{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="the weight is size x size")
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--batch", type=int, default=64, help="rows of x for the forward benchmark")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size)
    n = w.numel()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU kernels "
          f"{torch.backends.cpu.get_cpu_capability()}, weight {args.size} x {args.size}")
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
        before = quantize_before(w, 64, double_quant=dq)[0]
        quant = [lambda: nf4.quantize(w, 64, double_quant=dq), lambda: quantize_before(w, 64, double_quant=dq)]
        dequant = [lambda: nf4.dequantize(packed, state, check=False)]
        if bnbf is not None:
            with torch._dynamo.config.patch(disable=True):
                p, s = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            quant.append(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq))
            dequant.append(lambda: bnbf.dequantize_4bit(p, s))
        with torch._dynamo.config.patch(disable=True):  # bitsandbytes eager, as ours: no compile time
            ours_q, before_q, theirs_q = (timeit(*quant, repeat=args.repeat) + [None])[:3]
            ours_d, theirs_d = (timeit(*dequant, repeat=args.repeat) + [None])[:2]
        same = "" if bnbf is None else (
            f"   bytes == bitsandbytes: {torch.equal(packed, p.view(-1))}, before: {torch.equal(before, p.view(-1))}")
        row(f"quantize nf4{tag}", ours_q, theirs_q, n, "bitsandbytes", same)
        row(f"  before the speed-up{tag}", before_q, theirs_q, n, "bitsandbytes",
            f"   now/before time = {ours_q / before_q:5.2f}")
        row(f"dequantize nf4{tag}", ours_d, theirs_d, n, "bitsandbytes")

    # what any pure-PyTorch dequantise must do: one look-up per byte (both of its levels as one 64-bit
    # word), one multiply by the block's absmax. Timed alone, these are its floor.
    packed, state = nf4.quantize(w, 64)
    pairs = nf4.CODEBOOKS["nf4"][nf4.unpack(torch.arange(256, dtype=torch.uint8))].view(torch.int64)
    index = packed.int()
    values = pairs.index_select(0, index).view(torch.float32).view(-1, 64)
    t_lookup, t_scale = timeit(lambda: pairs.index_select(0, index), lambda: values * state.absmax[:, None],
                               repeat=args.repeat)
    floor = t_lookup + t_scale
    row("  pure-PyTorch floor: lookup+scale", floor, theirs_d if bnbf else None, n, "bitsandbytes",
        f"   (lookup {1e3 * t_lookup:.2f} ms + scale {1e3 * t_scale:.2f} ms)")

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
