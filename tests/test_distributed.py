"""Data parallel (minipeft.distributed): two gloo processes against one, and the bytes DDP all-reduces.

The references are independent of DDP: a 1-process ``mp.train`` run with the same global batch (no
process group, no hook), and the trainable-parameter count worked out by formula, times 4 bytes (fp32
gradients). Two spawns of two processes each (a few seconds each), on a tiny model.
"""
import pytest
import torch
import torch.distributed as dist

import minipeft as mp

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")

CONFIG = mp.GPTConfig(d_model=32, n_layer=2, n_head=4, d_ff=64, block_size=48)  # small for testing efficiency
TRAIN = dict(steps=6, lr=1e-3, batch_size=16, seed=3)
# Why not bit-equal: each rank runs half the batch (other matmul shapes, other summation order) and the
# all-reduce adds the two halves' gradients in another order than one backward does; float32 rounding
# (~1e-7 relative) then passes through AdamW, which divides by each element's gradient size and so enlarges
# the rounding of elements whose gradient is near zero. A weight moves by ~lr = 1e-3 a step; atol 1e-4 is a
# tenth of that. Measured on the toy base, 10 steps: the correct runs differ by 3e-6 to 2e-5 (4 seeds);
# a realistic mistake, each rank taking its plain mean loss (not weighted by its share of the answer
# characters), by 3e-3 to 6e-3; on this tiny model by 3e-4 to 3e-3 (and its losses by 4e-4 to 1e-3).
ATOL, RTOL = 1e-4, 1e-4


def task():
    return mp.make_task("copy", n_train=64, n_val=8)


def both_ways(build):
    """The same model trained by one process and by two (DDP); returns (start, one, history, two, run)."""
    torch.manual_seed(0)
    one = build()
    torch.manual_seed(0)
    two = build()
    start = {n: p.detach().clone() for n, p in one.named_parameters()}
    history = mp.train(one, task(), device="cpu", progress=False, **TRAIN)
    run = mp.train_data_parallel(two, task(), world=2, timeout=120, **TRAIN)
    return start, one, history, two, run


@pytest.fixture(scope="module")
def full():
    return both_ways(lambda: mp.full_finetune(mp.GPT(CONFIG)))


@pytest.fixture(scope="module")
def lora():
    return both_ways(lambda: mp.add_lora(mp.GPT(CONFIG), r=4, alpha=8))


def test_full_finetuning_allreduces_every_parameter(full):
    *_, run = full
    C, F, V, L, T = CONFIG.d_model, CONFIG.d_ff, CONFIG.vocab_size, CONFIG.n_layer, CONFIG.block_size
    block = 4 * (C * C + C) + (C * F + F) + (F * C + C) + 2 * 2 * C  # q k v o, fc_in, fc_out, two LayerNorms
    n = V * C + T * C + L * block + 2 * C + V * C                     # embeddings, blocks, final norm, head
    assert run.bytes_per_step == [4 * n] * TRAIN["steps"]


def test_lora_allreduces_only_the_adapters(lora):
    *_, run = lora
    r, C = 4, CONFIG.d_model
    n = CONFIG.n_layer * 2 * r * (C + C)  # A (r x C) and B (C x r) on q and on v, per block
    assert run.bytes_per_step == [4 * n] * TRAIN["steps"]
    assert all(b >= 1 for b in run.buckets_per_step)


@pytest.mark.parametrize("which", ["full", "lora"])
def test_two_processes_match_one_with_the_same_global_batch(which, request):
    start, one, history, two, run = request.getfixturevalue(which)
    torch.testing.assert_close(run.history.loss, history.loss, atol=ATOL, rtol=RTOL)
    compared = 0
    for (name, p), q in zip(one.named_parameters(), two.parameters()):
        if not p.requires_grad:
            assert torch.equal(q, start[name]), f"frozen {name} changed"
        elif not name.endswith("attn.k_proj.bias"):
            # (a key bias adds q.b to every score of a row, which softmax ignores: its true gradient is 0, so
            # what AdamW follows is rounding noise, different in each run; it is left out)
            torch.testing.assert_close(q, p, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
            compared += 1
    assert compared >= 4
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in one.named_parameters() if p.requires_grad)
    assert moved > 10 * ATOL  # the runs trained: a check that would pass untrained is no check
    assert not two.training


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(world=0), ValueError, "world"), (dict(world=2.0), TypeError, "world"),
    (dict(world=4, batch_size=2), ValueError, "batch_size"), (dict(timeout=0), ValueError, "timeout"),
])
def test_bad_arguments_are_refused_before_spawning(kwargs, error, words):
    with pytest.raises(error, match=words):
        mp.train_data_parallel(mp.full_finetune(mp.GPT(CONFIG)), task(), **kwargs)


def test_frozen_model_is_refused():
    with pytest.raises(ValueError, match="no trainable parameters"):
        mp.train_data_parallel(mp.freeze(mp.GPT(CONFIG)), task())
