"""LoRA: every number checked against a hand computation or a formula, never against the code itself."""
import math

import pytest
import torch
import torch.nn as nn

import minipeft as mp
from helpers import assert_close_and_sensitive


def _x(config, batch=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, config.vocab_size, (batch, T), generator=g)


def _randomise_lora(model, seed=0):
    """Give every trainable LoRA matrix random values (B starts at zero, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _snapshot(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    text, state = snap
    return repr(model) == text and state.keys() == model.state_dict().keys() and all(
        torch.equal(state[k], v) for k, v in model.state_dict().items())


# --- the layer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear", ("fc_in", "fc_out")])
@pytest.mark.parametrize("rslora", [False, True])
def test_starts_exactly_at_the_base(tiny_model, tiny_config, targets, rslora):
    x = _x(tiny_config)
    before = tiny_model(x)
    mp.add_lora(tiny_model, r=4, alpha=8, targets=targets, dropout=0.1, rslora=rslora).eval()
    assert torch.equal(tiny_model(x), before)  # B = 0: the same base kernels plus exact zeros


def test_initialisation_as_peft():
    torch.manual_seed(0)
    layer = mp.LoRALinear(nn.Linear(48, 24), r=6, alpha=12)
    assert layer.lora_A.shape == (6, 48) and layer.lora_B.shape == (24, 6)
    assert torch.count_nonzero(layer.lora_B) == 0
    # kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(48)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # uniform std


@pytest.mark.parametrize("r,alpha,rslora,scaling", [(4, 8, False, 2.0), (4, 8, True, 4.0),
                                                    (16, 16, False, 1.0), (16, 16, True, 4.0),
                                                    (1, 0.5, False, 0.5)])
def test_scaling_by_hand(r, alpha, rslora, scaling):
    layer = mp.LoRALinear(nn.Linear(32, 32), r=r, alpha=alpha, rslora=rslora)
    assert layer.scaling == scaling


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("shape", [(8, 12), (12, 5)])
def test_closed_form(shape, rslora):
    in_f, out_f = shape
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f)
    layer = mp.LoRALinear(base, r=3, alpha=5.0, rslora=rslora)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, in_f)
    # y = x W^T + b + scaling x A^T B^T, in float64 by hand
    s = 5.0 / (math.sqrt(3) if rslora else 3)
    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    want = x.double() @ W.T + b + s * (x.double() @ A.T @ B.T)
    s_wrong = 5.0 / (3 if rslora else math.sqrt(3))  # a realistic mistake: the other scaling rule
    wrong = x.double() @ W.T + b + s_wrong * (x.double() @ A.T @ B.T)
    assert_close_and_sensitive(layer(x).double(), want, wrong=wrong)


def test_wraps_any_linear_like_module():
    class Doubler(nn.Module):  # not an nn.Linear: only in_features, out_features and a forward
        in_features, out_features = 6, 6

        def forward(self, x):
            return 2 * x

    layer = mp.LoRALinear(Doubler(), r=2, alpha=2)
    nn.init.ones_(layer.lora_B)
    x = torch.ones(1, 6)
    # 2 x + 1 * B A x, with B all ones: every output gets sum(A @ x)
    # wrong: scaling alpha instead of alpha / r (here 2 instead of 1)
    assert_close_and_sensitive(layer(x), 2 * x + (layer.lora_A @ x.T).sum(), wrong=2 * x + 2 * (layer.lora_A @ x.T).sum())


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = mp.LoRALinear(nn.Linear(16, 16), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 16)
    closed = layer.base_layer(x) + x @ layer.lora_A.T @ layer.lora_B.T
    layer.eval()
    assert torch.allclose(layer(x), closed, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), closed, atol=1e-3)


def test_only_A_and_B_get_gradients(tiny_model, tiny_config):
    mp.add_lora(tiny_model, r=4, alpha=8)
    _randomise_lora(tiny_model)
    tiny_model(_x(tiny_config)).square().mean().backward()
    for name, p in tiny_model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_trainable_count_by_hand(tiny_model):
    total = sum(p.numel() for p in tiny_model.parameters())
    mp.add_lora(tiny_model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    # 2 layers x (q, v) x r (in + out) = 2 * 2 * 4 * (32 + 32)
    assert mp.trainable_parameters(tiny_model) == (1024, total + 1024)


# --- choosing targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("targets,expected", [
    ("q_proj", ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
    (("fc_in",), ["blocks.0.mlp.fc_in", "blocks.1.mlp.fc_in"]),
    ("blocks.1.attn.*", ["blocks.1.attn.q_proj", "blocks.1.attn.k_proj", "blocks.1.attn.v_proj",
                         "blocks.1.attn.o_proj"]),
    ("all-linear", [f"blocks.{i}.{m}" for i in range(2) for m in
                    ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc_in", "mlp.fc_out")]),
])
def test_targets(tiny_model, targets, expected):
    mp.add_lora(tiny_model, r=2, alpha=2, targets=targets)
    assert list(mp.lora_layers(tiny_model)) == expected


# --- merging --------------------------------------------------------------------------------------------


def _with_scaling_one(model, x):
    """The output a merge that forgot the scaling would give (W + B A instead of W + scaling B A)."""
    adapters = [m.adapters[m.active] for m in mp.lora_layers(model).values()]
    scalings = [a.scaling for a in adapters]
    for a in adapters:
        a.scaling = 1.0
    try:
        return model(x)
    finally:
        for a, s in zip(adapters, scalings):
            a.scaling = s


# merged and unmerged are the same maths through different kernels (W' x vs W x + B A x): a tolerance
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_merge_unmerge(tiny_model, tiny_config, targets):
    x = _x(tiny_config)
    weights = {n: m.weight.clone() for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)}
    mp.add_lora(tiny_model, r=4, alpha=8, targets=targets)
    _randomise_lora(tiny_model)
    unmerged, forgot_scaling = tiny_model(x), _with_scaling_one(tiny_model, x)
    mp.merge_lora(tiny_model)
    layer = next(iter(mp.lora_layers(tiny_model).values()))
    # the merged weight is W + scaling B A
    name = next(iter(mp.lora_layers(tiny_model)))
    BA = layer.lora_B.detach() @ layer.lora_A.detach()
    assert_close_and_sensitive(layer.base_layer.weight, weights[name] + 2.0 * BA, wrong=weights[name] + BA)
    assert_close_and_sensitive(tiny_model(x), unmerged, wrong=forgot_scaling)
    mp.unmerge_lora(tiny_model)
    for n, m in mp.lora_layers(tiny_model).items():  # W + dW - dW: W up to one rounding of W + dW
        torch.testing.assert_close(m.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    assert_close_and_sensitive(tiny_model(x), unmerged, wrong=forgot_scaling)


def test_merge_and_unload_is_a_plain_model(tiny_model, tiny_config):
    x = _x(tiny_config)
    mp.add_lora(tiny_model, r=4, alpha=8)
    _randomise_lora(tiny_model)
    unmerged, forgot_scaling = tiny_model(x), _with_scaling_one(tiny_model, x)
    mp.unload_lora(mp.merge_lora(tiny_model))
    assert not mp.lora_layers(tiny_model) and type(tiny_model.blocks[0].attn.q_proj) is nn.Linear
    assert_close_and_sensitive(tiny_model(x), unmerged, wrong=forgot_scaling)


class Frozen4bitLike(nn.Module):
    """Stands in for the 4-bit layer's contract: merge_delta refuses unless requantize=True."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("w", linear.weight.detach().clone())

    def forward(self, x):
        return x @ self.w.T

    def merge_delta(self, delta, requantize: bool):
        if not requantize:
            raise ValueError("merging into a 4-bit weight rounds: pass requantize=True")
        self.w += delta


def test_merge_into_a_non_linear_base(tiny_model):
    tiny_model.blocks[1].attn.v_proj = Frozen4bitLike(tiny_model.blocks[1].attn.v_proj)
    mp.add_lora(tiny_model, r=4, alpha=8)
    _randomise_lora(tiny_model)
    snap = _snapshot(tiny_model)
    with pytest.raises(ValueError, match="requantize"):
        mp.merge_lora(tiny_model)
    assert _same(tiny_model, snap)  # the refusing layer went first: nothing changed
    mp.merge_lora(tiny_model, requantize=True)
    layer = tiny_model.blocks[1].attn.v_proj
    assert torch.allclose(layer.base_layer.w, snap[1]["blocks.1.attn.v_proj.base_layer.w"]
                          + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach(), atol=1e-6)


# --- bad input: a clear error, the model unchanged --------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "positive integer"), (dict(r=-2), "positive integer"), (dict(r=2.5), "positive integer"),
    (dict(r=33), r"larger than min\(in, out\)"), (dict(alpha=0), "alpha"), (dict(alpha=-1.0), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(targets=("q_proj", "query")), "'query' matches no linear layer.*q_proj, k_proj, v_proj"),
    (dict(targets=()), "targets"), (dict(name="my adapter"), "identifier"),
])
def test_bad_arguments(tiny_model, kwargs, message):
    snap = _snapshot(tiny_model)
    with pytest.raises((ValueError, TypeError), match=message):  # TypeError: a value of the wrong type
        mp.add_lora(tiny_model, **{"r": 4, "alpha": 8, **kwargs})
    assert _same(tiny_model, snap)
    assert mp.trainable_parameters(tiny_model)[0] == sum(p.numel() for p in tiny_model.parameters())


def test_same_name_twice_and_double_merge(tiny_model):
    mp.add_lora(tiny_model, r=4, alpha=8)
    snap = _snapshot(tiny_model)
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'default'"):
        mp.add_lora(tiny_model, r=2, alpha=8, targets=("q_proj", "k_proj"))
    assert _same(tiny_model, snap)
    with pytest.raises(ValueError, match="not merged"):
        mp.unmerge_lora(tiny_model)
    mp.merge_lora(tiny_model)
    snap = _snapshot(tiny_model)
    with pytest.raises(ValueError, match="already merged"):
        mp.merge_lora(tiny_model)
    for act in (lambda: mp.add_lora(tiny_model, r=2, alpha=2, name="other"),
                lambda: mp.set_adapter(tiny_model, "default"),
                lambda: mp.disable_adapter(tiny_model).__enter__()):
        with pytest.raises(ValueError, match="merge"):
            act()
    assert _same(tiny_model, snap)


def test_no_lora_to_merge(tiny_model):
    with pytest.raises(ValueError, match="no active LoRA adapter"):
        mp.merge_lora(tiny_model)


# --- several named adapters, and mixed batches ---------------------------------------------------


def _two_adapters(model):
    mp.add_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), name="a")
    _randomise_lora(model, seed=1)
    mp.add_lora(model, r=2, alpha=4, targets="all-linear", name="b")
    _randomise_lora(model, seed=2)  # only b is trainable now, so only b is touched
    return model


def test_named_adapters(tiny_model, tiny_config):
    x = _x(tiny_config)
    base_out = tiny_model(x)
    _two_adapters(tiny_model)
    assert mp.list_adapters(tiny_model) == ["a", "b"] and mp.active_adapter(tiny_model) == "b"
    # only b trains: all-linear r=2 on 2 blocks: 2 * 2 * (4 * (32 + 32) + (32 + 64) + (64 + 32))
    assert mp.trainable_parameters(tiny_model)[0] == 2 * 2 * (4 * 64 + 96 + 96)
    out_b = tiny_model(x)
    mp.set_adapter(tiny_model, "a")
    assert mp.trainable_parameters(tiny_model)[0] == 2 * 2 * 4 * 64
    out_a = tiny_model(x)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    with mp.disable_adapter(tiny_model):  # the bare base layers: the same kernels as for base_out
        assert torch.equal(tiny_model(x), base_out)
    assert torch.equal(tiny_model(x), out_a)  # back on leaving the context (the same kernels again)
    with pytest.raises(ValueError, match="no lora adapter named 'c'"):
        mp.set_adapter(tiny_model, "c")
    mp.delete_adapter(tiny_model, "a")
    assert mp.list_adapters(tiny_model) == ["b"] and mp.active_adapter(tiny_model) is None
    assert torch.equal(tiny_model(x), base_out)
    mp.delete_adapter(tiny_model, "b")  # the last one: the plain layers come back
    assert not mp.lora_layers(tiny_model) and type(tiny_model.blocks[0].mlp.fc_in) is nn.Linear
    assert torch.equal(tiny_model(x), base_out)


@pytest.mark.parametrize("names", [["a", "b", None, "a"], ["b", "b", "b", "b"], [None, "a", "a", "b"]])
def test_mixed_batch_equals_separate_runs(tiny_model, tiny_config, names):
    x = _x(tiny_config, batch=4)
    _two_adapters(tiny_model)
    separate = {}
    for name in ("a", "b"):
        mp.set_adapter(tiny_model, name)
        separate[name] = tiny_model(x)
    with mp.disable_adapter(tiny_model):
        separate[None] = tiny_model(x)
    with mp.adapter_per_row(tiny_model, names):
        mixed = tiny_model(x)
    # one batch, each adapter on its own rows (index_add): other matmul shapes than the separate runs
    other = {"a": "b", "b": "a", None: "a"}  # a realistic mistake: a row served by another adapter
    for row, name in enumerate(names):
        assert_close_and_sensitive(mixed[row], separate[name][row], wrong=separate[other[name]][row])
    with pytest.raises(ValueError, match="2 adapter names for a batch of 4 rows"):
        with mp.adapter_per_row(tiny_model, ["a", "b"]):
            tiny_model(x)
    with pytest.raises(ValueError, match="no lora adapter named 'z'"):
        with mp.adapter_per_row(tiny_model, ["a", "z", "a", "a"]):
            pass


# --- subspace similarity (LoRA paper, section 7) -----------------------------------------------------


def _span(*cols, d=6):
    """A d x 6 matrix whose column space is spanned by the given unit vectors e_c, decreasing weights."""
    M = torch.zeros(d, 6)
    for k, c in enumerate(cols):
        M[c, k] = 3.0 - 0.5 * k
    return M


@pytest.mark.parametrize("W1,W2,i,j,want", [
    (_span(0, 1), _span(0, 1), 2, 2, 1.0),          # the same subspace
    (_span(0, 1), _span(1, 0), 2, 2, 1.0),          # the same subspace, other order
    (_span(0, 1), _span(2, 3), 2, 2, 0.0),          # orthogonal
    (_span(0, 1), _span(0, 2), 2, 2, 0.5),          # one shared direction of two: 1 / 2
    (_span(0, 1), _span(1, 2, 0), 1, 3, 1.0),       # e0 lies in span(e1, e2, e0)
    (_span(0, 1, 2), _span(0, 4, 5), 3, 3, 1 / 3),
])
def test_subspace_similarity_by_hand(W1, W2, i, j, want):
    assert mp.subspace_similarity(W1, W2, i, j) == pytest.approx(want, abs=1e-9)


def test_subspace_similarity_ignores_scale_and_right_side():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(10, 10))
    W1 = U[:, :3] @ torch.randn(3, 7)
    W2 = -5 * U[:, :3] @ torch.randn(3, 4)  # same column space, other shape and scale
    assert mp.subspace_similarity(W1, W2, 3, 3) == pytest.approx(1.0, abs=1e-9)


# --- the low-rank widget's numbers (minipeft.plots) -----------------------------------------------------


def test_lowrank_numbers_by_hand():
    from minipeft.plots import energy_top_r, lowrank_numbers
    full = torch.zeros(8, 6)
    full[0, 0], full[1, 1] = 3.0, 4.0   # singular values 4, 3: energy 16 + 9 = 25
    lora = torch.zeros(8, 6)
    lora[1, 2] = 0.5                    # rank 1, output direction e1 = full's strongest direction
    n = lowrank_numbers(full, lora, 1)
    assert n["energy"] == pytest.approx(16 / 25) and n["rel_error"] == pytest.approx(3 / 5)
    assert n["lora_rank"] == 1 and n["phi"] == pytest.approx(1.0) and n["chance"] == pytest.approx(1 / 8)
    lora[1, 2], lora[0, 3] = 0.0, 0.5   # now along e0: full's second direction
    assert lowrank_numbers(full, lora, 1)["phi"] == pytest.approx(0.0, abs=1e-12)
    assert lowrank_numbers(full, lora, 2)["phi"] == pytest.approx(1.0)
    assert lowrank_numbers(full, lora, 2)["energy"] == pytest.approx(1.0)
    assert energy_top_r([1.0, 1.0, 1.0, 1.0], 1) == 0.25


@pytest.mark.parametrize("r", [1, 5, 16])
def test_plot_lowrank_over_its_range(r):
    import matplotlib.pyplot as plt
    from minipeft.plots import plot_lowrank, plot_sweep
    torch.manual_seed(0)
    full, lora = torch.randn(16, 24), torch.randn(16, 3) @ torch.randn(3, 24)
    fig = plot_lowrank(full, lora, r, "layer", max_rank=16)
    assert len(fig.axes) == 3
    fig2 = plot_sweep([1, 2, 4], {"a": [[0.1, 0.5, 0.4], [0.2, 0.6, 0.3]]}, "x", best="max")
    assert len(fig2.axes) == 1
    plt.close("all")


@pytest.mark.parametrize("i", [1, 3, None])
def test_phi_curve_equals_subspace_similarity(i):
    from minipeft.plots import phi_curve
    torch.manual_seed(1)
    full, lora = torch.randn(12, 20), torch.randn(12, 3) @ torch.randn(3, 20)
    ranks = [1, 2, 3, 5, 12]
    k = 12 if i is None else i  # None: all of LoRA's (12, numerically) directions
    want = [mp.subspace_similarity(lora, full, min(k, j), j) for j in ranks]
    assert phi_curve(lora, full, ranks, i) == pytest.approx(want, abs=1e-9)
