"""LoRA: low-rank adaptation of frozen linear layers (Hu et al. 2021, arXiv 2106.09685).

A frozen layer ``W`` (out x in) keeps its weights and learns an update of rank ``r``::

    h = W x + scaling * B A x        A: r x in (Kaiming-uniform), B: out x r (zeros), scaling = alpha / r

so ``dW = scaling * B A`` is exactly zero at the start: the adapted model begins at the base. Only A and
B train, ``r * (in + out)`` numbers instead of ``in * out``. :func:`merge_lora` adds ``dW`` into ``W``
after training, and inference then costs nothing extra. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)
uses ``scaling = alpha / sqrt(r)`` so that large ranks still learn.

Names and arithmetic follow PEFT (``lora_A``, ``lora_B``, ``scaling``, ``base_layer``; same
initialisation, dropout on the input of A, same merge), so the numbers carry over to it. One layer may
hold several named adapters; which one runs is chosen model-wide (see :mod:`minipeft.lora_multi`).
"""
from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .full import freeze


@dataclass
class LoRAConfig:
    r: int = 8                                       # rank of the update
    alpha: float = 16.0                              # scaling = alpha / r  (alpha / sqrt(r) with rslora)
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # name suffixes, globs ("blocks.0.*"), or "all-linear"
    dropout: float = 0.0                             # on the input of A, in training only
    rslora: bool = False
    name: str = "default"                            # adapter name: several may live in one model

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise TypeError(f"rslora must be True or False, got {self.rslora!r}")
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"adapter name must be a Python identifier such as 'default', got {self.name!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be non-empty module names or patterns, got {self.targets!r}")


class LoRAAdapter(nn.Module):
    """One low-rank update ``x -> scaling * B A dropout(x)``, ``A`` (r x in), ``B`` (out x r)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, device=None):
        super().__init__()
        self.r, self.alpha, self.rslora = r, alpha, rslora
        # scaling = alpha / r   (rsLoRA: alpha / sqrt(r))
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))  # zero: dW = 0 at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear and PEFT use
        self.dropout = nn.Dropout(dropout)

    def delta_weight(self) -> torch.Tensor:
        # dW = scaling * B A    (out x in)
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scaling * B A x as two thin products, never forming dW: (..., in) -> (..., r) -> (..., out)
        return self.dropout(x) @ self.lora_A.T @ self.lora_B.T * self.scaling

    def extra_repr(self) -> str:
        rs = ", rslora" if self.rslora else ""
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{rs}, "
                f"lora_A={tuple(self.lora_A.shape)}, lora_B={tuple(self.lora_B.shape)}")


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling * B A dropout(x)`` around any linear-like layer.

    The base layer is only called, never looked into (it needs ``in_features`` and ``out_features``),
    so an ``nn.Linear`` and a frozen 4-bit layer are wrapped alike. ``adapters`` holds named
    :class:`LoRAAdapter` s; ``active`` names the one that runs (``None``: the bare base).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 rslora: bool = False, name: str = "default"):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged = False     # True while the active adapter's dW sits inside the base weight
        self.row_names = None   # one adapter name per batch row, for a mixed batch (lora_multi)
        self.add_adapter(name, r, alpha, dropout, rslora)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        LoRAConfig(r, alpha, ("-",), dropout, rslora, name)  # checks the values
        check_rank(r, self, f"this layer (adapter {name!r})")
        if name in self.adapters:
            raise ValueError(f"this layer already has a LoRA adapter named {name!r}")
        ref = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers()), None)
        self.adapters[name] = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, rslora,
                                          device=None if ref is None else ref.device)
        self.active = name

    # the active adapter's parts, under PEFT's names
    lora_A = property(lambda self: self.adapters[self.active].lora_A)
    lora_B = property(lambda self: self.adapters[self.active].lora_B)
    scaling = property(lambda self: self.adapters[self.active].scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.row_names is not None:          # a mixed batch: row b uses adapter row_names[b]
            return self._forward_per_row(x, y)
        if self.active is None or self.merged:  # the bare base, or dW already inside the base weight
            return y
        return y + self.adapters[self.active](x)

    def _forward_per_row(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(self.row_names) != x.shape[0]:
            raise ValueError(f"{len(self.row_names)} adapter names for a batch of {x.shape[0]} rows")
        for name in dict.fromkeys(self.row_names):  # each adapter once, on its own rows
            if name in self.adapters:
                rows = torch.tensor([b for b, n in enumerate(self.row_names) if n == name], device=x.device)
                y = y.index_add(0, rows, self.adapters[name](x[rows]))
        return y

    def merge(self, sign: int = 1, requantize: bool = False) -> None:
        """Add (``sign=1``) or subtract (``-1``) the active adapter's dW to the base weight."""
        delta = sign * self.adapters[self.active].delta_weight().detach()
        if isinstance(self.base_layer, nn.Linear):
            with torch.no_grad():
                self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        else:  # e.g. the 4-bit layer: dequantise, add, requantise (it refuses unless requantize=True)
            self.base_layer.merge_delta(delta, requantize=requantize)
        self.merged = sign == 1

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active!r}, merged={self.merged}")


def check_rank(r: int, layer: nn.Module, where: str) -> None:
    if r > min(layer.in_features, layer.out_features):
        raise ValueError(f"LoRA rank r={r} is larger than min(in, out) = "
                         f"min({layer.in_features}, {layer.out_features}) of {where}")


def _linear_like(m: nn.Module) -> bool:
    return isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like layer by name; a LoRALinear counts once (its ``base_layer`` is not listed)."""
    found, inside = {}, ()
    for name, module in model.named_modules():  # parents come before their children
        if name and _linear_like(module) and not name.startswith(inside):
            found[name] = module
        if isinstance(module, LoRALinear):
            inside += (name + ".",)
    return found


def _matches(name: str, target: str) -> bool:
    if target == "all-linear":
        return name != "head"
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def find_targets(model: nn.Module, targets) -> dict[str, nn.Module]:
    """The linear layers named by ``targets``: a name suffix (``"q_proj"``), a glob (``"blocks.[01].*"``),
    or ``"all-linear"`` (every linear layer but the output ``head``, as in PEFT)."""
    layers = linear_layers(model)
    chosen = {}
    for t in (targets,) if isinstance(targets, str) else targets:
        hits = {n: m for n, m in layers.items() if _matches(n, t)}
        if not hits:
            kinds = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
            raise ValueError(f"LoRA target {t!r} matches no linear layer; the linear layers are named "
                             f"{kinds} (full names like {next(iter(layers), 'none')!r})")
        chosen.update(hits)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"),
             dropout: float = 0.0, rslora: bool = False, name: str = "default") -> nn.Module:
    """Freeze ``model`` and wrap each target layer in a :class:`LoRALinear` (in place; returns ``model``).

    Calling it again with another ``name`` adds a second adapter (to the same or other layers); the
    newest adapter becomes the active one and the only part that trains.
    """
    config = LoRAConfig(r, alpha, targets, dropout, rslora, name)  # checks the values
    chosen = find_targets(model, config.targets)
    for where, layer in chosen.items():  # check everything before changing anything
        check_rank(r, layer, where)
        if isinstance(layer, LoRALinear) and name in layer.adapters:
            raise ValueError(f"{where} already has a LoRA adapter named {name!r}: pass another name= "
                             f"or remove it with delete_lora_adapter")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("the model has a merged LoRA adapter: call unmerge_lora before adding another")
    freeze(model)
    for where, layer in chosen.items():
        if isinstance(layer, LoRALinear):
            layer.add_adapter(name, r, alpha, dropout, rslora)
        else:
            parent, _, child = where.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(layer, r, alpha, dropout, rslora, name))
    from .lora_multi import set_lora_adapter
    return set_lora_adapter(model, name)


def _merge_all(model: nn.Module, sign: int, requantize: bool) -> nn.Module:
    verb = "merge" if sign == 1 else "unmerge"
    layers = [m for m in lora_layers(model).values() if m.active is not None]
    if not layers:
        raise ValueError(f"nothing to {verb}: the model has no active LoRA adapter")
    if any(m.merged == (sign == 1) for m in layers):
        raise ValueError("LoRA is already merged: call unmerge_lora first" if sign == 1 else
                         "LoRA is not merged: call merge_lora first")
    for m in layers:
        if not isinstance(m.base_layer, nn.Linear) and not hasattr(m.base_layer, "merge_delta"):
            raise TypeError(f"cannot {verb} into a {type(m.base_layer).__name__}: it has no merge_delta()")
    # layers that may refuse (4-bit ones, without requantize=True) go first, before anything changed
    for m in sorted(layers, key=lambda m: isinstance(m.base_layer, nn.Linear)):
        m.merge(sign, requantize)
    return model


def merge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold ``scaling * B A`` of the active adapter into each base weight: no inference overhead after.

    A 4-bit base must be dequantised, added to and requantised (rounding error): ``requantize=True``.
    """
    return _merge_all(model, +1, requantize)


def unmerge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Subtract the merged update again: the base weights come back (up to float rounding)."""
    return _merge_all(model, -1, requantize)


def subspace_similarity(W1: torch.Tensor, W2: torch.Tensor, i: int, j: int) -> float:
    """phi(W1, W2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)  (the LoRA paper, section 7).

    ``U1``, ``U2``: left singular vectors of the two matrices. 1 when the top-i directions of one lie in
    the span of the top-j of the other, 0 when the two subspaces are orthogonal; two random subspaces of
    R^d give about max(i, j) / d.
    """
    U1 = torch.linalg.svd(torch.as_tensor(W1).detach().double(), full_matrices=False).U[:, :i]
    U2 = torch.linalg.svd(torch.as_tensor(W2).detach().double(), full_matrices=False).U[:, :j]
    return float((U1.T @ U2).pow(2).sum() / min(i, j))
