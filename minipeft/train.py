"""One small training loop for every notebook and method, and the evaluation it reports.

AdamW over the parameters that require gradients (so a PEFT method trains only what it added),
linear warm-up then cosine decay to 10 % of the peak learning rate, gradient clipping at 1.0,
cross-entropy on the answer characters only. Deterministic under a seed on the CPU; bf16 autocast
on CUDA. ``MINIPEFT_QUICK=1`` (set by CI) makes :func:`budget` pick the small numbers.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .tasks import IGNORE, Task, encode_batch, exact_match

QUICK = os.environ.get("MINIPEFT_QUICK", "") not in ("", "0")


def budget(default, quick):
    """``quick`` when MINIPEFT_QUICK=1 is set (CI), else ``default``: ``steps = budget(400, 40)``."""
    return quick if QUICK else default


def default_device() -> torch.device:
    """cuda if there is a GPU, else mps (Apple), else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@dataclass
class History:
    """What one training run recorded: the loss at every step, accuracies at every evaluation."""
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0

    @property
    def step_time(self) -> float:
        """Mean seconds per optimisation step (evaluation excluded)."""
        return self.seconds / max(self.steps, 1)

    def __repr__(self):
        acc = f", val_acc={self.val_acc[-1]:.3f}" if self.val_acc else ""
        last = f"{self.loss[-1]:.4f}" if self.loss else "n/a"
        return f"History(steps={self.steps}, final_loss={last}{acc}, step_time={1000 * self.step_time:.1f} ms)"


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` down to ``lr / 10``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_fn(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def _texts(task) -> list[str]:
    tasks = [task] if isinstance(task, Task) else list(task)
    if not tasks or not all(isinstance(t, Task) for t in tasks):
        raise ValueError("task must be a Task from make_task() or a non-empty list of them")
    return [text for t in tasks for text in t.train]


def train(model: torch.nn.Module, task, steps: int = 400, lr: float = 1e-3, batch_size: int = 32,
          seed: int = 0, warmup: int | None = None, weight_decay: float = 0.0, eval_every: int = 0,
          device=None, progress: bool = True) -> History:
    """Train ``model`` in place on ``task`` (a Task, or a list of Tasks mixed together).

    Only parameters with ``requires_grad`` are optimised. ``warmup`` defaults to 10 % of the steps.
    With ``eval_every > 0`` the exact match on the train and validation splits is recorded every that
    many steps (and at the end). Returns a :class:`History`.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    texts = _texts(task)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (apply a method or full_finetune first)")
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    warmup = max(1, steps // 10) if warmup is None else warmup

    torch.manual_seed(seed)  # dropout and anything else random inside the model
    gen = torch.Generator().manual_seed(seed)  # which examples go in which batch
    X, Y = encode_batch(texts)
    lengths = (Y != IGNORE).int().cumsum(1).argmax(1) + 1  # last scored position + 1, per row
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    hist = History()
    model.train()
    for step in tqdm(range(steps), disable=not progress, desc="train", leave=False):
        t0 = time.perf_counter()
        rows = torch.randint(len(texts), (batch_size,), generator=gen)
        T = int(lengths[rows].max())
        x, y = X[rows, :T].to(device), Y[rows, :T].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with autocast:
            loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.loss.append(loss.item())
        hist.seconds += time.perf_counter() - t0
        hist.steps += 1
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            hist.eval_steps.append(step + 1)
            tasks = [task] if isinstance(task, Task) else task
            hist.train_acc.append(sum(evaluate(model, t, "train") for t in tasks) / len(tasks))
            hist.val_acc.append(sum(evaluate(model, t, "val") for t in tasks) / len(tasks))
            model.train()
    model.eval()
    return hist


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, split: str = "val", batch_size: int = 512,
             max_examples: int | None = 1000) -> float:
    """Exact-match accuracy in [0, 1] of ``model`` on ``task``'s ``split`` ("val" or "train")."""
    if not isinstance(task, Task):
        raise ValueError(f"evaluate needs a Task from make_task(), got {type(task).__name__}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    texts = getattr(task, split)[:max_examples]
    device = model_device(model)
    was_training = model.training
    model.eval()
    hits = 0.0
    for i in range(0, len(texts), batch_size):
        x, y = encode_batch(texts[i:i + batch_size])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.to(device))
        hits += exact_match(logits, y.to(device)).sum().item()
    model.train(was_training)
    return hits / len(texts)
