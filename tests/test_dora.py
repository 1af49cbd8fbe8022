"""DoRA (minipeft/dora.py) against a hand-worked 2 x 3 layer and PEFT's ``LoraConfig(use_dora=True)``.

The method contract (identity at the start, gradients only to A, B and m, base bit for bit, save/load)
is tested for every registry method in tests/test_methods.py; here: the maths.

Tolerances (float32, CPU), as in tests/test_references.py: logits ``atol=1e-4, rtol=1e-5`` (logits reach
~20; the two routes differ in summation order only), gradients ``atol=1e-6, rtol=1e-4``. Each comparison is
shown sensitive: the norm taken over the wrong axis misses the logits, and a norm left in the gradient
graph (the paper's section 4.3 detaches it) misses the gradients, by far more than the tolerance.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: every model is built here

import pytest  # noqa: E402
import torch  # noqa: E402

import minipeft as mp  # noqa: E402
from helpers import REFERENCE_GRADS, REFERENCE_LOGITS, assert_close_and_sensitive, state, tolerance_ratio, loss_of  # noqa: E402

LOGITS, GRADS = REFERENCE_LOGITS, REFERENCE_GRADS  # tests/helpers.py: why these tolerances
R, ALPHA = 4, 8


def hand_layer():
    """W = [[3, 0, 4], [1, 2, 2]] (row norms 5 and 3), b = [0.5, -1]; r = 1, alpha = 1 (s = 1)."""
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0, 4.0], [1.0, 2.0, 2.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    return mp.DoRALinear(layer, mp.DoRAConfig(r=1, alpha=1.0, targets="-"))


def test_formula_by_hand():
    """B A = [[0, 0, 0], [1, 0, -1]], so W + s B A = [[3, 0, 4], [2, 2, 1]]: row norms 5 and 3 again.
    With m = [10, 6]: W' = [[6, 0, 8], [4, 4, 2]], and for x = [1, 1, 1]: W' x + b = [14.5, 9]."""
    dora = hand_layer()
    assert torch.equal(dora.dora.magnitude, torch.tensor([5.0, 3.0]))  # m starts at ||W||_c
    with torch.no_grad():
        dora.dora.lora_A.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        dora.dora.lora_B.copy_(torch.tensor([[0.0], [1.0]]))
        dora.dora.magnitude.copy_(torch.tensor([10.0, 6.0]))
    x = torch.ones(1, 3)
    y = dora(x)
    torch.testing.assert_close(y, torch.tensor([[14.5, 9.0]]), atol=1e-6, rtol=0)
    # d(sum y) / dm_i = (W + s B A)_i x / ||(W + s B A)_i|| = [7 / 5, 5 / 3]; the norm is a constant
    y.sum().backward()
    torch.testing.assert_close(dora.dora.magnitude.grad, torch.tensor([7 / 5, 5 / 3]), atol=1e-6, rtol=0)
    # d(sum y) / dB = g * s * (A x) per row = [2, 2] * (1 - 1) = 0; d/dA = s * sum_i g_i B_i x^T = 2 * [1, 1, 1]
    torch.testing.assert_close(dora.dora.lora_B.grad, torch.zeros(2, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(dora.dora.lora_A.grad, torch.tensor([[2.0, 2.0, 2.0]]), atol=1e-6, rtol=0)
    with torch.no_grad():
        mp.merge_dora(torch.nn.Sequential(dora))  # fold into one plain layer
    assert torch.equal(dora.base_layer.weight, torch.tensor([[6.0, 0.0, 8.0], [4.0, 4.0, 2.0]]))


def test_parameter_count_by_hand(capsys):
    """LoRA's r (in + out) plus out (the magnitude) per adapted layer: q and v in 4 blocks, C = 128, r = 8."""
    model = mp.load_base()
    c = model.config
    dora = c.n_layer * 2 * (8 * (c.d_model + c.d_model) + c.d_model)
    mp.add_dora(model, r=8, alpha=16)
    mp.print_trainable_parameters(model)
    total = 812_032 + dora
    assert capsys.readouterr().out == (f"trainable params: {dora:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * dora / total:.4f}\n")
    assert dora == 17_408


def random_values(model, seed=0):
    """Non-zero A and B (so the direction moves) and m off its start, per (block, q|v)."""
    g = torch.Generator().manual_seed(seed)
    C = model.config.d_model
    out = {}
    for i, block in enumerate(model.blocks):
        for p in "qv":
            W = getattr(block.attn, f"{p}_proj").weight
            out[i, p] = dict(A=torch.randn(R, C, generator=g) * 0.1, B=torch.randn(C, R, generator=g) * 0.1,
                             m=W.norm(dim=1) * (1 + 0.2 * torch.randn(C, generator=g)))
    return out


def ours(values):
    model = mp.add_dora(mp.load_base(), r=R, alpha=ALPHA, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for (i, p), v in values.items():
            d = getattr(model.blocks[i].attn, f"{p}_proj").dora
            for part, value in zip((d.lora_A, d.lora_B, d.magnitude), (v["A"], v["B"], v["m"])):
                part.copy_(value)
    return model


def peft_dora(values):
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(mp.load_base(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0, use_dora=True))
    with torch.no_grad():
        for (i, p), v in values.items():
            layer = getattr(ref.base_model.model.blocks[i].attn, f"{p}_proj")
            layer.lora_A["default"].weight.copy_(v["A"])
            layer.lora_B["default"].weight.copy_(v["B"])
            layer.lora_magnitude_vector["default"].weight.copy_(v["m"])
    return ref


def peft_parts(ref, i, p):
    layer = getattr(ref.base_model.model.blocks[i].attn, f"{p}_proj")
    return dict(A=layer.lora_A["default"].weight, B=layer.lora_B["default"].weight,
                m=layer.lora_magnitude_vector["default"].weight)


def our_parts(model, i, p):
    d = getattr(model.blocks[i].attn, f"{p}_proj").dora
    return dict(A=d.lora_A, B=d.lora_B, m=d.magnitude)


def batch():
    return mp.encode_batch(mp.make_task("rotate", seed=0).val[:16])



class WrongAxis(mp.dora.DoRAAdapter):
    """The mistake a reader of "column norm" makes: the norm over dim 0 of the (out x in) weight."""

    def gain(self, weight):
        with torch.no_grad():
            norm = (weight + self.delta_weight()).norm(dim=0)
        return self.magnitude / norm


class NormInGraph(mp.dora.DoRAAdapter):
    """The norm left in the gradient graph (what section 4.3 of the paper chose not to do)."""

    def gain(self, weight):
        return self.magnitude / (weight + self.delta_weight()).norm(dim=1)


def with_adapter(values, kind):
    model = ours(values)
    for layer in mp.dora.dora_layers(model).values():
        layer.dora.__class__ = kind  # the same tensors, another gain
    return model


def test_matches_peft_on_our_gpt(capsys):
    values = random_values(mp.load_base())
    mine, ref = ours(values), peft_dora(values)
    mp.print_trainable_parameters(mine)
    ref.print_trainable_parameters()
    mine_line, peft_line = capsys.readouterr().out.splitlines()
    assert mine_line == peft_line

    x, y = batch()
    mine_logits, ref_logits = mine(x), ref(x)
    with torch.no_grad():
        assert (mine_logits - mp.load_base()(x)).abs().max() > 1.0  # DoRA does change the output
        wrong = with_adapter(values, WrongAxis)(x)
    assert_close_and_sensitive(mine_logits, ref_logits, wrong, **LOGITS)

    loss_of(mine_logits, y).backward()
    loss_of(ref_logits, y).backward()
    in_graph = with_adapter(values, NormInGraph)
    loss_of(in_graph(x), y).backward()
    worst = 0.0
    for (i, p) in values:
        mine_g, ref_g, graph_g = our_parts(mine, i, p), peft_parts(ref, i, p), our_parts(in_graph, i, p)
        for k in "ABm":
            assert mine_g[k].grad.abs().max() > 1e-4
            torch.testing.assert_close(mine_g[k].grad, ref_g[k].grad, **GRADS)
        worst = max(worst, tolerance_ratio(graph_g["A"].grad, ref_g["A"].grad, **GRADS))
    assert worst > 10  # the detached norm is what PEFT computes, and the tolerance sees the difference
    assert [n for n, q in mine.named_parameters() if q.grad is not None and ".dora." not in n] == []


def test_merge_matches_peft_merge_and_unload():
    values = random_values(mp.load_base(), seed=1)
    mine, ref = ours(values), peft_dora(values)
    x, _ = batch()
    with torch.no_grad():
        before = mine(x)
        mp.merge_dora(mine)
        merged = ref.merge_and_unload()
        assert mp.methods_in(mine) == {}
        for (i, p) in values:
            torch.testing.assert_close(getattr(mine.blocks[i].attn, f"{p}_proj").weight,
                                       getattr(merged.blocks[i].attn, f"{p}_proj").weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mine(x), merged(x), **LOGITS)
        torch.testing.assert_close(mine(x), before, **LOGITS)  # merging changes nothing


def test_bad_input_leaves_the_model_unchanged():
    model = mp.load_base()
    before = state(model)
    with pytest.raises(ValueError, match="rank r=200"):
        mp.add_dora(model, r=200)
    with pytest.raises(ValueError, match="'nope'"):
        mp.add_dora(model, targets=("nope",))
    with pytest.raises(TypeError, match="rank r"):
        mp.add_dora(model, r=2.5)
    with pytest.raises(ValueError, match="nothing to merge"):
        mp.merge_dora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    mp.add_dora(model, r=2)
    with pytest.raises(ValueError, match="already has DoRA"):
        mp.add_dora(model, r=2)


@pytest.mark.parametrize("options", [{"r": 2}, {"r": 3, "targets": "all-linear"}, {"r": 2, "targets": ("fc_out",)}],
                         ids=str)
def test_memory_formula_matches_measurement(tiny_model, tiny_config, options):
    """The formula's DoRA plan (LoRA's, plus W x and s B A x for m's gradient and the norm vectors) against
    one measured step: weights, gradients and optimizer state exact, activations exact (as for LoRA)."""
    mp.add_dora(tiny_model, **options)
    measured = mp.measure_memory(tiny_model, 3, 11)
    predicted = mp.predict_memory(tiny_config, "dora", 3, 11, compute_dtype="fp32", **options)
    assert (measured.weights, measured.gradients, measured.optimizer) == \
        (predicted.weights, predicted.gradients, predicted.optimizer)
    assert measured.trainable == predicted.trainable == mp.trainable_parameters(tiny_model)[0]
    assert predicted.activations == measured.activations
