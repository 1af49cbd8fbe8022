"""Prompt tuning, checked against a forward pass written out here from the model's parts."""
import pytest
import torch
import torch.nn as nn

import minipeft as mp
from helpers import ATOL, assert_close_and_sensitive, greedy_margin, state


def by_hand(model, prompt, x, start=0):
    """Reference: the blocks read [P ; E[x] + pos(0..T-1)] (no position on the prompt); drop the prompt's logits.

    ``start``: the text's first position (not 0 only to build a wrong result)."""
    B, T = x.shape
    n = prompt.shape[0]
    text = model.tok_emb(x) + model.pos_emb(torch.arange(start, start + T))
    h = torch.cat([prompt.expand(B, n, -1), text], dim=1)
    for block in model.blocks:
        h = block(h)
    return model.head(model.ln_f(h))[:, n:]


def test_empty_prompt_is_the_base(tiny_model):
    x = torch.randint(1, 41, (2, 9))
    before = tiny_model(x)
    mp.add_prompt_tuning(tiny_model, n_tokens=1)
    tiny_model.prompt_tuning.embedding = nn.Parameter(torch.zeros(0, 32))  # the degenerate prompt
    # bit-equal: concatenating nothing leaves the same embeddings and positions, so the same kernels run
    assert torch.equal(tiny_model(x), before)


@pytest.mark.parametrize("n_tokens,init", [(1, "vocab"), (5, "random"), (12, "vocab")])
def test_forward_equals_hand_computation(tiny_model, n_tokens, init):
    reference_model = mp.GPT(tiny_model.config)
    reference_model.load_state_dict(tiny_model.state_dict())
    mp.add_prompt_tuning(tiny_model, n_tokens=n_tokens, init=init, seed=3)
    with torch.no_grad():
        tiny_model.prompt_tuning.embedding.normal_()  # any prompt, not just the initial one
    x = torch.randint(1, 41, (3, 11))
    out = tiny_model(x)
    assert out.shape == (3, 11, 41)  # the virtual positions are gone
    prompt = tiny_model.prompt_tuning.embedding
    with torch.no_grad():  # a realistic mistake: the text placed after the prompt (positions n..n+T-1)
        wrong = by_hand(reference_model, prompt, x, start=n_tokens)
        assert_close_and_sensitive(out, by_hand(reference_model, prompt, x), wrong=wrong)


def test_vocab_init_from_text_repeats_the_characters(tiny_model):
    mp.add_prompt_tuning(tiny_model, n_tokens=5, init_text="ab")
    ids = [mp.tokenizer.stoi[c] for c in "ababa"]
    assert torch.equal(tiny_model.prompt_tuning.embedding.data, tiny_model.tok_emb.weight.data[ids])


def test_random_init_has_the_scale_of_the_token_embeddings(tiny_model):
    mp.add_prompt_tuning(tiny_model, n_tokens=40, init="random")
    scale = tiny_model.tok_emb.weight[1:].std().item()
    assert abs(tiny_model.prompt_tuning.embedding.std().item() / scale - 1) < 0.1


def test_counts_and_gradients_reach_only_the_prompt(tiny_model):
    total = sum(p.numel() for p in tiny_model.parameters())
    mp.add_prompt_tuning(tiny_model, n_tokens=7)
    assert mp.trainable_parameters(tiny_model) == (7 * 32, total + 7 * 32)
    x, y = mp.encode_batch(["rotate:abcd=bcda.", "rotate:xyz=yzx."])
    nn.functional.cross_entropy(tiny_model(x).reshape(-1, 41), y.reshape(-1), ignore_index=-100).backward()
    for name, p in tiny_model.named_parameters():
        assert (p.grad is not None) == (name == "prompt_tuning.embedding"), name
    assert tiny_model.prompt_tuning.embedding.grad.abs().sum() > 0


def test_generation_with_and_without_cache_matches_hand_greedy(tiny_model):
    reference_model = mp.GPT(tiny_model.config)
    reference_model.load_state_dict(tiny_model.state_dict())
    mp.add_prompt_tuning(tiny_model, n_tokens=6, init="random")
    x = torch.randint(1, 41, (2, 5))
    out = x
    for _ in range(7):  # greedy decoding, recomputing the whole sequence each step
        logits = by_hand(reference_model, tiny_model.prompt_tuning.embedding, out)[:, -1:]
        # the token ids can be compared exactly only if no greedy choice is a near-tie that rounding could flip
        assert greedy_margin(logits) > ATOL
        out = torch.cat([out, logits.argmax(-1)], 1)
    assert torch.equal(tiny_model.generate(x, 7, use_cache=True), out)
    assert torch.equal(tiny_model.generate(x, 7, use_cache=False), out)


def test_the_context_counts_the_virtual_tokens(tiny_model):
    mp.add_prompt_tuning(tiny_model, n_tokens=40)  # block_size 48
    tiny_model(torch.randint(1, 41, (1, 8)))
    with pytest.raises(ValueError, match="40 virtual tokens \\+ 9 input tokens exceed the context"):
        tiny_model(torch.randint(1, 41, (1, 9)))


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_tokens=0), "n_tokens must be a positive integer"),
    (dict(n_tokens=-3), "n_tokens must be a positive integer"),
    (dict(n_tokens=2.5), "n_tokens must be a positive integer"),
    (dict(n_tokens=48), "leaves no room for text"),
    (dict(n_tokens=4, init="zeros"), "unknown init 'zeros'"),
    (dict(n_tokens=4, init_text="Hello!"), "outside the vocabulary: \\['!', 'H'\\]"),
    (dict(n_tokens=4, init_text=""), "init_text must be a non-empty string"),
    (dict(n_tokens=4, init="random", init_text="abc"), "init_text needs init='vocab'"),
])
def test_bad_input_names_the_problem_and_leaves_the_model(tiny_model, kwargs, message):
    before = state(tiny_model)
    with pytest.raises((ValueError, TypeError), match=message):  # TypeError: a value of the wrong type
        mp.add_prompt_tuning(tiny_model, **kwargs)
    assert not hasattr(tiny_model, "prompt_tuning")
    assert not tiny_model._forward_pre_hooks and not tiny_model._forward_hooks
    assert all(p.requires_grad for p in tiny_model.parameters())
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_applying_twice_is_an_error(tiny_model):
    mp.add_prompt_tuning(tiny_model, n_tokens=3)
    with pytest.raises(ValueError, match="already has prompt tuning"):
        mp.add_prompt_tuning(tiny_model, n_tokens=3)
    assert tiny_model.prompt_tuning.n_tokens == 3 and len(tiny_model._forward_pre_hooks) == 1


# --- the sweep widget's numbers (minipeft.plots) ------------------------------------------------------


@pytest.mark.parametrize("selected", [1, 4, 16])
def test_sweep_numbers_and_plot_over_the_range(selected):
    import matplotlib.pyplot as plt
    from minipeft import plots

    x = [1, 4, 16]
    values = [[0.1, 0.2, 0.6], [0.3, 0.4, 0.8]]  # two seeds
    num = plots.sweep_numbers(x, values, selected)
    i = x.index(selected)
    assert num["index"] == i and num["n_seeds"] == 2
    assert num["selected_mean"] == pytest.approx((values[0][i] + values[1][i]) / 2)
    # the sample std of two values a, b is |a - b| / sqrt(2)
    assert num["selected_std"] == pytest.approx(abs(values[0][i] - values[1][i]) / 2 ** 0.5)
    histories = {v: [mp.History(loss=[2.0, 1.0, 0.5])] * 2 for v in x}
    fig = plots.plot_sweep_selection(x, values, selected, histories, xlabel="n_tokens")
    assert len(fig.axes) == 2 and f"n_tokens={selected}" in fig.axes[0].get_title()
    plt.close(fig)
