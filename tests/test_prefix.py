"""Prefix tuning, checked against attention written out here over the concatenated keys and values."""
import math

import pytest
import torch
import torch.nn as nn

import minipeft as mp
from helpers import ATOL, assert_close_and_sensitive, copy_of, greedy_margin, state


def attention_by_hand(attn, x, pk, pv):
    """softmax(q [Pk ; K]^T / sqrt(hs) + mask) [Pv ; V] for one layer; pk, pv: (B, H, n, hs). Returns (out, weights)."""
    B, T, C = x.shape
    H = attn.n_head
    hs = C // H
    split = lambda t: t.view(B, T, H, hs).permute(0, 2, 1, 3)  # (B, T, C) -> (B, H, T, hs)
    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    K, V = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    n = pk.shape[2]
    out, weights = torch.zeros(B, H, T, hs), torch.zeros(B, H, T, n + T)
    for t in range(T):  # query t sees all n prefix positions and text positions 0..t
        s = q[:, :, t:t + 1] @ K[:, :, :n + t + 1].transpose(-1, -2) / math.sqrt(hs)
        w = s.softmax(-1)
        weights[:, :, t, :n + t + 1] = w[:, :, 0]
        out[:, :, t] = (w @ V[:, :, :n + t + 1])[:, :, 0]
    return attn.o_proj(out.permute(0, 2, 1, 3).reshape(B, T, C)), weights


def by_hand(model, prefix, x):
    """The whole model with prefix (L, 2, n, C) per row (B, L, 2, n, C); the text at positions 0..T-1."""
    B, T = x.shape
    L, H, C = model.config.n_layer, model.config.n_head, model.config.d_model
    if prefix.dim() == 4:
        prefix = prefix.expand(B, *prefix.shape)
    n = prefix.shape[3]
    h = model.tok_emb(x) + model.pos_emb(torch.arange(T))
    weights = []
    for i, block in enumerate(model.blocks):
        heads = lambda p: p.reshape(B, n, H, C // H).transpose(1, 2)  # (B, n, C) -> (B, H, n, hs)
        a, w = attention_by_hand(block.attn, block.ln_1(h), heads(prefix[:, i, 0]), heads(prefix[:, i, 1]))
        weights.append(w)
        h = h + a
        h = h + block.mlp(block.ln_2(h))
    return model.head(model.ln_f(h)), weights


def test_empty_prefix_is_the_base(tiny_model):
    x = torch.randint(1, 41, (2, 9))
    before = tiny_model(x)
    mp.add_prefix_tuning(tiny_model, n_prefix=1, reparam=False)
    tiny_model.prefix_tuning.prefixes["default"].prefix = nn.Parameter(torch.zeros(2, 2, 0, 32))  # degenerate
    # not bit-equal: the keys now come through the cache (a concatenated, contiguous copy), so the attention
    # matmuls run on another memory layout, and some CPUs (MKL on AMD) then round differently (~1e-8)
    shifted = tiny_model(x, position_ids=torch.arange(1, 10))  # a realistic mistake: the text one position late
    assert_close_and_sensitive(tiny_model(x), before, wrong=shifted)


@pytest.mark.parametrize("n_prefix,reparam", [(1, False), (4, False), (4, True), (9, True)])
def test_attention_with_prefix_equals_hand_computation(tiny_model, n_prefix, reparam):
    reference = copy_of(tiny_model)
    mp.add_prefix_tuning(tiny_model, n_prefix=n_prefix, reparam=reparam, seed=1)
    for block in tiny_model.blocks:
        block.attn.keep_attn = True
    x = torch.randint(1, 41, (3, 10))
    with torch.no_grad():
        out = tiny_model(x)
        ref, weights = by_hand(reference, tiny_model.prefix_tuning.prefixes["default"](), x)
        # a realistic mistake: keys and values of the prefix swapped
        swapped = by_hand(reference, tiny_model.prefix_tuning.prefixes["default"]().flip(1), x)[0]
    assert_close_and_sensitive(out, ref, wrong=swapped)
    for block, w in zip(tiny_model.blocks, weights):
        torch.testing.assert_close(block.attn.attn_weights, w, atol=1e-6, rtol=1e-5)


def test_parameter_counts_by_formula(tiny_model):
    L, C = 2, 32
    base = sum(p.numel() for p in tiny_model.parameters())
    mp.add_prefix_tuning(tiny_model, n_prefix=5, reparam=True, reparam_dim=8, reparam_hidden=16)
    mlp = 5 * 8 + (8 * 16 + 16) + (16 * L * 2 * C + L * 2 * C)
    assert mp.trainable_parameters(tiny_model) == (mlp, base + mlp)
    mp.fold_prefix(tiny_model)
    assert mp.trainable_parameters(tiny_model) == (L * 2 * 5 * C, base + L * 2 * 5 * C)


def test_folding_the_reparameterisation_keeps_the_outputs(tiny_model):
    mp.add_prefix_tuning(tiny_model, n_prefix=6, reparam=True)
    mp.train(tiny_model, mp.make_task("rotate", n_train=64, n_val=8), steps=3, lr=1e-2, batch_size=8,
             device="cpu", progress=False)
    x = torch.randint(1, 41, (4, 12))
    before = tiny_model(x)
    mp.fold_prefix(tiny_model)
    prefix = tiny_model.prefix_tuning.prefixes["default"]
    assert not prefix.config.reparam and not hasattr(prefix, "mlp") and prefix.prefix.requires_grad
    # the stored MLP output may sit in another memory layout than the freshly computed one: a tolerance
    folded = prefix.prefix.detach().clone()
    with torch.no_grad():  # a realistic mistake: MLP(P') (n, L * 2 * C) viewed as (L, 2, n, C) without the permute
        prefix.prefix.copy_(folded.permute(2, 0, 1, 3).reshape(folded.shape))
        wrong = tiny_model(x)
        prefix.prefix.copy_(folded)
    assert_close_and_sensitive(tiny_model(x), before, wrong=wrong)


def test_mixed_task_batch_equals_per_task_runs(tiny_model):
    reference = copy_of(tiny_model)
    mp.add_prefix_tuning(tiny_model, n_prefix=4, reparam=False, name="rotate", seed=1)
    mp.add_prefix_tuning(tiny_model, n_prefix=4, reparam=True, name="caesar", seed=2)
    x = torch.randint(1, 41, (4, 11))
    rows = ["rotate", "caesar", "caesar", "rotate"]
    alone = {}
    for name in ("rotate", "caesar", None):
        mp.set_adapter(tiny_model, name)
        alone[name] = tiny_model(x)
    with mp.adapter_per_row(tiny_model, rows):
        mixed = tiny_model(x)
    other = {"rotate": "caesar", "caesar": "rotate"}
    for b, name in enumerate(rows):  # the same maths on other operands (one batch, a prefix per row): a tolerance
        # a realistic mistake: the row gets the other task's prefix
        assert_close_and_sensitive(mixed[b], alone[name][b], wrong=alone[other[name]][b])
    # and against the hand computation with one prefix per row
    p = tiny_model.prefix_tuning.prefixes
    per_row = torch.stack([p[name]() for name in rows]).detach()
    with torch.no_grad():
        assert_close_and_sensitive(mixed, by_hand(reference, per_row, x)[0],
                                   wrong=by_hand(reference, per_row.roll(1, dims=0), x)[0])  # rows mixed up
    mp.set_adapter(tiny_model, None)
    assert torch.equal(tiny_model(x), alone[None])  # the same base path, same kernels, same inputs


def test_named_prefixes_add_list_switch_delete(tiny_model):
    x = torch.randint(1, 41, (2, 8))
    base_out = tiny_model(x)
    mp.add_prefix_tuning(tiny_model, n_prefix=3, reparam=False, name="a")
    out_a = tiny_model(x)
    mp.add_prefix_tuning(tiny_model, n_prefix=5, reparam=False, name="b", seed=4)
    assert mp.list_adapters(tiny_model) == ["a", "b"] and tiny_model.prefix_tuning.active == "b"
    trainable = lambda: {n for n, p in tiny_model.prefix_tuning.prefixes.items() if p.prefix.requires_grad}
    assert trainable() == {"b"}
    mp.set_adapter(tiny_model, "a")
    assert trainable() == {"a"} and torch.equal(tiny_model(x), out_a)  # the same prefix through the same kernels
    mp.delete_adapter(tiny_model, "a")
    assert mp.list_adapters(tiny_model) == ["b"] and tiny_model.prefix_tuning.active is None
    assert torch.equal(tiny_model(x), base_out)  # no prefix active: the plain forward, as before


def test_generation_with_and_without_cache_matches_hand_greedy(tiny_model):
    reference = copy_of(tiny_model)
    mp.add_prefix_tuning(tiny_model, n_prefix=5, reparam=True)
    x = torch.randint(1, 41, (2, 6))
    out = x
    with torch.no_grad():
        prefix = tiny_model.prefix_tuning.prefixes["default"]()
        for _ in range(6):
            logits = by_hand(reference, prefix, out)[0][:, -1:]
            # the token ids can be compared exactly only if no greedy choice is a near-tie that rounding could flip
            assert greedy_margin(logits) > ATOL
            out = torch.cat([out, logits.argmax(-1)], 1)
    assert torch.equal(tiny_model.generate(x, 6, use_cache=True), out)
    assert torch.equal(tiny_model.generate(x, 6, use_cache=False), out)


def test_the_context_counts_the_prefix(tiny_model):
    mp.add_prefix_tuning(tiny_model, n_prefix=40, reparam=False)  # block_size 48
    tiny_model(torch.randint(1, 41, (1, 8)))
    with pytest.raises(ValueError, match="a prefix of 40 positions \\+ 9 input tokens exceed the context"):
        tiny_model(torch.randint(1, 41, (1, 9)))


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_prefix=0), "n_prefix must be a positive integer"),
    (dict(n_prefix=-1), "n_prefix must be a positive integer"),
    (dict(n_prefix=1.5), "n_prefix must be a positive integer"),
    (dict(n_prefix=48), "leaves no room for text"),
    (dict(n_prefix=4, reparam_hidden=0), "reparam_hidden must be a positive integer"),
    (dict(n_prefix=4, reparam="yes"), "reparam must be True or False"),
    (dict(n_prefix=4, init_std=-1.0), "init_std must be a finite number >= 0"),
    (dict(n_prefix=4, name="my task"), "must be a Python identifier"),
    (dict(n_prefix=4, name="train"), "'train' cannot be an adapter name"),
])
def test_bad_input_names_the_problem_and_leaves_the_model(tiny_model, kwargs, message):
    before = state(tiny_model)
    with pytest.raises((ValueError, TypeError), match=message):  # TypeError: a value of the wrong type
        mp.add_prefix_tuning(tiny_model, **kwargs)
    assert not hasattr(tiny_model, "prefix_tuning") and not tiny_model._forward_pre_hooks
    assert all(p.requires_grad for p in tiny_model.parameters())
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_same_name_twice_and_bad_switches_are_errors(tiny_model):
    mp.add_prefix_tuning(tiny_model, n_prefix=3, reparam=False, name="a")
    mp.add_prefix_tuning(tiny_model, n_prefix=4, reparam=False, name="b")
    before = state(tiny_model)
    with pytest.raises(ValueError, match="already has a prefix named 'a'"):
        mp.add_prefix_tuning(tiny_model, n_prefix=3, name="a")
    with pytest.raises(ValueError, match="no prefix adapter named 'c'"):
        mp.adapter_per_row(tiny_model, ["a", "c"]).__enter__()
    with pytest.raises(ValueError, match="same n_prefix, got \\[3, 4\\]"):
        mp.adapter_per_row(tiny_model, ["a", "b"]).__enter__()
    with mp.adapter_per_row(tiny_model, ["a", "a"]):
        with pytest.raises(ValueError, match="2 prefix names \\(one per row\\) for a batch of 3 rows"):
            tiny_model(torch.randint(1, 41, (3, 5)))
    assert mp.list_adapters(tiny_model) == ["a", "b"] and len(tiny_model._forward_pre_hooks) == 1
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
