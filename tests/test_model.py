import math

import pytest
import torch
import torch.nn.functional as F

import minipeft as mp
from helpers import ATOL, greedy_margin


def expected_params(c: mp.GPTConfig) -> int:
    """Closed form: embeddings + n_layer * (attention + MLP + 2 LayerNorms) + final LayerNorm + head."""
    d, f, V, T = c.d_model, c.d_ff, c.vocab_size, c.block_size
    attn = 4 * (d * d + d)
    mlp = (d * f + f) + (f * d + d)
    ln = 2 * d
    return V * d + T * d + c.n_layer * (attn + mlp + 2 * ln) + ln + V * d


@pytest.mark.parametrize("cfg", [dict(), dict(d_model=32, n_layer=2, n_head=4, d_ff=64, block_size=48),
                                 dict(d_model=48, n_layer=3, n_head=6, d_ff=100, vocab_size=17)])
def test_parameter_count_matches_formula(cfg):
    c = mp.GPTConfig(**cfg)
    assert sum(p.numel() for p in mp.GPT(c).parameters()) == expected_params(c)


def test_default_model_size_by_hand():
    # 41*128 + 64*128 + 4*(66048 + 131712 + 512) + 256 + 41*128 = 812,032
    assert sum(p.numel() for p in mp.GPT(mp.GPTConfig()).parameters()) == 812_032


def test_causality(tiny_model):
    x = torch.randint(1, 41, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(1, 41, (2, 8))
    a, b = tiny_model(x), tiny_model(y)
    # bit-equal: same shapes, so the same kernels; later tokens only add exp(-inf) = 0 terms to early rows
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_at_init_is_about_ln_vocab():
    torch.manual_seed(0)
    model = mp.GPT(mp.GPTConfig())
    x = torch.randint(1, 41, (64, 24))
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 41), x[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(41)) < 0.1


def test_attention_by_hand(tiny_model):
    """One attention layer against the textbook formula softmax(QK^T/sqrt(d) + mask) V, written here."""
    attn = tiny_model.blocks[0].attn
    x = torch.randn(2, 7, 32)
    B, T, C, H = 2, 7, 32, 4
    hs = C // H
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).view(B, T, H, hs).permute(0, 2, 1, 3)
    k = (x @ attn.k_proj.weight.T + attn.k_proj.bias).view(B, T, H, hs).permute(0, 2, 1, 3)
    v = (x @ attn.v_proj.weight.T + attn.v_proj.bias).view(B, T, H, hs).permute(0, 2, 1, 3)
    out = torch.zeros(B, H, T, hs)
    for t in range(T):  # query t sees keys 0..t
        s = (q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-1, -2)) / hs ** 0.5
        out[:, :, t] = (s.softmax(-1) @ v[:, :, :t + 1])[:, :, 0]
    ref = out.permute(0, 2, 1, 3).reshape(B, T, C) @ attn.o_proj.weight.T + attn.o_proj.bias
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_fused_attention_equals_written_out(tiny_config):
    torch.manual_seed(0)
    a = mp.GPT(tiny_config).eval()
    b = mp.GPT(mp.GPTConfig(**{**tiny_config.__dict__, "fused_attention": True})).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(1, 41, (3, 15))
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_kv_cache_equals_full_recompute(tiny_model):
    x = torch.randint(1, 41, (3, 10))
    full = tiny_model(x)
    cache = mp.KVCache(tiny_model.config.n_layer)
    first = tiny_model(x[:, :6], past_kv=cache)
    rest = tiny_model(x[:, 6:], past_kv=cache)
    assert len(cache) == 10
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_generate_with_cache_equals_recompute(tiny_model):
    x = torch.randint(1, 41, (4, 5))
    a = tiny_model.generate(x, 12, use_cache=True)
    b = tiny_model.generate(x, 12, use_cache=False)
    assert a.shape == (4, 17) and torch.equal(a, b)
    # token ids compare exactly across the two routes only if no greedy choice was a near-tie
    assert greedy_margin(tiny_model(b[:, :-1])[:, 4:]) > ATOL


def test_inputs_embeds_equals_ids(tiny_model):
    x = torch.randint(1, 41, (2, 9))
    torch.testing.assert_close(tiny_model(x), tiny_model(inputs_embeds=tiny_model.tok_emb(x)))


def test_keep_attn_rows_sum_to_one_and_are_causal(tiny_model):
    attn = tiny_model.blocks[1].attn
    attn.keep_attn = True
    tiny_model(torch.randint(1, 41, (1, 8)))
    w = attn.attn_weights[0]  # (nh, T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 8))
    assert torch.all(w.triu(diagonal=1) == 0)


@pytest.mark.parametrize("kwargs, words", [
    (dict(d_model=30, n_head=4), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(d_model=-8), "d_model"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config(kwargs, words):
    with pytest.raises(ValueError, match=words):
        mp.GPTConfig(**kwargs)


def test_too_long_sequence(tiny_model):
    with pytest.raises(ValueError, match="exceeds the context"):
        tiny_model(torch.ones(1, 49, dtype=torch.long))


def test_token_out_of_vocab(tiny_model):
    with pytest.raises(ValueError, match="token ids"):
        tiny_model(torch.tensor([[1, 2, 99]]))


# --- gradient checkpointing --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_gives_the_same_loss_and_gradients(tiny_model, method):
    """Recomputing each block in backward runs the same kernels on the same inputs, so the loss is equal;
    the gradients may differ in accumulation order only: assert_close at fp32's default (rtol 1.3e-6,
    atol 1e-5). Dropout 0.1 checks that the recomputation replays the same random mask."""
    model = mp.GPT(mp.GPTConfig(**{**tiny_model.config.__dict__, "dropout": 0.1}))
    model.load_state_dict(tiny_model.state_dict())
    mp.full_finetune(model) if method == "full" else mp.add_lora(model, r=4, targets="all-linear")
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(1, model.config.vocab_size, (3, 12), generator=g) for _ in range(2))
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.train().zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks in both runs
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], msg=name)


def test_checkpointing_keeps_fewer_tensors_and_only_when_training(tiny_model):
    """Full fine-tuning, B=2, T=10, C=32, loss = sum of the logits. With checkpointing autograd holds after
    the forward pass, by hand: each block's input (2 x 2 x 10 x 32 x 4 = 5,120 B), the final LayerNorm's
    input and statistics (2,560 + 160), the head's input (2,560), the int64 token ids (160) and positions
    (80): 10,640 B, less than without. In eval mode or under no_grad the forward pass is the plain one."""
    mp.full_finetune(tiny_model)
    x = torch.randint(1, tiny_model.config.vocab_size, (2, 10))
    kept = {}
    for checkpointing in (False, True):
        tiny_model.gradient_checkpointing = checkpointing
        with mp.SavedTensors(exclude=tiny_model.parameters()) as saved:
            tiny_model.train()(x).sum()
        kept[checkpointing] = saved.nbytes
    assert kept[True] == 5120 + 2560 + 160 + 2560 + 160 + 80 < kept[False]
    tiny_model.gradient_checkpointing = True
    with torch.no_grad():
        plain = tiny_model.eval()(x)
    tiny_model.gradient_checkpointing = False
    assert torch.equal(plain, tiny_model(x))


def test_checkpointing_refuses_a_growing_cache(tiny_model):
    mp.full_finetune(tiny_model).train()
    tiny_model.gradient_checkpointing = True
    cache = mp.KVCache(tiny_model.config.n_layer)
    with pytest.raises(ValueError, match="checkpointing"):
        tiny_model(torch.randint(1, 10, (1, 4)), past_kv=cache)
