"""What every method file shares: argument checks, module surgery, and the shape of a method's entry.

The checks return the value they accept and raise a ``ValueError`` / ``TypeError`` that names the
argument, so that every public function can check all of its arguments first and change the model only
after: ``r = positive_int("r", r)``. ``bool`` is never taken for a number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    if not _number(name, value) > 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def non_negative_float(name: str, value) -> float:
    if not _number(name, value) >= 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def probability(name: str, value) -> float:
    """A rate in [0, 1), such as a dropout probability."""
    if not 0 <= _number(name, value) < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def module(name: str, value) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch nn.Module (a minipeft GPT), got {type(value).__name__}")
    return value


def one_of(name: str, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value


# names that an nn.ModuleDict, or the bookkeeping of the methods, already uses
_TAKEN = set(dir(nn.ModuleDict())) | {"training", "keys", "items", "values", "base_layer"}


def adapter_name(value) -> str:
    """A name for a named adapter: a Python identifier not taken by ``nn.ModuleDict`` (``"rotate"``)."""
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"an adapter name must be a Python identifier such as 'rotate', got {value!r}")
    if value in _TAKEN:
        raise ValueError(f"{value!r} cannot be an adapter name: nn.ModuleDict uses it")
    return value


def replace_module(model: nn.Module, where: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``where`` of ``model`` (module surgery); returns the module it replaced."""
    parent, _, child = where.rpartition(".")
    parent = model.get_submodule(parent)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@dataclass(frozen=True)
class Method:
    """What the rest of the library needs to know about one method (each method file ends with its own).

    ``names(model)`` lists its adapters in ``model`` (``[None]``: present without names; ``[]``: absent);
    ``parts(model, name)`` the modules that hold its trained tensors, by path; ``options(model, name)``
    the JSON-able options with which ``add(model, name=name, **options)`` rebuilds it. A method with named
    adapters also says which one runs (``active``), switches (``set_active``, ``None``: the bare base), runs
    one per batch row (``set_rows``) and deletes one (``delete``); :mod:`minipeft.methods` gives them one API.
    """
    name: str                                  # "lora": the key in files, the comparison and the formula
    config: type | None                        # its config dataclass: the one place its defaults live
    add: Callable                              # add_*(model, **options) -> model
    names: Callable
    parts: Callable
    options: Callable
    owned: tuple = ()                          # module types that hold only this method's tensors
    wrapper: tuple | None = None               # (wrapper type, attribute holding the wrapped base layer)
    active: Callable | None = None
    set_active: Callable | None = None
    set_rows: Callable | None = None
    delete: Callable | None = None
