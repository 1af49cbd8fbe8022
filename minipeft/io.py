"""Saving and loading adapters: only the trained part, checked against the base model before use.

One fine-tuned task is one folder holding two files (the layout PEFT uses):

* ``adapter_config.json``: the method, its options, the adapter's name, the base model's
  ``GPTConfig`` and a fingerprint of the base weights;
* ``adapter_model.safetensors``: the trained tensors and nothing else.

The fingerprint (:func:`~minipeft.io_methods.base_fingerprint`, a SHA-256 over the base tensors
inside the model, without any method's own) identifies the frozen base the method was applied to; what
each method saves and how it is rebuilt lives in :mod:`minipeft.io_methods`. A merged LoRA is refused
(its update sits inside the base weights): unmerge it first. Full fine-tuning is saved the same way
(method ``"full"``: every tensor) so that bytes on disk compare honestly; it has no fingerprint, as it
replaces every weight.

Loading validates everything before it touches the base: the JSON's keys and values, the base's
config, a trial application of the method to a copy of the base, the fingerprint, and every tensor's
name, shape, dtype and finiteness. Only JSON and safetensors are read, never a pickle, so a file
cannot run code; a file that is not what it claims is refused with an error naming the problem.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .full import freeze, full_finetune
from .io_methods import (METHODS, AdapterFileError, BaseMismatchError, adapter_tensors, base_fingerprint,
                         base_state_dict, methods_in)
from .lora import lora_layers
from .model import GPT

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
FORMAT, FORMAT_VERSION = "minipeft-adapter", 1
CONFIG_KEYS = ("format", "format_version", "minipeft_version", "method", "name", "options",
               "base_config", "base_fingerprint")
ARCHITECTURE = ("vocab_size", "block_size", "d_model", "n_layer", "n_head", "d_ff")  # what shapes the weights


# --- saving ------------------------------------------------------------------------------------------


def save_adapter(model: GPT, directory, name: str | None = None, method: str | None = None) -> Path:
    """Write the trained part of ``model`` to ``directory`` (created if needed); returns its path.

    ``method`` is found from the model (a model without a PEFT method is saved whole, as ``"full"``);
    ``name`` picks one of several named adapters (default: the only one, or the active one).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_adapter needs a minipeft GPT, got {type(model).__name__}")
    present = methods_in(model)
    if method is None:
        if len(present) > 1:
            raise ValueError(f"the model has several methods {sorted(present)}: pass method= to pick one")
        method = next(iter(present), "full")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    if method == "full" and present:
        raise ValueError(f"method='full' saves a plain model, but this one has {sorted(present)}")
    if method != "full" and method not in present:
        raise ValueError(f"the model has no {method} adapter (it has {sorted(present) or 'none'})")
    names = present.get(method, [None])
    if names == [None] and name is not None:
        raise ValueError(f"{method} checkpoints have no names; leave name=None")
    if names != [None] and name is None:
        name = names[0] if len(names) == 1 else METHODS[method]["active"](model)
        if name is None:
            raise ValueError(f"the model has the {method} adapters {names} and none is active alone: pass name=")
    if name not in names:
        raise ValueError(f"no {method} adapter named {name!r}; the model has {names}")
    if method == "lora" and any(m.merged for m in lora_layers(model).values()):
        raise ValueError("the LoRA adapter is merged into the base weights: call mp.unmerge_lora(model) first "
                         "(the file holds A and B, and the fingerprint is of the unmerged base)")
    tensors = {k: t.detach().cpu().contiguous() for k, t in adapter_tensors(method, model, name).items()}
    from . import __version__
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, minipeft_version=__version__, method=method,
                  name=name, options=METHODS[method]["options"](model, name), base_config=asdict(model.config),
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
        problems = [f"{kind} key(s) {ks}" for kind, ks in (("missing", missing), ("unexpected", extra)) if ks]
        raise AdapterFileError(f"{path}: " + "; ".join(problems))
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format {config['format']!r} version {config['format_version']!r} is not "
                               f"{FORMAT!r} version {FORMAT_VERSION}")
    method, options = config["method"], config["options"]
    if method not in METHODS:
        raise AdapterFileError(f"{path}: unknown method {method!r}; known: {sorted(METHODS)}")
    keys = METHODS[method]["keys"]
    if not isinstance(options, dict) or set(options) != set(keys):
        got = sorted(options) if isinstance(options, dict) else options
        raise AdapterFileError(f"{path}: the options of {method} must have exactly the keys {list(keys)}, "
                               f"got {got}")
    if not isinstance(config["base_config"], dict) or not set(ARCHITECTURE) <= set(config["base_config"]):
        raise AdapterFileError(f"{path}: base_config must be an object with the keys {list(ARCHITECTURE)}")
    fp, unnamed = config["base_fingerprint"], method in ("prompt", "full")
    if method == "full" and fp is not None:
        raise AdapterFileError(f"{path}: base_fingerprint must be null for a full checkpoint, got {fp!r}")
    if method != "full" and not (isinstance(fp, str) and re.fullmatch("sha256:[0-9a-f]{64}", fp)):
        raise AdapterFileError(f"{path}: base_fingerprint {fp!r} is not 'sha256:' and 64 hex digits")
    if not (config["name"] is None if unnamed else isinstance(config["name"], str)):
        raise AdapterFileError(f"{path}: name must be " + ("null" if unnamed else "a string") +
                               f" for method {method}, got {config['name']!r}")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = f" ({', '.join(pickles)} found: pickles are never loaded, they can run code)" if pickles else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file (corrupted or truncated?): {e}") \
            from None


def _check_tensors(found: dict, expected: dict, path: Path) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise AdapterFileError(f"{path} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise AdapterFileError(f"{path} holds unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, live in expected.items():
        t = found[key]
        if t.shape != live.shape:
            raise AdapterFileError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                   f"expected {tuple(live.shape)}")
        if t.dtype != live.dtype:
            raise AdapterFileError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected {live.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterFileError(f"{path}: tensor {key!r} holds NaN or infinite values")


def _own_random_numbers(model):
    """Run the method's initialisation on forked random generators (CPU, and the model's GPUs)."""
    return torch.random.fork_rng(devices=sorted({t.device.index or 0 for t in model.state_dict().values()
                                                 if t.is_cuda}))


def load_adapter(base: GPT, directory, name: str | None = None, trainable: bool = False) -> GPT:
    """Apply the adapter saved in ``directory`` to ``base`` (in place; returns it), after validating it.

    By default the adapter is loaded **for inference: frozen** (``requires_grad=False``, eval mode).
    Pass ``trainable=True`` to resume training it: users of other libraries trip over this, as PEFT
    also loads adapters frozen unless ``is_trainable=True``. ``name`` renames a named adapter (LoRA,
    prefix, bottleneck adapter) so that several files saved as "default" can live in one base; the
    loaded one becomes the active one. Every error (wrong base, corrupted file, missing or unexpected
    tensors, wrong shapes or dtypes) is raised before ``base`` is changed.
    """
    if not isinstance(base, GPT):
        raise TypeError(f"load_adapter needs a minipeft GPT as base, got {type(base).__name__}")
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable must be True or False, got {trainable!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter folder at {directory}")
    config = read_adapter_config(directory)
    method, options, path = config["method"], config["options"], directory / WEIGHTS_NAME
    if name is not None and config["name"] is None:
        raise ValueError(f"{method} checkpoints have no names; leave name=None")
    name = config["name"] if name is None else name
    wanted, have = config["base_config"], asdict(base.config)
    diff = [f"{k}={wanted[k]} (this base: {have[k]})" for k in ARCHITECTURE if wanted[k] != have[k]]
    if diff:
        raise BaseMismatchError(f"{directory} was saved from a base with {', '.join(diff)}")
    if method == "full" and methods_in(base):
        raise ValueError(f"a full checkpoint loads into a plain base; this one has {sorted(methods_in(base))}")
    tensors = _read_tensors(directory)
    apply = METHODS[method]["apply"]
    try:
        with _own_random_numbers(base):  # the trial does not move the caller's random numbers
            trial = apply(copy.deepcopy(base), options, name)  # the method checks its own options
    except (AdapterFileError, BaseMismatchError):
        raise
    except (ValueError, TypeError) as e:
        raise type(e)(f"cannot apply the {method} adapter of {directory} to this base: {e}") from e
    if method != "full" and base_fingerprint(trial) != config["base_fingerprint"]:
        raise BaseMismatchError(f"{directory} was saved from other base weights (its base: "
                                f"{config['base_fingerprint'][:19]}..., "
                                f"this base: {base_fingerprint(trial)[:19]}...)")
    _check_tensors(tensors, adapter_tensors(method, trial, name), path)
    del trial
    with _own_random_numbers(base):  # everything checked: now change the base itself
        apply(base, options, name)
    live = adapter_tensors(method, base, name)
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(tensors[key])
    if method == "full":
        full_finetune(base) if trainable else freeze(base)
    elif not trainable:
        for t in live.values():
            t.requires_grad_(False)
    return base if trainable else base.eval()
