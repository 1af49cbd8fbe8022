"""Bad inputs across the whole library, one table: each call is refused with the exact error type and
a message that names the problem, and the model is left exactly as it was (state dict, trainable
flags, structure, train/eval mode)."""
import json
import re
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import minipeft as mp
from minipeft.__main__ import main as cli

# --- set-ups: what exists before the refused call (they may change the model; the snapshot comes after)


def _lora(model, tmp, **kw):
    mp.add_lora(model, r=4, alpha=8, **kw)
    return tmp


def _saved(model, tmp, method="lora"):
    """A valid adapter of ``method`` saved from a copy of ``model`` (same base); returns its folder."""
    other = mp.GPT(model.config)
    other.load_state_dict(model.state_dict())
    {"lora": lambda m: mp.add_lora(m, r=4, alpha=8), "prompt": lambda m: mp.add_prompt_tuning(m, n_tokens=3),
     "qlora": lambda m: mp.add_lora(mp.quantize_nf4(m), r=4, alpha=8)}[method](other)
    mp.save_adapter(other, tmp / "adapter")
    return tmp / "adapter"


def _edit_config(model, tmp, edit):
    folder = _saved(model, tmp)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return folder


def _edit_tensors(model, tmp, edit):
    folder = _saved(model, tmp)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return folder


def _edit_bytes(model, tmp, edit):
    folder = _saved(model, tmp)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(edit(path.read_bytes()))
    return folder


def _other_base(model, tmp, **config):
    """An adapter saved from another base: other config (``config``) or the same config, other weights."""
    torch.manual_seed(99)
    other = mp.GPT(mp.GPTConfig(**{**vars(model.config), **config}))
    mp.save_adapter(mp.add_lora(other, r=4, alpha=8), tmp / "other")
    return tmp / "other"


def _task(model, tmp):
    return mp.make_task("rotate", seed=0, n_train=16, n_val=8)


def _rename(name):
    def setup(model, tmp):
        folder = _saved(model, tmp)
        (folder / "adapter_model.safetensors").rename(folder / name)
        return folder
    return setup


def _not_json(model, tmp):
    folder = _saved(model, tmp)
    (folder / "adapter_config.json").write_text("{'method': 'lora'")  # Python, not JSON, and cut short
    return folder


def _nothing(model, tmp):
    return tmp


R = SimpleNamespace  # one row: id, setup(model, tmp) -> ctx, call(model, ctx), error, match
ROWS = [
    # add_lora
    R(id="lora-rank-zero", setup=_nothing, call=lambda m, c: mp.add_lora(m, r=0), error=ValueError,
      match="rank r must be a positive integer"),
    R(id="lora-rank-too-large", setup=_nothing, call=lambda m, c: mp.add_lora(m, r=64), error=ValueError,
      match=r"r=64 is larger than min\(in, out\)"),
    R(id="lora-unknown-target", setup=_nothing, call=lambda m, c: mp.add_lora(m, targets="qkv"), error=ValueError,
      match="'qkv' matches no linear layer"),
    R(id="lora-negative-alpha", setup=_nothing, call=lambda m, c: mp.add_lora(m, alpha=-1), error=ValueError,
      match="alpha must be a positive finite number"),
    R(id="lora-same-name-twice", setup=_lora, call=lambda m, c: mp.add_lora(m, r=4), error=ValueError,
      match="already has a LoRA adapter named 'default'"),
    # add_prompt_tuning
    R(id="prompt-zero-tokens", setup=_nothing, call=lambda m, c: mp.add_prompt_tuning(m, n_tokens=0),
      error=ValueError, match="n_tokens must be a positive integer"),
    R(id="prompt-unknown-init", setup=_nothing, call=lambda m, c: mp.add_prompt_tuning(m, init="zeros"),
      error=ValueError, match="unknown init 'zeros'"),
    R(id="prompt-fills-the-context", setup=_nothing, call=lambda m, c: mp.add_prompt_tuning(m, n_tokens=48),
      error=ValueError, match="leaves no room for text"),
    R(id="prompt-twice", setup=lambda m, t: mp.add_prompt_tuning(m, n_tokens=2),
      call=lambda m, c: mp.add_prompt_tuning(m, n_tokens=2), error=ValueError, match="already has prompt tuning"),
    # add_prefix_tuning
    R(id="prefix-zero", setup=_nothing, call=lambda m, c: mp.add_prefix_tuning(m, n_prefix=0), error=ValueError,
      match="n_prefix must be a positive integer"),
    R(id="prefix-bad-name", setup=_nothing, call=lambda m, c: mp.add_prefix_tuning(m, name="my task"),
      error=ValueError, match="must be a Python identifier"),
    R(id="prefix-same-name-twice", setup=lambda m, t: mp.add_prefix_tuning(m, n_prefix=2, name="a"),
      call=lambda m, c: mp.add_prefix_tuning(m, n_prefix=2, name="a"), error=ValueError,
      match="already has a prefix named 'a'"),
    # add_adapters
    R(id="adapter-unknown-placement", setup=_nothing, call=lambda m, c: mp.add_adapters(m, placement="middle"),
      error=ValueError, match="unknown placement 'middle'"),
    R(id="adapter-zero-bottleneck", setup=_nothing, call=lambda m, c: mp.add_adapters(m, bottleneck=0),
      error=ValueError, match="bottleneck must be a positive integer"),
    R(id="adapter-unknown-activation", setup=_nothing, call=lambda m, c: mp.add_adapters(m, activation="tanh"),
      error=ValueError, match="unknown activation 'tanh'"),
    # NF4
    R(id="quantize-nf4-blocksize", setup=_nothing, call=lambda m, c: mp.quantize_nf4(m, blocksize=48),
      error=ValueError, match="blocksize must be a positive power of two"),
    R(id="quantize-nf4-twice", setup=lambda m, t: mp.quantize_nf4(m), call=lambda m, c: mp.quantize_nf4(m),
      error=ValueError, match="already quantised"),
    R(id="nf4-integer-tensor", setup=_nothing, call=lambda m, c: mp.nf4.quantize(torch.arange(64)),
      error=TypeError, match="must be a floating-point tensor"),
    R(id="nf4-nan", setup=_nothing, call=lambda m, c: mp.nf4.quantize(torch.full((64,), float("nan"))),
      error=ValueError, match="NaN or infinite"),
    # train / evaluate / make_task
    R(id="train-zero-steps", setup=_task, call=lambda m, c: mp.train(m, c, steps=0), error=ValueError,
      match="steps must be a positive integer"),
    R(id="train-negative-lr", setup=_task, call=lambda m, c: mp.train(m, c, steps=1, lr=-1.0), error=ValueError,
      match="lr must be a positive finite number"),
    R(id="train-nothing-trainable", setup=lambda m, t: _task(mp.freeze(m), t),
      call=lambda m, c: mp.train(m, c, steps=1, progress=False), error=ValueError, match="no trainable parameters"),
    R(id="train-task-name-not-task", setup=_nothing, call=lambda m, c: mp.train(m, "rotate", steps=1),
      error=ValueError, match="task must be a Task"),
    R(id="evaluate-unknown-split", setup=_task, call=lambda m, c: mp.evaluate(m, c, split="dev"),
      error=ValueError, match="split must be 'train' or 'val'"),
    R(id="evaluate-not-a-task", setup=_nothing, call=lambda m, c: mp.evaluate(m, "rotate"), error=ValueError,
      match="evaluate needs a Task"),
    R(id="make-task-unknown", setup=_nothing, call=lambda m, c: mp.make_task("subtract"), error=ValueError,
      match="unknown task 'subtract'"),
    R(id="make-task-no-examples", setup=_nothing, call=lambda m, c: mp.make_task("rotate", n_train=0),
      error=ValueError, match="n_train must be a positive integer"),
    # save_adapter
    R(id="save-merged-lora", setup=lambda m, t: (mp.merge_lora(mp.add_lora(m, r=4, alpha=8)), t)[1],
      call=lambda m, c: mp.save_adapter(m, c / "x"), error=ValueError, match="merged into the base weights"),
    R(id="save-unknown-name", setup=_lora, call=lambda m, c: mp.save_adapter(m, c / "x", name="rotate"),
      error=ValueError, match="no lora adapter named 'rotate'"),
    R(id="save-two-methods", setup=lambda m, t: _lora(mp.add_prompt_tuning(m, n_tokens=2), t),
      call=lambda m, c: mp.save_adapter(m, c / "x"), error=ValueError, match=r"several methods \['lora', 'prompt'\]"),
    R(id="save-not-a-model", setup=_nothing, call=lambda m, c: mp.save_adapter(m.head, c / "x"), error=TypeError,
      match="model must be a minipeft GPT, got Linear"),
    # load_adapter: the files
    R(id="load-corrupted-safetensors", setup=lambda m, t: _edit_bytes(m, t, lambda b: b"\x07" * 8 + b[8:]),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match="adapter_model.safetensors is not a readable safetensors file"),
    R(id="load-truncated-safetensors", setup=lambda m, t: _edit_bytes(m, t, lambda b: b[:len(b) // 2]),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match="adapter_model.safetensors is not a readable safetensors file"),
    R(id="load-only-a-pickle", setup=_rename("adapter_model.bin"), call=lambda m, c: mp.load_adapter(m, c),
      error=FileNotFoundError, match="adapter_model.bin found: pickles are never loaded"),
    R(id="load-no-folder", setup=_nothing, call=lambda m, c: mp.load_adapter(m, c / "nowhere"),
      error=FileNotFoundError, match="no adapter folder at .*nowhere"),
    R(id="load-config-not-json", setup=_not_json, call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError, match="is not valid JSON"),
    R(id="load-config-missing-key", setup=lambda m, t: _edit_config(m, t, lambda c: c.pop("base_fingerprint")),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match=r"missing key\(s\) \['base_fingerprint'\]"),
    R(id="load-config-extra-key", setup=lambda m, t: _edit_config(m, t, lambda c: c.update(exec="rm -rf /")),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError, match=r"unexpected key\(s\) \['exec'\]"),
    R(id="load-options-extra-key", setup=lambda m, t: _edit_config(m, t, lambda c: c["options"].update(bias=True)),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match="options of lora must have exactly the keys"),
    R(id="load-options-bad-value", setup=lambda m, t: _edit_config(m, t, lambda c: c["options"].update(r=-3)),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match="cannot apply the lora adapter .* rank r must be a positive integer, got -3"),
    R(id="load-options-bad-nf4", setup=lambda m, t: _edit_config(m, t, lambda c: c["options"].update(base_nf4="4bit")),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match="options.base_nf4 must be null or an object"),
    R(id="load-unknown-method", setup=lambda m, t: _edit_config(m, t, lambda c: c.update(method="no_such_method")),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError, match="unknown method 'no_such_method'"),
    R(id="load-claims-another-method", setup=lambda m, t: _edit_config(m, t, lambda c: c.update(
        method="prompt", name=None, options=asdict(mp.PromptTuningConfig(n_tokens=3)))),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match=r"lacks tensor\(s\) \['prompt_tuning.embedding'\]"),
    R(id="load-missing-tensor", setup=lambda m, t: _edit_tensors(m, t, lambda d: d.pop("blocks.0.attn.q_proj.lora_A")),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match=r"lacks tensor\(s\) \['blocks.0.attn.q_proj.lora_A'\]"),
    R(id="load-unexpected-tensor", setup=lambda m, t: _edit_tensors(m, t, lambda d: d.update(evil=torch.zeros(2))),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match=r"holds unexpected tensor\(s\) \['evil'\]"),
    R(id="load-wrong-shape", setup=lambda m, t: _edit_tensors(
        m, t, lambda d: d.update({"blocks.1.attn.v_proj.lora_B": torch.zeros(32, 5)})),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match=r"'blocks.1.attn.v_proj.lora_B' has shape \(32, 5\), expected \(32, 4\)"),
    R(id="load-wrong-dtype", setup=lambda m, t: _edit_tensors(
        m, t, lambda d: d.update({"blocks.0.attn.v_proj.lora_A": d["blocks.0.attn.v_proj.lora_A"].half()})),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match="'blocks.0.attn.v_proj.lora_A' has dtype torch.float16, expected torch.float32"),
    R(id="load-nan-tensor", setup=lambda m, t: _edit_tensors(
        m, t, lambda d: d["blocks.0.attn.q_proj.lora_B"].fill_(float("nan"))),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.AdapterFileError,
      match="'blocks.0.attn.q_proj.lora_B' holds NaN"),
    # load_adapter: the base
    R(id="load-other-base-config", setup=lambda m, t: _other_base(m, t, d_model=16, d_ff=32),
      call=lambda m, c: mp.load_adapter(m, c), error=mp.BaseMismatchError,
      match=r"saved from a base with d_model=16 \(this base: 32\), d_ff=32 \(this base: 64\)"),
    R(id="load-other-base-weights", setup=_other_base, call=lambda m, c: mp.load_adapter(m, c),
      error=mp.BaseMismatchError, match="saved from other base weights"),
    R(id="load-plain-lora-into-4bit-base", setup=lambda m, t: (_saved(m, t), mp.quantize_nf4(m))[0],
      call=lambda m, c: mp.load_adapter(m, c), error=mp.BaseMismatchError,
      match="saved on a full-precision base; this base is 4-bit"),
    R(id="load-name-taken", setup=lambda m, t: (_saved(m, t), _lora(m, t))[0],
      call=lambda m, c: mp.load_adapter(m, c), error=ValueError, match="already has a lora adapter named 'default'"),
    R(id="load-name-for-unnamed-method", setup=lambda m, t: _saved(m, t, "prompt"),
      call=lambda m, c: mp.load_adapter(m, c, name="rotate"), error=ValueError, match="prompt checkpoints have no names"),
    R(id="load-trainable-not-bool", setup=_saved, call=lambda m, c: mp.load_adapter(m, c, trainable="yes"),
      error=TypeError, match="trainable must be True or False"),
    # the command line (argparse prints the message on stderr)
    R(id="cli-unknown-command", setup=_nothing, call=lambda m, c: cli(["finetune"]), error=SystemExit,
      match="invalid choice: 'finetune'"),
    R(id="cli-steps-not-a-number", setup=_nothing, call=lambda m, c: cli(["pretrain", "--steps", "many"]),
      error=SystemExit, match="invalid int value: 'many'"),
    R(id="cli-compare-unknown-method", setup=_nothing, call=lambda m, c: cli(["compare", "--methods", "ia3"]),
      error=ValueError, match=r"unknown method\(s\)"),
    R(id="cli-compare-unknown-task", setup=_nothing, call=lambda m, c: cli(["compare", "--task", "subtract"]),
      error=ValueError, match="unknown task 'subtract'"),
]


def _snapshot(model):
    return (repr(model), model.training, {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _unchanged(model, snap):
    text, training, flags, state = snap
    now = model.state_dict()
    return (repr(model) == text and model.training == training and flags == {
        n: p.requires_grad for n, p in model.named_parameters()} and state.keys() == now.keys()
        and all(torch.equal(state[k], now[k]) for k in state))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_refused_with_a_clear_error_and_nothing_changed(row, tiny_model, tmp_path, capsys):
    ctx = row.setup(tiny_model, tmp_path)
    snap = _snapshot(tiny_model)
    with pytest.raises(row.error) as info:
        row.call(tiny_model, ctx)
    assert type(info.value) is row.error  # the exact type, not a subclass
    message = capsys.readouterr().err if row.error is SystemExit else str(info.value)
    assert re.search(row.match, message), message
    assert _unchanged(tiny_model, snap)


def test_the_table_is_long_enough():
    assert len(ROWS) >= 25
