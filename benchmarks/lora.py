"""LoRA speed, measured side by side in one run: forward time merged / unmerged / base, and train-step
time LoRA / full fine-tuning, on the toy model and on a larger configuration.

    python benchmarks/lora.py            # a few minutes on one CPU core
    python benchmarks/lora.py --quick    # under a minute

Goals (issue 4): merged LoRA forward / base forward <= 1.02; LoRA train step / full step < 1.
Timings are interleaved (base, unmerged, merged, ... in turn, many short rounds; ``timing.py``) and the
median of the per-round ratios is reported, so a machine busy with other work slows every variant alike.
The train step is ``minipeft.train.train_step``, the one ``mp.train`` takes.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from timing import interleaved, ratio

import minipeft as mp
from minipeft.train import train_step


def lora_model(base: torch.nn.Module, targets) -> torch.nn.Module:
    model = mp.add_lora(copy.deepcopy(base), r=8, alpha=16, targets=targets)
    with torch.no_grad():  # a trained-looking adapter (B is zero at start)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def step_of(model, x, y):
    """One training step of ``model`` on ``(x, y)``, the very step ``mp.train`` takes."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    return lambda: train_step(model, opt, x, y, params)


def run(name: str, base: torch.nn.Module, batch: int, T: int, rounds: int, seconds: float):
    torch.manual_seed(0)
    base.eval()
    x = torch.randint(1, base.config.vocab_size, (batch, T))
    y = torch.randint(1, base.config.vocab_size, (batch, T))
    print(f"\n{name}: {sum(p.numel() for p in base.parameters()):,} parameters, batch {batch} x {T} tokens")
    for targets in [("q_proj", "v_proj"), "all-linear"]:
        unmerged = lora_model(base, targets)
        merged = mp.merge_lora(copy.deepcopy(unmerged))
        unloaded = mp.unload_lora(copy.deepcopy(merged))
        with torch.no_grad():
            err = (merged(x) - unmerged(x)).abs().max().item()
            fns = {m: (lambda mod=mod: mod(x)) for m, mod in
                   dict(base=base, unmerged=unmerged, merged=merged, unloaded=unloaded).items()}
            t = interleaved(fns, rounds, seconds=seconds, warmup=3)
        label = "q,v" if targets != "all-linear" else "all-linear"
        print(f"  forward, LoRA r=8 on {label:10s}  base {1e3 * statistics.median(t['base']):7.2f} ms | "
              f"unmerged / base {ratio(t, 'unmerged', 'base'):.3f} | merged / base {ratio(t, 'merged', 'base'):.3f}"
              f" | merged+unloaded / base {ratio(t, 'unloaded', 'base'):.3f} | max |merged - unmerged| {err:.1e}")
    full = mp.full_finetune(copy.deepcopy(base)).train()
    steps = {"full": step_of(full, x, y)}
    for targets in [("q_proj", "v_proj"), "all-linear"]:
        steps[str(targets)] = step_of(lora_model(base, targets).train(), x, y)
    t = interleaved(steps, rounds, seconds=seconds, warmup=3)
    print(f"  train step: full fine-tuning {1e3 * statistics.median(t['full']):7.2f} ms | "
          f"LoRA q,v / full {ratio(t, str(('q_proj', 'v_proj')), 'full'):.3f} | "
          f"LoRA all-linear / full {ratio(t, 'all-linear', 'full'):.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter timings")
    args = parser.parse_args(argv)
    rounds, seconds = (3, 0.02) if args.quick else (21, 0.05)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rounds {rounds}")
    run("toy model (the shipped base)", mp.load_base(), batch=32, T=20, rounds=rounds, seconds=seconds)
    torch.manual_seed(0)
    larger = mp.GPT(mp.GPTConfig(d_model=384, n_layer=6, n_head=6, d_ff=1536, block_size=128))
    run("larger config (d_model 384, 6 layers, random weights)", larger, batch=8, T=64, rounds=rounds, seconds=seconds)


if __name__ == "__main__":
    main()
