"""A results cache for training runs: a run that was already made is loaded, not trained again.

A run's result depends on everything that went into it, so the key is the SHA-256 of a canonical JSON
(sorted keys) of all of it: the method's spec, the task (name, seed, split sizes and a digest of its
examples), the training arguments (seed, learning rate, steps, batch size, warm-up, weight decay, ...),
a hash of the library's own source files (a change to the schedule or a method changes every key;
files no run executes, such as the plots and reports, are left out)
and of the shipped base checkpoint, the torch version, the device and the number of CPU threads (CPU
results are reproducible per thread count only).

An entry is a folder ``<key>/`` with ``result.json`` (metrics, history, the key's inputs, a checksum
of the tensors file) and ``tensors.safetensors`` (the trained tensors, when a run kept them; never
pickle). An entry whose JSON is unreadable, whose key or inputs differ from the ones asked for, or
whose tensors do not match their checksum is refused with a one-line message and the run is made
again. Files are written to a temporary name and renamed, so a run that is interrupted leaves no
half-written entry behind.

The folder is ``.minipeft_cache/`` at the repository root (git-ignored), or ``MINIPEFT_CACHE_DIR``;
``MINIPEFT_CACHE=0`` turns the cache off (CI trains for real).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = 1  # bump when the layout of an entry changes
PACKAGE = Path(__file__).resolve().parent


def default_dir() -> Path:
    """``MINIPEFT_CACHE_DIR``, else ``.minipeft_cache/`` beside the package in a source checkout,
    else ``~/.cache/minipeft`` (an installed package has no repository root to write to)."""
    if os.environ.get("MINIPEFT_CACHE_DIR"):
        return Path(os.environ["MINIPEFT_CACHE_DIR"])
    root = PACKAGE.parent
    return root / ".minipeft_cache" if (root / "pyproject.toml").exists() else Path.home() / ".cache" / "minipeft"


def enabled_by_env() -> bool:
    """False when ``MINIPEFT_CACHE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("MINIPEFT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


# files that no training run executes (reports, plots, widgets, the memory formula and its presets, the
# command line, the data-parallel launcher, whose runs are never cached): editing them keeps every cached run
NOT_RUN = ("__main__.py", "report.py", "widgets.py", "plots/", "presets.py", "memory_formula.py", "memory.py",
           "distributed.py")


def _hash_files(package: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).as_posix().startswith(NOT_RUN):
            continue
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


LOADED = (PACKAGE, _hash_files(PACKAGE))  # the code this process imported (an edit on disk later does not run)


def source_hash() -> str:
    """SHA-256 over the library's ``*.py`` files (relative path and contents, sorted by path), except
    those in :data:`NOT_RUN`: for the package this process runs, as they were when it was imported."""
    return LOADED[1] if PACKAGE == LOADED[0] else _hash_files(PACKAGE)


def base_hash() -> str | None:
    """SHA-256 over the shipped base checkpoint's files (a re-made base changes every result), or None."""
    from . import base  # at call time: MINIPEFT_BASE may point elsewhere
    files = sorted(Path(base.BASE_DIR).glob("*")) if Path(base.BASE_DIR).is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def canonical(obj) -> str:
    """The one JSON text of ``obj``: sorted keys, no spaces (so dict order never changes a key)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def key_of(inputs: dict) -> str:
    return hashlib.sha256(canonical(inputs).encode()).hexdigest()


def run_inputs(spec: dict, task, train_args: dict, device: torch.device) -> dict:
    """Everything a run's result depends on, as one JSON-able dict (the key is its hash)."""
    texts = canonical([task.train, task.val, task.test])
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = device.type
    return {
        "spec": spec,
        "task": {"name": task.name, "seed": task.seed, "n_train": len(task.train), "n_val": len(task.val),
                 "n_test": len(task.test), "examples_sha256": hashlib.sha256(texts.encode()).hexdigest()},
        "train": train_args,
        "code": source_hash(), "base": base_hash(),
        "torch": torch.__version__, "device": where, "threads": torch.get_num_threads(),
    }


def _is_key(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class Cache:
    """Stored run results under ``path``; ``enabled=None`` follows ``MINIPEFT_CACHE``."""

    def __init__(self, path=None, enabled: bool | None = None):
        self.path = Path(path) if path is not None else default_dir()
        self.enabled = enabled_by_env() if enabled is None else bool(enabled)

    def __repr__(self):
        return f"Cache({str(self.path)!r}, enabled={self.enabled})"

    def load(self, inputs: dict, need_tensors: bool = False):
        """``(record, tensors)`` stored for ``inputs``, or None (absent, refused, or without the tensors
        asked for). ``tensors`` is None when the run kept none."""
        if not self.enabled:
            return None
        key = key_of(inputs)
        entry = self.path / key
        if not (entry / "result.json").exists():
            return None
        try:
            record = json.loads((entry / "result.json").read_text())
            if record.get("format") != FORMAT or record.get("key") != key:
                raise ValueError("foreign entry (its key differs)")
            if canonical(record.get("inputs")) != canonical(inputs):
                raise ValueError("foreign entry (its inputs differ)")
            tensors = None
            if record.get("tensors_sha256") is not None:
                data = (entry / "tensors.safetensors").read_bytes()
                if hashlib.sha256(data).hexdigest() != record["tensors_sha256"]:
                    raise ValueError("tensors file does not match its checksum")
                tensors = load_tensors(data)
        except Exception as e:  # unreadable JSON or tensors, a missing file, a wrong key: never load it
            print(f"cache: refused entry {key[:12]} ({e}); recomputing")
            return None
        if need_tensors and tensors is None:
            return None  # stored without tensors: run again and store them this time
        return record, tensors

    def save(self, inputs: dict, record: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path | None:
        """Store ``record`` (JSON-able) and ``tensors`` for ``inputs``; returns the entry folder."""
        if not self.enabled:
            return None
        key = key_of(inputs)
        entry = self.path / key
        record = {**record, "format": FORMAT, "key": key, "inputs": inputs, "tensors_sha256": None}
        try:
            entry.mkdir(parents=True, exist_ok=True)
            if tensors is not None:
                data = save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
                record["tensors_sha256"] = hashlib.sha256(data).hexdigest()
                _atomic_write(entry / "tensors.safetensors", data)
            # result.json last: an entry counts once its JSON is there, and the JSON names its tensors' checksum
            _atomic_write(entry / "result.json", json.dumps(record, indent=1, allow_nan=True).encode())
        except OSError as e:  # a read-only or full disk costs the cache, not the run
            print(f"cache: could not store entry {key[:12]} ({e})")
            return None
        return entry

    def clear(self) -> int:
        """Delete every entry (only folders named by a key, nothing else); returns how many."""
        if not self.path.is_dir():
            return 0
        gone = 0
        for entry in self.path.iterdir():
            if entry.is_dir() and _is_key(entry.name):
                shutil.rmtree(entry)
                gone += 1
        return gone


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path`` (atomic on POSIX and Windows)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clear_cache(path=None) -> int:
    """Delete every cached run (``python -m minipeft cache clear``); prints and returns how many."""
    cache = Cache(path, enabled=True)
    gone = cache.clear()
    print(f"cleared {gone} cached run{'s' if gone != 1 else ''} from {cache.path}")
    return gone
