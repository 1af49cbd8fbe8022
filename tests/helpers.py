"""Small helpers shared by the method tests (pytest puts this folder on the import path)."""
import torch

import minipeft as mp


def copy_of(model):
    """An independent plain GPT with the same weights, in eval mode: the reference a test compares against."""
    twin = mp.GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def state(model):
    """A snapshot of every tensor of ``model`` (to check later that nothing changed)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- comparing two routes to the same maths ------------------------------------------------------------
# Bit-equality (torch.equal) holds only where the same kernels run on the same inputs: a save/load round
# trip, a frozen tensor left untouched, an update that adds exact zeros to the same base output. Two
# routes to the same maths (a different matmul shape, a loop by hand, a merged weight, a batch mixing
# rows) differ by summation order, and by how much depends on the CPU (AVX2/AVX-512, Intel/AMD, MKL's
# code path) and the thread count. They are compared with a tolerance instead, and each such test also
# shows that a realistic mistake misses the reference by far more than that tolerance.

# the shipped base against a reference library (transformers, PEFT) with the same weights: the same tensors
# multiplied in another order. Logits reach ~24; one of 7,872 moved 1.25e-5 under ATEN_CPU_CAPABILITY=avx2.
REFERENCE_LOGITS = dict(atol=1e-4, rtol=1e-5)
REFERENCE_GRADS = dict(atol=1e-6, rtol=1e-4)


def loss_of(logits, y):
    """The training loss (mp.train's) from logits: cross-entropy over the scored positions."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=mp.tasks.IGNORE)


# float32 forward of the tiny test model: logits of size ~0.1-1, rounding differences ~1e-7..1e-6 of that.
ATOL, RTOL = 1e-5, 1e-5


def tolerance_ratio(actual, expected, atol=ATOL, rtol=RTOL):
    """max |actual - expected| / (atol + rtol |expected|): <= 1 is what assert_close accepts."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs() / (atol + rtol * expected.abs())).max().item()


def assert_close_and_sensitive(actual, expected, wrong, atol=ATOL, rtol=RTOL, factor=10.0):
    """``actual`` equals ``expected`` within (atol, rtol), while ``wrong`` (the output of a realistic
    mistake: a prefix shifted by one position, the wrong LoRA scaling, one weight off by 1e-3, ...)
    misses ``expected`` by more than ``factor`` times that tolerance; so the tolerance cannot hide it."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    ratio = tolerance_ratio(wrong, expected, atol, rtol)
    assert ratio > factor, f"a wrong result is only {ratio:.3g} x the tolerance away: the check is too loose"


@torch.no_grad()
def nudged(model, name, run, by=1e-3):
    """``run()`` with the first number of the parameter ``name`` of ``model`` moved by ``by`` (put back after)."""
    p = model.get_parameter(name)
    first = (0,) * p.dim()
    old = p[first].clone()
    p[first] += by
    try:
        return run()
    finally:
        p[first] = old  # the exact old value (x + by - by need not be x)


def greedy_margin(logits):
    """The smallest gap between the best and the second-best logit over all positions: a greedy choice
    is stable across CPUs only if this is far above float32 rounding (~1e-8 on these logits); tests ask
    for more than ATOL."""
    top = logits.detach().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()
