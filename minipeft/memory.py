"""Training memory, measured: weights, gradients, optimizer state and activations of one step.

One training step holds four kinds of tensors::

    memory = weights              every parameter and buffer, at its stored dtype (4-bit codes as stored)
           + gradients            one per trainable parameter
           + optimizer state      AdamW: two moments per trainable parameter (m and v)
           + activations          what the forward pass keeps for the backward pass

With fp32 AdamW full fine-tuning costs 4 + 4 + 8 = 16 bytes per parameter before activations. A PEFT
method shrinks gradients and optimizer state to its few trainable parameters, but activations only
where a frozen layer needs no input kept: backpropagation still passes through every layer above the
lowest trainable part, which is why LoRA saves less than people expect at long sequences and large batches.

:func:`measure_memory` runs one real step and counts each kind; activations are what passes through
``torch.autograd.graph.saved_tensors_hooks`` (so it works on the CPU), shared storages once, parameters
and buffers not. On CUDA the step's ``torch.cuda.max_memory_allocated`` is reported too (it includes
temporaries no hook sees). :mod:`minipeft.memory_formula` predicts the same numbers in closed form.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .common import integer, module, positive_int
from .train import loss_fn, model_device

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
GiB = 2 ** 30  # the course's unit: binary gibibytes (a "24 GB" GPU holds 24 GiB, see minipeft.plots.memory)


@dataclass
class MemoryBreakdown:
    """Bytes of one training step, by kind. ``weights`` maps a dtype name to bytes (``{"float32": ...}``)."""
    weights: dict[str, int] = field(default_factory=dict)
    gradients: int = 0
    optimizer: int = 0      # AdamW's exp_avg and exp_avg_sq (the one-number 'step' counters are left out)
    activations: int = 0    # saved for backward, shared storages counted once (+ ``recomputed``)
    trainable: int = 0      # trainable parameter count
    cuda_peak: int | None = None  # torch.cuda.max_memory_allocated during the step (CUDA only)
    recomputed: int = 0     # gradient checkpointing: the largest block's saved tensors, recomputed in backward

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.gradients + self.optimizer + self.activations

    def parts(self) -> dict[str, int]:
        """The four stacked parts in bytes: weights, gradients, optimizer, activations."""
        return {"weights": self.weight_bytes, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations}

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={_fmt(v)}" for k, v in self.parts().items())
        peak = "" if self.cuda_peak is None else f", cuda_peak={_fmt(self.cuda_peak)}"
        return f"MemoryBreakdown({parts}, total={_fmt(self.total)}, trainable={self.trainable:,}{peak})"


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer by dtype name, each storage once (4-bit codes count as uint8)."""
    seen, out = set(), {}
    for t in list(model.parameters()) + list(model.buffers()):
        ptr, nbytes = _storage(t)
        if ptr in seen or nbytes == 0:
            continue
        seen.add(ptr)
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + nbytes
    return out


class SavedTensors:
    """Context manager that counts the bytes autograd saves for backward, each storage once.

    >>> with SavedTensors(exclude=model.parameters()) as saved:   # doctest: +SKIP
    ...     loss = model(x).sum()
    >>> saved.nbytes                                               # doctest: +SKIP
    """

    def __init__(self, exclude=()):
        self.exclude = {_storage(t)[0] for t in exclude}
        self.storages: dict[int, int] = {}  # data_ptr -> bytes
        self.shapes: list[tuple] = []       # (shape, dtype) of every saved tensor, for inspection

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        self.shapes.append((tuple(t.shape), t.dtype))
        if ptr not in self.exclude and nbytes:
            self.storages[ptr] = nbytes
        return t  # kept as it is: the step runs exactly as without the hook

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _import_bitsandbytes():
    """``bitsandbytes``, imported without its warning (on CPUs with AVX512-BF16) that an optional kernel
    package, fetched from the internet at run time, is missing: its 8-bit optimizers do not use it."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        log.setLevel(level)
    return bitsandbytes


def measure_memory(model: nn.Module, batch_size: int = 32, seq_len: int = 32, batch=None, loss=None,
                   seed: int = 0, optimizer: str = "adamw") -> MemoryBreakdown:
    """Run one AdamW training step of ``model`` and count its memory by kind (a :class:`MemoryBreakdown`).

    ``seq_len``: text tokens (prompt tuning adds its own). ``batch=(x, y)`` replaces the random tokens,
    ``loss(model, x, y)`` the course's cross-entropy (any network can be measured). ``optimizer``: "adamw"
    (PyTorch's) or bitsandbytes' "adamw8bit" / "paged_adamw8bit" (on the CPU it warns and does not page);
    its state is counted by storage, shared tensors once. With ``model.gradient_checkpointing`` the hooks see what is held
    between forward and backward (each block's input, kept by the checkpoint); each block's recomputed
    inside is counted by running the block again on its input, and the largest is added as ``recomputed``.
    The model is left as it was: weights restored, gradients cleared, every module's train/eval mode back.
    """
    module("model", model)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    batch_size, seq_len, seed = positive_int("batch_size", batch_size), positive_int("seq_len", seq_len), \
        integer("seed", seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (apply a method or full_finetune first)")
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)  # random tokens and targets: memory depends on shapes, not text
    x, y = batch if batch is not None else [torch.randint(1, model.config.vocab_size, (batch_size, seq_len),
                                                          generator=g).to(device) for _ in range(2)]
    before = [p.detach().to("cpu", copy=True) for p in params]  # restored after the step
    modes = [(m, m.training) for m in model.modules()]  # every module's train/eval mode, restored after
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), foreach=False)
    else:
        bnb = _import_bitsandbytes()
        opt = (bnb.optim.PagedAdamW8bit if optimizer.startswith("paged") else bnb.optim.AdamW8bit)(
            params, lr=1e-3, betas=(0.9, 0.95))
    frozen = list(model.parameters()) + list(model.buffers())
    blocks = list(getattr(model, "blocks", [])) if getattr(model, "gradient_checkpointing", False) else []
    inputs = []  # (block, its input) of each checkpointed block in the forward pass
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0]))) for b in blocks]
    model.train()
    try:
        with SavedTensors(exclude=frozen) as saved:
            value = (loss or loss_fn)(model, x, y)
        for h in hooks:
            h.remove()
        value.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        opt.step()
        state = {_storage(t) for s in opt.state.values() for k, t in s.items() if k != "step" and torch.is_tensor(t)}
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        recomputed = 0
        for block, inp in inputs:  # what the recomputation in backward saves: the block run again
            with SavedTensors(exclude=frozen) as inside:
                block(inp)
            recomputed = max(recomputed, inside.nbytes)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
                p.grad = None
        for m, training in modes:
            m.train(training)
    return MemoryBreakdown(weight_bytes(model), grads, sum(n for _, n in state), saved.nbytes + recomputed,
                           sum(p.numel() for p in params), peak, recomputed)
