"""The results cache: the key follows every input that changes a result (and nothing else), a hit gives
back exactly what the run produced, a damaged or foreign entry is refused and recomputed, off means off."""
import json
import shutil

import pytest
import torch

import minipeft as mp
from minipeft import cache as C
from minipeft import protocol as P


@pytest.fixture
def tiny_task():
    return mp.make_task("rotate", seed=0, n_train=64, n_val=32, n_test=32)


SOURCE_HASH = C.source_hash  # the real one, for the test of the hash itself


@pytest.fixture(autouse=True)
def fixed_code(monkeypatch):
    """Pin the source hash for the length of a test: an edit to the library while the tests run would
    (rightly) change the key between two runs of one test."""
    frozen = SOURCE_HASH()
    monkeypatch.setattr(C, "source_hash", lambda: frozen)


SPEC = {"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]}
ARGS = dict(seed=0, lr=0.01, steps=4, batch_size=8, warmup=1, weight_decay=0.0, eval_every=0, eval_examples=32)


def _inputs(spec=SPEC, task=None, device="cpu", **changes):
    task = task or mp.make_task("rotate", seed=0, n_train=64, n_val=32, n_test=32)
    return C.run_inputs(spec, task, {**ARGS, **changes}, torch.device(device))


# --- the key ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    dict(spec={**SPEC, "r": 4}), dict(spec={**SPEC, "alpha": 4}), dict(spec={**SPEC, "targets": ["q_proj"]}),
    dict(task=mp.make_task("rotate", seed=1, n_train=64, n_val=32, n_test=32)),
    dict(task=mp.make_task("caesar", seed=0, n_train=64, n_val=32, n_test=32)),
    dict(task=mp.make_task("rotate", seed=0, n_train=65, n_val=32, n_test=32)),
    dict(task=mp.make_task("rotate", seed=0, n_train=64, n_val=32, n_test=31)),
    dict(seed=1), dict(lr=0.011), dict(steps=5), dict(batch_size=16), dict(warmup=2), dict(weight_decay=0.01),
    dict(eval_examples=16), dict(device="meta"),
], ids=lambda c: ",".join(c))
def test_key_changes_with_each_input(change):
    assert C.key_of(_inputs(**change)) != C.key_of(_inputs())


def test_key_changes_with_code_base_torch_and_threads(monkeypatch):
    key = C.key_of(_inputs())
    for obj, name, value in [(C, "source_hash", lambda: "0" * 64),   # an edited library file
                             (C, "base_hash", lambda: "1" * 64),     # a re-made base checkpoint
                             (torch, "__version__", "0.0.1"),
                             (torch, "get_num_threads", lambda: 97)]:
        with monkeypatch.context() as m:
            m.setattr(obj, name, value)
            assert C.key_of(_inputs()) != key, name
    assert C.key_of(_inputs()) == key


def test_key_ignores_what_changes_no_result():
    key = C.key_of(_inputs())
    reordered = {"targets": ["q_proj", "v_proj"], "r": 2, "method": "lora"}      # dict key order
    as_tuple = {**SPEC, "targets": ("q_proj", "v_proj")}                        # a tuple is a JSON list
    assert C.key_of(_inputs(spec=reordered)) == key == C.key_of(_inputs(spec=as_tuple))
    assert C.key_of(_inputs(lr=1e-2)) == key                                    # the same float
    assert C.key_of(_inputs()) == key                                           # a fresh, equal task


def test_base_hash_follows_the_checkpoint_files(tmp_path, monkeypatch):
    from minipeft import base
    assert C.base_hash() is not None  # the shipped checkpoint
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(base, "BASE_DIR", tmp_path)
    h = C.base_hash()
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert C.base_hash() != h
    monkeypatch.setattr(base, "BASE_DIR", tmp_path / "missing")
    assert C.base_hash() is None


def test_source_hash_follows_python_files_only(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(C, "PACKAGE", tmp_path)
    h = SOURCE_HASH()
    (tmp_path / "notes.txt").write_text("not code")
    assert SOURCE_HASH() == h
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert SOURCE_HASH() != h


def test_source_hash_leaves_out_files_no_run_executes(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text("steps = 1\n")
    (tmp_path / "plots").mkdir()
    for name in ("report.py", "widgets.py", "plots/general.py", "__main__.py"):
        (tmp_path / name).write_text("a = 1\n")
    monkeypatch.setattr(C, "PACKAGE", tmp_path)
    h = SOURCE_HASH()
    for name in ("report.py", "widgets.py", "plots/general.py", "__main__.py"):
        (tmp_path / name).write_text("a = 2\n")
        assert SOURCE_HASH() == h, name
    (tmp_path / "train.py").write_text("steps = 2\n")
    assert SOURCE_HASH() != h


def test_source_hash_is_the_code_this_process_imported():
    """Of the package itself: the hash taken at import (an edit on disk afterwards is not the code that runs)."""
    assert C.LOADED[0] == C.PACKAGE and SOURCE_HASH() == C.LOADED[1]


# --- runs through the cache ----------------------------------------------------------------------------

def _builder(config, calls):
    def build():
        calls.append(1)
        return mp.add_lora(mp.GPT(config), r=2, alpha=4, targets=("q_proj", "v_proj"))
    return build


def _run(build, task, cache, keep_tensors=True):
    return P.run(SPEC, build, task, seed=0, lr=0.01, steps=4, batch_size=8, device="cpu", eval_examples=32,
                 keep_tensors=keep_tensors, cache=cache)


def _same(a, b, timing=True):
    """The same result; ``timing=False`` for a run made twice (its seconds differ, nothing else may)."""
    assert (a.spec, a.seed, a.lr, a.val, a.test, a.trainable, a.total) == \
           (b.spec, b.seed, b.lr, b.val, b.test, b.trainable, b.total)
    assert a.history.loss == b.history.loss  # every loss, bit for bit
    if timing:
        assert a.seconds == b.seconds and a.history == b.history
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:         # the bytes that were written are the bytes read back
        assert a.tensors[name].dtype == b.tensors[name].dtype and torch.equal(a.tensors[name], b.tensors[name])


def test_a_hit_returns_exactly_what_the_run_produced(tiny_config, tiny_task, tmp_path, capsys):
    calls, cache = [], C.Cache(tmp_path, enabled=True)
    first = _run(_builder(tiny_config, calls), tiny_task, cache)
    assert not first.cached and len(calls) == 1 and "loaded from cache" not in capsys.readouterr().out
    second = _run(_builder(tiny_config, calls), tiny_task, cache)
    assert second.cached and len(calls) == 1  # nothing was built or trained
    assert capsys.readouterr().out.startswith("loaded from cache: ")
    _same(first, second)
    entry = tmp_path / C.key_of(json.loads(next(tmp_path.glob("*/result.json")).read_text())["inputs"])
    assert sorted(p.name for p in entry.iterdir()) == ["result.json", "tensors.safetensors"]


def test_tensors_are_stored_even_when_not_kept(tiny_config, tiny_task, tmp_path):
    """A run made without keep_tensors stores its tensors anyway: a later caller that needs them (to
    restore the trained model) loads them instead of training again."""
    calls, cache = [], C.Cache(tmp_path, enabled=True)
    without = _run(_builder(tiny_config, calls), tiny_task, cache, keep_tensors=False)
    assert without.tensors is None
    with_tensors = _run(_builder(tiny_config, calls), tiny_task, cache, keep_tensors=True)
    assert with_tensors.cached and len(calls) == 1 and with_tensors.history.loss == without.history.loss
    made_here = _run(_builder(tiny_config, []), tiny_task, C.Cache(tmp_path / "other", enabled=True))
    _same(made_here, with_tensors, timing=False)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:40])


def _foreign_inputs(path):
    record = json.loads(path.read_text())
    record["inputs"]["train"]["lr"] = 0.5  # an entry made by other inputs, filed under this key
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("damage, file, why", [
    (_flip_a_byte, "tensors.safetensors", "checksum"),
    (_truncate, "tensors.safetensors", "checksum"),
    (_truncate, "result.json", "refused"),
    (_foreign_inputs, "result.json", "inputs differ"),
    (lambda p: p.unlink(), "tensors.safetensors", "refused"),
])
def test_a_damaged_entry_is_refused_and_recomputed(tiny_config, tiny_task, tmp_path, capsys, damage, file, why):
    calls, cache = [], C.Cache(tmp_path, enabled=True)
    first = _run(_builder(tiny_config, calls), tiny_task, cache)
    (entry,) = tmp_path.iterdir()
    damage(entry / file)
    capsys.readouterr()
    again = _run(_builder(tiny_config, calls), tiny_task, cache)
    out = capsys.readouterr().out
    assert not again.cached and len(calls) == 2
    assert out.startswith(f"cache: refused entry {entry.name[:12]}") and why in out and out.count("\n") == 1
    _same(first, again, timing=False)  # recomputed: the same result as the first time (CPU determinism)
    assert _run(_builder(tiny_config, calls), tiny_task, cache).cached  # and stored whole again


def test_an_entry_under_another_key_is_refused(tiny_config, tiny_task, tmp_path, capsys):
    calls, cache = [], C.Cache(tmp_path, enabled=True)
    _run(_builder(tiny_config, calls), tiny_task, cache)
    (entry,) = tmp_path.iterdir()
    other = mp.make_task("rotate", seed=5, n_train=64, n_val=32, n_test=32)
    key = C.key_of(C.run_inputs(SPEC, other, {**ARGS, "warmup": 1}, torch.device("cpu")))
    shutil.copytree(entry, tmp_path / key)  # the first run's files filed under the second run's key
    again = _run(_builder(tiny_config, calls), other, cache)
    assert not again.cached and len(calls) == 2 and "its key differs" in capsys.readouterr().out


def test_cache_off_writes_nothing(tiny_config, tiny_task, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MINIPEFT_CACHE", "0")  # what CI's test command sets
    calls = []
    assert not C.Cache().enabled and C.Cache().path == tmp_path / "cache"
    a = _run(_builder(tiny_config, calls), tiny_task, cache=None)
    b = _run(_builder(tiny_config, calls), tiny_task, cache=None)
    assert not a.cached and not b.cached and len(calls) == 2 and not (tmp_path / "cache").exists()
    _run(_builder(tiny_config, calls), tiny_task, cache=False)
    assert not (tmp_path / "cache").exists() and len(calls) == 3
    monkeypatch.setenv("MINIPEFT_CACHE", "1")
    _run(_builder(tiny_config, calls), tiny_task, cache=None)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # on: the default cache follows the variable


def test_clear_cache_removes_entries_only(tiny_config, tiny_task, tmp_path, capsys):
    cache = C.Cache(tmp_path, enabled=True)
    _run(_builder(tiny_config, []), tiny_task, cache)
    assert not list(tmp_path.glob("**/.tmp-*"))  # atomic writes leave no temporary files behind
    (tmp_path / "keep.txt").write_text("not an entry")
    (tmp_path / "notes").mkdir()
    assert C.clear_cache(tmp_path) == 1
    assert "cleared 1 cached run " in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "notes"]
    assert C.clear_cache(tmp_path / "missing") == 0


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_run(tiny_config, tiny_task, tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache folder's place is taken by a file")
    r = _run(_builder(tiny_config, []), tiny_task, C.Cache(blocked, enabled=True))
    assert not r.cached and r.tensors and "cache: could not store entry" in capsys.readouterr().out
    assert blocked.read_text().startswith("the cache folder's place")


def test_equivalent_arguments_share_an_entry(tiny_config, tiny_task, tmp_path):
    calls, cache = [], C.Cache(tmp_path, enabled=True)
    args = dict(seed=0, lr=0.01, steps=10, batch_size=8, device="cpu", cache=cache)
    first = P.run(SPEC, _builder(tiny_config, calls), tiny_task, warmup=None, eval_examples=None, **args)
    # warmup None is train()'s default (10 % of the steps); 32 val and 32 test examples: 32, 100 or all the same
    for same in (dict(warmup=1, eval_examples=32), dict(warmup=None, eval_examples=100)):
        assert P.run(SPEC, _builder(tiny_config, calls), tiny_task, **same, **args).cached
    assert not P.run(SPEC, _builder(tiny_config, calls), tiny_task, warmup=1, eval_examples=16, **args).cached
    assert len(calls) == 2 and not first.cached


def test_a_search_says_once_how_many_of_its_runs_the_cache_held(tiny_config, tiny_task, tmp_path, capsys):
    calls, cache = [], C.Cache(tmp_path, enabled=True)

    def search():
        return P.lr_search(SPEC, _builder(tiny_config, calls), tiny_task, grid=P.log_grid(1e-3, 1e-1), steps=2, seeds=2,
                           max_widen=0, batch_size=8, device="cpu", eval_examples=16, cache=cache)
    search()
    trained = len(calls)                                   # 5 rates at seed 0, the chosen one at seed 1
    assert trained == 6 and "loaded from cache" not in capsys.readouterr().out
    search()
    assert len(calls) == trained                           # nothing trained again
    lines = [line for line in capsys.readouterr().out.splitlines() if "loaded from cache" in line]
    assert len(lines) == 1 and "6 of the 6 runs" in lines[0]
