"""DoRA: LoRA on the direction of each weight row, and a learned magnitude per output feature.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353. A weight is a magnitude
times a direction, ``W = ||W||_c * W / ||W||_c``, the norm taken over each output feature's row of the
(out x in) weight (the paper's "column" norm, written for the transposed weight). DoRA learns the magnitude
``m`` (one number per output feature) and updates the direction with LoRA::

    W' = m * (W + s B A) / ||W + s B A||_c        m starts at ||W||_c, B at 0: W' = W at the start

so it trains LoRA's ``r (in + out)`` numbers plus ``out`` more a layer. The norm is treated as a constant
in backward (section 4.3: "detaching it from the gradient graph"), as PEFT does, which saves memory. The
output is computed as PEFT computes it, without forming ``W'``::

    y = W x + b + (g - 1) * (W x) + g * s B A x,      g = m / ||W + s B A||_c   (the bias is not rescaled)

which is exactly the base's output at the start (``g - 1 = 0``, ``B = 0``). Built on LoRA's pieces:
:class:`DoRAAdapter` is a :class:`~minipeft.lora.LoRAAdapter` (A, B, scaling, ``delta_weight``) with the
magnitude added, and the targets are chosen as LoRA's (PEFT: ``LoraConfig(use_dora=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .common import Method, module, replace_module
from .full import freeze
from .lora import LoRAAdapter, LoRAConfig, find_targets


@dataclass
class DoRAConfig:
    r: int = 8                                       # rank of the direction's update
    alpha: float = 16.0                              # scaling s = alpha / r
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # as LoRA's: name suffixes, globs, or "all-linear"

    def __post_init__(self):
        self.targets = LoRAConfig(self.r, self.alpha, self.targets).targets  # LoRA's checks


class DoRAAdapter(LoRAAdapter):
    """LoRA's A and B, plus the magnitude ``m`` (out,), initialised to the row norms of ``weight``."""

    def __init__(self, weight: torch.Tensor, config: DoRAConfig):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, LoRAConfig(config.r, config.alpha), weight.device)
        self.magnitude = nn.Parameter(weight.detach().norm(dim=1))  # ||W||_c, one per output feature

    def gain(self, weight: torch.Tensor) -> torch.Tensor:
        """g = m / ||W + s B A||_c, the norm a constant for backward (section 4.3)."""
        with torch.no_grad():  # no graph, nothing kept for backward
            norm = (weight + self.delta_weight()).norm(dim=1)
        return self.magnitude / norm

    def extra_repr(self) -> str:
        return super().extra_repr() + f", magnitude={tuple(self.magnitude.shape)}"


class DoRALinear(nn.Module):
    """``y = m * (W + s B A) / ||W + s B A||_c x + b`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, config: DoRAConfig):
        super().__init__()
        self.base_layer = base
        self.dora = DoRAAdapter(base.weight, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                                                  # W x + b
        Wx = y if self.base_layer.bias is None else y - self.base_layer.bias   # W x
        g = self.dora.gain(self.base_layer.weight)                             # (out,)
        return y + (g - 1) * Wx + g * self.dora(x)                             # + s B A x, rescaled


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}


def add_dora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj")) -> nn.Module:
    """Freeze ``model`` and wrap each target layer in a :class:`DoRALinear` (in place; returns ``model``)."""
    module("model", model)
    config = DoRAConfig(r, alpha, targets)  # checks the values
    if dora_layers(model):
        raise ValueError("the model already has DoRA; start again from a fresh mp.load_base()")
    chosen = find_targets(model, config.targets)
    for where, layer in chosen.items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"DoRA needs the weight of a plain nn.Linear; {where} is a {type(layer).__name__}")
        if r > min(layer.in_features, layer.out_features):
            raise ValueError(f"DoRA rank r={r} is larger than min(in, out) = "
                             f"min({layer.in_features}, {layer.out_features}) of {where}")
    new = {w: DoRALinear(layer, config).train(model.training) for w, layer in chosen.items()}  # allocate first
    freeze(model)
    for where, layer in new.items():
        replace_module(model, where, layer)
    return model


@torch.no_grad()
def merge_dora(model: nn.Module) -> nn.Module:
    """Replace every DoRALinear by a plain layer holding ``W' = g * (W + s B A)`` (and the same bias)."""
    layers = dora_layers(module("model", model))
    if not layers:
        raise ValueError("nothing to merge: the model has no DoRA layers")
    merged = {}
    for where, m in layers.items():  # compute every new weight first
        W = m.base_layer.weight
        merged[where] = m.dora.gain(W)[:, None] * (W + m.dora.delta_weight())
        if not torch.isfinite(merged[where]).all():
            raise ValueError(f"the merged DoRA weight of {where} holds NaN or infinite values")
    for where, m in layers.items():
        m.base_layer.weight.copy_(merged[where])
        replace_module(model, where, m.base_layer)
    return model


# --- bookkeeping: one unnamed DoRA; what a file holds ---------------------------------------------------


def _options(model: nn.Module, name) -> dict:
    layers = dora_layers(model)
    one = next(iter(layers.values())).dora
    return dict(r=one.r, alpha=one.alpha, targets=sorted(layers))


METHOD = Method("dora", DoRAConfig, add_dora, owned=(DoRAAdapter,), wrapper=(DoRALinear, "base_layer"),
                names=lambda model: [None] if dora_layers(model) else [],
                parts=lambda model, name: {w: m.dora for w, m in dora_layers(model).items()},
                options=_options)
