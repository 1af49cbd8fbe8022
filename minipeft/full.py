"""Full fine-tuning, and counting what trains.

Full fine-tuning unfreezes every weight and updates all of them on the new task: the strongest
baseline, and the most expensive one: with AdamW in fp32 each parameter costs 4 bytes of weight,
4 of gradient and 8 of optimizer state (two moments), 16 bytes in all, and every task needs its own
full copy of the model. Every PEFT method instead calls :func:`freeze` and adds a few parameters.
"""
from __future__ import annotations

import torch.nn as nn

from .common import Method


def freeze(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``model`` (the first step of every PEFT method)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def full_finetune(model: nn.Module) -> nn.Module:
    """Make every parameter trainable (full fine-tuning) and return the model."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a tensor shared by two modules counts once.

    A 4-bit layer (:class:`minipeft.qlora.Linear4bit`) keeps its frozen weight as packed codes in
    buffers, not parameters; ``total`` counts the weights those codes stand for (``quantized_numel``),
    as PEFT counts 2 per packed byte for 4-bit models, so quantising does not shrink "all params".
    """
    trainable = total = 0
    for p in model.parameters():  # .parameters() already skips duplicates
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    total += sum(getattr(m, "quantized_numel", 0) for m in model.modules())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print counts in PEFT's format: ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330``."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# --- bookkeeping: full fine-tuning has no adapter: a file holds every tensor of the model (see io.py) -----

METHOD = Method("full", None, full_finetune, names=lambda model: [], parts=lambda model, name: {},
                options=lambda model, name: {}, whole=True)
