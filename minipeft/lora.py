"""LoRA: low-rank adaptation of frozen linear layers (Hu et al. 2021, arXiv 2106.09685).

A frozen layer ``W`` (out x in) keeps its weights and learns an update of rank ``r``::

    h = W x + scaling * B A x        A: r x in (Kaiming-uniform), B: out x r (zeros), scaling = alpha / r

so ``dW = scaling * B A`` is exactly zero at the start: the adapted model begins at the base. Only A and
B train, ``r * (in + out)`` numbers instead of ``in * out``. :func:`merge_lora` adds ``dW`` into ``W``
after training, and inference then costs nothing extra. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)
uses ``scaling = alpha / sqrt(r)`` so that large ranks still learn.

Names and arithmetic follow PEFT (``lora_A``, ``lora_B``, ``scaling``, ``base_layer``, initialisation,
dropout on A's input, merge), so the numbers carry over to it. The file reads in the lecture's order:
the update, the layer that adds it to a frozen one, the surgery, merging; then the bookkeeping of
several named adapters per layer (``mp.set_adapter``, ``mp.adapter_per_row``: one per batch row, as
multi-adapter servers such as S-LoRA, arXiv 2311.03285, batch requests).
"""
from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .common import Method, adapter_name, boolean, module, positive_float, positive_int, probability, replace_module
from .full import freeze
from .qlora import nf4_settings, quantize_like


@dataclass
class LoRAConfig:
    r: int = 8                                       # rank of the update
    alpha: float = 16.0                              # scaling = alpha / r  (alpha / sqrt(r) with rslora)
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # name suffixes, globs ("blocks.0.*"), or "all-linear"
    dropout: float = 0.0                             # on the input of A, in training only
    rslora: bool = False

    def __post_init__(self):
        positive_int("LoRA rank r", self.r)
        positive_float("LoRA alpha", self.alpha)
        probability("LoRA dropout", self.dropout)
        boolean("rslora", self.rslora)
        self.targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(self.targets, (tuple, list)) or not self.targets or \
                not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be non-empty module names or patterns, got {self.targets!r}")
        self.targets = tuple(self.targets)


def _device(module: nn.Module) -> torch.device:
    return next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device


class LoRAAdapter(nn.Module):
    """One low-rank update ``x -> scaling * B A dropout(x)``, ``A`` (r x in), ``B`` (out x r)."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device=None):
        super().__init__()
        self.r, self.alpha, self.rslora = config.r, config.alpha, config.rslora
        # scaling = alpha / r   (rsLoRA: alpha / sqrt(r))
        self.scaling = config.alpha / math.sqrt(config.r) if config.rslora else config.alpha / config.r
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, device=device))  # zero: dW = 0 at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear and PEFT use
        self.dropout = nn.Dropout(config.dropout)

    def delta_weight(self) -> torch.Tensor:
        # dW = scaling * B A    (out x in)
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scaling * B A x as two thin products, never forming dW: (..., in) -> (..., r) -> (..., out);
        # the scaling multiplies the thin (..., r) middle, r numbers a row instead of out
        return (self.dropout(x) @ self.lora_A.T * self.scaling) @ self.lora_B.T

    def extra_repr(self) -> str:
        rs = ", rslora" if self.rslora else ""
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{rs}, "
                f"lora_A={tuple(self.lora_A.shape)}, lora_B={tuple(self.lora_B.shape)}")


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling * B A dropout(x)`` around any layer with ``in_features`` and
    ``out_features`` (an ``nn.Linear``, a frozen 4-bit layer): the base layer is only called, never looked
    into. ``adapters`` holds named :class:`LoRAAdapter` s; ``active`` names the one that runs (or None)."""

    def __init__(self, base: nn.Module, r: int = LoRAConfig.r, alpha: float = LoRAConfig.alpha,
                 dropout: float = LoRAConfig.dropout, rslora: bool = LoRAConfig.rslora, name: str = "default"):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.merged = False  # True while the active adapter's dW sits inside the base weight
        self.rows = None     # a mixed batch: (batch size, {adapter name: the batch rows that use it})
        self.adapters[adapter_name(name)] = LoRAAdapter(self.in_features, self.out_features,
                                                        LoRAConfig(r, alpha, "-", dropout, rslora), _device(base))
        self.active: str | None = name

    # the active adapter's parts, under PEFT's names
    lora_A = property(lambda self: self.adapters[self.active].lora_A)
    lora_B = property(lambda self: self.adapters[self.active].lora_B)
    scaling = property(lambda self: self.adapters[self.active].scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.rows is None:  # one adapter for the batch; none: the bare base; merged: dW is inside W
            return y if self.active is None or self.merged else y + self.adapters[self.active](x)
        n_rows, rows_of = self.rows  # a mixed batch: each adapter adds its update to its own rows only
        if x.shape[0] != n_rows:
            raise ValueError(f"{n_rows} adapter names for a batch of {x.shape[0]} rows (one name per row)")
        for name, rows in rows_of.items():
            if name in self.adapters:
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


# --- the surgery: which layers, and wrapping them -------------------------------------------------------


def _linear_like(m: nn.Module) -> bool:
    return isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like layer by name; a LoRALinear counts once (its ``base_layer`` is not listed)."""
    found, inside = {}, ()
    for name, m in model.named_modules():  # parents come before their children
        if name and _linear_like(m) and not name.startswith(inside):
            found[name] = m
        if isinstance(m, LoRALinear):
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


def add_lora(model: nn.Module, r: int = LoRAConfig.r, alpha: float = LoRAConfig.alpha, targets=LoRAConfig.targets,
             dropout: float = LoRAConfig.dropout, rslora: bool = LoRAConfig.rslora, name: str = "default") -> nn.Module:
    """Freeze ``model`` and wrap each target layer in a :class:`LoRALinear` (in place; returns ``model``).
    Another ``name`` adds a second adapter, which becomes the active one and the only part that trains."""
    module("model", model)
    config = LoRAConfig(r, alpha, targets, dropout, rslora)  # checks the values
    adapter_name(name)
    chosen = find_targets(model, config.targets)
    for where, layer in chosen.items():  # check everything before changing anything
        if r > min(layer.in_features, layer.out_features):
            raise ValueError(f"LoRA rank r={r} is larger than min(in, out) = "
                             f"min({layer.in_features}, {layer.out_features}) of {where}")
        if isinstance(layer, LoRALinear) and name in layer.adapters:
            raise ValueError(f"{where} already has a LoRA adapter named {name!r}: pass another name= "
                             f"or remove it with mp.delete_adapter")
    _not_merged(model, "add an adapter")
    new = {}  # allocate first: if memory runs out, the model is untouched
    for where, layer in chosen.items():
        if isinstance(layer, LoRALinear):
            new[where] = LoRAAdapter(layer.in_features, layer.out_features, config, _device(layer.base_layer))
        else:
            new[where] = LoRALinear(layer, r, alpha, dropout, rslora, name)
        new[where].train(model.training)  # new modules take the model's train/eval mode
    freeze(model)
    for where, layer in chosen.items():
        if isinstance(layer, LoRALinear):
            layer.adapters[name] = new[where]
        else:
            replace_module(model, where, new[where])
    _set_active(model, name)
    return model


# --- merging ---------------------------------------------------------------------------------------------


def _merge_all(model: nn.Module, sign: int, requantize: bool) -> nn.Module:
    verb = "merge" if sign == 1 else "unmerge"
    module("model", model)
    boolean("requantize", requantize)
    layers = {w: m for w, m in lora_layers(model).items() if m.active is not None}
    if not layers:
        raise ValueError(f"nothing to {verb}: the model has no active LoRA adapter")
    if any(m.merged == (sign == 1) for m in layers.values()):
        raise ValueError("LoRA is already merged: call unmerge_lora first" if sign == 1 else
                         "LoRA is not merged: call merge_lora first")
    for where, m in layers.items():
        if not isinstance(m.base_layer, nn.Linear) and not hasattr(m.base_layer, "merge_delta"):
            raise TypeError(f"cannot {verb} into a {type(m.base_layer).__name__}: it has no merge_delta()")
        if not torch.isfinite(m.adapters[m.active].delta_weight()).all():
            raise ValueError(f"the LoRA update of {where} (adapter {m.active!r}) holds NaN or infinite values: "
                             f"merging it would make the base weights non-finite for good")
    # layers that may refuse (4-bit ones, without requantize=True) go first, before anything changed
    for m in sorted(layers.values(), key=lambda m: isinstance(m.base_layer, nn.Linear)):
        m.merge(sign, requantize)
    return model


def merge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold ``scaling * B A`` of the active adapter into each base weight: no inference overhead after.
    A 4-bit base must be dequantised, added to and requantised (rounding error): ``requantize=True``."""
    return _merge_all(model, +1, requantize)


def unmerge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Subtract the merged update again: the base weights come back (up to float rounding)."""
    return _merge_all(model, -1, requantize)


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base layer (after :func:`merge_lora`: PEFT's merge_and_unload)."""
    for where, m in lora_layers(model).items():
        replace_module(model, where, m.base_layer)
    return model


def subspace_similarity(W1: torch.Tensor, W2: torch.Tensor, i, j):
    """phi(W1, W2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)  (the LoRA paper, section 7).

    ``U1``, ``U2``: left singular vectors. 1 when the top-i directions of one lie in the span of the
    top-j of the other, 0 when orthogonal, about max(i, j) / d for random subspaces of R^d. Lists ``i``
    and ``j`` (same length) give one phi per pair, each SVD done once.
    """
    U1 = torch.linalg.svd(torch.as_tensor(W1).detach().double(), full_matrices=False).U
    U2 = torch.linalg.svd(torch.as_tensor(W2).detach().double(), full_matrices=False).U
    overlap = (U1.T @ U2).pow(2)  # squared cosines between the two sets of directions

    def phi(a: int, b: int) -> float:
        return float(overlap[:a, :b].sum() / min(a, b))
    return phi(i, j) if isinstance(i, int) else [phi(a, b) for a, b in zip(i, j)]


# --- bookkeeping: named adapters, one per row, what a file holds ----------------------------------------


def _names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for m in lora_layers(model).values() for n in m.adapters))


def _not_merged(model: nn.Module, what: str) -> None:
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError(f"cannot {what} while a LoRA adapter is merged into the base weights: "
                         f"call mp.unmerge_lora(model) first")


def _set_active(model: nn.Module, name: str | None) -> None:
    """``name`` runs (a layer without it runs its bare base) and is the only LoRA part that trains."""
    _not_merged(model, "switch adapters")
    for m in lora_layers(model).values():
        m.active = name if name in m.adapters else None
        for adapter_name_, adapter in m.adapters.items():
            adapter.requires_grad_(adapter_name_ == name)


def _set_rows(model: nn.Module, names: list | None) -> None:
    """Row b of the next batches uses adapter ``names[b]`` (``None``: the bare base); ``None``: no mixing."""
    _not_merged(model, "mix adapters in one batch")
    for m in lora_layers(model).values():
        m.rows = None if names is None else (len(names), {
            n: torch.tensor([b for b, x in enumerate(names) if x == n], device=_device(m))
            for n in dict.fromkeys(names) if n is not None})


def _delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a layer left without adapters becomes its base layer again."""
    _not_merged(model, "delete an adapter")
    for where, m in lora_layers(model).items():
        if name in m.adapters:
            del m.adapters[name]
            m.active = None if m.active == name else m.active
        if not m.adapters:
            replace_module(model, where, m.base_layer)


def _parts(model: nn.Module, name: str) -> dict[str, nn.Module]:
    return {w: m.adapters[name] for w, m in lora_layers(model).items() if name in m.adapters}


def _options(model: nn.Module, name: str) -> dict:
    parts = _parts(model, name)
    one = next(iter(parts.values()))
    return dict(r=one.r, alpha=one.alpha, targets=sorted(parts), dropout=one.dropout.p, rslora=one.rslora)


METHOD = Method("lora", LoRAConfig, add_lora, names=_names, parts=_parts, options=_options,
                owned=(LoRAAdapter,), wrapper=(LoRALinear, "base_layer"),
                active=lambda model: next((m.active for m in lora_layers(model).values() if m.active), None),
                set_active=_set_active, set_rows=_set_rows, delete=_delete,
                ready=lambda model: _not_merged(model, "save or load adapters"),
                base={"base_nf4": (nf4_settings, quantize_like)})  # QLoRA: how the 4-bit base was quantised
