"""Saving and loading adapters: only the trained part, checked against the base model before use.

One fine-tuned task is one folder holding two files (the layout PEFT uses):

* ``adapter_config.json``: the method, its options, the adapter's name, the base model's
  ``GPTConfig`` and a fingerprint of the base weights;
* ``adapter_model.safetensors``: the trained tensors and nothing else.

This module is the orchestrator (the file format, the fingerprint, the checks) and names no method:
what a method saves (its tensors, the options that rebuild it, what it needs of the base, such as
QLoRA's 4-bit settings) is written in its own file's ``METHOD`` entry. Full fine-tuning is saved the
same way, every tensor and no fingerprint (it replaces every weight), so that bytes on disk compare
honestly.

The base inside an adapted model is its state dict without the modules a method added, under the plain
model's names (``q_proj.base_layer.weight`` counts as ``q_proj.weight``)::

    fingerprint = SHA-256 over (name, dtype, shape, bytes) of every base tensor, in name order

so adding, training or loading adapters never changes it, and one changed bit of the base does (a
4-bit base is fingerprinted as stored: codes and constants).

Loading validates everything before it touches the base: the JSON's keys, types and sizes (bounded by
the base's shapes before anything is allocated), the base's config, a trial application of the method
to a copy of the base, the fingerprint, and every tensor's name, shape, dtype and finiteness. Only JSON
and safetensors are read, never a pickle, so a file cannot run code; whatever is wrong with a file is
one :class:`AdapterFileError` naming the file and the cause, or a :class:`BaseMismatchError` when the
file is sound but made for another base.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .common import AdapterFileError, BaseMismatchError, adapter_name, boolean, module
from .methods import METHODS, methods_in
from .model import GPT

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
FORMAT, FORMAT_VERSION = "minipeft-adapter", 1
CONFIG_KEYS = ("format", "format_version", "minipeft_version", "method", "name", "options",
               "base_config", "base_fingerprint")
ARCHITECTURE = ("vocab_size", "block_size", "d_model", "n_layer", "n_head", "d_ff")  # what shapes the weights


# --- the base and its fingerprint --------------------------------------------------------------------


def _plain_names(model: nn.Module) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """Prefixes of the methods' own modules, and (wrapped, plain) name prefixes, innermost wrapper first."""
    owned = tuple(t for m in METHODS.values() for t in m.owned)
    wrappers = dict(m.wrapper for m in METHODS.values() if m.wrapper)
    skip, renames = [], []
    for where, m in model.named_modules():
        if isinstance(m, owned):
            skip.append(f"{where}.")
        if type(m) in wrappers:
            renames.append((f"{where}.{wrappers[type(m)]}.", f"{where}."))
    return tuple(skip), renames[::-1]


def _plain(key: str, renames) -> str:
    for old, new in renames:
        key = new + key[len(old):] if key.startswith(old) else key
    return key


def base_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The frozen base inside ``model``: its state dict without any method's tensors, under plain names."""
    skip, renames = _plain_names(model)
    return {_plain(k, renames): v for k, v in model.state_dict(keep_vars=keep_vars).items() if not k.startswith(skip)}


def base_fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` of the base weights inside ``model`` (see the module docstring)."""
    h = hashlib.sha256()
    for key, t in sorted(base_state_dict(model).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def adapter_tensors(method: str, model: nn.Module, name) -> dict[str, torch.Tensor]:
    """File key -> the live tensor (a parameter or buffer of the model) that ``method`` trained."""
    if METHODS[method].whole:
        return base_state_dict(model, keep_vars=True)
    return {f"{where}.{key}": t for where, part in METHODS[method].parts(model, name).items()
            for key, t in [*part.named_parameters(), *part.named_buffers()]}


def _options(method: str, model, name) -> dict:
    """What the file records: the method's options, and what it needs of the base (``METHOD.base``)."""
    m = METHODS[method]
    return {**m.options(model, name), **{key: read(model) for key, (read, _) in m.base.items()}}


def _apply(method: str, model, options: dict, name):
    """Make ``model`` match what the method needs of the base, then add the method with its options."""
    m, options = METHODS[method], dict(options)
    for key, (_, match) in m.base.items():
        match(model, options.pop(key))
    return m.add(model, **options, **({} if name is None else {"name": name}))


def _keys(method: str) -> tuple[str, ...]:
    config = METHODS[method].config
    return (() if config is None else tuple(config.__dataclass_fields__)) + tuple(METHODS[method].base)


def _ready(model: nn.Module) -> None:
    """Each method present may refuse while the model is in a state no file can hold (a merged LoRA)."""
    for m in methods_in(model):
        if METHODS[m].ready is not None:
            METHODS[m].ready(model)


def _path(directory):
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {directory!r}")
    return Path(directory)


# --- saving ---------------------------------------------------------------------------------------------


def save_adapter(model: GPT, directory, name: str | None = None, method: str | None = None) -> Path:
    """Write the trained part of ``model`` to ``directory`` (created if needed); returns its path.

    ``method`` is found from the model (without a PEFT method: the whole model, as full fine-tuning);
    ``name`` picks one of several named adapters (default: the only one, or the active one). Everything
    is checked before anything is written, and a failure never leaves half an adapter behind.
    """
    module("model", model, GPT)
    _path(directory)
    present = methods_in(model)
    if method is None:
        if len(present) > 1:
            raise ValueError(f"the model has several methods {sorted(present)}: pass method= to pick one")
        method = next(iter(present), next(m.name for m in METHODS.values() if m.whole))
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    whole = METHODS[method].whole
    if whole and present:
        raise ValueError(f"method={method!r} saves a plain model, but this one has {sorted(present)}")
    if not whole and method not in present:
        raise ValueError(f"the model has no {method} adapter (it has {sorted(present) or 'none'})")
    names = present.get(method, [None])
    if names == [None] and name is not None:
        raise ValueError(f"{method} checkpoints have no names; leave name=None")
    if names != [None] and name is None:
        name = names[0] if len(names) == 1 else METHODS[method].active(model)
        if name is None:
            raise ValueError(f"the model has the {method} adapters {names} and none is active alone: pass name=")
    if name not in names:
        raise ValueError(f"no {method} adapter named {name!r}; the model has {names}")
    _ready(model)
    tensors = {k: t.detach().cpu().contiguous() for k, t in adapter_tensors(method, model, name).items()}
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ValueError(f"tensor {bad!r} holds NaN or infinite values (did training diverge?): not saved, "
                         f"as load_adapter would refuse the file")
    from . import __version__
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, minipeft_version=__version__, method=method,
                  name=name, options=_options(method, model, name), base_config=asdict(model.config),
                  base_fingerprint=None if whole else base_fingerprint(model))
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot save into {out}: it is a file, not a folder")
    for target in (out / CONFIG_NAME, out / WEIGHTS_NAME):
        if target.exists() and not target.is_file():
            raise ValueError(f"cannot write {target}: something that is not a file is in the way")
    out.mkdir(parents=True, exist_ok=True)
    # write both to temporary names, then rename: a failure never leaves half an adapter behind
    tmp_weights, tmp_config = out / f".{WEIGHTS_NAME}.tmp", out / f".{CONFIG_NAME}.tmp"
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt", "minipeft_method": method})
        tmp_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_weights, out / WEIGHTS_NAME)
        os.replace(tmp_config, out / CONFIG_NAME)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
    return out


# --- loading -------------------------------------------------------------------------------------------


def read_adapter_config(directory) -> dict:
    """The validated ``adapter_config.json`` of ``directory`` (raises :class:`AdapterFileError`)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {Path(directory)}")
    if path.stat().st_size > 1_000_000:
        raise AdapterFileError(f"{path} is {path.stat().st_size:,} bytes: too large for an adapter config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterFileError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from None
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
    if not isinstance(method, str) or method not in METHODS:
        raise AdapterFileError(f"{path}: unknown method {method!r}; known: {sorted(METHODS)}")
    keys = _keys(method)
    if not isinstance(options, dict) or set(options) != set(keys):
        got = sorted(options) if isinstance(options, dict) else options
        raise AdapterFileError(f"{path}: the options of {method} must have exactly the keys {list(keys)}, "
                               f"got {got}")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):  # e.g. 1e400 read as inf
            raise AdapterFileError(f"{path}: options.{key} = {value!r} is not a finite number")
    base_config = config["base_config"]
    if not isinstance(base_config, dict) or not set(ARCHITECTURE) <= set(base_config):
        raise AdapterFileError(f"{path}: base_config must be an object with the keys {list(ARCHITECTURE)}")
    for key in ARCHITECTURE:
        if isinstance(base_config[key], bool) or not isinstance(base_config[key], int):
            raise AdapterFileError(f"{path}: base_config.{key} must be an integer, got {base_config[key]!r}")
    fp, unnamed, whole = config["base_fingerprint"], METHODS[method].set_active is None, METHODS[method].whole
    if whole and fp is not None:
        raise AdapterFileError(f"{path}: base_fingerprint must be null for a {method} checkpoint, got {fp!r}")
    if not whole and not (isinstance(fp, str) and re.fullmatch("sha256:[0-9a-f]{64}", fp)):
        raise AdapterFileError(f"{path}: base_fingerprint {fp!r} is not 'sha256:' and 64 hex digits")
    if not (config["name"] is None if unnamed else isinstance(config["name"], str)):
        raise AdapterFileError(f"{path}: name must be " + ("null" if unnamed else "a string") +
                               f" for method {method}, got {config['name']!r}")
    return config


def _no_constant(word: str):
    raise ValueError(f"{word} is not allowed in an adapter config")


def _check_sizes(options: dict, base: GPT, path: Path) -> None:
    """Every whole-number option is at most a few times the base's largest dimension: a file cannot ask
    for gigabytes before its tensors are compared (a real adapter is far smaller than its base)."""
    c = base.config
    limit = 4 * max(c.block_size, c.d_model, c.d_ff, 2 * c.n_layer * c.d_model)
    for key, value in options.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise AdapterFileError(f"{path}: options.{key} = {value:,} is larger than this base allows "
                                   f"(at most {limit:,} for a base of d_model {c.d_model})")


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = f" ({', '.join(pickles)} found: pickles are never loaded, they can run code)" if pickles else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{hint}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- whatever the parser trips on, the file is at fault
        raise AdapterFileError(f"{path} is not a readable safetensors file (corrupted or truncated?): "
                               f"{type(e).__name__}: {e}") from None


def _check_tensors(found: dict, expected: dict, path: Path) -> None:
    for what, keys in (("lacks", set(expected) - set(found)), ("holds unexpected", set(found) - set(expected))):
        if keys:
            raise AdapterFileError(f"{path} {what} tensor(s) {sorted(keys)[:5]}{' ...' if len(keys) > 5 else ''}")
    for key, live in expected.items():
        t = found[key]
        if t.shape != live.shape:
            raise AdapterFileError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(live.shape)}")
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

    Loaded **for inference: frozen** and in eval mode, as PEFT does unless ``is_trainable=True``: pass
    ``trainable=True`` to resume training. ``name`` renames a named adapter (several files saved as
    "default" can live in one base); the loaded one becomes the active one. Every error is raised
    before ``base`` is changed.
    """
    module("base", base, GPT)
    boolean("trainable", trainable)
    directory = _path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter folder at {directory}")
    config = read_adapter_config(directory)
    method, options, path = config["method"], config["options"], directory / WEIGHTS_NAME
    if name is not None and config["name"] is None:
        raise ValueError(f"{method} checkpoints have no names; leave name=None")
    name = config["name"] if name is None else adapter_name(name)
    wanted, have = config["base_config"], asdict(base.config)
    diff = [f"{k}={wanted[k]} (this base: {have[k]})" for k in ARCHITECTURE if wanted[k] != have[k]]
    if diff:
        raise BaseMismatchError(f"{directory} was saved from a base with {', '.join(diff)}")
    whole = METHODS[method].whole
    if whole and methods_in(base):
        raise ValueError(f"a {method} checkpoint loads into a plain base; this one has {sorted(methods_in(base))}")
    _ready(base)
    if name is not None and name in METHODS[method].names(base):
        raise ValueError(f"the base already has a {method} adapter named {name!r}: pass name= to load this one "
                         f"under another name")
    _check_sizes(options, base, directory / CONFIG_NAME)
    tensors = _read_tensors(directory)
    try:
        with _own_random_numbers(base):  # the trial does not move the caller's random numbers
            trial = _apply(method, copy.deepcopy(base), options, name)  # the method checks its own options
    except (AdapterFileError, BaseMismatchError):
        raise
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"cannot apply the {method} adapter of {directory} to this base: {e}") from e
    except Exception as e:  # noqa: BLE001 -- e.g. an allocation the sizes above did not foresee
        raise AdapterFileError(f"cannot apply the {method} adapter of {directory}: "
                               f"{type(e).__name__}: {e}") from e
    if not whole and base_fingerprint(trial) != config["base_fingerprint"]:
        raise BaseMismatchError(f"{directory} was saved from other base weights (its base: "
                                f"{config['base_fingerprint'][:19]}..., "
                                f"this base: {base_fingerprint(trial)[:19]}...)")
    _check_tensors(tensors, adapter_tensors(method, trial, name), path)
    del trial
    with _own_random_numbers(base):  # everything checked: now change the base itself
        _apply(method, base, options, name)
    live = adapter_tensors(method, base, name)
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(tensors[key])
    if not trainable:  # what add_* made trainable is frozen again
        for t in live.values():
            t.requires_grad_(False)
    return base if trainable else base.eval()
