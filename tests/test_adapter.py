"""Bottleneck adapters, checked against the formula and a forward pass written out here."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minipeft as mp
from helpers import assert_close_and_sensitive, copy_of, state

ACT = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu}


def delta_by_hand(adapter, h):
    """W_up f(W_down h + b_down) + b_up."""
    z = ACT[adapter.config.activation](h @ adapter.down.weight.T + adapter.down.bias)
    return z @ adapter.up.weight.T + adapter.up.bias


def randomise_up(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def by_hand(base, adapted, x, name="default", residual=True):
    """The base model's blocks, with adapter(h) = h + delta(h) applied to each adapted sublayer's output.

    ``residual=False`` builds a wrong result (the adapter's own skip connection forgotten: delta(h) alone)."""
    keep = 1.0 if residual else 0.0
    h = base.tok_emb(x) + base.pos_emb(torch.arange(x.shape[1]))
    for block, ablock in zip(base.blocks, adapted.blocks):
        a = block.attn(block.ln_1(h))
        if isinstance(ablock.attn.o_proj, mp.AdaptedLinear):
            a = keep * a + delta_by_hand(ablock.attn.o_proj.adapters[name], a)
        h = h + a
        m = block.mlp(block.ln_2(h))
        h = h + keep * m + delta_by_hand(ablock.mlp.fc_out.adapters[name], m)
    return base.head(base.ln_f(h))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_up_projection_is_the_identity(tiny_model, placement):
    x = torch.randint(1, 41, (2, 9))
    before = tiny_model(x)
    mp.add_adapters(tiny_model, bottleneck=4, placement=placement)
    adapter = tiny_model.blocks[0].mlp.fc_out.adapters["default"]
    h = torch.randn(3, 5, 32)
    # bit-equal by construction: up = 0 adds exact zeros to the same base kernel's output
    assert torch.equal(adapter(h), h)
    assert torch.equal(tiny_model(x), before)


@pytest.mark.parametrize("placement,activation", [("houlsby", None), ("pfeiffer", None), ("houlsby", "gelu")])
def test_forward_equals_hand_computation(tiny_model, placement, activation):
    reference = copy_of(tiny_model)
    mp.add_adapters(tiny_model, bottleneck=6, placement=placement, activation=activation)
    randomise_up(tiny_model)
    expected = {"houlsby": "swish", "pfeiffer": "relu"}[placement] if activation is None else activation
    assert tiny_model.blocks[0].mlp.fc_out.adapters["default"].config.activation == expected
    x = torch.randint(1, 41, (3, 10))
    with torch.no_grad():
        assert_close_and_sensitive(tiny_model(x), by_hand(reference, tiny_model, x),
                                   wrong=by_hand(reference, tiny_model, x, residual=False))


@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("bottleneck", [1, 8])
def test_placement_and_parameter_count(tiny_model, placement, per_layer, bottleneck):
    total = sum(p.numel() for p in tiny_model.parameters())
    mp.add_adapters(tiny_model, bottleneck=bottleneck, placement=placement)
    d, L = 32, 2
    one = (d * bottleneck + bottleneck) + (bottleneck * d + d)  # down + up, with biases
    assert mp.trainable_parameters(tiny_model) == (L * per_layer * one, total + L * per_layer * one)
    adapted = [n for n, m in tiny_model.named_modules() if isinstance(m, mp.AdaptedLinear)]
    wanted = [f"blocks.{i}.{p}" for i in range(L) for p in (["attn.o_proj"] * (per_layer == 2) + ["mlp.fc_out"])]
    assert adapted == wanted


def test_two_adapters_switch_stack_average_delete(tiny_model):
    reference = copy_of(tiny_model)
    x = torch.randint(1, 41, (2, 8))
    base_out = tiny_model(x)
    mp.add_adapters(tiny_model, bottleneck=4, placement="pfeiffer", name="a")
    mp.add_adapters(tiny_model, bottleneck=3, placement="pfeiffer", name="b", seed=1)
    randomise_up(tiny_model)
    assert mp.list_adapters(tiny_model) == ["a", "b"]
    trainable = {n.split(".")[5] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"b"}  # the newest is active and the only one that trains
    with torch.no_grad():
        mp.set_adapter(tiny_model, "a")
        assert_close_and_sensitive(tiny_model(x), by_hand(reference, tiny_model, x, "a"),
                                   wrong=by_hand(reference, tiny_model, x, "b"))  # the other adapter
        layer = tiny_model.blocks[1].mlp.fc_out
        a, b = layer.adapters["a"], layer.adapters["b"]
        h = torch.randn(2, 3, 32)
        z = h + delta_by_hand(a, h)
        stacked, averaged = z + delta_by_hand(b, z), h + (delta_by_hand(a, h) + delta_by_hand(b, h)) / 2
        mp.compose_adapters(tiny_model, ["a", "b"], combine="stack")  # a mistake would be to combine the other way
        assert_close_and_sensitive(layer.adapt(h), stacked, wrong=averaged)
        mp.compose_adapters(tiny_model, ["a", "b"], combine="average")
        assert_close_and_sensitive(layer.adapt(h), averaged, wrong=stacked)
        mp.set_adapter(tiny_model, None)
        assert torch.equal(tiny_model(x), base_out)  # no adapter in use: the same kernels as before
    mp.delete_adapter(tiny_model, "a")
    mp.delete_adapter(tiny_model, "b")
    assert mp.list_adapters(tiny_model) == [] and type(tiny_model.blocks[0].mlp.fc_out) is nn.Linear
    assert tiny_model.state_dict().keys() == reference.state_dict().keys()
    assert torch.equal(tiny_model(x), base_out)  # the plain layers back: the same kernels as before


@pytest.mark.parametrize("kwargs,message", [
    (dict(bottleneck=0), "bottleneck must be a positive integer"),
    (dict(bottleneck=-4), "bottleneck must be a positive integer"),
    (dict(bottleneck=2.5), "bottleneck must be a positive integer"),
    (dict(placement="parallel"), "unknown placement 'parallel'"),
    (dict(activation="sigmoid"), "unknown activation 'sigmoid'"),
    (dict(name="two words"), "must be a Python identifier"),
    (dict(name="keys"), "'keys' cannot be an adapter name"),
])
def test_bad_input_names_the_problem_and_leaves_the_model(tiny_model, kwargs, message):
    before = state(tiny_model)
    with pytest.raises((ValueError, TypeError), match=message):  # TypeError: a value of the wrong type
        mp.add_adapters(tiny_model, **kwargs)
    assert not mp.list_adapters(tiny_model) and all(p.requires_grad for p in tiny_model.parameters())
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_same_name_twice_and_unknown_names_are_errors(tiny_model):
    mp.add_adapters(tiny_model, bottleneck=4)
    before = state(tiny_model)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        mp.add_adapters(tiny_model, bottleneck=8, placement="pfeiffer")
    with pytest.raises(ValueError, match="unknown adapter name\\(s\\) \\['x'\\]"):
        mp.compose_adapters(tiny_model, ["default", "x"])
    with pytest.raises(ValueError, match="unknown combine 'sum'"):
        mp.compose_adapters(tiny_model, ["default"], combine="sum")
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_model.blocks[0].mlp.fc_out.active == ["default"]


def test_param_footprint_plot_labels_percentages():
    import matplotlib.pyplot as plt
    from minipeft import plots

    fig = plots.plot_param_footprint({"prompt": 2_560, "adapters": 33_920}, total=812_032)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["2,560 (0.32 %)", "33,920 (4.18 %)"]  # 100 * 2560 / 812032 = 0.315..., 33920 -> 4.177...
    plt.close(fig)
