"""Prompt tuning, prefix tuning and bottleneck adapters against full fine-tuning, on one task, in one run.

For each method: trainable parameters (count and % of the base), exact match mean +- std over seeds
at the learning rate picked by a short sweep, and the time of one training step relative to full
fine-tuning. Same task, steps and batch size for all.

    python benchmarks/prompt_prefix_adapters.py            # ~15 minutes on 2 busy CPU cores
    python benchmarks/prompt_prefix_adapters.py --quick    # a smoke run

The learning rate is picked on seed 0 with ``--sweep-steps`` steps, then every seed trains ``--steps``.
Step times are interleaved (one step of each method in turn, many rounds) and the median of the
per-round ratios is reported, so a machine busy with other work slows every method alike.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from timing import interleaved, median, ratio

import minipeft as mp
from minipeft.train import train_step

METHODS = {  # name: (apply, learning rates to sweep)
    "full fine-tuning": (mp.full_finetune, (3e-4, 1e-3, 3e-3)),
    "prompt tuning (20 tokens)": (lambda m, s: mp.add_prompt_tuning(m, n_tokens=20, seed=s), (1e-2, 3e-2, 1e-1)),
    "prefix tuning (10, reparam)": (lambda m, s: mp.add_prefix_tuning(m, n_prefix=10, seed=s), (3e-3, 1e-2, 3e-2)),
    "adapters (Houlsby, 16)": (lambda m, s: mp.add_adapters(m, bottleneck=16, seed=s), (1e-3, 3e-3, 1e-2)),
}


def make(name: str, seed: int):
    apply = METHODS[name][0]
    model = mp.load_base()
    return apply(model) if apply is mp.full_finetune else apply(model, seed)


def run(name, task, lr, steps, batch_size, seed) -> float:
    model = make(name, seed)
    mp.train(model, task, steps=steps, lr=lr, batch_size=batch_size, seed=seed, device="cpu", progress=False)
    return mp.evaluate(model, task)


def step_times(task, batch_size: int, rounds: int) -> dict:
    """Seconds per training step of each method, one figure per round, methods interleaved."""
    x, y = mp.encode_batch(task.train[:batch_size])
    steps = {}
    for name in METHODS:
        model = make(name, 0).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
        steps[name] = lambda model=model, opt=opt, params=params: train_step(model, opt, x, y, params)
    return interleaved(steps, rounds, number=5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="rotate")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--sweep-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny numbers, to check that it runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.sweep_steps, args.seeds, args.rounds = 10, 5, 2, 2
    torch.manual_seed(0)
    task = mp.make_task(args.task, seed=0)
    n_base = sum(p.numel() for p in mp.load_base().parameters())
    print(f"task {args.task}, {args.steps} steps (sweep: {args.sweep_steps}), batch {args.batch_size}, "
          f"{args.seeds} seeds, {torch.get_num_threads()} threads", flush=True)

    results = {}
    for name, (_, lrs) in METHODS.items():
        sweep = {lr: run(name, task, lr, args.sweep_steps, args.batch_size, 0) for lr in lrs}
        lr = max(sweep, key=sweep.get)  # the first best on ties
        accs = [run(name, task, lr, args.steps, args.batch_size, s) for s in range(args.seeds)]
        trainable, _ = mp.trainable_parameters(make(name, 0))
        results[name] = dict(sweep=sweep, lr=lr, accs=accs, trainable=trainable)
        print(f"  {name}: sweep {', '.join(f'{k:g}: {v:.3f}' for k, v in sweep.items())} -> lr {lr:g}; "
              f"seeds {', '.join(f'{a:.3f}' for a in accs)}", flush=True)

    times = step_times(task, args.batch_size, args.rounds)
    full = "full fine-tuning"
    print(f"\n{'method':30s} {'trainable':>10s} {'% of base':>9s} {'lr':>6s} {'exact match':>14s} {'step / full':>11s}")
    for name, r in results.items():
        step_ratio = ratio(times, name, full)
        acc = f"{statistics.mean(r['accs']):.3f} ± {statistics.pstdev(r['accs']):.3f}"
        print(f"{name:30s} {r['trainable']:>10,d} {100 * r['trainable'] / n_base:>8.3f}% {r['lr']:>6g} {acc:>14s} "
              f"{step_ratio:>10.2f}x")
    folded = mp.fold_prefix(make("prefix tuning (10, reparam)", 0))
    n_folded = mp.trainable_parameters(folded)[0]
    print(f"(prefix after folding the reparameterisation: {n_folded:,} parameters, {100 * n_folded / n_base:.2f}%)")
    print(f"(full fine-tuning step: {1000 * median(times, full):.0f} ms; std over seeds is the population std)")


if __name__ == "__main__":
    main()
