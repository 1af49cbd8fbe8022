"""Bottleneck adapters: a small residual MLP inserted after a frozen sublayer.

    adapter(h) = h + W_up f(W_down h + b_down) + b_up,    W_down in R^{b x d}, W_up in R^{d x b}, b << d

``W_up`` and ``b_up`` start at zero, so every adapter starts as the identity and the adapted model
starts exactly as the base. Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv 1902.00751: an adapter after attention and one after the feed-forward block of every layer
(``placement="houlsby"``). Pfeiffer et al. 2021, "AdapterFusion", arXiv 2005.00247: after the
feed-forward block only (``"pfeiffer"``; we keep its position and drop its extra LayerNorm details).
The nonlinearity follows AdapterHub's configs: swish for houlsby, relu for pfeiffer.

Module surgery, without editing the model: the output projection of each adapted sublayer
(``attn.o_proj``, ``mlp.fc_out``) is replaced by an :class:`AdaptedLinear`, which holds the very same
weight and bias tensors, under the same names, and runs its adapters on its output. So the base's
``state_dict`` keys do not change, and "after attention" is exactly "after ``o_proj``".

Several named adapters (one per task) can live in one model: :func:`set_adapters` chooses one, none,
or several composed, either stacked (``a2(a1(h))``) or averaged (``h + mean_i delta_i(h)``, AdapterHub's
Stack and Average blocks). Adding an adapter under a name the model already has is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        if not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck <= 0:
            raise ValueError(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {tuple(PLACEMENTS)}")
        if self.activation is None:
            self.activation = DEFAULT_ACTIVATION[self.placement]
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {tuple(ACTIVATIONS)}")


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


def adapted_layers(model: nn.Module) -> list[AdaptedLinear]:
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they were added."""
    return list(dict.fromkeys(n for layer in adapted_layers(model) for n in layer.adapters))


def add_adapters(model: GPT, bottleneck: int = 16, placement: str = "houlsby", name: str = "default",
                 activation: str | None = None, seed: int = 0) -> GPT:
    """Freeze ``model`` and insert bottleneck adapters (Houlsby or Pfeiffer placement); returns the model.

    Adding adapters under a new ``name`` keeps the earlier ones and makes the new one active (and the
    only trainable one); compose them with :func:`set_adapters`.
    """
    config = AdapterConfig(bottleneck, placement, activation, seed)  # validates the options
    if not isinstance(model, GPT):
        raise TypeError(f"add_adapters needs a minipeft GPT, got {type(model).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an adapter name must be a Python identifier (like 'rotate'), got {name!r}")
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; pick another name or delete_adapter() it")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"{name!r} cannot be an adapter name (it is taken by nn.ModuleDict)")
    freeze(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for block in model.blocks:
            for path in PLACEMENTS[placement]:
                parent_name, child_name = path.split(".")
                parent = getattr(block, parent_name)
                layer = getattr(parent, child_name)
                if not isinstance(layer, AdaptedLinear):  # the surgery: o_proj / fc_out -> AdaptedLinear
                    layer = AdaptedLinear(layer)
                    setattr(parent, child_name, layer)
                layer.adapters[name] = Adapter(layer.out_features, config).to(layer.weight)
    return set_adapters(model, name)


def set_adapters(model: GPT, names: str | list[str] | None, combine: str = "stack") -> GPT:
    """Use one adapter (a name), several composed (a list, ``combine="stack"`` or ``"average"``), or none.

    The adapters in use become trainable, the others are frozen (as PEFT's ``set_adapter`` does).
    """
    used = [] if names is None else [names] if isinstance(names, str) else list(names)
    unknown = sorted(set(used) - set(list_adapters(model)))
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; the model has {list_adapters(model)}")
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; choose one of {COMBINES}")
    for layer in adapted_layers(model):
        layer.active, layer.combine = used, combine
        for n, adapter in layer.adapters.items():
            adapter.requires_grad_(n in used)
    return model


def delete_adapter(model: GPT, name: str) -> GPT:
    """Remove adapter ``name``; a layer left without adapters becomes a plain ``nn.Linear`` again."""
    if name not in list_adapters(model):
        raise ValueError(f"unknown adapter name {name!r}; the model has {list_adapters(model)}")
    for parent in list(model.modules()):
        for child_name, layer in list(parent.named_children()):
            if isinstance(layer, AdaptedLinear) and name in layer.adapters:
                del layer.adapters[name]
                layer.active = [n for n in layer.active if n != name]
                if not layer.adapters:
                    setattr(parent, child_name, layer.to_linear())
    return model
