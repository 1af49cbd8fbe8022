"""Several named LoRA adapters in one model: list, switch, delete, disable, and mixed batches.

One frozen base can serve many tasks: each task is a small adapter (``add_lora(..., name="caesar")``)
and the base weights are shared. Every :class:`~minipeft.lora.LoRALinear` keeps its adapters in a
``ModuleDict`` keyed by name; the functions here act on all layers at once:

    mp.add_lora(model, r=8, alpha=16, name="rotate"); mp.add_lora(model, r=8, alpha=16, name="caesar")
    mp.lora_adapters(model)                 # ['rotate', 'caesar']
    mp.set_lora_adapter(model, "rotate")    # rotate runs (and is the only part that trains)
    with mp.disable_lora(model): ...        # the bare base model
    with mp.lora_adapter_per_row(model, ["rotate", "caesar", None]): model(x)   # one batch, three tasks

A mixed batch runs the shared base once for all rows, then adds each adapter's ``scaling * B A x``
to its own rows only (the way multi-adapter servers such as S-LoRA, arXiv 2311.03285, batch requests).
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from .lora import LoRALinear, lora_layers


def _layers(model: nn.Module) -> list[LoRALinear]:
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora first")
    return layers


def _not_merged(layers: list[LoRALinear], what: str) -> None:
    if any(m.merged for m in layers):
        raise ValueError(f"cannot {what} while an adapter is merged into the base: call unmerge_lora first")


def _known(model: nn.Module, name) -> None:
    names = lora_adapters(model)
    if name not in names:
        raise ValueError(f"no LoRA adapter named {name!r}; the model has {names}")


def lora_adapters(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters in ``model``, in the order they were added."""
    return list(dict.fromkeys(n for m in lora_layers(model).values() for n in m.adapters))


def active_lora_adapter(model: nn.Module) -> str | None:
    """The adapter that runs now (``None``: none does)."""
    return next((m.active for m in lora_layers(model).values() if m.active is not None), None)


def set_lora_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the one that runs, and the only LoRA part that trains (as PEFT's set_adapter)."""
    layers = _layers(model)
    _known(model, name)
    _not_merged(layers, "switch adapters")
    for m in layers:
        m.active = name if name in m.adapters else None  # a layer without it runs its bare base
        for adapter_name, adapter in m.adapters.items():
            adapter.requires_grad_(adapter_name == name)
    return model


def delete_lora_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` everywhere; a layer left without adapters becomes its base layer again.

    If it was the active adapter, none is active afterwards (the model runs its bare base).
    """
    layers = _layers(model)
    _known(model, name)
    _not_merged(layers, "delete an adapter")
    for where, m in lora_layers(model).items():
        if name in m.adapters:
            del m.adapters[name]
            m.active = None if m.active == name else m.active
        if not m.adapters:
            _replace(model, where, m.base_layer)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base layer (after :func:`merge_lora`: PEFT's merge_and_unload)."""
    for where, m in lora_layers(model).items():
        _replace(model, where, m.base_layer)
    return model


def _replace(model: nn.Module, where: str, new: nn.Module) -> None:
    parent, _, child = where.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """``with disable_lora(model):`` runs the bare base model; the adapters come back afterwards."""
    layers = _layers(model)
    _not_merged(layers, "disable LoRA")
    saved = [m.active for m in layers]
    for m in layers:
        m.active = None
    try:
        yield model
    finally:
        for m, active in zip(layers, saved):
            m.active = active


@contextlib.contextmanager
def lora_adapter_per_row(model: nn.Module, names):
    """``with lora_adapter_per_row(model, ["a", "b", None]):`` row b of the next batches uses adapter
    ``names[b]`` (``None``: the bare base). Equal to running each adapter on its rows separately."""
    layers = _layers(model)
    names = list(names)
    for name in set(names) - {None}:
        _known(model, name)
    _not_merged(layers, "mix adapters in one batch")
    for m in layers:
        m.row_names = names
    try:
        yield model
    finally:
        for m in layers:
            m.row_names = None
