"""Random bad arguments thrown at every public function (hypothesis).

The contract, for each call with ONE argument replaced by a bad value (wrong type, out of range,
non-finite, unknown name) and the others valid: a ``ValueError`` or ``TypeError`` whose message names
that argument, and nothing changed -- every state-dict tensor, ``requires_grad``, the module tree, the
forward hooks, train/eval mode of every module, the tensors passed in, and the files in the folder the
call may write to. The hand-picked cases with their exact messages are in ``test_bad_inputs.py``; here
hypothesis draws the values (25 per function, the same on every run; set MINIPEFT_PROPERTY_EXAMPLES=500
to search longer).
"""
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp

# --- the model, and what must not change ----------------------------------------------------------------


def tiny_model() -> mp.GPT:
    torch.manual_seed(0)  # small for testing efficiency
    return mp.GPT(mp.GPTConfig(vocab_size=41, block_size=48, d_model=32, n_layer=2, n_head=2, d_ff=64)).eval()


def snapshot(model: nn.Module, kwargs: dict, folder: Path) -> dict:
    """Everything a refused call must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "inputs": {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)},
        "files": {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
                  for p in sorted(folder.rglob("*"))},
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for key in ("grad", "modules", "training", "hooks", "files"):
        assert before[key] == after[key], f"{key} changed"
    for key in ("state", "inputs"):
        assert before[key].keys() == after[key].keys(), f"{key}: keys changed"
        for k, t in before[key].items():
            # bit for bit: the same tensor before and after (NaN equal to NaN)
            assert torch.equal(t, after[key][k]) or (t.is_floating_point() and torch.equal(
                t.isnan(), after[key][k].isnan()) and torch.equal(t.nan_to_num(), after[key][k].nan_to_num())), \
                f"{key}[{k!r}] changed"


# --- bad values -----------------------------------------------------------------------------------------

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
WRONG_TYPE = st.one_of(st.none(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.just(object()))
NOT_INT = st.one_of(WRONG_TYPE, st.booleans(), st.floats())          # 2.0 is not an int, nor is True
NOT_NUMBER = st.one_of(WRONG_TYPE, st.booleans())                    # True is not a number


def bad_int(low: int = 1, high: int | None = None):
    """Not an integer in [low, high]: wrong types, and integers outside."""
    out = [NOT_INT, st.integers(max_value=low - 1)]
    if high is not None:
        out.append(st.integers(min_value=high + 1))
    return st.one_of(*out)


def bad_float(strict: bool = True, high: float | None = None):
    """Not a finite number > 0 (``strict``) or >= 0, and below ``high`` (excluded) if given."""
    below = st.floats(max_value=0.0, exclude_max=not strict, allow_nan=False) | st.integers(max_value=-(not strict))
    out = [NOT_NUMBER, NON_FINITE, below]
    if high is not None:
        out.append(st.floats(min_value=high, allow_nan=False))
    return st.one_of(*out)


NOT_NONE = lambda v: v is not None  # noqa: E731  (None is the valid default of these)
BAD_BOOL = st.one_of(st.none(), st.text(max_size=4), st.integers(), st.floats(), st.lists(st.booleans(), max_size=2))


def bad_choice(choices):
    return st.one_of(st.text(max_size=8).filter(lambda s: s not in choices), st.none(), st.integers(),
                     st.lists(st.text(max_size=2), max_size=2))


BAD_NAME = st.one_of(  # not an adapter name: not an identifier, or taken by nn.ModuleDict
    st.text(max_size=8).filter(lambda s: not s.isidentifier()), st.sampled_from(["keys", "items", "training"]),
    st.integers(), st.lists(st.text(max_size=2), max_size=2))
UNKNOWN_NAME = st.sampled_from(["zzz", "rotate", "caesar"])          # identifiers the model has no adapter for
NOT_A_MODULE = st.one_of(st.none(), st.text(max_size=4), st.integers(), st.lists(st.integers(), max_size=2))
NOT_A_GPT = NOT_A_MODULE | st.builds(nn.Linear, st.just(4), st.just(4))  # for the functions that need a GPT

# --- one entry per public function: its valid call, and the bad values of each argument -----------------


@dataclass
class Spec:
    call: Callable                        # call(**kwargs): the public function
    valid: Callable                       # valid(model, folder) -> kwargs of a valid call (may set the model up)
    bad: dict                             # argument -> strategy of bad values
    words: dict = field(default_factory=dict)   # argument -> regex its message may use instead of its name
    errors: dict = field(default_factory=dict)  # argument -> other exception types allowed (beyond Value/TypeError)


def _task():
    return mp.make_task("rotate", seed=0, n_train=16, n_val=8, n_test=0)


def _with_lora(model, *names):
    for n in names or ("default",):
        mp.add_lora(model, r=2, alpha=4, name=n)
    return model


def _with_adapters(model):
    mp.add_adapters(model, bottleneck=4, name="a")
    mp.add_adapters(model, bottleneck=4, name="b")
    return model


def _saved(model, folder):
    """A LoRA adapter saved from a copy of ``model`` (the same base) into ``folder/saved``."""
    other = tiny_model()
    mp.save_adapter(_with_lora(other), folder / "saved")
    return folder / "saved"


def _per_row(model, names):
    with mp.adapter_per_row(model, names):
        pass


MODEL = {"model": NOT_A_MODULE}       # add_lora, quantize_nf4, train, ... take any nn.Module
GPT = {"model": NOT_A_GPT}
MODEL_WORDS = {"model": r"model|GPT|Module"}   # "add_adapters needs a minipeft GPT, got str"

SPECS = {
    "add_lora": Spec(mp.add_lora, lambda m, f: dict(model=m, r=2, alpha=4.0, targets=("q_proj",), dropout=0.0,
                                                     rslora=False, name="default"),
                     dict(MODEL, r=st.one_of(bad_int(1), st.integers(min_value=33)), alpha=bad_float(),
                          targets=st.one_of(st.sampled_from(["qkv", "", (), [], ("q_proj", "nowhere")]),
                                            st.none(), st.integers(), st.lists(st.integers(), min_size=1, max_size=2)),
                          dropout=bad_float(strict=False, high=1.0), rslora=BAD_BOOL, name=BAD_NAME),
                     words=dict(MODEL_WORDS, r="rank", targets="target")),
    "add_ia3": Spec(mp.add_ia3, lambda m, f: dict(model=m, targets=("k_proj", "v_proj", "fc_out"), feedforward=("fc_out",)),
                    dict(MODEL, targets=st.one_of(st.sampled_from(["", (), [], ("k_proj", "nowhere")]), st.none(),
                                                  st.integers()),
                         feedforward=st.one_of(st.sampled_from([("q_proj",), ("nowhere",)]), st.integers())),
                    words=dict(MODEL_WORDS, targets="target", feedforward="feedforward|feed-forward|target")),
    "add_dora": Spec(mp.add_dora, lambda m, f: dict(model=m, r=2, alpha=4.0, targets=("q_proj",)),
                     dict(MODEL, r=st.one_of(bad_int(1), st.integers(min_value=33)), alpha=bad_float(),
                          targets=st.one_of(st.sampled_from(["", (), [], ("q_proj", "nowhere")]), st.none(),
                                            st.integers())),
                     words=dict(MODEL_WORDS, r="rank", targets="target")),
    "add_prompt_tuning": Spec(mp.add_prompt_tuning, lambda m, f: dict(model=m, n_tokens=3, init="vocab",
                                                                       init_text=None, seed=0),
                              dict(GPT, n_tokens=st.one_of(bad_int(1), st.integers(min_value=48)),
                                   init=bad_choice(("vocab", "random")),
                                   init_text=st.one_of(st.just(""), st.integers(), st.lists(st.integers(), max_size=2),
                                                       st.sampled_from(["ABC", "é!", "\x00"])),
                                   seed=NOT_INT),
                              words=MODEL_WORDS),
    "add_prefix_tuning": Spec(mp.add_prefix_tuning, lambda m, f: dict(model=m, n_prefix=2, reparam=True, name="p",
                                                                       reparam_dim=4, reparam_hidden=8,
                                                                       init_std=0.1, seed=0),
                              dict(GPT, n_prefix=st.one_of(bad_int(1), st.integers(min_value=48)), reparam=BAD_BOOL,
                                   name=BAD_NAME, reparam_dim=bad_int(1), reparam_hidden=bad_int(1),
                                   init_std=bad_float(strict=False), seed=NOT_INT),
                              words=MODEL_WORDS),
    "add_adapters": Spec(mp.add_adapters, lambda m, f: dict(model=m, bottleneck=4, placement="houlsby", name="a",
                                                             activation=None, seed=0),
                         dict(GPT, bottleneck=bad_int(1), placement=bad_choice(("houlsby", "pfeiffer")),
                              name=BAD_NAME, activation=bad_choice(("relu", "gelu")).filter(NOT_NONE),
                              seed=NOT_INT),
                         words=MODEL_WORDS),
    "compose_adapters": Spec(mp.compose_adapters, lambda m, f: dict(model=_with_adapters(m), names=["a", "b"],
                                                                     combine="stack"),
                             dict(GPT, names=st.one_of(st.sampled_from([["a", "zzz"], ["zzz"], "a", None, 3,
                                                                          [1], ["a", None]])),
                                  combine=bad_choice(("stack", "average"))),
                             words=dict(MODEL_WORDS, names=r"name|adapter")),
    "quantize_nf4": Spec(mp.quantize_nf4, lambda m, f: dict(model=m, skip=("tok_emb", "head"), blocksize=64,
                                                             double_quant=True, quant_type="nf4", compute_dtype=None),
                         dict(MODEL, skip=st.one_of(st.sampled_from(["nowhere", ("head", "hed"), 3, None, [1]])),
                              blocksize=st.one_of(NOT_INT, st.integers(max_value=0),
                                                  st.integers(min_value=3).filter(lambda b: b & (b - 1))),
                              double_quant=BAD_BOOL, quant_type=bad_choice(("nf4", "fp4", "int4")),
                              compute_dtype=st.sampled_from([torch.int8, torch.int64, torch.bool, "float16", 1])),
                         words=MODEL_WORDS),
    "merge_lora": Spec(mp.merge_lora, lambda m, f: dict(model=_with_lora(m), requantize=False),
                       dict(MODEL, requantize=BAD_BOOL), words=MODEL_WORDS),
    "unmerge_lora": Spec(mp.unmerge_lora, lambda m, f: dict(model=mp.merge_lora(_with_lora(m)), requantize=False),
                         dict(MODEL, requantize=BAD_BOOL), words=MODEL_WORDS),
    "set_adapter": Spec(mp.set_adapter, lambda m, f: dict(model=_with_lora(m, "a", "b"), name="a"),
                        dict(MODEL, name=st.one_of(UNKNOWN_NAME, BAD_NAME)),
                        words=dict(MODEL_WORDS, name="name|adapter")),
    "delete_adapter": Spec(mp.delete_adapter, lambda m, f: dict(model=_with_lora(m, "a", "b"), name="a"),
                           dict(MODEL, name=st.one_of(UNKNOWN_NAME, BAD_NAME, st.none())),
                           words=dict(MODEL_WORDS, name="name|adapter")),
    "adapter_per_row": Spec(_per_row, lambda m, f: dict(model=_with_lora(m, "a", "b"), names=["a", None, "b"]),
                            dict(MODEL, names=st.one_of(st.sampled_from(["a", None, 3, [], ["a", "zzz"]]),
                                                        st.lists(BAD_NAME, min_size=1, max_size=3))),
                            words=dict(MODEL_WORDS, names="name|adapter")),
    "train": Spec(mp.train, lambda m, f: dict(model=_with_lora(m), task=_task(), steps=1, lr=1e-3, batch_size=4,
                                               seed=0, warmup=0, weight_decay=0.0, eval_every=0, device="cpu",
                                               progress=False),
                  dict(MODEL, task=st.one_of(st.sampled_from(["rotate", None, 3, [], [None]])), steps=bad_int(1),
                       lr=bad_float(), batch_size=bad_int(1), seed=NOT_INT,
                       warmup=bad_int(0, high=1).filter(NOT_NONE),
                       weight_decay=bad_float(strict=False), eval_every=bad_int(0),
                       device=st.one_of(st.sampled_from(["tpu", "gpu", "", True]), st.floats(), st.lists(
                           st.integers(), max_size=2)), progress=BAD_BOOL),
                  words=MODEL_WORDS),
    "evaluate": Spec(mp.evaluate, lambda m, f: dict(model=m, task=_task(), split="val", batch_size=4, max_examples=8),
                     dict(MODEL, task=st.sampled_from(["rotate", None, 3, []]), split=bad_choice(("train", "val")),
                          batch_size=bad_int(1), max_examples=bad_int(1).filter(NOT_NONE)),
                     words=MODEL_WORDS),
    "make_task": Spec(mp.make_task, lambda m, f: dict(name="rotate", seed=0, n_train=4, n_val=4, n_test=0),
                      dict(name=bad_choice(tuple(mp.TASKS)), seed=NOT_INT, n_train=bad_int(1).filter(NOT_NONE),
                           n_val=bad_int(1),
                           n_test=bad_int(0)),
                      words=dict(name="task")),
    "save_adapter": Spec(mp.save_adapter, lambda m, f: dict(model=_with_lora(m), directory=f / "out", name=None,
                                                             method=None),
                         dict(GPT, directory=st.sampled_from([None, 3, ["out"]]),
                              name=st.one_of(UNKNOWN_NAME, BAD_NAME),
                              method=bad_choice(tuple(mp.METHODS)).filter(NOT_NONE)),
                         words=dict(MODEL_WORDS, name="name", method="method|adapter")),
    "load_adapter": Spec(mp.load_adapter, lambda m, f: dict(base=m, directory=_saved(m, f), name=None,
                                                             trainable=False),
                         dict(base=NOT_A_GPT, directory=st.sampled_from([None, 3, ["saved"], "no/such/folder"]),
                              name=BAD_NAME, trainable=BAD_BOOL),
                         words=dict(base=r"base|GPT", name="name", directory="directory|folder|path"),
                         errors=dict(directory=(FileNotFoundError,))),
    "nf4.quantize": Spec(mp.nf4.quantize, lambda m, f: dict(x=torch.randn(128), blocksize=64, double_quant=False,
                                                             quant_type="nf4"),
                         dict(x=st.one_of(st.sampled_from([torch.arange(8), torch.zeros(0),
                                                          torch.tensor([1.0, math.nan]),
                                                          torch.tensor([math.inf, 1.0]), [1.0, 2.0], None, 1.0])),
                              blocksize=st.one_of(NOT_INT, st.integers(max_value=0),
                                                  st.integers(min_value=3).filter(lambda b: b & (b - 1))),
                              double_quant=BAD_BOOL, quant_type=bad_choice(("nf4", "fp4", "int4"))),
                         words=dict(x=r"\bx\b|tensor")),
    "predict_memory": Spec(mp.predict_memory, lambda m, f: dict(model="toy", method="lora", batch_size=2, seq_len=8,
                                                                 base_dtype="fp32", compute_dtype=None, flash=False,
                                                                 double_quant=True, r=2),
                           dict(model=st.one_of(bad_choice(tuple(mp.PRESETS)), st.builds(nn.Linear, st.just(4),
                                                                                         st.just(4))),
                                method=bad_choice(tuple(mp.METHODS) + ("qlora",)), batch_size=bad_int(1),
                                seq_len=bad_int(1), base_dtype=bad_choice(("fp32", "bf16", "nf4")),
                                compute_dtype=st.one_of(st.text(min_size=1, max_size=6).filter(
                                    lambda s: s not in ("fp32", "bf16")), st.integers(min_value=1)),
                                flash=BAD_BOOL, double_quant=BAD_BOOL, r=bad_int(1))),
    "measure_memory": Spec(mp.measure_memory, lambda m, f: dict(model=_with_lora(m), batch_size=2, seq_len=8, seed=0),
                           dict(MODEL, batch_size=bad_int(1), seq_len=st.one_of(bad_int(1), st.integers(min_value=49)),
                                seed=NOT_INT),
                           words=dict(MODEL_WORDS, seq_len=r"sequence of \d+ tokens")),  # the model's own check
}


def _names(message: str, argument: str, words: dict) -> bool:
    pattern = rf"\b{re.escape(argument)}\b" + (f"|{words[argument]}" if argument in words else "")
    return re.search(pattern, message, re.IGNORECASE) is not None


def check(spec: Spec, argument: str, value) -> None:
    """One bad call: refused with a ValueError/TypeError that names ``argument``; nothing changed."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        valid = spec.valid(tiny_model(), folder)
        model = valid.get("model", valid.get("base"))
        if not isinstance(model, nn.Module):
            model = tiny_model()  # a function without a model: the snapshot still watches the tensors and files
        before = snapshot(model, valid, folder)
        with pytest.raises((ValueError, TypeError) + spec.errors.get(argument, ())) as info:
            spec.call(**{**valid, argument: value})
        message = str(info.value)
        assert _names(message, argument, spec.words), f"{argument}={value!r}: the message does not name it: {message}"
        assert_unchanged(before, snapshot(model, valid, folder))


@pytest.mark.parametrize("function", SPECS)
@settings(max_examples=int(os.environ.get("MINIPEFT_PROPERTY_EXAMPLES", 25)), deadline=None,
          derandomize=True)  # the same draws on every run and machine
@given(data=st.data())
def test_bad_argument_is_refused_naming_it_and_changes_nothing(function, data):
    spec = SPECS[function]
    argument = data.draw(st.sampled_from(sorted(spec.bad)), label="argument")
    value = data.draw(spec.bad[argument], label=argument)
    check(spec, argument, value)


def test_every_public_function_has_an_entry():
    public = {"add_lora", "add_ia3", "add_dora", "add_prompt_tuning", "add_prefix_tuning", "add_adapters", "compose_adapters",
              "quantize_nf4", "merge_lora", "unmerge_lora", "set_adapter", "delete_adapter", "adapter_per_row",
              "train", "evaluate", "make_task", "save_adapter", "load_adapter", "nf4.quantize", "predict_memory",
              "measure_memory"}
    assert public <= set(SPECS)


# --- the check itself can fail: each way of breaking the contract is caught -------------------------------


def _breaks(model, how, folder):
    if how == "weight":
        model.head.weight.data[0, 0] += 1
    elif how == "requires_grad":
        model.head.weight.requires_grad_(False)
    elif how == "mode":
        model.blocks[0].train()
    elif how == "hook":
        model.head.register_forward_hook(lambda *a: None)
    elif how == "module":
        model.head = nn.Linear(model.head.in_features, model.head.out_features)
    elif how == "file":
        (folder / "left_behind.txt").write_text("x")
    raise ValueError("r must be a positive integer" if how != "message" else "something is wrong")


@pytest.mark.parametrize("how", ["weight", "requires_grad", "mode", "hook", "module", "file", "message"])
def test_the_check_catches_a_broken_contract(how):
    folder = {}
    spec = Spec(lambda model, r, folder: _breaks(model, how, folder),
                lambda m, f: folder.setdefault("kwargs", dict(model=m, r=1, folder=f)), {"r": st.just(0)})
    with pytest.raises(AssertionError):
        check(spec, "r", 0)
