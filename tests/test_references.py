"""Reference tests against the libraries a student graduates to: transformers' GPT-2 and PEFT's LoRA.

**Our GPT is GPT-2.** :func:`gpt2_twin` builds a ``transformers.GPT2LMHeadModel`` from a ``GPT2Config``
(nothing is downloaded) and maps our weights into it:

* ``Conv1D`` stores its weight as (in, out), ``nn.Linear`` as (out, in): every weight is transposed;
* ``c_attn`` is q, k and v fused along the output: ``W = [W_q | W_k | W_v]`` (in, 3C), bias likewise;
* ``o_proj -> c_proj``, ``fc_in -> c_fc``, ``fc_out -> mlp.c_proj``, ``tok_emb -> wte``, ``pos_emb -> wpe``.

Two details differ from a GPT-2 checkpoint's config and are matched by config, not by code:

* GELU: ours is the exact one, ``0.5 x (1 + erf(x / sqrt 2))`` (``F.gelu``); GPT-2 uses the tanh
  approximation (``gelu_new``). Hence ``activation_function="gelu"``. With ``gelu_new`` the logits of
  the shipped base move by ~3e-2, far outside the tolerance: ``test_tanh_gelu_is_told_apart``.
* the head: ours is untied (its own ``vocab x C`` matrix, no bias); GPT-2 ties ``lm_head`` to ``wte``.
  Hence ``tie_word_embeddings=False`` and ``lm_head`` gets our head.

Everything else is GPT-2's default and already ours: LayerNorm eps 1e-5, pre-LN blocks and a final
``ln_f``, learned positions, biases on every projection, scores scaled by ``1/sqrt(head_dim)`` (no
per-layer scaling), causal mask, no dropout at eval. Both models hold the same number of parameters.

**Our LoRA is PEFT's.** Two comparisons, both with the same non-zero random ``A`` and ``B`` copied in:

1. PEFT applied to *our own* GPT (PEFT wraps any ``nn.Linear``): the same layers ``q_proj``, ``v_proj``,
   the same shapes, so logits, gradients, merge and the printed line must agree one for one.
2. PEFT on the GPT-2 twin. There q, k and v are one fused ``c_attn``, and a LoRA on it updates all
   three. q-and-v-only LoRA of rank r is reproduced exactly by a rank-2r adapter on ``c_attn`` with a
   block structure (and ``lora_alpha`` doubled, so that ``scaling = alpha / r`` stays the same)::

       A = [A_q ; A_v]  (2r x C)      B = [[B_q, 0], [0, 0], [0, B_v]]  (3C x 2r)
       B A = [B_q A_q ; 0 ; B_v A_v]  =  the q and v updates, nothing on k

   Logits and merged logits must agree; of the gradients, the blocks that exist in ours (A_q, A_v, and
   the diagonal blocks of B) must agree. The fused adapter also gets gradients in its zero blocks (it
   would learn k and cross terms if trained): that is where the two models part, and why the fair
   parameter-count comparison is the first one.

Tolerances (float32, CPU): logits ``atol=1e-4, rtol=1e-5``, i.e. ``|ours - theirs| <= 1e-4 + 1e-5 |theirs|``
(the base's logits reach 24; the two routes differ by up to ~1.5e-5 there, a relative 6e-7, because
GPT-2 multiplies the scores by ``head_dim**-0.5`` where we divide by ``sqrt(head_dim)``; the tanh GELU
moves them by 3e-2); gradients ``atol=1e-6, rtol=1e-4`` (they reach O(1); the routes differ by < 1e-6).
Merged against merged uses the logits' tolerance; one model merged against itself unmerged, 1e-4 (two
float routes through a large random dW: up to 1.4e-5 measured with rsLoRA's scaling 5.66).
The tests skip only when transformers or peft is missing; nothing here reaches the network.
"""
import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub look-ups, ever: every model here is built from a config
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import minipeft as mp  # noqa: E402
from helpers import REFERENCE_GRADS, REFERENCE_LOGITS, loss_of  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside PEFT

LOGITS, GRADS = REFERENCE_LOGITS, REFERENCE_GRADS  # tests/helpers.py: why these tolerances
MERGED = dict(atol=1e-4, rtol=1e-4)  # one model merged vs not: (W + dW) x against W x + B A x, dW large here
R, ALPHA = 8, 16


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection during these tests fails loudly."""
    def refuse(*args, **kwargs):
        raise RuntimeError("a reference test tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------------
# the GPT-2 twin
# ---------------------------------------------------------------------------------------------------

def gpt2_twin(model: mp.GPT, activation: str = "gelu", attn: str = "eager"):
    """A ``transformers.GPT2LMHeadModel`` holding ``model``'s weights (see the module docstring)."""
    c = model.config
    config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.d_model, n_layer=c.n_layer,
        n_head=c.n_head, n_inner=c.d_ff, activation_function=activation, layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation=attn)
    twin = transformers.GPT2LMHeadModel(config)
    ours = model.state_dict()
    sd = {"transformer.wte.weight": ours["tok_emb.weight"], "transformer.wpe.weight": ours["pos_emb.weight"],
          "transformer.ln_f.weight": ours["ln_f.weight"], "transformer.ln_f.bias": ours["ln_f.bias"],
          "lm_head.weight": ours["head.weight"]}
    for i in range(c.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[h + ln + ".weight"], sd[h + ln + ".bias"] = ours[o + ln + ".weight"], ours[o + ln + ".bias"]
        qkv = [o + f"attn.{p}_proj." for p in "qkv"]
        sd[h + "attn.c_attn.weight"] = torch.cat([ours[p + "weight"] for p in qkv]).T  # (C, 3C)
        sd[h + "attn.c_attn.bias"] = torch.cat([ours[p + "bias"] for p in qkv])        # (3C,)
        for theirs, mine in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
            sd[h + theirs + ".weight"] = ours[o + mine + ".weight"].T  # Conv1D: (in, out)
            sd[h + theirs + ".bias"] = ours[o + mine + ".bias"]
    twin.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)  # every tensor, once
    return twin.eval()


def random_gpt(seed: int = 0) -> mp.GPT:
    """A small GPT with an unusual shape (3 heads of 16, d_ff not 4C) and weights large enough
    (std 0.3, LayerNorm gains around 1) that attention is far from uniform and every detail shows."""
    torch.manual_seed(seed)
    model = mp.GPT(mp.GPTConfig(vocab_size=50, block_size=32, d_model=48, n_layer=3, n_head=3, d_ff=80))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight",
                                                                        "ln_f.weight")) else 0.0))
    return model.eval()


def task_batch(name: str = "rotate", n: int = 16):
    x, y = mp.encode_batch(mp.make_task(name, seed=0).val[:n])
    return x, y



@pytest.mark.parametrize("which", ["base", "random"])
@pytest.mark.parametrize("fused", [False, True])
def test_logits_match_gpt2(which, fused):
    model = mp.load_base() if which == "base" else random_gpt()
    if fused:  # the same weights, attention through PyTorch's fused kernel on both sides
        fast = mp.GPT(dataclasses.replace(model.config, fused_attention=True))
        fast.load_state_dict(model.state_dict())
        model = fast.eval()
    twin = gpt2_twin(model, attn="sdpa" if fused else "eager")
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())
    torch.manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size))  # every position used
    with torch.no_grad():
        ours, theirs = model(idx), twin(idx).logits
    assert theirs.abs().max() > 1.0  # logits of a real size, so that atol 1e-5 means something
    torch.testing.assert_close(ours, theirs, **LOGITS)


def test_tanh_gelu_is_told_apart():
    """The tolerance is tight enough to see GPT-2's default tanh GELU instead of our exact one."""
    model = mp.load_base()
    x, _ = task_batch()
    with torch.no_grad():
        ours, tanh = model(x), gpt2_twin(model, activation="gelu_new")(x).logits
    assert (ours - tanh).abs().max() > 100 * LOGITS["atol"]


def test_greedy_generation_matches_gpt2():
    """minGPT's check: the same greedy continuations, token for token (ours with its KV cache).

    Per pretraining task, one batch of validation prompts of equal length (so that neither side pads)."""
    model = mp.load_base()
    twin = gpt2_twin(model)
    solved = []
    for name in mp.PRETRAIN_TASKS:
        texts = mp.make_task(name, seed=0).val
        n = texts[0].index("=") + 1
        texts = [t for t in texts if t.index("=") + 1 == n][:4]
        prompt = torch.tensor([mp.tokenizer.encode(t[:n]) for t in texts])  # (B, n)
        ours = model.generate(prompt, max_new_tokens=12)
        theirs = twin.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        assert torch.equal(ours, theirs), (name, [mp.tokenizer.decode(row) for row in theirs])
        solved += [mp.tokenizer.decode(row[n:]).startswith(t[n:]) for row, t in zip(ours, texts)]
    assert sum(solved) >= 0.75 * len(solved)  # real answers, not a degenerate continuation


# ---------------------------------------------------------------------------------------------------
# LoRA against PEFT
# ---------------------------------------------------------------------------------------------------

def our_lora(model) -> dict:
    """``{(layer, "q"|"v", "A"|"B"): parameter}`` of our adapters, found by parameter name."""
    found = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_A", "lora_B"):
            layer = int(name.split("blocks.")[1].split(".")[0])
            proj = "q" if ".q_proj." in name else "v" if ".v_proj." in name else None
            assert proj is not None, name
            found[(layer, proj, leaf[-1])] = p
    return found


def random_lora(model, seed: int = 0) -> dict:
    """Non-zero random A (r x in) and B (out x r) for each q and v projection of ``model``."""
    g = torch.Generator().manual_seed(seed)
    C = model.config.d_model
    return {(i, p, m): torch.randn(*((R, C) if m == "A" else (C, R)), generator=g) * 0.1
            for i in range(model.config.n_layer) for p in "qv" for m in "AB"}


def ours_with_lora(model, values, rslora=False):
    mp.add_lora(model, r=R, alpha=ALPHA, targets=("q_proj", "v_proj"), rslora=rslora)
    params = our_lora(model)
    assert params.keys() == values.keys()
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(values[key])
    return model


def peft_on_ours(model, values, rslora=False):
    """PEFT's LoRA on our own GPT: the same layers, the same shapes."""
    ref = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, use_rslora=rslora))
    layers = ref.base_model.model.blocks
    with torch.no_grad():
        for (i, p, m), value in values.items():
            lora = getattr(layers[i].attn, f"{p}_proj")
            (lora.lora_A if m == "A" else lora.lora_B)["default"].weight.copy_(value)
    return ref


def peft_on_twin(twin, values, C):
    """PEFT's LoRA on GPT-2's fused ``c_attn``, with the block structure that makes it q-and-v-only."""
    ref = peft.get_peft_model(twin, peft.LoraConfig(r=2 * R, lora_alpha=2 * ALPHA, target_modules=["c_attn"],
                                                    lora_dropout=0.0, fan_in_fan_out=True))
    with torch.no_grad():
        for i, block in enumerate(ref.base_model.model.transformer.h):
            A, B = block.attn.c_attn.lora_A["default"].weight, block.attn.c_attn.lora_B["default"].weight
            A.copy_(torch.cat([values[i, "q", "A"], values[i, "v", "A"]]))  # (2r, C)
            B.zero_()                                                       # (3C, 2r)
            B[:C, :R], B[2 * C:, R:] = values[i, "q", "B"], values[i, "v", "B"]
    return ref


@pytest.mark.parametrize("rslora", [False, True])  # scaling alpha / r = 2, or alpha / sqrt(r) = 5.66
def test_lora_matches_peft_on_our_gpt(capsys, rslora):
    x, y = task_batch()
    values = random_lora(mp.load_base())
    ours = ours_with_lora(mp.load_base(), values, rslora)
    ref = peft_on_ours(mp.load_base(), values, rslora)

    # the printed line: PEFT's own count on the same model
    mp.print_trainable_parameters(ours)
    ref.print_trainable_parameters()
    ours_line, peft_line = capsys.readouterr().out.splitlines()
    assert ours_line == peft_line
    assert mp.trainable_parameters(ours) == ref.get_nb_trainable_parameters()

    # logits, then the gradients of A and B after one backward of the same loss
    ours_logits, ref_logits = ours(x), ref(x)
    with torch.no_grad():
        assert (ours_logits - mp.load_base()(x)).abs().max() > 1e-2  # the adapters do change the output
    torch.testing.assert_close(ours_logits, ref_logits, **LOGITS)
    loss_of(ours_logits, y).backward()
    loss_of(ref_logits, y).backward()
    for (i, p, m), param in our_lora(ours).items():
        lora = getattr(ref.base_model.model.blocks[i].attn, f"{p}_proj")
        theirs = (lora.lora_A if m == "A" else lora.lora_B)["default"].weight.grad
        assert param.grad.abs().max() > 1e-4
        torch.testing.assert_close(param.grad, theirs, **GRADS)
    frozen = [n for n, q in ours.named_parameters() if q.grad is not None and "lora_" not in n]
    assert frozen == []

    # merged: our merge_lora against PEFT's merge_and_unload, weights and logits
    with torch.no_grad():
        mp.merge_lora(ours)
        merged = ref.merge_and_unload()
        for i in range(ours.config.n_layer):
            for p in ("q_proj", "k_proj", "v_proj"):
                theirs = getattr(merged.blocks[i].attn, p).weight
                mine = [w for n, w in ours.named_parameters() if n.startswith(f"blocks.{i}.attn.{p}.")
                        and n.endswith("weight")]
                assert len(mine) == 1
                torch.testing.assert_close(mine[0], theirs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours(x), merged(x), **LOGITS)
        torch.testing.assert_close(ours(x), ours_logits, **MERGED)  # merging changes nothing


def test_print_line_by_hand(capsys):
    """The line's numbers worked out from the shapes: r (in + out) per adapted layer, 2 per block."""
    model = mp.load_base()
    c = model.config
    C, V, T, L, Fd = c.d_model, c.vocab_size, c.block_size, c.n_layer, c.d_ff
    base = V * C + T * C + L * (2 * 2 * C + 4 * (C * C + C) + (C * Fd + Fd) + (Fd * C + C)) + 2 * C + V * C
    lora = L * 2 * R * (C + C)
    mp.add_lora(model, r=R, alpha=ALPHA, targets=("q_proj", "v_proj"))
    mp.print_trainable_parameters(model)
    pct = 100 * lora / (base + lora)
    assert capsys.readouterr().out == f"trainable params: {lora:,d} || all params: {base + lora:,d} || trainable%: {pct:.4f}\n"
    assert (lora, base) == (16_384, 812_032)


def test_lora_matches_peft_on_gpt2_twin(capsys):
    x, y = task_batch()
    base = mp.load_base()
    C = base.config.d_model
    values = random_lora(base, seed=1)
    ours = ours_with_lora(mp.load_base(), values)
    ref = peft_on_twin(gpt2_twin(base), values, C)

    ours_logits, ref_logits = ours(x), ref(input_ids=x).logits
    torch.testing.assert_close(ours_logits, ref_logits, **LOGITS)
    loss_of(ours_logits, y).backward()
    loss_of(ref_logits, y).backward()
    for i, block in enumerate(ref.base_model.model.transformer.h):
        gA = block.attn.c_attn.lora_A["default"].weight.grad  # (2r, C)
        gB = block.attn.c_attn.lora_B["default"].weight.grad  # (3C, 2r)
        mine = {(p, m): our_lora(ours)[i, p, m].grad for p in "qv" for m in "AB"}
        torch.testing.assert_close(mine["q", "A"], gA[:R], **GRADS)
        torch.testing.assert_close(mine["v", "A"], gA[R:], **GRADS)
        torch.testing.assert_close(mine["q", "B"], gB[:C, :R], **GRADS)
        torch.testing.assert_close(mine["v", "B"], gB[2 * C:, R:], **GRADS)
        assert gB[:C, R:].abs().max() > 1e-6  # the fused adapter's extra freedom: cross terms train too

    # PEFT counts the fused adapter whole: 2r (C + 3C) per block, twice ours (zeros included)
    ref.print_trainable_parameters()
    L = base.config.n_layer
    fused, total = L * 2 * R * (C + 3 * C), sum(p.numel() for p in base.parameters())
    assert capsys.readouterr().out.startswith(f"trainable params: {fused:,d} || all params: {total + fused:,d} ||")

    with torch.no_grad():
        mp.merge_lora(ours)
        merged = ref.merge_and_unload()
        torch.testing.assert_close(ours(x), merged(input_ids=x).logits, **LOGITS)
        mp.unmerge_lora(ours)
        torch.testing.assert_close(ours(x), ours_logits, **MERGED)
