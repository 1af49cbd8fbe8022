"""IA³ (minipeft/ia3.py) against a hand-worked layer, PEFT's IA3 on our GPT, and PEFT's GPT-2 defaults.

The method contract (identity at the start, gradients only to the vectors, base bit for bit, save/load)
is tested for every registry method in tests/test_methods.py; here: the maths.

Tolerances (float32, CPU): the same two routes as tests/test_references.py (PEFT multiplies the same
tensors in the same order, so differences are summation-order rounding): logits ``atol=1e-4, rtol=1e-5``
(logits reach ~20), gradients ``atol=1e-6, rtol=1e-4``. Each comparison is shown sensitive: a realistic
mistake (l_k and l_v scaling the input of k_proj and v_proj instead of their output) misses by far more.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: every model is built here

import pytest  # noqa: E402
import torch  # noqa: E402

import minipeft as mp  # noqa: E402
from helpers import REFERENCE_GRADS, REFERENCE_LOGITS, assert_close_and_sensitive, state, loss_of  # noqa: E402

LOGITS, GRADS = REFERENCE_LOGITS, REFERENCE_GRADS  # tests/helpers.py: why these tolerances
TARGETS, FEEDFORWARD = ["k_proj", "v_proj", "fc_out"], ["fc_out"]  # PEFT's Llama defaults, our names


def test_one_layer_by_hand():
    """A 2 x 3 layer: output scaling multiplies rows (bias too); input scaling multiplies columns."""
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[1.0, 0.0, -1.0]])  # W x + b = [1 - 3 + 0.5, 4 - 6 - 1] = [-1.5, -3]
    out = mp.IA3Linear(layer, feedforward=False)
    with torch.no_grad():
        out.ia3.ia3_l.copy_(torch.tensor([2.0, 0.5]))
    assert torch.equal(out(x), torch.tensor([[-3.0, -1.5]]))           # [2 * -1.5, 0.5 * -3]
    inp = mp.IA3Linear(layer, feedforward=True)
    with torch.no_grad():
        inp.ia3.ia3_l.copy_(torch.tensor([2.0, 1.0, 0.0]))             # x * l = [2, 0, 0]
    assert torch.equal(inp(x), torch.tensor([[2.5, 7.0]]))             # [2 + 0.5, 8 - 1]


def test_parameter_count_by_hand(capsys):
    """2 C + F per block (l_k, l_v: C each; l_ff: F), PEFT's printed line."""
    model = mp.load_base()
    c = model.config
    ia3 = c.n_layer * (2 * c.d_model + c.d_ff)
    mp.add_ia3(model)
    mp.print_trainable_parameters(model)
    total = 812_032 + ia3
    assert capsys.readouterr().out == (f"trainable params: {ia3:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * ia3 / total:.4f}\n")
    assert ia3 == 3_072


def random_vectors(model, seed=0):
    """Vectors 1 + 0.3 N(0, 1), so that every scaling shows, keyed by (block, layer)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    size = {"k_proj": c.d_model, "v_proj": c.d_model, "fc_out": c.d_ff}
    return {(i, n): 1 + 0.3 * torch.randn(size[n], generator=g) for i in range(c.n_layer) for n in size}


def layer_of(blocks, i, name):
    return getattr(blocks[i].attn if name.endswith("_proj") else blocks[i].mlp, name)


def ours(values, feedforward=FEEDFORWARD):
    model = mp.add_ia3(mp.load_base(), targets=TARGETS, feedforward=feedforward)
    with torch.no_grad():
        for (i, n), v in values.items():
            layer_of(model.blocks, i, n).ia3.ia3_l.copy_(v)
    return model


def peft_ia3(values):
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(mp.load_base(), peft.IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD))
    with torch.no_grad():
        for (i, n), v in values.items():
            p = layer_of(ref.base_model.model.blocks, i, n).ia3_l["default"]   # (out, 1), or (1, in) feed-forward
            p.copy_(v.view(p.shape))
    return ref


def batch():
    x, y = mp.encode_batch(mp.make_task("rotate", seed=0).val[:16])
    return x, y



def test_matches_peft_on_our_gpt(capsys):
    values = random_vectors(mp.load_base())
    mine, ref = ours(values), peft_ia3(values)
    mp.print_trainable_parameters(mine)
    ref.print_trainable_parameters()
    mine_line, peft_line = capsys.readouterr().out.splitlines()
    assert mine_line == peft_line

    x, y = batch()
    mine_logits, ref_logits = mine(x), ref(x)
    with torch.no_grad():
        assert (mine_logits - mp.load_base()(x)).abs().max() > 1.0  # the vectors do change the output
        wrong = ours(values, feedforward=TARGETS)(x)  # the mistake: l_k, l_v scale the input of k_proj, v_proj
    assert_close_and_sensitive(mine_logits, ref_logits, wrong, **LOGITS)

    loss_of(mine_logits, y).backward()
    loss_of(ref_logits, y).backward()
    for (i, n) in values:
        grad = layer_of(mine.blocks, i, n).ia3.ia3_l.grad
        theirs = layer_of(ref.base_model.model.blocks, i, n).ia3_l["default"].grad.flatten()
        assert grad.abs().max() > 1e-3
        torch.testing.assert_close(grad, theirs, **GRADS)
    assert [n for n, p in mine.named_parameters() if p.grad is not None and "ia3_l" not in n] == []


def test_merge_matches_peft_merge_and_unload():
    values = random_vectors(mp.load_base(), seed=1)
    mine, ref = ours(values), peft_ia3(values)
    x, _ = batch()
    with torch.no_grad():
        before = mine(x)
        mp.merge_ia3(mine)
        merged = ref.merge_and_unload()
        assert mp.methods_in(mine) == {}  # plain nn.Linear layers again
        for (i, n) in values:
            torch.testing.assert_close(layer_of(mine.blocks, i, n).weight, layer_of(merged.blocks, i, n).weight,
                                       atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(layer_of(mine.blocks, i, n).bias, layer_of(merged.blocks, i, n).bias,
                                       atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine(x), merged(x), **LOGITS)
        torch.testing.assert_close(mine(x), before, **LOGITS)  # merging changes nothing


def test_matches_peft_gpt2_defaults():
    """PEFT's own IA3 defaults for GPT-2 (``c_attn`` and ``mlp.c_proj``, the latter feed-forward) on the GPT-2
    twin of our base. GPT-2 fuses q, k, v into ``c_attn``, so its vector also scales q: with the q third set
    to ones it is exactly our l_k and l_v; ``mlp.c_proj`` is our fc_out, its input scaled."""
    peft = pytest.importorskip("peft")
    from test_references import gpt2_twin
    base = mp.load_base()
    values = random_vectors(base, seed=2)
    C = base.config.d_model
    ref = peft.get_peft_model(gpt2_twin(base), peft.IA3Config())  # no targets given: PEFT's GPT-2 mapping
    with torch.no_grad():
        for i, block in enumerate(ref.base_model.model.transformer.h):
            qkv = torch.cat([torch.ones(C), values[i, "k_proj"], values[i, "v_proj"]])
            block.attn.c_attn.ia3_l["default"].copy_(qkv.view(block.attn.c_attn.ia3_l["default"].shape))
            block.mlp.c_proj.ia3_l["default"].copy_(values[i, "fc_out"].view(block.mlp.c_proj.ia3_l["default"].shape))
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(values)(x), ref(input_ids=x).logits, **LOGITS)


def test_bad_input_leaves_the_model_unchanged():
    model = mp.load_base()
    before = state(model)
    with pytest.raises(ValueError, match="feedforward"):
        mp.add_ia3(model, targets=("k_proj",), feedforward=("fc_out",))
    with pytest.raises(ValueError, match="target 'nope'"):
        mp.add_ia3(model, targets=("nope",), feedforward=())
    with pytest.raises(ValueError, match="nothing to merge"):
        mp.merge_ia3(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # not frozen either
    mp.add_ia3(model)
    with pytest.raises(ValueError, match="already has IA3"):
        mp.add_ia3(model)


@pytest.mark.parametrize("options", [{}, {"targets": ("q_proj", "o_proj", "fc_in", "fc_out"), "feedforward": ("q_proj",)},
                                     {"targets": ("v_proj", "fc_out"), "feedforward": ()}], ids=str)
def test_memory_formula_matches_measurement(tiny_model, tiny_config, options):
    """The formula's IA3 plan (a scaled output keeps that output, a scaled input keeps the input) against
    one measured step: weights, gradients and optimizer state exact, activations exact (as for LoRA)."""
    mp.add_ia3(tiny_model, **options)
    measured = mp.measure_memory(tiny_model, 3, 11)
    predicted = mp.predict_memory(tiny_config, "ia3", 3, 11, compute_dtype="fp32", **options)
    assert (measured.weights, measured.gradients, measured.optimizer) == \
        (predicted.weights, predicted.gradients, predicted.optimizer)
    assert measured.trainable == predicted.trainable == mp.trainable_parameters(tiny_model)[0]
    assert predicted.activations == measured.activations


def test_memory_formula_on_llama_2_7b():
    """l_k, l_v (4,096 each) and l_ff (11,008) in 32 layers: 614,400 vectors' entries, ~0.01 % of 6.7B."""
    predicted = mp.predict_memory("Llama-2-7B", "ia3", 1, 128, base_dtype="bf16")
    assert predicted.trainable == 32 * (4096 + 4096 + 11008) == 614_400
    assert 0.005 < 100 * predicted.trainable / mp.PRESETS["Llama-2-7B"].n_params() < 0.015
