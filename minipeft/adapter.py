"""Bottleneck adapters: a small residual MLP inserted after a frozen sublayer.

    adapter(h) = h + W_up f(W_down h + b_down) + b_up,    W_down in R^{b x d}, W_up in R^{d x b}, b << d

``W_up`` and ``b_up`` start at zero, so every adapter starts as the identity and the adapted model
exactly as the base. Houlsby et al. 2019 (arXiv 1902.00751) put one after attention and one after the
feed-forward block of every layer (``placement="houlsby"``); Pfeiffer et al. 2021 (AdapterFusion, arXiv
2005.00247) after the feed-forward block only (``"pfeiffer"``, without its extra LayerNorm details).
The nonlinearity follows AdapterHub's configs: swish for houlsby, relu for pfeiffer.

The surgery: the output projection of each adapted sublayer (``attn.o_proj``, ``mlp.fc_out``) becomes an
:class:`AdaptedLinear`, holding the very same weight and bias under the same names (the base's state
dict keys do not change) and running its adapters on its output. Named adapters (one per task) are
chosen with ``mp.set_adapter`` and friends; :func:`compose_adapters` runs several at once, stacked
(``a2(a1(h))``) or averaged (``h + mean_i delta_i(h)``, AdapterHub's Stack and Average blocks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Method, adapter_name, integer, module, one_of, positive_int, replace_module
from .full import freeze
from .model import GPT

PLACEMENTS = {"houlsby": ("attn.o_proj", "mlp.fc_out"), "pfeiffer": ("mlp.fc_out",)}
DEFAULT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}
ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
COMBINES = ("stack", "average")


@dataclass
class AdapterConfig:
    bottleneck: int = 16
    placement: str = "houlsby"      # "houlsby": after attention and after the MLP; "pfeiffer": after the MLP
    activation: str | None = None   # None: swish for houlsby, relu for pfeiffer (AdapterHub)
    seed: int = 0                   # initialisation of the down-projections

    def __post_init__(self):
        positive_int("bottleneck", self.bottleneck)
        one_of("placement", self.placement, PLACEMENTS)
        if self.activation is None:
            self.activation = DEFAULT_ACTIVATION[self.placement]
        one_of("activation", self.activation, ACTIVATIONS)
        integer("seed", self.seed)


class Adapter(nn.Module):
    """``h + up(f(down(h)))``, with ``up`` zero at the start (the identity)."""

    def __init__(self, d_model: int, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.down = nn.Linear(d_model, config.bottleneck)  # default (Kaiming-uniform) initialisation
        self.act = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(config.bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        # delta(h) = W_up f(W_down h + b_down) + b_up: (B, T, d) -> (B, T, b) -> (B, T, d)
        return self.up(self.act(self.down(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)

    def extra_repr(self) -> str:
        return f"bottleneck={self.config.bottleneck}, params={sum(p.numel() for p in self.parameters()):,}"


class AdaptedLinear(nn.Module):
    """A frozen linear layer (the original weight and bias) followed by the adapters in use."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same tensors, under the same names
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.combine = "stack"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(F.linear(x, self.weight, self.bias))

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        """Run the adapters in use on the layer's output ``h``."""
        used = [self.adapters[n] for n in self.active if n in self.adapters]
        if self.combine == "average" and used:
            # h + (1/k) sum_i delta_i(h)
            return h + torch.stack([a.delta(h) for a in used]).mean(dim=0)
        for adapter in used:  # stack: a_k(... a_1(h))
            h = adapter(h)
        return h

    def to_linear(self) -> nn.Linear:
        """The plain linear layer again (the same weight and bias tensors)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active}, combine={self.combine!r}")


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def add_adapters(model: GPT, bottleneck: int = AdapterConfig.bottleneck, placement: str = AdapterConfig.placement,
                 name: str = "default", activation: str | None = AdapterConfig.activation,
                 seed: int = AdapterConfig.seed) -> GPT:
    """Freeze ``model`` and insert bottleneck adapters (Houlsby or Pfeiffer placement); returns the model.
    A new ``name`` keeps the earlier adapters and makes the new one active (and the only trainable one)."""
    config = AdapterConfig(bottleneck, placement, activation, seed)  # validates the options
    module("model", model, GPT)
    adapter_name(name, _names(model))
    where = [f"blocks.{i}.{path}" for i in range(len(model.blocks)) for path in PLACEMENTS[placement]]
    new = {}
    with torch.random.fork_rng(devices=[]):  # allocate first: if memory runs out, the model is untouched
        torch.manual_seed(seed)
        for w in where:
            layer = model.get_submodule(w)
            new[w] = Adapter(layer.out_features, config).to(layer.weight).train(model.training)
    freeze(model)
    for w in where:  # the surgery: o_proj / fc_out -> AdaptedLinear
        layer = model.get_submodule(w)
        if not isinstance(layer, AdaptedLinear):
            layer = AdaptedLinear(layer).train(model.training)
            replace_module(model, w, layer)
        layer.adapters[name] = new[w]
    compose_adapters(model, [name])
    return model


def compose_adapters(model: GPT, names: list[str], combine: str = "stack") -> GPT:
    """Run several adapters at once, ``combine="stack"`` (``a2(a1(h))``) or ``"average"``; they all train."""
    module("model", model)
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"names must be a list of adapter names, got {names!r}")
    unknown = sorted(set(names) - set(_names(model)))
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; the model has {_names(model)}")
    one_of("combine", combine, COMBINES)
    for layer in adapted_layers(model).values():
        layer.active, layer.combine = list(names), combine
        for n, adapter in layer.adapters.items():
            adapter.requires_grad_(n in names)
    return model


# --- bookkeeping: named adapters, what a file holds -----------------------------------------------------


def _names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for layer in adapted_layers(model).values() for n in layer.adapters))


def _active(model: nn.Module) -> str | None:
    active = next(iter(adapted_layers(model).values())).active
    return active[0] if len(active) == 1 else None


def _delete(model: GPT, name: str) -> None:
    """Remove adapter ``name``; a layer left without adapters becomes a plain ``nn.Linear`` again."""
    for where, layer in adapted_layers(model).items():
        if name in layer.adapters:
            del layer.adapters[name]
            layer.active = [n for n in layer.active if n != name]
            if not layer.adapters:
                replace_module(model, where, layer.to_linear())


def _parts(model: nn.Module, name: str) -> dict[str, nn.Module]:
    return {w: m.adapters[name] for w, m in adapted_layers(model).items() if name in m.adapters}


METHOD = Method("adapter", AdapterConfig, add_adapters, names=_names, parts=_parts,
                options=lambda model, name: asdict(next(iter(_parts(model, name).values())).config),
                owned=(Adapter,), active=_active,
                set_active=lambda model, name: compose_adapters(model, [] if name is None else [name]),
                delete=_delete)
