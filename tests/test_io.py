"""Saving and loading adapters: round trips bit for bit, only the trained part on disk, a fingerprint
recomputed by hand, frozen-by-default loading, several adapters in one base. (Refused inputs: see
test_bad_inputs.py.)"""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open

import minipeft as mp
from helpers import assert_close_and_sensitive


def _need(name):
    """A method that another module provides; skipped only while it does not exist yet."""
    if not hasattr(mp, name):
        pytest.skip(f"mp.{name} does not exist yet")
    return getattr(mp, name)


# each method as the user would apply it to the tiny model (d_model 32, 2 layers, d_ff 64)
METHODS = {
    "lora": lambda m: mp.add_lora(m, r=4, alpha=8, targets=("q_proj", "v_proj")),
    "lora_named_all_linear": lambda m: mp.add_lora(m, r=2, alpha=4, targets="all-linear", rslora=True, name="t1"),
    "prompt": lambda m: _need("add_prompt_tuning")(m, n_tokens=5),
    "prefix": lambda m: _need("add_prefix_tuning")(m, n_prefix=4),
    "adapters": lambda m: _need("add_adapters")(m, bottleneck=8),
    "qlora": lambda m: mp.add_lora(_need("quantize_nf4")(m), r=4, alpha=8, targets="all-linear"),
    "full": lambda m: mp.full_finetune(m),
}


def _fresh(config, state):
    model = mp.GPT(config)
    model.load_state_dict(state)
    return model.eval()


def _randomise_trainable(model, seed=0):
    """Random values in every trainable tensor (LoRA's B starts at zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _x(config, batch=3, T=9, seed=1):
    return torch.randint(1, config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def base_state(tiny_model):
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_is_bit_for_bit_and_frozen(tiny_model, tiny_config, base_state, method, tmp_path):
    METHODS[method](tiny_model)
    _randomise_trainable(tiny_model)
    x = _x(tiny_config)
    expected = tiny_model.eval()(x)
    mp.save_adapter(tiny_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    loaded = mp.load_adapter(_fresh(tiny_config, base_state), tmp_path)
    assert torch.equal(loaded(x), expected)  # the same tensors through the same kernels: bit for bit
    assert mp.trainable_parameters(loaded)[0] == 0 and not loaded.training  # for inference: frozen, eval


@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_true_resumes_training_of_the_adapter_only(tiny_model, tiny_config, base_state, method,
                                                             tmp_path):
    METHODS[method](tiny_model)
    _randomise_trainable(tiny_model)
    trained = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    mp.save_adapter(tiny_model, tmp_path)
    loaded = mp.load_adapter(_fresh(tiny_config, base_state), tmp_path, trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trained


def test_the_file_holds_only_the_lora_matrices(tiny_model, tiny_config, tmp_path):
    mp.add_lora(tiny_model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    mp.save_adapter(tiny_model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # by hand: 2 layers x (q, v) x (A: r x d_model, B: d_model x r), d_model = 32, r = 4
    assert shapes == {f"blocks.{i}.attn.{p}.{m}": (4, 32) if m == "lora_A" else (32, 4)
                      for i in range(2) for p in ("q_proj", "v_proj") for m in ("lora_A", "lora_B")}
    numbers = 2 * 2 * (4 * 32 + 32 * 4)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert numbers * 4 < size < numbers * 4 + 1024  # fp32 numbers + a small JSON header


def test_full_checkpoint_holds_every_weight(tiny_model, tmp_path):
    mp.save_adapter(mp.full_finetune(tiny_model), tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(tiny_model.state_dict())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "full" and config["base_fingerprint"] is None


def test_config_records_method_options_and_base(tiny_model, tiny_config, tmp_path):
    mp.add_lora(tiny_model, r=2, alpha=3.0, targets="fc_in", dropout=0.25, name="caesar")
    mp.save_adapter(tiny_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["name"] == "caesar"
    assert config["options"] == dict(r=2, alpha=3.0, targets=["blocks.0.mlp.fc_in", "blocks.1.mlp.fc_in"],
                                     dropout=0.25, rslora=False, base_nf4=None)
    assert config["base_config"] == dict(vocab_size=41, block_size=48, d_model=32, n_layer=2, n_head=4, d_ff=64,
                                         dropout=0.0, fused_attention=False)


def _hand_fingerprint(state):
    """SHA-256 over name|dtype|shape| and raw bytes of every tensor, in name order (the documented recipe)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


@pytest.mark.parametrize("method", ["lora", "lora_named_all_linear", "prompt", "prefix", "adapters"])
def test_fingerprint_is_that_of_the_plain_base(tiny_model, base_state, method, tmp_path):
    METHODS[method](tiny_model)
    _randomise_trainable(tiny_model)  # training the adapter must not change the fingerprint
    assert mp.base_fingerprint(tiny_model) == _hand_fingerprint(base_state)
    mp.save_adapter(tiny_model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_fingerprint"] == \
        _hand_fingerprint(base_state)


def test_fingerprint_sees_a_one_ulp_change(tiny_model, base_state):
    w = base_state["blocks.1.mlp.fc_out.weight"]
    w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))
    assert mp.base_fingerprint(tiny_model) != _hand_fingerprint(base_state)


def test_loading_does_not_move_the_random_stream(tiny_model, tiny_config, base_state, tmp_path):
    mp.save_adapter(mp.add_lora(tiny_model, r=4, alpha=8), tmp_path)
    fresh = _fresh(tiny_config, base_state)
    torch.manual_seed(123)
    mp.load_adapter(fresh, tmp_path)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)


def test_three_adapters_in_one_base_and_a_mixed_batch(tiny_model, tiny_config, base_state, tmp_path):
    x = _x(tiny_config, batch=6)
    singles = {}
    for seed, task in enumerate(["rotate", "caesar", "sortdesc"]):
        model = _fresh(tiny_config, base_state)
        mp.add_lora(model, r=4, alpha=8, targets="all-linear")  # each saved under the default name
        _randomise_trainable(model, seed)
        singles[task] = model(x)
        mp.save_adapter(model, tmp_path / task)
    served = _fresh(tiny_config, base_state)
    for task in singles:
        mp.load_adapter(served, tmp_path / task, name=task)  # renamed on load
    assert mp.list_adapters(served) == ["rotate", "caesar", "sortdesc"]
    for task, y in singles.items():
        mp.set_adapter(served, task)
        assert torch.equal(served(x), y)  # the same adapter through the same kernels as when it was saved
    rows = ["rotate", "caesar", "sortdesc", None, "caesar", "rotate"]
    with mp.adapter_per_row(served, rows):
        mixed = served(x)
    with mp.disable_adapter(served):
        singles[None] = served(x)
    # a mixed batch runs each adapter on its rows only (other matmul shapes): a tolerance, and a row
    # served by another task's adapter (a realistic mistake) misses by far more
    other = {"rotate": "caesar", "caesar": "sortdesc", "sortdesc": "rotate", None: "rotate"}
    for b, task in enumerate(rows):
        assert_close_and_sensitive(mixed[b], singles[task][b], wrong=singles[other[task]][b])


def test_save_picks_the_named_adapter(tiny_model, tiny_config, base_state, tmp_path):
    mp.add_lora(tiny_model, r=4, alpha=8, name="a")
    mp.add_lora(tiny_model, r=2, alpha=8, targets="fc_out", name="b")
    _randomise_trainable(tiny_model)  # trains b only (the active one)
    mp.save_adapter(tiny_model, tmp_path / "a", name="a")
    mp.save_adapter(tiny_model, tmp_path / "b")  # default: the active adapter
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["options"]["r"] == 4
    loaded = mp.load_adapter(_fresh(tiny_config, base_state), tmp_path / "b")
    x = _x(tiny_config)
    assert mp.list_adapters(loaded) == ["b"] and torch.equal(loaded(x), tiny_model(x))  # same kernels, same tensors


def test_no_pickle_is_ever_read(tiny_model, tmp_path):
    mp.save_adapter(mp.add_lora(tiny_model, r=4, alpha=8), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickles are never loaded"):
        mp.load_adapter(mp.GPT(tiny_model.config), tmp_path)


def test_qlora_file_records_the_4bit_base_and_rebuilds_it(tiny_model, tiny_config, base_state, tmp_path):
    _need("quantize_nf4")(tiny_model, blocksize=32, double_quant=False)
    mp.add_lora(tiny_model, r=4, alpha=8, targets="fc_in")
    _randomise_trainable(tiny_model)
    mp.save_adapter(tiny_model, tmp_path)
    nf4 = json.loads((tmp_path / "adapter_config.json").read_text())["options"]["base_nf4"]
    assert nf4["blocksize"] == 32 and nf4["double_quant"] is False and nf4["quant_type"] == "nf4"
    assert nf4["layers"] == sorted(f"blocks.{i}.{p}" for i in range(2) for p in
                                   ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc_in", "mlp.fc_out"))
    x = _x(tiny_config)
    for target in (_fresh(tiny_config, base_state),   # full precision: quantised on load, as it was
                   mp.quantize_nf4(_fresh(tiny_config, base_state), blocksize=32, double_quant=False)):
        # bit for bit: quantising the same weights is elementwise and exact, then the same kernels run
        assert torch.equal(mp.load_adapter(target, tmp_path)(x), tiny_model(x))


def test_three_prefixes_loaded_into_one_base_and_a_mixed_batch(tiny_model, tiny_config, base_state, tmp_path):
    x = _x(tiny_config, batch=4)
    singles = {}
    for seed, task in enumerate(["rotate", "caesar", "sortdesc"]):
        model = mp.add_prefix_tuning(_fresh(tiny_config, base_state), n_prefix=3, reparam=seed != 1, seed=seed)
        _randomise_trainable(model, seed)
        singles[task] = model(x)
        mp.save_adapter(model, tmp_path / task)
    served = _fresh(tiny_config, base_state)
    for task in singles:
        mp.load_adapter(served, tmp_path / task, name=task)
    rows = ["sortdesc", "rotate", "caesar", "rotate"]
    with mp.adapter_per_row(served, rows):  # one prefix per row, one forward pass
        mixed = served(x)
    other = {"rotate": "caesar", "caesar": "sortdesc", "sortdesc": "rotate"}  # a mistake: another task's prefix
    for b, task in enumerate(rows):  # the same maths on another batch's cache: a tolerance
        assert_close_and_sensitive(mixed[b], singles[task][b], wrong=singles[other[task]][b])


def test_a_folded_prefix_saves_only_the_prefix(tiny_model, tiny_config, base_state, tmp_path):
    mp.add_prefix_tuning(tiny_model, n_prefix=3)
    _randomise_trainable(tiny_model)
    x = _x(tiny_config)
    expected = mp.fold_prefix(tiny_model)(x)
    mp.save_adapter(tiny_model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"prefix_tuning.prefix.prefix": (2, 2, 3, 32)}  # (layers, key/value, n_prefix, d_model)
    # bit for bit: the same folded prefix, saved and loaded, through the same kernels
    assert torch.equal(mp.load_adapter(_fresh(tiny_config, base_state), tmp_path)(x), expected)
