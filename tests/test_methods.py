"""The contract every method of the registry (``mp.METHODS``) keeps, tested once for all of them.

A new method added to the registry is tested here without a line of new test code: it starts at the base
(where the method is an identity at initialisation), gradients reach only its own tensors, the base is bit
for bit the same after training, it survives a save/load round trip, and where it has named adapters a
batch mixing them row by row equals running each alone.
"""
import pytest
import torch

import minipeft as mp
from minipeft.io import adapter_tensors
from helpers import assert_close_and_sensitive

METHODS = list(mp.METHODS)
PEFT = [m for m in METHODS if m != "full"]
# small options for testing efficiency; everything else is the method's config default
SMALL = {"prompt": {"n_tokens": 4}, "prefix": {"n_prefix": 3}, "adapter": {"bottleneck": 4}, "lora": {"r": 2}}
SMALL.update(dora={"r": 2})  # IA3 has no size option
# methods whose trainable part is an exact identity at initialisation (B = 0, W_up = 0); prompt and
# prefix tuning put vectors in front of the text, which changes the output from the first step
IDENTITY_AT_START = {"full", "adapter", "lora"}
IDENTITY_AT_START |= {"ia3", "dora"}  # IA3: vectors of ones; DoRA: B = 0 and m = ||W||_c (g - 1 = 0 exactly)
# the parameter names each method's trainable tensors have, written out by hand (not taken from the library)
OWN_NAMES = {"prompt": "prompt_tuning.embedding", "prefix": "prefix_tuning.", "adapter": ".adapters.",
             "lora": ".lora_"}
OWN_NAMES.update(ia3=".ia3.ia3_l", dora=".dora.")


def apply(model, method, seed=0, **extra):
    torch.manual_seed(seed)  # LoRA's A; the others take the seed as an option
    config = mp.METHODS[method].config
    seeded = {"seed": seed} if config is not None and "seed" in config.__dataclass_fields__ else {}
    return mp.METHODS[method].add(model, **SMALL.get(method, {}), **seeded, **extra)


def trained_tensors(model, method):
    return adapter_tensors(method, model, mp.METHODS[method].active(model) if mp.METHODS[method].active else None)


@pytest.mark.parametrize("method", sorted(IDENTITY_AT_START))
def test_starts_exactly_at_the_base(tiny_model, method):
    x = torch.randint(1, 41, (3, 9))
    before = tiny_model(x)
    apply(tiny_model, method)
    assert torch.equal(tiny_model(x), before)  # the same base kernels plus an exact zero


@pytest.mark.parametrize("method", PEFT)
def test_gradients_reach_only_the_method_and_the_base_stays_bit_for_bit(tiny_model, method):
    task = mp.make_task("rotate", seed=0, n_train=64, n_val=16)
    base_before = {k: v.clone() for k, v in mp.base_state_dict(tiny_model).items()}
    apply(tiny_model, method)
    own = {id(t) for t in trained_tensors(tiny_model, method).values()}
    x, y = mp.encode_batch(task.train[:8])
    from minipeft.train import loss_fn
    loss_fn(tiny_model, x, y).backward()
    with_grad = {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert with_grad and all(id(tiny_model.get_parameter(n)) in own for n in with_grad)
    assert with_grad == {n for n, _ in tiny_model.named_parameters() if OWN_NAMES[method] in n}
    tiny_model.zero_grad(set_to_none=True)
    mp.train(tiny_model, task, steps=3, lr=1e-2, batch_size=8, progress=False)
    after = mp.base_state_dict(tiny_model)
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # frozen tensors are never written


def test_full_finetuning_changes_the_base(tiny_model):
    """The control for the test above: the same check sees full fine-tuning change the weights."""
    task = mp.make_task("rotate", seed=0, n_train=64, n_val=16)
    before = {k: v.clone() for k, v in mp.base_state_dict(tiny_model).items()}
    mp.full_finetune(tiny_model)
    mp.train(tiny_model, task, steps=3, lr=1e-2, batch_size=8, progress=False)
    assert not all(torch.equal(mp.base_state_dict(tiny_model)[k], v) for k, v in before.items())


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tiny_model, tiny_config, tmp_path, method):
    task = mp.make_task("rotate", seed=0, n_train=64, n_val=16)
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply(tiny_model, method)
    mp.train(tiny_model, task, steps=2, lr=1e-2, batch_size=8, progress=False)
    tiny_model.eval()
    mp.save_adapter(tiny_model, tmp_path)
    fresh = mp.GPT(tiny_config)
    fresh.load_state_dict(base_state)
    mp.load_adapter(fresh, tmp_path)
    saved, loaded = trained_tensors(tiny_model, method), trained_tensors(fresh, method)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = torch.randint(1, 41, (3, 9))
    assert torch.equal(fresh(x), tiny_model(x))  # the same tensors through the same kernels


@pytest.mark.parametrize("method", [m for m in PEFT if mp.METHODS[m].set_rows is not None])
def test_mixed_batch_equals_each_adapter_alone(tiny_model, method):
    apply(tiny_model, method, name="a")
    apply(tiny_model, method, seed=1, name="b")
    with torch.no_grad():  # LoRA's B starts at zero: give it values, so that the two adapters differ
        for n, p in tiny_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.randint(1, 41, (4, 9))
    rows = ["a", "b", "b", "a"]
    alone = {}
    for name in ("a", "b"):
        mp.set_adapter(tiny_model, name)
        alone[name] = tiny_model(x)
    with mp.adapter_per_row(tiny_model, rows):
        mixed = tiny_model(x)
    other = {"a": "b", "b": "a"}
    for i, name in enumerate(rows):  # a mistake would serve the row with the other adapter
        assert_close_and_sensitive(mixed[i], alone[name][i], wrong=alone[other[name]][i])


@pytest.mark.parametrize("method", PEFT)
def test_every_method_default_is_written_once(method):
    """The registry's config is where the defaults live: add_*'s own defaults agree with it."""
    import dataclasses
    import inspect
    params = inspect.signature(mp.METHODS[method].add).parameters
    for f in dataclasses.fields(mp.METHODS[method].config):
        field, value = f.name, f.default
        if field in params and params[field].default is not inspect.Parameter.empty:
            default = params[field].default
            default = tuple(default) if isinstance(default, list) else default
            default = (default,) if field == "targets" and isinstance(default, str) else default
            assert default == value, f"{method}.{field}: add_* says {default!r}, the config {value!r}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [False, True])
def test_new_modules_take_the_models_mode(tiny_model, method, training):
    """Modules a method inserts follow the model's train/eval mode (dropout off in an eval model)."""
    tiny_model.train(training)
    apply(tiny_model, method)
    apply(tiny_model, method, name="second") if mp.METHODS[method].set_rows is not None else None
    assert [m.training for m in tiny_model.modules()] == [training] * len(list(tiny_model.modules()))
