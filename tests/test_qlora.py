"""The frozen 4-bit layer and QLoRA, checked against plain linear layers and hand-made references."""
import pytest
import torch
import torch.nn as nn

import minipeft as mp
from minipeft import nf4
from helpers import assert_close_and_sensitive
from minipeft.qlora import Linear4bit, NF4Config


def reference_weight(linear, config):
    """The dequantised weight, by minipeft.nf4 (itself checked byte for byte against bitsandbytes in test_nf4)."""
    packed, state = nf4.quantize(linear.weight.detach(), config.blocksize, config.double_quant)
    return nf4.dequantize(packed, state)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(24, 40), (7, 9)])  # 9 * 7 = 63: a partial block and an odd count
def test_output_equals_linear_with_dequantised_weight(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    config = NF4Config(double_quant=False)
    layer = Linear4bit.from_linear(linear, config)
    ref = nn.Linear(shape[1], shape[0], bias=bias)
    with torch.no_grad():
        ref.weight.copy_(reference_weight(linear, config))
        if bias:
            ref.bias.copy_(linear.bias)
    x = torch.randn(3, 5, shape[1], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    # a tolerance (the 4-bit layer need not call the very same kernel); a realistic mistake, the full-precision
    # weight used instead of the 4-bit one, misses by far more
    assert_close_and_sensitive(y, y_ref, wrong=linear(x))
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)  # the gradient the LoRA layers below need
    assert not any(p.requires_grad for p in layer.parameters())


def test_no_full_precision_weight_is_kept():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = Linear4bit.from_linear(linear)  # double quantisation by default
    n = 64 * 32
    stored = dict(layer.named_parameters()) | dict(layer.named_buffers())
    assert {k: v.dtype for k, v in stored.items()} == {
        "bias": torch.float32, "packed": torch.uint8, "absmax": torch.uint8,
        "absmax_offset": torch.float32, "absmax2": torch.float32}
    assert stored["packed"].numel() == n // 2 and stored["absmax"].numel() == n // 64
    assert not [k for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]  # no plain tensor attribute
    # nor for backward: autograd saves no (out, in) tensor
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    assert (32, 64) not in saved and (64, 32) not in saved
    # bytes: 1,024 code bytes + 32 absmax bytes + 1 fp32 scale + 1 fp32 offset
    assert layer.storage_bits() == pytest.approx(8 * (1024 + 32 + 4 + 4) / n)


def test_quantize_nf4_replaces_linears_and_keeps_counts(tiny_model):
    before = mp.trainable_parameters(tiny_model)[1]
    x = torch.randint(1, 41, (2, 12))
    y0 = tiny_model(x)
    linears = [n for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)]
    assert mp.quantize_nf4(tiny_model) is tiny_model
    q = mp.linear4bit_layers(tiny_model)
    assert sorted(q) == sorted(n for n in linears if n != "head")
    assert isinstance(tiny_model.head, nn.Linear)
    # "all params" counts the logical weights of 4-bit layers: unchanged; nothing trains
    assert mp.trainable_parameters(tiny_model) == (0, before)
    y = tiny_model(x)
    assert (y - y0).norm() / y0.norm() < 0.2  # 4-bit rounding: close, not equal
    assert not torch.equal(y, y0)


def test_qlora_trains_only_the_adapters(tiny_model):
    mp.quantize_nf4(tiny_model)
    x = torch.randint(1, 41, (2, 12))
    y_q = tiny_model(x)
    buffers = {k: v.clone() for k, v in tiny_model.named_buffers()}
    mp.add_lora(tiny_model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    assert isinstance(tiny_model.blocks[0].attn.q_proj.base_layer, Linear4bit)
    # r * (in + out) per layer: 4 * (32 + 32) * 2 targets * 2 layers
    assert mp.trainable_parameters(tiny_model)[0] == 4 * 64 * 2 * 2
    assert torch.equal(tiny_model(x), y_q)  # B = 0: the same 4-bit layers' output plus exact zeros
    task = mp.make_task("rotate", seed=0, n_train=64)
    mp.train(tiny_model, task, steps=3, lr=1e-2, batch_size=8, progress=False, device="cpu")
    after = dict(tiny_model.named_buffers())
    assert all(torch.equal(v, after[k.replace("q_proj.", "q_proj.base_layer.").replace(
        "v_proj.", "v_proj.base_layer.")]) for k, v in buffers.items())  # the base: bit for bit
    assert tiny_model.blocks[0].attn.q_proj.lora_B.abs().sum() > 0


def test_merge_requires_requantize_and_rounds(tiny_model):
    mp.quantize_nf4(tiny_model)
    mp.add_lora(tiny_model, r=4, alpha=8, targets=("q_proj",))
    torch.manual_seed(1)
    for layer in mp.lora_layers(tiny_model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(ValueError, match="requantiz"):
        mp.merge_lora(tiny_model)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())  # left as it was
    lora = tiny_model.blocks[0].attn.q_proj
    base = lora.base_layer
    # reference, by hand: quantise(dequantise(W) + scaling * B A)
    merged_w = base.dequantized_weight() + lora.scaling * lora.lora_B.detach() @ lora.lora_A.detach()
    ref_packed, ref_state = nf4.quantize(merged_w, 64, True)
    x = torch.randint(1, 41, (2, 12))
    y = tiny_model(x)
    mp.merge_lora(tiny_model, requantize=True)
    assert torch.equal(base.packed, ref_packed) and torch.equal(base.absmax, ref_state.absmax)
    y_merged = tiny_model(x)
    assert 0 < (y_merged - y).abs().max() < 0.5  # the requantisation error is real, and small
    mp.unmerge_lora(tiny_model, requantize=True)  # subtracts and requantises once more
    with pytest.raises(ValueError, match="shape"):
        base.merge_delta(torch.zeros(3, 3), requantize=True)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(blocksize=48), ValueError, "power of two"),
    (dict(quant_type="int8"), ValueError, "quant_type"),
    (dict(double_quant="yes"), TypeError, "double_quant"),
    (dict(compute_dtype=torch.int8), TypeError, "compute_dtype"),
    (dict(skip=("tok_emb", "head", "q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")),
     ValueError, "no nn.Linear"),
    (dict(skip=(3,)), TypeError, "skip"),
])
def test_bad_arguments_leave_the_model_unchanged(tiny_model, kwargs, error, match):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(error, match=match):
        mp.quantize_nf4(tiny_model, **kwargs)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not mp.linear4bit_layers(tiny_model)
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_quantising_twice_or_after_lora_is_an_error(tiny_model, tiny_config):
    mp.quantize_nf4(tiny_model)
    with pytest.raises(ValueError, match="already quantised"):
        mp.quantize_nf4(tiny_model)
    other = mp.GPT(tiny_config)
    mp.add_lora(other)
    with pytest.raises(ValueError, match="quantise the base first"):
        mp.quantize_nf4(other)


def test_bf16_compute_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    layer = Linear4bit.from_linear(linear, NF4Config(compute_dtype=torch.bfloat16))
    x = torch.randn(5, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # back in the input's dtype
    ref = x @ layer.dequantized_weight().T + linear.bias
    assert torch.allclose(y, ref, rtol=0.02, atol=0.05)


def test_dequantize_nf4_then_merge_exactly(tiny_model):
    x = torch.randint(1, 41, (2, 12))
    mp.quantize_nf4(tiny_model)
    mp.add_lora(tiny_model, r=4, alpha=8, targets="all-linear")
    torch.manual_seed(2)
    for layer in mp.lora_layers(tiny_model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    y = tiny_model(x)
    with mp.disable_adapter(tiny_model):
        y_base = tiny_model(x)  # what a merge that dropped the update would give
    w_hat = tiny_model.blocks[1].mlp.fc_in.base_layer.dequantized_weight()
    assert mp.dequantize_nf4(tiny_model) is tiny_model and not mp.linear4bit_layers(tiny_model)
    fc_in = tiny_model.blocks[1].mlp.fc_in
    assert type(fc_in.base_layer) is nn.Linear and torch.equal(fc_in.base_layer.weight, w_hat)
    assert mp.trainable_parameters(tiny_model)[0] == sum(4 * (m.in_features + m.out_features)
                                                         for m in mp.lora_layers(tiny_model).values())
    torch.testing.assert_close(tiny_model(x), y, atol=1e-5, rtol=1e-5)  # the same function, now in fp32 weights
    mp.merge_lora(tiny_model)                              # no requantisation needed: exact up to fp32 rounding
    assert_close_and_sensitive(tiny_model(x), y, wrong=y_base)
    with pytest.raises(ValueError, match="no Linear4bit"):
        mp.dequantize_nf4(tiny_model)
