"""IA³: learned vectors that rescale keys, values and the feed-forward's inner activation.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv 2205.05638 ("Infused Adapter by Inhibiting and Amplifying Inner Activations"). Three
vectors per block, everything else frozen::

    k = l_k * (W_k u + b_k)        v = l_v * (W_v u + b_v)        h = W_out (l_ff * GELU(W_in u + b_in)) + b_out

``*`` is elementwise, the vectors start at ones (the model starts exactly at the base) and they are all
that trains: ``2 C + F`` numbers a block (768 for the toy model, against 16,384 for LoRA r=8 on q and v).

As in PEFT (``IA3Config``): each target layer has its *output* scaled, except the ``feedforward`` ones,
which have their *input* scaled (``l_ff`` multiplies GELU's output, the input of ``fc_out``); the defaults
are PEFT's for Llama-like models, our names: ``k_proj``, ``v_proj``, ``fc_out`` (feed-forward). The output
scaling multiplies the bias too, as in PEFT. :func:`merge_ia3` folds the vectors into the weights
(rows of ``W`` and ``b`` for an output scaling, columns of ``W`` for an input one) and removes the wrappers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .common import Method, module, replace_module
from .full import freeze
from .lora import _device, _matches, linear_layers


@dataclass
class IA3Config:
    targets: tuple[str, ...] = ("k_proj", "v_proj", "fc_out")  # name suffixes or globs, as LoRA's targets
    feedforward: tuple[str, ...] = ("fc_out",)                  # of the targets: scale the input, not the output

    def __post_init__(self):
        for field in ("targets", "feedforward"):
            value = getattr(self, field)
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, (tuple, list)) or not all(isinstance(t, str) and t for t in value):
                raise ValueError(f"IA3 {field} must be module names or patterns, got {value!r}")
            setattr(self, field, tuple(value))
        if not self.targets:
            raise ValueError("IA3 targets must name at least one layer, got ()")
        if set(self.feedforward) - set(self.targets):
            raise ValueError(f"IA3 feedforward {self.feedforward} must be among the targets {self.targets}")


class IA3Vector(nn.Module):
    """The learned vector ``ia3_l`` of one layer (PEFT's name), ones at the start."""

    def __init__(self, features: int, feedforward: bool, device=None):
        super().__init__()
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones(features, device=device))

    def extra_repr(self) -> str:
        return f"{'input' if self.feedforward else 'output'} scaling, features={self.ia3_l.numel()}"


class IA3Linear(nn.Module):
    """``base_layer(x) * l`` (output scaling) or ``base_layer(x * l)`` (feed-forward: input scaling)."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        self.base_layer = base
        self.ia3 = IA3Vector(base.in_features if feedforward else base.out_features, feedforward, _device(base))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l = self.ia3.ia3_l  # noqa: E741 -- the paper's name
        return self.base_layer(x * l) if self.ia3.feedforward else self.base_layer(x) * l


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def _find(model: nn.Module, patterns: tuple, field: str) -> dict[str, nn.Module]:
    layers, chosen = linear_layers(model), {}
    for t in patterns:
        hits = {n: m for n, m in layers.items() if _matches(n, t)}
        if not hits:
            kinds = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
            raise ValueError(f"IA3 {field} {t!r} matches no linear layer; the linear layers are named {kinds}")
        chosen.update(hits)
    return chosen


def add_ia3(model: nn.Module, targets=("k_proj", "v_proj", "fc_out"), feedforward=("fc_out",)) -> nn.Module:
    """Freeze ``model`` and wrap each target layer in an :class:`IA3Linear` (in place; returns ``model``)."""
    module("model", model)
    config = IA3Config(targets, feedforward)  # checks the values
    if ia3_layers(model):
        raise ValueError("the model already has IA3 vectors; start again from a fresh mp.load_base()")
    chosen, inputs = _find(model, config.targets, "target"), set(_find(model, config.feedforward, "feedforward"))
    for where, layer in chosen.items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"IA3 wraps plain nn.Linear layers; {where} is a {type(layer).__name__}")
    new = {w: IA3Linear(layer, w in inputs).train(model.training) for w, layer in chosen.items()}  # allocate first
    freeze(model)
    for where, layer in new.items():
        replace_module(model, where, layer)
    return model


@torch.no_grad()
def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every vector into its layer's weights and put the plain layers back (no way back: dividing by
    ``l`` again would not give the old weights bit for bit)."""
    layers = ia3_layers(module("model", model))
    if not layers:
        raise ValueError("nothing to merge: the model has no IA3 vectors")
    for where, m in layers.items():
        if not torch.isfinite(m.ia3.ia3_l).all():
            raise ValueError(f"the IA3 vector of {where} holds NaN or infinite values: merging it would make "
                             f"the base weights non-finite for good")
    for where, m in layers.items():
        W, b, l = m.base_layer.weight, m.base_layer.bias, m.ia3.ia3_l  # noqa: E741
        if m.ia3.feedforward:
            W.mul_(l)                # W (out x in) * l[None, :]: W_out (l * h) = (W_out diag(l)) h
        else:
            W.mul_(l[:, None])       # l * (W u + b) = (diag(l) W) u + l * b
            if b is not None:
                b.mul_(l)
        replace_module(model, where, m.base_layer)
    return model


# --- bookkeeping: one unnamed set of vectors; what a file holds -------------------------------------------


def _options(model: nn.Module, name) -> dict:
    layers = ia3_layers(model)
    return dict(targets=sorted(layers), feedforward=sorted(w for w, m in layers.items() if m.ia3.feedforward))


METHOD = Method("ia3", IA3Config, add_ia3, owned=(IA3Vector,), wrapper=(IA3Linear, "base_layer"),
                names=lambda model: [None] if ia3_layers(model) else [],
                parts=lambda model, name: {w: m.ia3 for w, m in ia3_layers(model).items()},
                options=_options)
