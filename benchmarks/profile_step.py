"""Where one training step's time goes, for every method, on the shipped base (task sortdesc, batch 32).

    python benchmarks/profile_step.py              # ~2 minutes on 2 quiet CPU threads
    python benchmarks/profile_step.py --quick      # a smoke run
    python benchmarks/profile_step.py --ops        # also the top operators of each method (torch.profiler)

For each method one step is split into forward (the loss), backward, and the optimiser (gradient clipping
+ AdamW): three closures timed side by side with every other method's (``timing.interleaved``), so one
burst of load on the machine hits all of them in the same round; the ratio to full fine-tuning is the
median of the per-round ratios. Printed beside: the tokens the model runs on per row, the number of
operators the step dispatches (torch.profiler), and the saved activations (``measure_memory``).
Last, the cost of ``mp.train``'s own loop around the step (batching, learning-rate schedule, History).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from timing import interleaved, median, ratio

import minipeft as mp
from minipeft.train import loss_fn, train_step

METHODS = {
    "full fine-tuning": mp.full_finetune,
    "prompt tuning (20 tokens)": lambda m: mp.add_prompt_tuning(m, n_tokens=20),
    "prefix tuning (10, reparam)": lambda m: mp.add_prefix_tuning(m, n_prefix=10, reparam=True),
    "adapters (Houlsby 16)": lambda m: mp.add_adapters(m, bottleneck=16, placement="houlsby"),
    "LoRA r=8 q,v": lambda m: mp.add_lora(m, r=8, alpha=16, targets=("q_proj", "v_proj")),
    "LoRA r=8 all-linear": lambda m: mp.add_lora(m, r=8, alpha=16, targets="all-linear"),
    "QLoRA (NF4 + LoRA all-linear)": lambda m: mp.add_lora(mp.quantize_nf4(m), r=8, alpha=16, targets="all-linear"),
}
FULL = "full fine-tuning"


def build(name: str):
    torch.manual_seed(0)
    model = METHODS[name](mp.load_base()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))  # what mp.train uses
    return model, opt, params


def phases(model, opt, params, x, y) -> dict:
    """Three closures: the forward alone, forward + backward, and the whole step (what mp.train runs)."""
    def forward():  # with autograd recording, as in training (the graph is dropped unused)
        loss_fn(model, x, y)

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()

    return {"fwd": forward, "fwd+bwd": forward_backward, "step": lambda: train_step(model, opt, x, y, params)}


def operators(fn, steps: int = 3) -> tuple[int, list]:
    """Operators dispatched per call of ``fn`` and the top ones by self CPU time (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = prof.key_averages()
    n_ops = sum(e.count for e in events if e.key.startswith("aten::")) // steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return n_ops, [(e.key, e.count // steps, e.self_cpu_time_total / steps / 1e3) for e in top]


def loop_overhead(task, batch_size: int, steps: int, repeats: int) -> dict:
    """Per step of ``mp.train`` on full fine-tuning: its History's step time vs the bare train_step on
    the same batches (drawn as train draws them), alternated ``repeats`` times."""
    from minipeft.tasks import IGNORE
    texts = task.train
    X, Y = mp.encode_batch(texts)
    lengths = (Y != IGNORE).int().cumsum(1).argmax(1) + 1
    rows = torch.randint(len(texts), (steps, batch_size), generator=torch.Generator().manual_seed(0))
    T = lengths[rows].amax(1).tolist()
    loop, bare = [], []
    for _ in range(repeats):
        model, opt, params = build(FULL)
        hist = mp.train(model, task, steps=steps, lr=1e-4, batch_size=batch_size, seed=0, device="cpu",
                        progress=False)
        loop.append(hist.step_time)
        model, opt, params = build(FULL)
        t0 = time.perf_counter()
        for s in range(steps):
            train_step(model, opt, X[rows[s], :T[s]], Y[rows[s], :T[s]], params)
        bare.append((time.perf_counter() - t0) / steps)
    return dict(loop=statistics.median(loop), bare=statistics.median(bare),
                ratio=statistics.median(a / b for a, b in zip(loop, bare)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ops", action="store_true", help="print each method's top operators")
    ap.add_argument("--cpu-time", action="store_true",
                    help="count process CPU time instead of wall time (steadier on a crowded machine, use 1 thread)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, to check that it runs")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    task = mp.make_task("sortdesc", seed=0)
    x, y = mp.encode_batch(task.train[:args.batch_size])  # (B, T): what mp.train feeds, padded to the longest
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, task sortdesc, batch {tuple(x.shape)}, "
          f"{rounds} interleaved rounds (median), {'CPU' if args.cpu_time else 'wall'} time, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    built = {name: build(name) for name in METHODS}
    fns, info = {}, {}
    for name, (model, opt, params) in built.items():
        for phase, fn in phases(model, opt, params, x, y).items():
            fns[(name, phase)] = fn
        n_ops, top = operators(fns[(name, "step")])
        mem = mp.measure_memory(model, batch=(x, y))
        tokens = x.shape[1] + (20 if name.startswith("prompt") else 0)
        info[name] = dict(ops=n_ops, top=top, act=mem.activations, trainable=len(params), tokens=tokens)
    keys = list(fns)
    times = interleaved({k: fns[k] for k in keys}, rounds, number=3, warmup=2,
                        clock=time.process_time if args.cpu_time else time.perf_counter)

    def ms(name, phase):
        return 1e3 * median(times, (name, phase))

    print(f"\n{'method':32s} {'step ms':>8s} {'/ full':>7s} {'fwd':>7s} {'bwd':>7s} {'optim':>7s} "
          f"{'ops/step':>8s} {'tensors':>7s} {'tokens':>6s} {'activ. MiB':>10s}")
    for name in METHODS:
        fwd, fb, step = ms(name, "fwd"), ms(name, "fwd+bwd"), ms(name, "step")
        i = info[name]
        print(f"{name:32s} {step:8.1f} {ratio(times, (name, 'step'), (FULL, 'step')):7.3f} {fwd:7.1f} "
              f"{fb - fwd:7.1f} {step - fb:7.1f} {i['ops']:8d} {i['trainable']:7d} {i['tokens']:6d} "
              f"{i['act'] / 2**20:10.2f}")
    print("(fwd: the loss; bwd: fwd+bwd minus fwd; optim: the step minus fwd+bwd = clipping + AdamW; "
          "tensors: trainable parameter tensors AdamW loops over; a difference of medians, so a small one "
          "can come out slightly negative)")
    if args.ops:
        for name in METHODS:
            print(f"\n{name}: top operators by self time per step (wall clock under the profiler, which "
                  "slows small operators: compare counts and order, not the milliseconds with the table)")
            for key, count, t in info[name]["top"]:
                print(f"  {key:40s} x{count:<4d} {t:7.2f} ms")
    o = loop_overhead(task, args.batch_size, steps=10 if args.quick else 40, repeats=2 if args.quick else 3)
    print(f"\nmp.train loop, full fine-tuning: {1e3 * o['loop']:.1f} ms/step (History.step_time) vs the bare "
          f"train_step on the same batches {1e3 * o['bare']:.1f} ms/step: ratio {o['ratio']:.3f}")


if __name__ == "__main__":
    main()
