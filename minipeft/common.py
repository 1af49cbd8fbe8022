"""What every method file shares: argument checks, module surgery, and the shape of a method's entry.

The checks return the value they accept and raise a ``ValueError`` / ``TypeError`` that names the
argument, so that every public function can check all of its arguments first and change the model only
after: ``r = positive_int("r", r)``. ``bool`` is never taken for a number.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An integer (numpy's too), within ``[low, high]`` where a bound is given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in [{low}, {'inf' if high is None else high}], got {value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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


def module(name: str, value, kind: type = nn.Module) -> nn.Module:
    """A torch module, or of type ``kind`` (``module("model", model, GPT)``)."""
    if not isinstance(value, kind):
        what = "torch nn.Module (a minipeft GPT)" if kind is nn.Module else f"minipeft {kind.__name__}"
        raise TypeError(f"{name} must be a {what}, got {type(value).__name__}")
    return value


def one_of(name: str, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value


# names that an nn.ModuleDict, or the bookkeeping of the methods, already uses
_TAKEN = set(dir(nn.ModuleDict())) | {"training", "keys", "items", "values", "base_layer"}


def adapter_name(value, taken=(), what: str = "an adapter") -> str:
    """A name for a named adapter: a Python identifier not taken by ``nn.ModuleDict`` (``"rotate"``),
    nor by one of the model's adapters (``taken``)."""
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"an adapter name must be a Python identifier such as 'rotate', got {value!r}")
    if value in _TAKEN:
        raise ValueError(f"{value!r} cannot be an adapter name: nn.ModuleDict uses it")
    if value in taken:
        raise ValueError(f"the model already has {what} named {value!r}; pick another name or mp.delete_adapter() it")
    return value


def replace_module(model: nn.Module, where: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``where`` of ``model`` (module surgery); returns the module it replaced."""
    parent, _, child = where.rpartition(".")
    parent = model.get_submodule(parent)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class AdapterFileError(ValueError):
    """A saved adapter that is not what it claims: unreadable, incomplete, oversized or with unexpected parts."""


class BaseMismatchError(ValueError):
    """A saved adapter made for another base model (other config or other weights)."""


OWNED: dict[type, str] = {}  # module type -> the method that owns it (filled as each method file loads)


def methods_applied(model: nn.Module) -> list[str]:
    """The methods whose own modules are in ``model`` (what :func:`minipeft.methods_in` finds, without the
    registry, for the modules that must not import it)."""
    return sorted({OWNED[type(m)] for m in model.modules() if type(m) in OWNED})


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
    whole: bool = False                        # replaces every weight: a file holds the whole model
    ready: Callable | None = None              # (model) raises if it cannot be saved or loaded into now
    base: dict = field(default_factory=dict)   # saved option -> (read it from a model, make a base match it)

    def __post_init__(self):
        OWNED.update(dict.fromkeys(self.owned, self.name))
