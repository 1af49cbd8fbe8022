"""Saving and loading adapters: only the trained part, checked against the base model before use.

One fine-tuned task is one folder holding two files (the layout PEFT uses):

* ``adapter_config.json``: the method, its options, the adapter's name, the base model's
  ``GPTConfig`` and a fingerprint of the base weights;
* ``adapter_model.safetensors``: the trained tensors and nothing else.

The fingerprint identifies the frozen base the method was applied to::

    fingerprint = SHA-256 over (name, dtype, shape, bytes) of every base tensor, in name order

"The base" is the model's state dict without the tensors that any method added (LoRA's A and B, a soft
prompt, prefixes, bottleneck adapters) and under the plain model's names (``q_proj.base_layer.weight``
counts as ``q_proj.weight``), so adding or loading other adapters does not change it. A 4-bit base is
fingerprinted as stored (codes and constants). A merged LoRA is refused (its update sits inside the
base weights): unmerge it first. Full fine-tuning is saved the same way (method ``"full"``: every
tensor) so that bytes on disk compare honestly; it has no fingerprint, since it replaces every weight.

Loading validates everything before it touches the base: the JSON's keys and values, the base's
config, a trial application of the method on a copy of the base, the fingerprint, and every tensor's
name, shape, dtype and finiteness. Only JSON and safetensors are read, never a pickle, so a file
cannot run code; a file that is not what it claims is refused with an error naming the problem.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .full import freeze, full_finetune
from .lora import LoRAAdapter, LoRALinear, add_lora, lora_layers
from .lora_multi import active_lora_adapter, lora_adapters
from .model import GPT
try:  # while qlora.py lands
    from .qlora import linear4bit_layers, quantize_nf4
except ImportError:
    def linear4bit_layers(model):
        return {}

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
FORMAT, FORMAT_VERSION = "minipeft-adapter", 1
CONFIG_KEYS = ("format", "format_version", "minipeft_version", "method", "name", "options",
               "base_config", "base_fingerprint")
ARCHITECTURE = ("vocab_size", "block_size", "d_model", "n_layer", "n_head", "d_ff")  # what shapes the weights
OWNED = (LoRAAdapter,)   # modules whose tensors belong to a method, never to the base
WRAPPERS = {LoRALinear: "base_layer"}  # wrapper -> the child that holds the base layer


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
# names(model): its adapters in the model; options/tensors(model, name): what is saved
# (tensors: file key -> the live tensor); apply(model, options, name): add it to a base.


def _nf4_options(model):
    """How the base was quantised (QLoRA), or None for a full-precision base."""
    _, renames = _plain_names(model)
    layers = {_plain(w + ".", renames)[:-1]: m for w, m in linear4bit_layers(model).items()}
    if not layers:
        return None
    configs = {(c.blocksize, c.double_quant, c.quant_type, str(c.compute_dtype)) for c in
               (m.config for m in layers.values())}
    if len(configs) > 1:
        raise ValueError(f"the 4-bit layers were quantised with different settings {sorted(configs)}")
    blocksize, double_quant, quant_type, dtype = configs.pop()
    return dict(layers=sorted(layers), blocksize=blocksize, double_quant=double_quant, quant_type=quant_type,
                compute_dtype=None if dtype == "None" else dtype.removeprefix("torch."))


def _quantize_like(model, nf4_options) -> None:
    """Quantise a full-precision base as the saved QLoRA base was (checked by the fingerprint after)."""
    have = _nf4_options(model)
    if have == nf4_options:
        return
    if have is not None or nf4_options is None:
        what = lambda o: "full precision" if o is None else f"4-bit ({o['quant_type']}, blocksize {o['blocksize']})"
        raise BaseMismatchError(f"the adapter was saved on a {what(nf4_options)} base; this base is {what(have)}")
    opts = dict(nf4_options)
    layers, dtype = set(opts.pop("layers")), opts.pop("compute_dtype")
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise AdapterFileError(f"compute_dtype {dtype!r} is not a torch dtype")
    skip = tuple(n for n, m in model.named_modules() if type(m) is nn.Linear and n not in layers)
    quantize_nf4(model, skip=skip, compute_dtype=None if dtype is None else getattr(torch, dtype), **opts)


def _lora_options(model, name):
    layers = {w: m.adapters[name] for w, m in lora_layers(model).items() if name in m.adapters}
    one = next(iter(layers.values()))
    return dict(r=one.r, alpha=one.alpha, targets=sorted(layers), dropout=one.dropout.p, rslora=one.rslora,
                base_nf4=_nf4_options(model))


def _lora_apply(model, options, name):
    options = dict(options)
    _quantize_like(model, options.pop("base_nf4"))
    return add_lora(model, name=name, **options)


def _lora_tensors(model, name):
    return {f"{w}.{part}": getattr(m.adapters[name], part) for w, m in lora_layers(model).items()
            if name in m.adapters for part in ("lora_A", "lora_B")}


def _lora_check(model, name):
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError("the LoRA adapter is merged into the base weights: call mp.unmerge_lora(model) first "
                         "(the file holds A and B, and the fingerprint is of the unmerged base)")


METHODS = {
    "lora": dict(names=lora_adapters, options=_lora_options, tensors=_lora_tensors, check=_lora_check,
                 keys=("r", "alpha", "targets", "dropout", "rslora", "base_nf4"), named=True, apply=_lora_apply),
    "full": dict(names=lambda model: [], options=lambda model, name: {}, keys=(), named=False,
                 tensors=lambda model, name: base_state_dict(model), apply=lambda model, opts, name: model),
}
try:  # while prompt.py lands
    from .prompt import SoftPrompt, add_prompt_tuning
    OWNED += (SoftPrompt,)
    METHODS["prompt"] = dict(
        names=lambda model: ["default"] if isinstance(getattr(model, "prompt_tuning", None), SoftPrompt) else [],
        options=lambda model, name: asdict(model.prompt_tuning.config),
        tensors=lambda model, name: {"prompt_tuning.embedding": model.prompt_tuning.embedding},
        keys=("n_tokens", "init", "init_text", "seed"), named=False,
        apply=lambda model, opts, name: add_prompt_tuning(model, **opts))
except ImportError:
    pass


def _methods_in(model: nn.Module) -> dict[str, list[str]]:
    return {m: spec["names"](model) for m, spec in METHODS.items() if spec["names"](model)}


# --- saving ------------------------------------------------------------------------------------------


def save_adapter(model: GPT, directory, name: str | None = None, method: str | None = None) -> Path:
    """Write the trained part of ``model`` to ``directory`` (created if needed); returns its path.

    ``method`` is found from the model (a model without a PEFT method is saved whole, as ``"full"``);
    ``name`` picks one of several named adapters (default: the active one).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_adapter needs a minipeft GPT, got {type(model).__name__}")
    present = _methods_in(model)
    if method is None:
        if len(present) > 1:
            raise ValueError(f"the model has several methods {sorted(present)}: pass method= to pick one")
        method = next(iter(present), "full")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    spec = METHODS[method]
    if method == "full" and present:
        raise ValueError(f"method='full' saves a plain model, but this one has {sorted(present)}")
    if method != "full" and method not in present:
        raise ValueError(f"the model has no {method} adapter (it has {sorted(present) or 'none'})")
    names = present.get(method, [])
    if not spec["named"]:
        if name is not None:
            raise ValueError(f"{method} adapters have no names; leave name=None")
    elif name is None:
        name = active_lora_adapter(model) if len(names) > 1 else names[0]
        if name is None:
            raise ValueError(f"no adapter is active among {names}: pass name= to pick one")
    elif name not in names:
        raise ValueError(f"no {method} adapter named {name!r}; the model has {names}")
    if "check" in spec:
        spec["check"](model, name)
    tensors = {k: t.detach().cpu().contiguous() for k, t in spec["tensors"](model, name).items()}
    from . import __version__
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, minipeft_version=__version__, method=method,
                  name=name, options=spec["options"](model, name), base_config=asdict(model.config),
                  base_fingerprint=None if method == "full" else base_fingerprint(model))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "minipeft_method": method})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


# --- loading -----------------------------------------------------------------------------------------


def read_adapter_config(directory) -> dict:
    """The validated ``adapter_config.json`` of ``directory`` (raises :class:`AdapterFileError`)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {Path(directory)}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(config).__name__}")
    missing, extra = [k for k in CONFIG_KEYS if k not in config], sorted(set(config) - set(CONFIG_KEYS))
    if missing or extra:
        raise AdapterFileError(f"{path}: " + "; ".join(
            ([f"missing key(s) {missing}"] if missing else []) + ([f"unexpected key(s) {extra}"] if extra else [])))
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format {config['format']!r} version {config['format_version']!r} is not "
                               f"{FORMAT!r} version {FORMAT_VERSION}")
    method = config["method"]
    if method not in METHODS:
        raise AdapterFileError(f"{path}: unknown method {method!r}; known: {sorted(METHODS)}")
    options, keys = config["options"], METHODS[method]["keys"]
    if not isinstance(options, dict) or set(options) != set(keys):
        got = sorted(options) if isinstance(options, dict) else options
        raise AdapterFileError(f"{path}: options of {method} must have exactly the keys {list(keys)}, got {got}")
    if not isinstance(config["base_config"], dict) or not set(ARCHITECTURE) <= set(config["base_config"]):
        raise AdapterFileError(f"{path}: base_config must be an object with the keys {list(ARCHITECTURE)}")
    fp = config["base_fingerprint"]
    if not (fp is None if method == "full" else isinstance(fp, str) and fp.startswith("sha256:") and len(fp) == 71):
        raise AdapterFileError(f"{path}: base_fingerprint {fp!r} is not 'sha256:' and 64 hex digits"
                               + (" (a full checkpoint has null)" if method == "full" else ""))
    if config["name"] is not None and not isinstance(config["name"], str):
        raise AdapterFileError(f"{path}: name must be a string or null, got {config['name']!r}")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = f" ({', '.join(pickles)} found: pickles are never loaded, they can run code)" if pickles else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file (corrupted or truncated?): {e}") from None


def _check_tensors(found: dict, expected: dict, path: Path) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise AdapterFileError(f"{path} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise AdapterFileError(f"{path} holds unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, live in expected.items():
        t = found[key]
        if t.shape != live.shape:
            raise AdapterFileError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(live.shape)}")
        if t.dtype != live.dtype:
            raise AdapterFileError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected {live.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterFileError(f"{path}: tensor {key!r} holds NaN or infinite values")


def load_adapter(base: GPT, directory, name: str | None = None, trainable: bool = False) -> GPT:
    """Apply the adapter saved in ``directory`` to ``base`` (in place; returns it), after validating it.

    By default the adapter is loaded **for inference: frozen** (``requires_grad=False``) and the model
    is put in eval mode. Pass ``trainable=True`` to resume training it; users of other libraries trip
    over this, as PEFT also loads adapters frozen unless ``is_trainable=True``. ``name`` renames a
    named adapter (LoRA) so that several files saved as "default" can live in one base. Every error
    (wrong base, corrupted file, missing or unexpected tensors, wrong shapes or dtypes) is raised before
    ``base`` is changed.
    """
    if not isinstance(base, GPT):
        raise TypeError(f"load_adapter needs a minipeft GPT as base, got {type(base).__name__}")
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable must be True or False, got {trainable!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter folder at {directory}")
    config = read_adapter_config(directory)
    method, spec, path = config["method"], METHODS[config["method"]], directory / WEIGHTS_NAME
    if name is not None and not spec["named"]:
        raise ValueError(f"{method} adapters have no names; leave name=None")
    name = (name or config["name"]) if spec["named"] else None
    wanted, have = config["base_config"], asdict(base.config)
    diff = [f"{k}={wanted[k]} (this base: {have[k]})" for k in ARCHITECTURE if wanted[k] != have[k]]
    if diff:
        raise BaseMismatchError(f"{directory} was saved from a base with {', '.join(diff)}")
    if method == "full" and _methods_in(base):
        raise ValueError(f"a full checkpoint loads into a plain base; this one has {sorted(_methods_in(base))}")
    tensors = _read_tensors(directory)
    with torch.random.fork_rng(devices=[]):  # the trial must not move the caller's random numbers
        trial = spec["apply"](copy.deepcopy(base), config["options"], name)  # the method's own checks
    if method != "full" and base_fingerprint(trial) != config["base_fingerprint"]:
        raise BaseMismatchError(f"{directory} was saved from other base weights (fingerprint "
                                f"{config['base_fingerprint'][:19]}..., this base {base_fingerprint(trial)[:19]}...)")
    _check_tensors(tensors, spec["tensors"](trial, name), path)
    del trial
    # everything checked: now change the base itself
    with torch.random.fork_rng(devices=[]):
        spec["apply"](base, config["options"], name)
    live = spec["tensors"](base, name)
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(tensors[key])
    if method == "full":
        full_finetune(base) if trainable else freeze(base)
    elif not trainable:
        for t in live.values():
            t.requires_grad_(False)
    return base if trainable else base.eval()
