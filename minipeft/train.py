"""One small training loop for every notebook and method, and the evaluation it reports.

AdamW over the parameters that require gradients (so a PEFT method trains only what it added),
linear warm-up then cosine decay to 10 % of the peak learning rate, gradient clipping at 1.0,
cross-entropy on the answer characters only. Deterministic under a seed on the CPU; bf16 autocast
on CUDA. ``MINIPEFT_QUICK=1`` (set by CI) makes :func:`budget` pick the small numbers.

Nothing is lost on bad input: every argument is checked before the model is touched, and a step
whose loss or gradient is not finite is never applied.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .common import boolean, integer, module, non_negative_float, positive_float, positive_int
from .tasks import IGNORE, Task, encode_batch, exact_match

QUICK = os.environ.get("MINIPEFT_QUICK", "") not in ("", "0")
SPLITS = ("train", "val", "test")


def _device(value) -> torch.device:
    """``torch.device(value)``, refused with a clear error if torch does not know it or it is absent."""
    if not isinstance(value, (str, int, torch.device)) or isinstance(value, bool):
        raise TypeError(f"device must be a torch.device or a string like 'cpu' or 'cuda', got {value!r}")
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"device {value!r} is not a device torch knows ({err})") from None
    if device.type != "cpu" and device.type != default_device().type:
        raise ValueError(f"device is {value!r} but this machine has no such device; use 'cpu' or leave it None")
    return device


def _finite_weights(model: torch.nn.Module) -> None:
    """Refuse a model with a NaN or infinite parameter: training could never make it finite again."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"the model's parameter {name!r} has {bad} non-finite value(s) (NaN or inf) "
                             "before training; load or build the model again")


# --- the loop --------------------------------------------------------------------------------------

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


class NonFiniteStep(ValueError):
    """The loss or the gradient norm of a step was NaN or infinite; the step was not applied."""


def train_step(model, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, params,
               autocast=None, max_norm: float = 1.0, scale: float = 1.0, world: int = 1) -> float:
    """One optimisation step: loss, backward, clip the gradient norm to ``max_norm``, ``opt.step()``.

    Returns the loss. Raises :class:`NonFiniteStep` *before* ``opt.step()`` when the loss or the
    gradient norm is not finite, so a bad step never reaches the weights. Data parallel (``model``
    wrapped in DDP, ``world`` ranks): this rank's loss is multiplied by ``scale`` before backward, and
    the loss returned is the whole batch's (the ranks' shares summed: one 4-byte all-reduce).
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = loss_fn(model, x, y) * scale
    opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP this also all-reduces (averages) the gradients, bucket by bucket
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    value = loss.detach().float()
    if world > 1:
        value = value / world
        torch.distributed.all_reduce(value)
    value, norm = torch.stack([value, norm.float()]).tolist()  # one host sync a step
    if not (math.isfinite(value) and math.isfinite(norm)):
        raise NonFiniteStep(f"loss {value}, gradient norm {norm}")
    opt.step()
    return value


def _tasks(task) -> list[Task]:
    tasks = [task] if isinstance(task, Task) else list(task) if isinstance(task, (list, tuple)) else []
    if not tasks or not all(isinstance(t, Task) for t in tasks):
        raise ValueError(f"task must be a Task from make_task() or a non-empty list of them, got {task!r:.80}")
    if not any(t.train for t in tasks):
        raise ValueError("task has no training examples (an empty train split)")
    return tasks


def train(model: torch.nn.Module, task, steps: int = 400, lr: float = 1e-3, batch_size: int = 32,
          seed: int = 0, warmup: int | None = None, weight_decay: float = 0.0, eval_every: int = 0,
          device=None, progress: bool = True) -> History:
    """Train ``model`` in place on ``task`` (a Task, or a list of Tasks mixed together); returns a :class:`History`.

    Only parameters with ``requires_grad`` are optimised; ``warmup`` defaults to 10 % of the steps. With
    ``eval_every > 0`` the exact match on train and val is recorded every that many steps and at the end.
    The model ends in eval mode, gradients cleared; on an error it keeps its train/eval mode, and a step
    with a non-finite loss or gradient norm raises ``ValueError`` with the weights as before that step.
    A model wrapped in ``DistributedDataParallel`` trains, on each rank, on its rows of the same batches
    (every ``world``-th row), so that the ranks together take the 1-process run's steps
    (:mod:`minipeft.distributed` launches them).
    """
    # every check first: nothing is touched until all arguments are known to be good
    steps, batch_size = positive_int("steps", steps), positive_int("batch_size", batch_size)
    lr, weight_decay = float(positive_float("lr", lr)), float(non_negative_float("weight_decay", weight_decay))
    seed, eval_every = integer("seed", seed), integer("eval_every", eval_every, 0)
    warmup = max(1, steps // 10) if warmup is None else integer("warmup", warmup, 0, steps)
    progress = boolean("progress", progress)
    device = default_device() if device is None else _device(device)
    module("model", model)
    world = torch.distributed.get_world_size() if isinstance(model, DistributedDataParallel) else 1
    if batch_size < world:
        raise ValueError(f"batch_size {batch_size} is smaller than the {world} data-parallel ranks: "
                         "every rank needs at least one example a step")
    tasks = _tasks(task)
    texts = [text for t in tasks for text in t.train]
    if eval_every and not all(t.val for t in tasks):
        raise ValueError("eval_every > 0 needs every task to have validation examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (apply a method or full_finetune first)")
    _finite_weights(model)

    was_training = model.training
    try:
        model.to(device)
        hist = _loop(model, tasks, texts, params, steps, lr, batch_size, seed, warmup, weight_decay,
                     eval_every, device, progress, world)
    except BaseException:
        model.train(was_training)
        raise
    finally:
        for p in params:  # the gradients of the last step are not part of the model
            p.grad = None
    model.eval()
    if os.environ.get("MINIPEFT_STEP_LOG"):  # count the course's training steps: one line per run
        with open(os.environ["MINIPEFT_STEP_LOG"], "a") as log:
            log.write(f"{hist.steps}\t{batch_size}\n")
    return hist


def _loop(model, tasks, texts, params, steps, lr, batch_size, seed, warmup, weight_decay, eval_every,
          device, progress, world=1) -> History:
    torch.manual_seed(seed)  # dropout and anything else random inside the model
    gen = torch.Generator().manual_seed(seed)  # which examples go in which batch
    X, Y = encode_batch(texts)  # encoded once; a step only indexes rows
    lengths = (Y != IGNORE).int().cumsum(1).argmax(1) + 1  # last scored position + 1, per row
    rows = torch.randint(len(texts), (steps, batch_size), generator=gen)  # every batch, drawn up front
    T = lengths[rows].amax(1).tolist()  # the length of each batch, without a sync per step
    scale = [1.0] * steps
    if world > 1:  # data parallel: every rank drew the same batches above and trains on its rows of each:
        # rank, rank + world, ... DDP averages the gradients over the ranks, so a rank's mean loss is weighted
        # by world x (its scored tokens) / (the batch's): the average is then the whole batch's mean loss
        scored = (Y != IGNORE).sum(1)[rows].double()  # (steps, batch_size): answer characters per row
        rank = torch.distributed.get_rank()
        scale = (world * scored[:, rank::world].sum(1) / scored.sum(1)).tolist()
        rows = rows[:, rank::world]
    X, Y = X.to(device), Y.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    hist = History()
    model.train()
    for step in tqdm(range(steps), disable=not progress, desc="train", leave=False):
        t0 = time.perf_counter()
        r = rows[step].to(device)
        x, y = X[r, :T[step]], Y[r, :T[step]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        try:
            hist.loss.append(train_step(model, opt, x, y, params, autocast, scale=scale[step], world=world))
        except NonFiniteStep as err:
            raise NonFiniteStep(
                f"training stopped at step {step} (of {steps}): {err} at learning rate {lr_at(step, steps, lr, warmup):.3g}; "
                "the step was not applied, the weights are those before it. Try a lower lr (e.g. "
                f"{lr / 10:.3g}) or check that the model's weights and inputs are finite") from None
        hist.seconds += time.perf_counter() - t0
        hist.steps += 1
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            hist.eval_steps.append(step + 1)
            hist.train_acc.append(sum(evaluate(model, t, "train") for t in tasks) / len(tasks))
            hist.val_acc.append(sum(evaluate(model, t, "val") for t in tasks) / len(tasks))
            model.train()
    return hist


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, split: str = "val", batch_size: int = 512,
             max_examples: int | None = 1000) -> float:
    """Exact-match accuracy in [0, 1] of ``model`` on ``task``'s ``split`` ("val", "train" or "test")."""
    module("model", model)
    if not isinstance(task, Task):
        raise ValueError(f"evaluate needs a Task from make_task(), got {type(task).__name__}")
    has = [s for s in SPLITS if getattr(task, s, None) is not None]  # "test" only where the Task has one
    if split not in has:
        raise ValueError(f"split must be {' or '.join(map(repr, has))} (the splits of task {task.name!r}), "
                         f"got {split!r}")
    texts = getattr(task, split)
    batch_size = positive_int("batch_size", batch_size)
    texts = texts[:max_examples if max_examples is None else positive_int("max_examples", max_examples)]
    if not texts:
        raise ValueError(f"the {split!r} split of task {task.name!r} is empty: nothing to evaluate")
    device = model_device(model)
    was_training = model.training
    model.eval()
    hits = 0.0
    try:
        for i in range(0, len(texts), batch_size):
            x, y = encode_batch(texts[i:i + batch_size])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x.to(device))
            hits += exact_match(logits, y.to(device)).sum().item()
    finally:
        model.train(was_training)
    return hits / len(texts)
