"""What each method adds to a model, as saving and loading see it: the base inside an adapted model,
its fingerprint, and for every method the tensors it trained and the options that rebuild it.

A model adapted by any method still holds its frozen base. :func:`base_state_dict` recovers it: the
state dict without the modules a method added (LoRA's A and B, soft prompts, prefixes, bottleneck
adapters), under the plain model's names (``q_proj.base_layer.weight`` counts as ``q_proj.weight``)::

    fingerprint = SHA-256 over (name, dtype, shape, bytes) of every base tensor, in name order

so adding, training or loading adapters never changes it, and one changed bit of the base does. A
4-bit base (QLoRA) is fingerprinted as stored (codes and constants); its quantisation settings are
saved with the LoRA options, so that a full-precision base is quantised the same way on loading.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, fields

import torch
import torch.nn as nn

from .adapter import Adapter, AdaptedLinear, AdapterConfig, add_adapters, list_adapters
from .lora import LoRAAdapter, LoRALinear, add_lora, lora_layers
from .lora_multi import active_lora_adapter, lora_adapters
from .prefix import PrefixTuning, PrefixTuningConfig, add_prefix_tuning, list_prefixes
from .prompt import PromptTuningConfig, SoftPrompt, add_prompt_tuning
from .qlora import linear4bit_layers, quantize_nf4

OWNED = (LoRAAdapter, SoftPrompt, PrefixTuning, Adapter)  # modules that belong to a method, never to the base
WRAPPERS = {LoRALinear: "base_layer"}  # wrapper -> its child that holds the base layer


class AdapterFileError(ValueError):
    """A saved adapter that is not what it claims: unreadable, incomplete, or with unexpected parts."""


class BaseMismatchError(ValueError):
    """A saved adapter made for another base model (other config or other weights)."""


# --- the base and its fingerprint --------------------------------------------------------------------


def _plain_names(model: nn.Module) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """Prefixes of the methods' own modules, and (wrapped, plain) name prefixes, innermost wrapper first."""
    skip, renames = [], []
    for where, m in model.named_modules():
        if isinstance(m, OWNED):
            skip.append(f"{where}.")
        if type(m) in WRAPPERS:
            renames.append((f"{where}.{WRAPPERS[type(m)]}.", f"{where}."))
    return tuple(skip), renames[::-1]


def _plain(key: str, renames) -> str:
    for old, new in renames:
        key = new + key[len(old):] if key.startswith(old) else key
    return key


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base inside ``model``: its state dict without any method's tensors, under plain names."""
    skip, renames = _plain_names(model)
    return {_plain(k, renames): v for k, v in model.state_dict().items() if not k.startswith(skip)}


def base_fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` of the base weights inside ``model`` (see the module docstring)."""
    h = hashlib.sha256()
    for key, t in sorted(base_state_dict(model).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# --- what each method saves, and how it is applied again ---------------------------------------------
# names(model): its adapters in the model ([None] for a method without names); active(model): the one
# in use; parts(model, name): {where: module} holding the trained tensors; options(model, name): what
# add_* needs to rebuild it; apply(model, options, name): add it to a base.


def _nf4_options(model) -> dict | None:
    """How the base was quantised (QLoRA), or None for a full-precision base."""
    _, renames = _plain_names(model)
    layers = {_plain(w + ".", renames)[:-1]: m.config for w, m in linear4bit_layers(model).items()}
    settings = {(c.blocksize, c.double_quant, c.quant_type, str(c.compute_dtype)) for c in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the 4-bit layers were quantised with different settings {sorted(settings)}")
    if not layers:
        return None
    blocksize, double_quant, quant_type, dtype = settings.pop()
    return dict(layers=sorted(layers), blocksize=blocksize, double_quant=double_quant, quant_type=quant_type,
                compute_dtype=None if dtype == "None" else dtype.removeprefix("torch."))


NF4_KEYS = ("layers", "blocksize", "double_quant", "quant_type", "compute_dtype")


def _quantize_like(model, saved: dict | None) -> None:
    """Quantise a full-precision base as the saved QLoRA base was (the fingerprint checks it after)."""
    if saved is not None and (not isinstance(saved, dict) or set(saved) != set(NF4_KEYS)
                              or not isinstance(saved["layers"], list)):
        raise AdapterFileError(f"options.base_nf4 must be null or an object with the keys {list(NF4_KEYS)}")
    have = _nf4_options(model)
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


def _lora_options(model, name):
    parts = _lora_parts(model, name)
    one = next(iter(parts.values()))
    return dict(r=one.r, alpha=one.alpha, targets=sorted(parts), dropout=one.dropout.p, rslora=one.rslora,
                base_nf4=_nf4_options(model))


def _lora_apply(model, options, name):
    options = dict(options)
    _quantize_like(model, options.pop("base_nf4"))
    return add_lora(model, name=name, **options)


def _lora_parts(model, name):
    return {w: m.adapters[name] for w, m in lora_layers(model).items() if name in m.adapters}


def _adapter_parts(model, name):
    return {w: m.adapters[name] for w, m in model.named_modules() if isinstance(m, AdaptedLinear)
            and name in m.adapters}


def _prefix_active(model):
    active = model.prefix_tuning.active
    return active if isinstance(active, str) else None


def _adapters_active(model):
    active = next((m.active for m in model.modules() if isinstance(m, AdaptedLinear)), [])
    return active[0] if len(active) == 1 else None


def _fields(config_class) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config_class))


def _has(attr, kind):
    return lambda model: [None] if isinstance(getattr(model, attr, None), kind) else []


METHODS = {
    "lora": dict(names=lora_adapters, active=active_lora_adapter, parts=_lora_parts, options=_lora_options,
                 apply=_lora_apply, keys=("r", "alpha", "targets", "dropout", "rslora", "base_nf4")),
    "prefix": dict(names=list_prefixes, active=_prefix_active,
                   parts=lambda model, name: {"prefix_tuning.prefix": model.prefix_tuning.prefixes[name]},
                   options=lambda model, name: asdict(model.prefix_tuning.prefixes[name].config),
                   apply=lambda model, opts, name: add_prefix_tuning(model, name=name, **opts),
                   keys=_fields(PrefixTuningConfig)),
    "adapter": dict(names=list_adapters, active=_adapters_active, parts=_adapter_parts,
                    options=lambda model, name: asdict(next(iter(_adapter_parts(model, name).values())).config),
                    apply=lambda model, opts, name: add_adapters(model, name=name, **opts),
                    keys=_fields(AdapterConfig)),
    "prompt": dict(names=_has("prompt_tuning", SoftPrompt), active=lambda model: None,
                   parts=lambda model, name: {"prompt_tuning": model.prompt_tuning},
                   options=lambda model, name: asdict(model.prompt_tuning.config),
                   apply=lambda model, opts, name: add_prompt_tuning(model, **opts),
                   keys=_fields(PromptTuningConfig)),
    "full": dict(names=lambda model: [], active=lambda model: None, parts=None, options=lambda model, name: {},
                 apply=lambda model, opts, name: model, keys=()),
}


def adapter_tensors(method: str, model: nn.Module, name) -> dict[str, torch.Tensor]:
    """File key -> the live tensor (a parameter or buffer of the model)."""
    if method == "full":
        return base_state_dict(model)
    return {f"{where}.{key}": t for where, part in METHODS[method]["parts"](model, name).items()
            for key, t in [*part.named_parameters(), *part.named_buffers()]}


def methods_in(model: nn.Module) -> dict[str, list]:
    return {m: spec["names"](model) for m, spec in METHODS.items() if spec["names"](model)}
