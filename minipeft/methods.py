"""The methods in one list, and one way to choose among named adapters, whatever the method.

Each method file ends with its entry (a :class:`~minipeft.common.Method`: its config, ``add_*``, what it
saves); ``METHODS`` collects them, and saving and loading, the memory formula, the comparison, the widgets
and the tests read it. A new method is its own file plus one line here.

One base can hold several named adapters of a method (one per task: LoRA, prefixes, bottleneck adapters),
chosen as PEFT chooses them::

    mp.list_adapters(model)                     # ['rotate', 'caesar']
    mp.set_adapter(model, "rotate")             # rotate runs, and is the only part that trains
    with mp.disable_adapter(model): ...         # the bare base model
    with mp.adapter_per_row(model, ["rotate", "caesar", None]): model(x)   # one batch, three tasks
    mp.delete_adapter(model, "caesar")
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from . import adapter, dora, full, ia3, lora, prefix, prompt
from .common import Method, adapter_name, module

METHODS: dict[str, Method] = {m.name: m for m in (full.METHOD, prompt.METHOD, prefix.METHOD, adapter.METHOD,
                                                  lora.METHOD)}
METHODS.update({m.name: m for m in (ia3.METHOD, dora.METHOD)})  # beyond the lecture (IA3, DoRA)


def methods_in(model: nn.Module) -> dict[str, list]:
    """``{method: its adapter names}`` for every method applied to ``model`` (``[None]``: no names)."""
    found = {name: m.names(model) for name, m in METHODS.items()}
    return {name: names for name, names in found.items() if names}


def _named(model: nn.Module, name: str | None = None) -> Method:
    """The method of ``model`` whose adapters have names (the one holding ``name``, if given)."""
    module("model", model)
    present = [METHODS[m] for m, names in methods_in(model).items() if METHODS[m].set_active is not None]
    if name is not None:
        present = [m for m in present if name in m.names(model)] or present
    if not present:
        raise ValueError("the model has no named adapters (add some with add_lora, add_prefix_tuning or "
                         "add_adapters)")
    if len(present) > 1:
        raise ValueError(f"the model has named adapters of several methods {[m.name for m in present]}; "
                         f"this is not supported")
    return present[0]


def _known(method: Method, model: nn.Module, names) -> None:
    unknown = [n for n in dict.fromkeys(names) if n is not None and n not in method.names(model)]
    if unknown:
        raise ValueError(f"no {method.name} adapter named {unknown[0]!r}; the model has {method.names(model)}")


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the named adapters in ``model``, in the order they were added (``[]`` without any)."""
    return [n for m, names in methods_in(model).items() if METHODS[m].set_active for n in names]


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that runs now (``None``: none, the bare base)."""
    return _named(model).active(model)


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make adapter ``name`` the one that runs, and the only one that trains (``None``: the bare base)."""
    method = _named(model, name)
    if name is not None:
        adapter_name(name)
    _known(method, model, [name])
    method.set_active(model, name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``; if it was the one running, the model runs its bare base afterwards."""
    method = _named(model, adapter_name(name))
    _known(method, model, [name])
    method.delete(model, name)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """``with disable_adapter(model):`` runs the bare base model; the active adapter comes back afterwards."""
    method = _named(model)
    active, trains = method.active(model), [p.requires_grad for p in model.parameters()]
    method.set_active(model, None)
    try:
        yield model
    finally:
        method.set_active(model, active)
        for p, flag in zip(model.parameters(), trains):  # what trained before trains again, nothing more
            p.requires_grad_(flag)


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names):
    """``with adapter_per_row(model, ["a", "b", None]):`` row b of the next batches runs adapter ``names[b]``
    (``None``: the bare base). Equal to running each adapter on its own rows separately."""
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise TypeError(f"names must be a list with one adapter name (or None) per batch row, got {names!r}")
    names = list(names)
    if not all(n is None or isinstance(n, str) for n in names):
        raise TypeError(f"names must hold one adapter name (a string) or None per batch row, got {names!r}")
    if not names:
        raise ValueError("adapter_per_row needs one name per batch row, got an empty list")
    method = _named(model, next((n for n in names if n is not None), None))
    _known(method, model, names)
    method.set_rows(model, names)
    try:
        yield model
    finally:
        method.set_rows(model, None)
