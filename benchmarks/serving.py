"""Serving many tasks from one base: requests per second of one mixed batch vs one batch per task.

    python benchmarks/serving.py            # N = 1, 2, 4, 8 tasks, 64 requests a batch
    python benchmarks/serving.py --quick    # fewer repeats

A batch of ``--batch`` requests (prompts like ``rotate:abcdef=``, answered by greedy decoding with the
KV cache) is spread evenly over N tasks, each with its own LoRA adapter (r = 8 on q and v, random
values: speed does not depend on what was learnt) in one shared base. Four ways to answer it, timed
in turn on the same inputs so that they see the same machine load:

* ``mixed``: one pass over the whole batch, each row with its own adapter (``lora_adapter_per_row``);
* ``per task``: switch the adapter (``set_lora_adapter``) and run one smaller batch per task;
* ``merged``: N merged single-task models (dW folded into a copy of the base), one batch each;
* ``base``: the bare base on the whole batch, the ceiling (no adapter at all).

Printed: requests/s (median of the repeats) and the ratio mixed / per task. Prefix tuning is timed
too when the model offers per-row prefixes.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import minipeft as mp

KINDS = ["rotate", "caesar", "sortdesc", "reverse", "sort", "copy"]  # what the requests look like
PROMPT_LEN = 14  # every prompt has this many characters: the model has no padding mask


def make_requests(n_tasks: int, batch: int, seed: int = 0):
    """``batch`` prompts of one length (token ids) and the adapter of each row, ``t0 .. t{n-1}``."""
    pools = {k: [x.split("=")[0] + "=" for x in mp.make_task(k, seed).val if len(x.split("=")[0]) + 1 == PROMPT_LEN]
             for k in KINDS}
    names = [f"t{b % n_tasks}" for b in range(batch)]
    kinds = [KINDS[b % n_tasks % len(KINDS)] for b in range(batch)]
    prompts = [pools[k][b % len(pools[k])] for b, k in enumerate(kinds)]
    return torch.tensor([mp.tokenizer.encode(p) for p in prompts]), names  # (batch, PROMPT_LEN)


def serving_model(n_tasks: int, seed: int = 0):
    """The base with ``n_tasks`` LoRA adapters of random values, and ``n_tasks`` merged single-task copies."""
    torch.manual_seed(seed)
    model = mp.load_base()
    for t in [f"t{i}" for i in range(n_tasks)]:
        mp.add_lora(model, r=8, alpha=16, name=t)
        with torch.no_grad():
            for layer in mp.lora_layers(model).values():
                layer.adapters[t].lora_B.normal_(0, 0.02)
    merged = {}
    for t in [f"t{i}" for i in range(n_tasks)]:
        mp.set_lora_adapter(model, t)
        single = mp.unload_lora(mp.merge_lora(copy.deepcopy(model)))
        merged[t] = single
    return model.eval(), merged


def answer(model, ids, new_tokens: int):
    return model.generate(ids, max_new_tokens=new_tokens)


def time_ways(n_tasks: int, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    model, merged = serving_model(n_tasks)
    ids, names = make_requests(n_tasks, batch)
    groups = {t: torch.tensor([b for b, n in enumerate(names) if n == t]) for t in dict.fromkeys(names)}

    def mixed():
        with mp.lora_adapter_per_row(model, names):
            return answer(model, ids, new_tokens)

    def per_task():
        out = torch.empty(batch, ids.shape[1] + new_tokens, dtype=torch.long)
        for t, rows in groups.items():
            mp.set_lora_adapter(model, t)
            out[rows] = answer(model, ids[rows], new_tokens)
        return out

    def merged_models():
        out = torch.empty(batch, ids.shape[1] + new_tokens, dtype=torch.long)
        for t, rows in groups.items():
            out[rows] = answer(merged[t], ids[rows], new_tokens)
        return out

    def bare():
        with mp.disable_lora(model):
            return answer(model, ids, new_tokens)

    ways = {"mixed": mixed, "per task": per_task, "merged": merged_models, "base": bare}
    # the three ways give the same answers (greedy tokens), else the timing would compare different work
    assert torch.equal(mixed(), per_task()), "mixed batch and per-task batches disagree"
    agree = (mixed() == merged_models()).float().mean().item()
    seconds = {k: [] for k in ways}
    with torch.inference_mode():
        for _ in range(repeats):  # interleaved: every way sees the same machine load
            for k, f in ways.items():
                t0 = time.perf_counter()
                f()
                seconds[k].append(time.perf_counter() - t0)
    rps = {k: batch / statistics.median(v) for k, v in seconds.items()}
    rps["agree_merged"] = agree
    return rps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"{args.new_tokens} new tokens a request, median of {repeats}")
    print(f"{'N tasks':>7} | {'mixed':>9} | {'per task':>9} | {'merged':>9} | {'base':>9} | "
          f"{'mixed/per task':>14} | {'mixed/base':>10}   (requests/s)")
    for n in (1, 2, 4, 8):
        r = time_ways(n, args.batch, args.new_tokens, repeats)
        print(f"{n:>7} | {r['mixed']:9.1f} | {r['per task']:9.1f} | {r['merged']:9.1f} | {r['base']:9.1f} | "
              f"{r['mixed'] / r['per task']:14.2f} | {r['mixed'] / r['base']:10.2f}")


if __name__ == "__main__":
    main()
