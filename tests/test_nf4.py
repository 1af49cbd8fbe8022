"""NF4 quantisation, checked against the published code book, hand computations, error bounds and bitsandbytes."""
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from minipeft import nf4

# The 16 NF4 levels as published (QLoRA paper, appendix; bitsandbytes `get_4bit_type("nf4")`)
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def half_widest_gap(quant_type):
    levels = sorted(nf4.CODEBOOKS[quant_type].tolist())
    levels = [v for v in levels if -1 <= v <= 1]  # int4's code -8 (-8/7) is never used
    return max(b - a for a, b in zip(levels, levels[1:])) / 2


def test_nf4_levels_equal_published_values():
    levels = nf4.normal_map()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert torch.allclose(levels, torch.tensor(PUBLISHED_NF4), rtol=0, atol=1e-7)
    assert torch.equal(nf4.CODEBOOKS["nf4"], levels)
    # asymmetric: 7 negative levels, an exact zero, 8 positive, the ends at -1 and 1
    assert (levels < 0).sum() == 7 and (levels == 0).sum() == 1 and (levels > 0).sum() == 8
    assert levels[0] == -1 and levels[-1] == 1


def test_nf4_bins_hold_equal_normal_mass():
    # independent: the positive levels are N(0,1) quantiles at equally spaced probabilities
    # offset, offset - d, ..., 0.5 + d (d = (offset - 0.5) / 8), scaled by the largest
    offset = 0.9677083
    q = [math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()
         for p in np.linspace(offset, 0.5, 9)[:-1]]
    positive = sorted(v / q[0] for v in q)
    assert np.allclose(nf4.CODEBOOKS["nf4"][8:].tolist(), positive, atol=1e-6)


def test_fp4_and_int4_codebooks():
    fp4 = nf4.CODEBOOKS["fp4"]
    assert sorted(abs(v) for v in fp4[:8].tolist()) == pytest.approx([0, 1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])
    assert torch.equal(fp4[8:], -fp4[:8])  # sign bit
    assert nf4.CODEBOOKS["int4"].tolist() == pytest.approx([k / 7 for k in range(-8, 8)])


def test_dynamic_map_shape():
    m = nf4.DYNAMIC
    assert m.shape == (256,) and torch.all(m[1:] >= m[:-1])
    assert m.max() == 1 and 0 in m.tolist() and m.min() > -1
    # 1 + 2 + ... + 64 = 127 values per sign in (10^-7, 1), plus 0 and 1
    assert ((m > 0) & (m < 1)).sum() == 127 and (m < 0).sum() == 127


def test_hand_worked_block():
    # absmax 2 -> scaled [0.5, -1, 0, 0.2]; nearest NF4 levels: 0.5 lies below the edge (0.4407 + 0.5626) / 2
    # = 0.5017 -> code 12; -1 -> code 0; 0 -> code 7; 0.2 lies below (0.1609 + 0.2461) / 2 = 0.2035 -> code 9.
    # Second block [3.0]: absmax 3, scaled 1 -> code 15, padded with a 0 (code 7).
    packed, state = nf4.quantize(torch.tensor([1.0, -2.0, 0.0, 0.4, 3.0]), blocksize=4)
    assert packed.tolist() == [12 * 16 + 0, 7 * 16 + 9, 15 * 16 + 7]
    assert state.absmax.tolist() == [2.0, 3.0]
    expected = [2 * PUBLISHED_NF4[12], -2.0, 0.0, 2 * PUBLISHED_NF4[9], 3.0]
    assert nf4.dequantize(packed, state).tolist() == pytest.approx(expected, abs=1e-6)


def test_pack_unpack_all_256_bytes():
    byte = torch.arange(256, dtype=torch.uint8)
    expected = [c for b in range(256) for c in divmod(b, 16)]  # (high nibble, low nibble)
    assert nf4.unpack(byte).tolist() == expected
    # quantise a vector whose codes are exactly these (the levels are fixed points, absmax is 1)
    x = nf4.CODEBOOKS["nf4"][torch.tensor(expected)]
    packed, state = nf4.quantize(x, blocksize=512)
    assert state.absmax.tolist() == [1.0]
    assert torch.equal(packed, byte)
    assert torch.equal(nf4.dequantize(packed, state), x)  # exact: each value is a level times absmax 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [1, 4, 64, 256])
def test_error_bound_and_shapes(quant_type, blocksize):
    torch.manual_seed(0)
    x = torch.randn(13, 37) * 5
    x[2] = 0  # an all-zero stretch
    packed, state = nf4.quantize(x, blocksize=blocksize, quant_type=quant_type)
    n = x.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
    assert state.absmax.numel() == math.ceil(n / blocksize)
    x_hat = nf4.dequantize(packed, state)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    absmax = torch.nn.functional.pad(x.reshape(-1).abs(), (0, -n % blocksize)).view(-1, blocksize).amax(1)
    bound = (half_widest_gap(quant_type) * absmax).repeat_interleave(blocksize)[:n].view_as(x)
    assert torch.all((x - x_hat).abs() <= bound * (1 + 1e-6))
    assert torch.all(x_hat[2] == 0)


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float32, array_shapes(min_dims=1, max_dims=3, max_side=70),
                elements=st.floats(-2.0**100, 2.0**100, width=32, allow_subnormal=False)),
       blocksize=st.sampled_from([1, 2, 8, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       double_quant=st.booleans())
def test_property_round_trip(x, blocksize, dtype, double_quant):
    x = torch.from_numpy(x)
    if dtype != torch.float32:
        x = x.clamp(-6e4, 6e4).to(dtype)  # float16 tops out at 65504
    packed, state = nf4.quantize(x, blocksize=blocksize, double_quant=double_quant)
    x_hat = nf4.dequantize(packed, state)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    xf, n = x.float().reshape(-1), x.numel()
    blocks = torch.nn.functional.pad(xf, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    if not double_quant:
        assert torch.equal(state.absmax, absmax)  # a max is one of the values: exact by either route
    # per element: half the widest NF4 gap times the block's absmax (plus the absmax's own 8-bit error
    # under double quantisation), plus the rounding to the output dtype
    absmax_hat = state.block_absmax()
    bound = half_widest_gap("nf4") * absmax_hat.abs() + (absmax_hat - absmax).abs()
    bound = bound.repeat_interleave(blocksize)[:n]
    eps = torch.finfo(dtype).eps
    err = (x_hat.float().reshape(-1) - xf).abs()
    assert torch.all(err <= bound * (1 + 2 * eps) + xf.abs() * eps)


def test_very_large_and_all_zero():
    x = torch.zeros(200)
    x[:64] = 3e38  # close to the largest float32
    x[64:128] = -1e-30
    packed, state = nf4.quantize(x)
    x_hat = nf4.dequantize(packed, state)
    # exact: every value is ±absmax, decoded as level ±1 times absmax
    assert torch.equal(x_hat[:64], x[:64]) and torch.equal(x_hat[64:128], x[64:128])
    assert torch.all(x_hat[128:] == 0) and state.absmax.tolist()[2:] == [0.0, 0.0]


def test_double_quant_absmax_within_8bit_bound():
    torch.manual_seed(0)
    x = torch.randn(300, 256) * torch.rand(300, 1) * 4  # 1200 blocks, absmax varying by row
    packed, state = nf4.quantize(x, blocksize=64, double_quant=True)
    _, plain = nf4.quantize(x, blocksize=64)
    absmax = plain.absmax
    assert state.absmax.dtype == torch.uint8 and state.absmax2.numel() == math.ceil(1200 / 256)
    assert torch.isclose(state.offset, absmax.mean())
    # the 8-bit error: half the widest gap of the dynamic map times max |absmax - offset| of its block of 256
    m = nf4.DYNAMIC
    half_gap = ((m[1:] - m[:-1]).max() / 2).item()
    centred = torch.nn.functional.pad(absmax - absmax.mean(), (0, -1200 % 256)).view(-1, 256)
    bound = (half_gap * centred.abs().amax(1)).repeat_interleave(256)[:1200]
    assert torch.all((state.block_absmax() - absmax).abs() <= bound + 1e-6)
    assert nf4.dequantize(packed, state).shape == x.shape


def test_bits_per_parameter_from_stored_bytes():
    x = torch.randn(256, 256)  # 65,536 values: 1,024 blocks of 64, 4 blocks of 256 absmax constants
    assert nf4.storage_bits(*nf4.quantize(x)) == 4.5  # 4 + 32 / 64
    bits = nf4.storage_bits(*nf4.quantize(x, double_quant=True))
    # 4 + 8/64 + 32/(64·256) = 4.127 (QLoRA), plus the 4-byte offset of this one tensor: 32 / 65,536
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 65536)


@pytest.mark.parametrize("bad, error, match", [
    (torch.arange(10), TypeError, "floating-point"),
    (torch.zeros(3, dtype=torch.complex64), TypeError, "floating-point"),
    (torch.zeros(0), ValueError, "empty"),
    (torch.tensor([1.0, float("nan")]), ValueError, "NaN"),
    (torch.tensor([1.0, float("inf")]), ValueError, "infinite"),
    (torch.tensor([-float("inf"), 1.0], dtype=torch.bfloat16), ValueError, "infinite"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        nf4.quantize(bad)


@pytest.mark.parametrize("blocksize", [0, -64, 48, 64.0, True, None])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive power of two"):
        nf4.quantize(torch.randn(64), blocksize=blocksize)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(quant_type="int8"), ValueError, "quant_type must be one of"),
    (dict(quant_type=["nf4"]), ValueError, "quant_type must be one of"),
    (dict(quant_type=None), ValueError, "quant_type must be one of"),
    (dict(double_quant="yes"), TypeError, "double_quant must be True or False"),
    (dict(double_quant=1), TypeError, "double_quant must be True or False"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        nf4.quantize(torch.randn(64), **kwargs)


# --- a state that does not match its bytes is refused -----------------------------------------------------
# Each row alters one thing of a (packed, state) pair made by quantize() of 200 values in blocks of 64
# (4 blocks, the last one partial; 100 bytes) and names the field the error message must name.

def _set(**fields):
    def alter(packed, state):
        for k, v in fields.items():
            setattr(state, k, v)
        return packed
    return alter


def _edit(name, fn):
    def alter(packed, state):
        setattr(state, name, fn(getattr(state, name)))
        return packed
    return alter


def _first(t, value):
    t = t.clone()
    t.view(-1)[0] = value
    return t


ALTERATIONS = [  # (id, double_quant, alter(packed, state) -> packed, text the message must contain)
    ("quant_type-other-codebook", False, _set(quant_type="fp4"), "state.quant_type"),
    ("quant_type-unknown", False, _set(quant_type="int8"), "state.quant_type"),
    ("quant_type-not-a-string", False, _set(quant_type=4), "state.quant_type"),
    ("dtype-other-float", False, _set(dtype=torch.bfloat16), "state.dtype"),
    ("dtype-integer", False, _set(dtype=torch.int32), "state.dtype"),
    ("dtype-not-a-dtype", False, _set(dtype="float32"), "state.dtype"),
    ("blocksize-other-power-of-two", False, _set(blocksize=32), "state.blocksize"),
    ("blocksize-not-power-of-two", False, _set(blocksize=48), "state.blocksize"),
    ("blocksize-bool", False, _set(blocksize=True), "state.blocksize"),
    ("blocksize-float", False, _set(blocksize=64.0), "state.blocksize"),
    ("shape-other-numel", False, _set(shape=torch.Size((10, 21))), "state.shape"),
    ("shape-same-numel", False, _set(shape=torch.Size((20, 10))), "state.shape"),
    ("shape-empty", False, _set(shape=torch.Size((0,))), "state.shape"),
    ("shape-negative", False, _set(shape=(-200,)), "state.shape"),
    ("absmax-too-few", False, _edit("absmax", lambda t: t[:3]), "state.absmax"),
    ("absmax-wrong-dtype", False, _edit("absmax", lambda t: t.double()), "state.absmax"),
    ("absmax-nan", False, _edit("absmax", lambda t: _first(t, float("nan"))), "state.absmax"),
    ("absmax-inf", False, _edit("absmax", lambda t: _first(t, float("inf"))), "state.absmax"),
    ("absmax-negative", False, _edit("absmax", lambda t: -t), "state.absmax"),
    ("absmax-changed", False, _edit("absmax", lambda t: t * 1.5), "state.absmax"),
    ("packed-one-byte", False, lambda p, s: _first(p, (int(p[0]) + 1) % 256), "packed"),
    ("packed-other-tensor", False, lambda p, s: nf4.quantize(torch.randn(200) + 5)[0], "packed"),
    ("packed-shorter", False, lambda p, s: p[:-1], "packed"),
    ("dq-fields-added-to-plain", False, _set(offset=torch.tensor(0.5), absmax2=torch.ones(1)),
     "state.offset and state.absmax2 are set"),
    ("dq-absmax2-removed", True, _set(absmax2=None), "state.absmax2"),
    ("dq-offset-removed", True, _set(offset=None), "state.offset"),
    ("dq-both-removed", True, _set(offset=None, absmax2=None), "state.offset and state.absmax2 are None"),
    ("dq-absmax2-too-many", True, _edit("absmax2", lambda t: t.repeat(2)), "state.absmax2"),
    ("dq-absmax2-nan", True, _edit("absmax2", lambda t: _first(t, float("nan"))), "state.absmax2"),
    ("dq-absmax2-negative", True, _edit("absmax2", lambda t: -t), "state.absmax2"),
    ("dq-absmax2-changed", True, _edit("absmax2", lambda t: t * 2), "state.absmax2"),
    ("dq-offset-inf", True, _set(offset=torch.tensor(float("inf"))), "state.offset"),
    ("dq-offset-changed", True, _edit("offset", lambda t: t + 0.25), "state.offset"),
    ("dq-offset-two-values", True, _edit("offset", lambda t: t.repeat(2)), "state.offset"),
    ("dq-absmax-codes-changed", True, _edit("absmax", lambda t: _first(t, (int(t[0]) + 1) % 256)), "state.absmax"),
    ("dq-absmax-float", True, _edit("absmax", lambda t: t.float()), "state.absmax"),
]


@pytest.mark.parametrize("double_quant, alter, field", [a[1:] for a in ALTERATIONS], ids=[a[0] for a in ALTERATIONS])
def test_altered_state_is_refused(double_quant, alter, field):
    torch.manual_seed(0)
    x = torch.randn(10, 20)
    packed, state = nf4.quantize(x, blocksize=64, double_quant=double_quant)
    nf4.dequantize(packed, state)  # the pair as quantize() made it decodes
    packed = alter(packed, state)
    with pytest.raises(ValueError, match=re.escape(field)):
        nf4.dequantize(packed, state)


@pytest.mark.parametrize("alter, field", [
    (_set(quant_type="int8"), "state.quant_type"),
    (_set(dtype=torch.int32), "state.dtype"),
    (_set(blocksize=32), "state.absmax"),
    (_set(absmax2=None), "state.offset and state.absmax2"),
])
def test_fields_checked_without_record_and_without_check(alter, field):
    # a state built by hand (no record, as the 4-bit layer builds it) and check=False still get the
    # checks that need only the fields
    packed, state = nf4.quantize(torch.randn(200), double_quant=True)
    state.record = None
    alter(packed, state)
    with pytest.raises(ValueError, match=re.escape(field)):
        nf4.dequantize(packed, state, check=False)


def test_foreign_state_and_wrong_types():
    a, state_a = nf4.quantize(torch.randn(128))
    b, _ = nf4.quantize(torch.randn(128))
    c, _ = nf4.quantize(torch.randn(100))
    with pytest.raises(ValueError, match="another tensor"):
        nf4.dequantize(c, state_a)  # wrong size
    with pytest.raises(ValueError, match="another tensor"):
        nf4.dequantize(b, state_a)  # same size, other values
    with pytest.raises(TypeError, match="QuantState"):
        nf4.dequantize(a, {"absmax": state_a.absmax})
    with pytest.raises(TypeError, match="packed must be the uint8 tensor"):
        nf4.dequantize(a.int(), state_a)


def test_checksum_is_a_sum_of_int32_words():
    # hand-computed: bytes 1, 2, 3, 4 | 5 are the little-endian words 0x04030201 and 0x00000005
    # (the native order of every CPU PyTorch runs on here)
    t = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    assert nf4.checksum(t) == 0x04030201 + 5
    assert nf4.checksum(t[1:]) == 0x05040302  # an unaligned slice is copied, not misread
    assert nf4.checksum(torch.tensor([1.0])) == 0x3F800000  # the fp32 bit pattern of 1.0


# --- bitsandbytes, an independent implementation (its CPU backend) ------------------------------------

@pytest.fixture(scope="module")
def bnb_functional():
    bnb = pytest.importorskip("bitsandbytes.functional",
                              reason="bitsandbytes is not installed: no comparison with the reference implementation")
    # bitsandbytes torch.compile's some CPU paths: seconds of compiling per shape, and eager gives the same
    with torch._dynamo.config.patch(disable=True):
        yield bnb


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(3, 70), (128, 512), (1, 1), (5,), (7, 9), (1000, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_bytes_equal_bitsandbytes(bnb_functional, quant_type, shape, dtype):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * 3).to(dtype)
    ref_packed, ref_state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    packed, state = nf4.quantize(x, blocksize=64, quant_type=quant_type)
    # codes and bytes are whole numbers; an absmax is a max, exact in any implementation: bit equality
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(state.absmax, ref_state.absmax)
    # decoding: our look-up and multiply in PyTorch vs bitsandbytes' C kernel, two routes to level · absmax.
    # Tolerance: one rounding to the output dtype; a wrong level is off by >= 8 % of absmax.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(nf4.dequantize(packed, state), bnb_functional.dequantize_4bit(ref_packed, ref_state),
                               rtol=eps, atol=0)


def test_double_quant_matches_bitsandbytes(bnb_functional):
    torch.manual_seed(0)
    x = torch.randn(512, 512)
    ref_packed, ref = bnb_functional.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = nf4.quantize(x, blocksize=64, double_quant=True)
    assert torch.equal(packed, ref_packed.view(-1))
    # offset: the same torch mean of the same (bit-equal) absmax in both; absmax2: a max, exact anywhere;
    # the 8-bit map: a code book, exactly representable by construction
    assert torch.equal(state.offset, ref.offset) and torch.equal(state.absmax2, ref.state2.absmax)
    assert torch.equal(nf4.DYNAMIC, bnb_functional.create_dynamic_map())
    # bitsandbytes' compiled CPU 8-bit kernel rounds a value lying within ~1e-5 of a bin edge either
    # way; ours always takes the nearest level. So the 8-bit codes agree up to a few such near-ties.
    agree = (state.absmax == ref.absmax).float().mean().item()
    assert agree > 0.99
    step = (nf4.DYNAMIC[1:] - nf4.DYNAMIC[:-1]).max() * state.absmax2.max()
    ref_absmax = bnb_functional.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
    assert torch.all((state.block_absmax() - ref_absmax).abs() <= step)


# --- the NF4 bins widget's numbers and pictures (minipeft.plots) ----------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize, block", [(64, 0), (64, 46), (256, 11), (4096, 0), (16, 187)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_widget_numbers(quant_type, blocksize, block, double_quant):
    from minipeft.plots import nf4_numbers
    torch.manual_seed(0)
    w = torch.randn(50, 60)  # 3,000 values: the last block of 64, 256 and 4096 is partial
    num = nf4_numbers(w, block, blocksize, quant_type, double_quant)
    n_blocks = math.ceil(3000 / blocksize)
    assert num["n_blocks"] == n_blocks
    block_values = w.reshape(-1)[block * blocksize:(block + 1) * blocksize]
    assert np.array_equal(num["values"], block_values.numpy())
    true_absmax = block_values.abs().max().item()
    assert num["absmax"] == (pytest.approx(true_absmax, rel=0.02) if double_quant else true_absmax)
    # every dequantised value is one of the levels drawn, and within half a bin of its value
    assert np.isin(num["dequantized"], num["levels"]).all()
    assert np.all(np.abs(num["dequantized"] - num["values"]) <= half_widest_gap(quant_type) * num["absmax"] * 1.03)
    assert len(num["edges"]) == len(num["levels"]) - 1
    # errors, independently: ||W - W_hat|| / ||W|| for the block and the whole tensor
    x_hat = nf4.dequantize(*nf4.quantize(w, blocksize, double_quant, quant_type))
    assert num["tensor_error"] == pytest.approx(((w - x_hat).norm() / w.norm()).item(), rel=1e-5)
    assert num["block_error"] == pytest.approx(
        np.linalg.norm(num["values"] - num["dequantized"]) / np.linalg.norm(num["values"]), rel=1e-5)
    # bits per parameter: 4 bits of code (3,000 values = 1,500 bytes) + the stored constants
    const = 4 * n_blocks if not double_quant else n_blocks + 4 * math.ceil(n_blocks / 256) + 4
    assert num["bits_per_param"] == pytest.approx(8 * (1500 + const) / 3000)


def test_nf4_widget_bad_block_and_figures():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from minipeft.plots import nf4_numbers, plot_codebooks, plot_nf4_bins, plot_normal_bins
    w = torch.randn(16, 16)
    with pytest.raises(ValueError, match="block"):
        nf4_numbers(w, 4, 64)
    for fig in (plot_nf4_bins(w, 3, 64, "nf4", True, "layer"), plot_nf4_bins(torch.zeros(8, 8), 0),
                plot_normal_bins(), plot_codebooks()):
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)
