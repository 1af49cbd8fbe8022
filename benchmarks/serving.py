"""Serving many tasks from one base: requests per second of one mixed batch vs one batch per task.

    python benchmarks/serving.py            # N = 1, 2, 4, 8 tasks, 64 requests a batch
    python benchmarks/serving.py --quick    # 3 repeats

A batch of ``--batch`` requests (prompts like ``rotate:abcdef=``, all of one length, answered by greedy
decoding with the KV cache) is spread evenly over N tasks, each with its own adapter in one shared
base: LoRA (r = 8 on q and v, random values: speed does not depend on what was learnt) or a prefix
(10 positions). The ways to answer it, timed in turn on the same inputs so that they share the
machine's load:

* ``lora mixed`` / ``prefix mixed``: one pass over the whole batch, each row with its own adapter
  (``mp.adapter_per_row(model, names)``, for LoRA and prefixes alike);
* ``lora per task`` / ``prefix per task``: switch the adapter and run one smaller batch per task;
* ``merged``: N merged single-task models (dW folded into a copy of the base), one batch each;
* ``base``: the plain base model on the whole batch, the ceiling (no adapter, no wrapper).

Printed: requests/s (median of the repeats) and the ratios. Mixed and per-task answers are checked
to be identical before anything is timed.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from timing import interleaved

import minipeft as mp

KINDS = ["rotate", "caesar", "sortdesc", "reverse", "sort", "copy"]  # what the requests look like
PROMPT_LEN = 14  # every prompt has this many characters: the model has no padding mask


def make_requests(n_tasks: int, batch: int, seed: int = 0):
    """``batch`` prompts of one length (token ids) and the adapter of each row, ``t0 .. t{n-1}``."""
    prompts = {k: [x[:x.index("=") + 1] for x in mp.make_task(k, seed).val] for k in KINDS}
    pools = {k: [p for p in ps if len(p) == PROMPT_LEN] for k, ps in prompts.items()}
    names = [f"t{b % n_tasks}" for b in range(batch)]
    kinds = [KINDS[b % n_tasks % len(KINDS)] for b in range(batch)]
    prompts = [pools[k][b % len(pools[k])] for b, k in enumerate(kinds)]
    return torch.tensor([mp.tokenizer.encode(p) for p in prompts]), names  # (batch, PROMPT_LEN)


def serving_models(n_tasks: int, seed: int = 0):
    """The base with ``n_tasks`` LoRA adapters (random values), ``n_tasks`` merged single-task copies,
    and the base with ``n_tasks`` prefixes (10 positions each)."""
    torch.manual_seed(seed)
    names = [f"t{i}" for i in range(n_tasks)]
    lora = mp.load_base()
    for t in names:
        mp.add_lora(lora, r=8, alpha=16, name=t)
        with torch.no_grad():
            for layer in mp.lora_layers(lora).values():
                layer.adapters[t].lora_B.normal_(0, 0.02)
    merged = {}
    for t in names:
        mp.set_adapter(lora, t)
        merged[t] = mp.unload_lora(mp.merge_lora(copy.deepcopy(lora)))
    prefix = mp.load_base()
    for i, t in enumerate(names):
        mp.add_prefix_tuning(prefix, n_prefix=10, name=t, seed=i)
    return lora.eval(), merged, prefix.eval()


def time_ways(n_tasks: int, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Requests per second of each way to answer one batch of requests spread over ``n_tasks`` tasks."""
    lora, merged, prefix = serving_models(n_tasks)
    plain = mp.load_base().eval()  # no adapter, no wrapper: the ceiling
    ids, names = make_requests(n_tasks, batch)
    groups = {t: torch.tensor([b for b, n in enumerate(names) if n == t]) for t in dict.fromkeys(names)}

    def per_group(run):  # one smaller batch per task; run(task, ids) answers it
        out = torch.empty(batch, ids.shape[1] + new_tokens, dtype=torch.long)
        for t, rows in groups.items():
            out[rows] = run(t, ids[rows])
        return out

    def mixed(model):
        with mp.adapter_per_row(model, names):
            return model.generate(ids, new_tokens)

    def lora_mixed():
        return mixed(lora)

    def lora_per_task():
        return per_group(lambda t, x: mp.set_adapter(lora, t).generate(x, new_tokens))

    ways = {
        "lora mixed": lora_mixed,
        "lora per task": lora_per_task,
        "merged": lambda: per_group(lambda t, x: merged[t].generate(x, new_tokens)),
        "base": lambda: plain.generate(ids, new_tokens),
        "prefix mixed": lambda: mixed(prefix),
        "prefix per task": lambda: per_group(lambda t, x: mp.set_adapter(prefix, t).generate(x, new_tokens)),
    }
    # mixed and per-task batches must give the same answers, else the timing would compare different work
    assert torch.equal(lora_mixed(), lora_per_task()), "LoRA: mixed batch and per-task batches disagree"
    assert torch.equal(ways["prefix mixed"](), ways["prefix per task"]()), "prefix: mixed and per task disagree"
    with torch.inference_mode():  # interleaved: every way sees the same machine load
        seconds = interleaved(ways, repeats, number=1)
    return {k: batch / statistics.median(v) for k, v in seconds.items()}


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
    cols = ["lora mixed", "lora per task", "merged", "base", "prefix mixed", "prefix per task"]
    print(f"{'N tasks':>7} | " + " | ".join(f"{c:>15}" for c in cols) +
          " | LoRA mixed/per task | prefix mixed/per task | LoRA mixed/merged")
    for n in (1, 2, 4, 8):
        r = time_ways(n, args.batch, args.new_tokens, repeats)
        print(f"{n:>7} | " + " | ".join(f"{r[c]:15.1f}" for c in cols) +
              f" | {r['lora mixed'] / r['lora per task']:19.2f} | {r['prefix mixed'] / r['prefix per task']:21.2f}"
              f" | {r['lora mixed'] / r['merged']:17.2f}")
    print("(requests/s, median of the repeats; ratios > 1: the mixed batch serves more requests per second)")


if __name__ == "__main__":
    main()
