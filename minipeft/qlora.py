"""QLoRA: a frozen 4-bit NF4 base with LoRA adapters in full precision on top.

:class:`Linear4bit` is a frozen linear layer that stores only what :func:`minipeft.nf4.quantize` returns
(packed 4-bit codes and per-block constants, as buffers) and dequantises its weight on the fly::

    y = x W_hat^T + b,    W_hat = level[code] * absmax   (in the compute dtype: bf16 on CUDA, fp32 on CPU)

No full-precision copy of ``W`` is kept, not even for backward: the gradient with respect to ``x``
(which the LoRA layers below need) dequantises again instead of saving ``W_hat``, as bitsandbytes does.
:func:`quantize_nf4` swaps a model's linear layers for these; ``mp.add_lora`` then wraps them unchanged,
and only the adapters train: that is QLoRA (Dettmers et al. 2023, arXiv 2305.14314).

Merging an adapter into a 4-bit layer means dequantise, add ``dW``, requantise: rounded to 4 bits again,
so the layer refuses unless asked (``merge_lora(model, requantize=True)``), and unmerging does not bring
the original codes back. The usual alternatives: keep the adapter unmerged, or merge into a 16-bit copy
of the dequantised base (:func:`dequantize_nf4`, then ``merge_lora``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import nf4
from .common import AdapterFileError, BaseMismatchError, boolean, methods_applied, module, replace_module
from .full import freeze


@dataclass
class NF4Config:
    blocksize: int = nf4.BLOCKSIZE
    double_quant: bool = True                 # store the absmax constants in 8 bits too (QLoRA's default)
    quant_type: str = "nf4"                   # or "fp4", "int4", for comparison
    compute_dtype: torch.dtype | None = None  # None: bf16 on CUDA, fp32 elsewhere

    def __post_init__(self):
        nf4.check_settings(self.blocksize, self.double_quant, self.quant_type)
        if self.compute_dtype is not None and not (isinstance(self.compute_dtype, torch.dtype)
                                                   and self.compute_dtype.is_floating_point):
            raise TypeError(f"compute_dtype must be a floating torch.dtype or None, got {self.compute_dtype!r}")


class _Matmul4bit(torch.autograd.Function):
    """``x W_hat^T`` that saves nothing for backward: ``dL/dx = dL/dy W_hat`` dequantises ``W`` again."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantized_weight(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.layer.dequantized_weight(grad_out.dtype), None  # the weight is frozen


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight lives only as 4-bit codes + block constants (buffers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, config: NF4Config | None = None):
        super().__init__()
        self.config = config or NF4Config()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._store(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: NF4Config | None = None) -> "Linear4bit":
        return cls(linear.weight.detach(), linear.bias, config)

    def _store(self, weight: torch.Tensor) -> None:
        packed, state = nf4.quantize(weight.detach(), self.config.blocksize, self.config.double_quant,
                                     self.config.quant_type)
        self.weight_dtype = state.dtype
        self.register_buffer("packed", packed)                # uint8, ceil(out * in / 2)
        for name, t in dict(absmax=state.absmax, absmax_offset=state.offset, absmax2=state.absmax2).items():
            self.register_buffer(name, t)                     # absent (None) without double quantisation

    def quant_state(self) -> nf4.QuantState:
        """The :class:`minipeft.nf4.QuantState` of the stored weight (built from the buffers)."""
        return nf4.QuantState(torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                              self.config.blocksize, self.config.quant_type, self.absmax,
                              self.absmax_offset, self.absmax2)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_hat`` (out x in), computed now from the codes; nothing is cached."""
        w = nf4.dequantize(self.packed, self.quant_state(), check=False)
        return w if dtype is None else w.to(dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.config.compute_dtype is not None:
            return self.config.compute_dtype
        return torch.bfloat16 if self.packed.is_cuda else torch.float32

    @property
    def quantized_numel(self) -> int:
        """The number of weights the packed codes stand for (what ``trainable_parameters`` counts)."""
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        y = _Matmul4bit.apply(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def storage_bits(self) -> float:
        """Bits per weight actually stored: the packed codes and the block constants (bias not included)."""
        return nf4.storage_bits(self.packed, self.quant_state())

    def merge_delta(self, delta: torch.Tensor, requantize: bool = False) -> None:
        """``W <- quantise(dequantise(W) + delta)``: used by ``merge_lora`` / ``unmerge_lora``."""
        if not boolean("requantize", requantize):
            raise ValueError(
                "cannot merge a LoRA update into a 4-bit layer without requantising: the merged weight "
                "dequantise(W) + dW must be rounded to 4 bits again, which adds error. Pass "
                "requantize=True (merge_lora(model, requantize=True)) to accept that, or keep the adapter unmerged")
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"delta has shape {tuple(delta.shape)}, the layer's weight is "
                             f"{(self.out_features, self.in_features)}")
        self._store(self.dequantized_weight(torch.float32) + delta.detach().float())

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{c.quant_type}, blocksize={c.blocksize}, double_quant={c.double_quant}, "
                f"{self.storage_bits():.3f} bits/weight")


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_nf4(model: nn.Module, skip=("tok_emb", "head"), blocksize: int = NF4Config.blocksize,
                 double_quant: bool = NF4Config.double_quant, quant_type: str = NF4Config.quant_type,
                 compute_dtype: torch.dtype | None = NF4Config.compute_dtype) -> nn.Module:
    """Freeze ``model`` and replace each ``nn.Linear`` (except those named in ``skip``) by a
    :class:`Linear4bit`, in place; returns ``model``. ``mp.add_lora(model, ...)`` afterwards gives QLoRA.
    """
    module("model", model)
    config = NF4Config(blocksize, double_quant, quant_type, compute_dtype)  # checks the values
    skip = (skip,) if isinstance(skip, str) else skip
    if not isinstance(skip, (tuple, list)) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be module names, got {skip!r}")
    if linear4bit_layers(model):
        raise ValueError("the model is already quantised (it has Linear4bit layers)")
    present = methods_applied(model)
    if present:
        raise ValueError(f"the model already has {present} applied: quantise the base first, then add the "
                         f"method (mp.quantize_nf4(model); mp.add_lora(model, ...)), so that the method's "
                         f"own layers stay trainable and in full precision")
    names = [n for n, _ in model.named_modules()]
    unknown = [s for s in skip if not any(_skipped(n, (s,)) for n in names)]
    if unknown:
        raise ValueError(f"skip names {unknown} match no module of the model (typo?); its linear layers are "
                         f"named like {sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear})}")
    targets = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)}
    if not targets:
        raise ValueError(f"no nn.Linear layer left to quantise (skip={tuple(skip)!r})")
    new = {n: Linear4bit.from_linear(m, config) for n, m in targets.items()}  # may raise: nothing changed yet
    freeze(model)
    for name, layer in new.items():
        replace_module(model, name, layer)
    return model


def dequantize_nf4(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Undo :func:`quantize_nf4` as far as it can be undone: every :class:`Linear4bit` becomes a frozen
    ``nn.Linear`` holding its dequantised weight ``W_hat`` (not the original ``W``), in place. LoRA layers
    wrapping them stay; ``merge_lora`` then adds ``dW`` to ``W_hat`` exactly, at ``dtype``'s memory cost."""
    layers = linear4bit_layers(model)
    if not layers:
        raise ValueError("the model has no Linear4bit layers to dequantise")
    for name, q in layers.items():
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                           device=q.packed.device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            linear.weight.copy_(q.dequantized_weight(dtype))
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        replace_module(model, name, linear)
    return model


def linear4bit_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """Every :class:`Linear4bit` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


# --- bookkeeping: a LoRA file records how its 4-bit base was quantised (LoRA's entry reads these two) -----

NF4_KEYS = ("layers", "blocksize", "double_quant", "quant_type", "compute_dtype")


def nf4_settings(model: nn.Module) -> dict | None:
    """How the base was quantised (JSON-able), or None for a full-precision base."""
    layers = {w.removesuffix(".base_layer"): m.config for w, m in linear4bit_layers(model).items()}
    settings = {(c.blocksize, c.double_quant, c.quant_type, str(c.compute_dtype)) for c in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the 4-bit layers were quantised with different settings {sorted(settings)}")
    if not layers:
        return None
    blocksize, double_quant, quant_type, dtype = settings.pop()
    return dict(layers=sorted(layers), blocksize=blocksize, double_quant=double_quant, quant_type=quant_type,
                compute_dtype=None if dtype == "None" else dtype.removeprefix("torch."))


def quantize_like(model: nn.Module, saved: dict | None) -> None:
    """Quantise a full-precision base as the saved one was (the fingerprint checks the result)."""
    if saved is not None and (not isinstance(saved, dict) or set(saved) != set(NF4_KEYS)
                              or not isinstance(saved["layers"], list)):
        raise AdapterFileError(f"options.base_nf4 must be null or an object with the keys {list(NF4_KEYS)}")
    have = nf4_settings(model)
    if have == saved:
        return
    if have is not None or saved is None:
        def what(o):
            return "full-precision" if o is None else f"4-bit ({o['quant_type']}, blocksize {o['blocksize']})"
        raise BaseMismatchError(f"the adapter was saved on a {what(saved)} base; this base is {what(have)}")
    opts = dict(saved)
    layers, dtype = set(opts.pop("layers")), opts.pop("compute_dtype")
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise AdapterFileError(f"options.base_nf4.compute_dtype {dtype!r} is not a torch dtype")
    skip = tuple(n for n, m in model.named_modules() if type(m) is nn.Linear and n not in layers)
    quantize_nf4(model, skip=skip, compute_dtype=dtype and getattr(torch, dtype), **opts)
