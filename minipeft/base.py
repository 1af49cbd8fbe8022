"""The pretrained base model: how it is made (``python -m minipeft pretrain``) and loaded (``load_base()``).

Adaptation only means something for a pretrained model, so the course ships one in ``data/base/``:
the toy GPT trained on a mix of the pretraining tasks (copy, reverse, sort, add). The recipe below
is the whole story: anyone can re-run it and get the same weights on the same machine and torch
version (bit-for-bit equality across machines is not promised: float summation order differs).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import GPT, GPTConfig
from .tasks import DOWNSTREAM_TASKS, PRETRAIN_TASKS, make_task
from .train import evaluate, train

BASE_DIR = Path(os.environ.get("MINIPEFT_BASE", Path(__file__).resolve().parent.parent / "data" / "base"))
PRETRAIN_RECIPE = dict(steps=8000, lr=2e-3, batch_size=64, warmup=100, weight_decay=0.1, seed=0)

# A family of smaller bases (notebook 12: prompt tuning against model size), pretrained by the same
# recipe and steps as the shipped base, which is the family's largest member (d_model 128, 4 layers).
# Only the sizes change: d_model, n_layer and d_ff = 4 * d_model (n_head stays 4).
FAMILY_DIR = Path(__file__).resolve().parent.parent / "data" / "family"
FAMILY = {"d32_l1": dict(d_model=32, n_layer=1, d_ff=128),
          "d64_l2": dict(d_model=64, n_layer=2, d_ff=256),
          "d96_l3": dict(d_model=96, n_layer=3, d_ff=384)}


def pretrain(out_dir: str | Path = BASE_DIR, progress: bool = True, config: dict | None = None,
             **overrides) -> dict:
    """Pretrain a fresh GPT on the mixture of ``PRETRAIN_TASKS`` and save it to ``out_dir``.
    ``config``: GPTConfig fields that differ from the shipped base (the family's sizes);
    ``overrides``: recipe entries that differ from ``PRETRAIN_RECIPE``.

    Returns the report written beside the weights: exact match per task (pretraining and
    downstream), parameter count and wall time.
    """
    recipe = {**PRETRAIN_RECIPE, **overrides}
    torch.manual_seed(recipe["seed"])
    model = GPT(GPTConfig(**(config or {})))
    # 20,000 examples per task (add has only 10,000 distinct inputs: 9,500 train + 500 validation);
    # no test split (n_test=0): the data the shipped base was pretrained on, before splits had a test part
    tasks = [make_task(name, seed=0, n_train=9500 if name == "add" else 20000, n_test=0) for name in PRETRAIN_TASKS]
    t0 = time.perf_counter()
    hist = train(model, tasks, device="cpu", progress=progress, **recipe)
    seconds = time.perf_counter() - t0
    accuracy = {name: evaluate(model, make_task(name, seed=0)) for name in PRETRAIN_TASKS + DOWNSTREAM_TASKS}
    report = {
        "recipe": recipe,
        "params": sum(p.numel() for p in model.parameters()),
        "pretrain_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "final_loss": round(sum(hist.loss[-50:]) / 50, 4),
        "exact_match": accuracy,
    }
    save_base(model, out_dir, report)
    return report


def pretrain_family(names=None, progress: bool = False, **overrides) -> dict[str, dict]:
    """Pretrain the smaller bases of ``FAMILY`` (all, or those named) into ``FAMILY_DIR/<name>/``."""
    reports = {}
    for name in names or FAMILY:
        if name not in FAMILY:
            raise ValueError(f"no family base {name!r}; the family is {sorted(FAMILY)}")
        reports[name] = pretrain(FAMILY_DIR / name, progress=progress, config=FAMILY[name], **overrides)
        print(f"{name}: {reports[name]['params']:,} parameters, {reports[name]['pretrain_seconds']:.0f} s", flush=True)
    return reports


def family_bases() -> dict[str, Path]:
    """Every base of the family by name, smallest first: the smaller bases, then the shipped one."""
    return {**{name: FAMILY_DIR / name for name in FAMILY}, "d128_l4": BASE_DIR}


def save_base(model: GPT, out_dir: str | Path, report: dict | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def load_base(path: str | Path = BASE_DIR, device=None) -> GPT:
    """A fresh copy of the pretrained base model (a new object with its own tensors at every call)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        how = "python -m minipeft pretrain" + (" --family" if path.parent.name == "family" else "")
        raise FileNotFoundError(f"no base model at {path} (no model.safetensors there): run `{how}` to make it")
    config = GPTConfig(**json.loads((path / "config.json").read_text()))
    model = GPT(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    return model.to(device) if device is not None else model


def base_report(path: str | Path = BASE_DIR) -> dict:
    """The report written when the shipped base was pretrained (accuracy per task, time, recipe)."""
    return json.loads((Path(path) / "report.json").read_text())
