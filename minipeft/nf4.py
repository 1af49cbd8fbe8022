"""NF4: 4-bit NormalFloat quantisation, blockwise, with double quantisation of the constants.

Pretrained weights are roughly normal, so NF4 puts its 16 levels at *quantiles* of N(0, 1): every bin
between two neighbouring levels holds about the same probability mass. A tensor is cut into blocks of
``blocksize`` consecutive values; each block is scaled by its absolute maximum into [-1, 1] and every
value is replaced by the index (0..15) of its nearest level::

    absmax_b = max_i |x_i|                    (one fp32 constant per block b)
    code_i   = argmin_j |x_i / absmax_b - level_j|
    x_hat_i  = level[code_i] * absmax_b

Two 4-bit codes are packed into one ``uint8`` (the even-indexed element in the high nibble), in the
same order and with the same rounding as bitsandbytes' ``quantize_4bit``: same bytes, same absmax.
Storage: 4 bits per value + 32 bits per block = 4.5 bits per parameter at blocksize 64. *Double
quantisation* stores the absmax constants themselves in 8 bits (mean subtracted, blocks of 256 with
bitsandbytes' 8-bit "dynamic" code, one fp32 scale each): about 4.127. Those 8-bit codes are the
exact nearest level; bitsandbytes' compiled CPU kernel rounds a few values lying within ~1e-5 of a
bin edge the other way.

A :class:`QuantState` that does not describe its bytes would decode into garbage, so :func:`dequantize`
refuses it (:func:`check_state`): fields that contradict each other or the number of bytes, and any
field or tensor changed since :func:`quantize` recorded it (an int32-word :func:`checksum` of each).

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv 2305.14314);
reference implementation: bitsandbytes, ``bitsandbytes/functional.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.special import ndtri  # the inverse CDF (quantile function) of N(0, 1)

NF4_OFFSET = 0.9677083  # 1 - (1/30 + 1/32) / 2 = 0.96770833..., rounded as bitsandbytes writes it


def normal_map(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, sorted, in [-1, 1]: bitsandbytes' ``create_normal_map`` in PyTorch.

    8 positive levels are the normal quantiles at 8 equally spaced probabilities from ``offset``
    down to 0.5 (0.5 itself excluded), 7 negative ones likewise with 7 probabilities, plus an exact 0;
    then all are divided by the largest. The quantile at probability 1 is infinite, so the outermost
    level sits at ``offset`` = 1 - (1/(2·15) + 1/(2·16)) / 2, halfway between the "ideal" outermost
    quantiles of a 15- and a 16-level type. Asymmetric (7 negative, 8 positive) so that 0 is exact.
    """
    # quantile points in float32, as bitsandbytes makes them (torch.linspace), the quantiles in float64
    pos = ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())       # 8 values, 1.85 ... 0.08
    neg = -ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())      # 7 values, -1.85 ... -0.09
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return levels / levels.max()


def fp4_map() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), in code order (the bit pattern).

    Magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 divided by 12: {0, 0.0052, 0.167, 0.25, 0.333, 0.5, 0.667, 1}.
    (The OCP "MX" e2m1 format has 0.5 where bitsandbytes has 0.0625.) Codes 8..15 are the negatives.
    """
    mag = torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    return torch.cat([mag, -mag]) / 12


def int4_map() -> torch.Tensor:
    """Uniform INT4: two's complement -8..7 scaled so that ±absmax maps to ±7. Code -8 is never used."""
    return torch.arange(-8, 8, dtype=torch.float32) / 7


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map``): 256 sorted values in [-1, 1].

    A float-like code with a varying exponent: 10^-6, 10^-5, ..., 10^0 decades with 1, 2, 4, ..., 64
    fraction steps each (and their negatives), plus 0 and 1. Used to store the absmax constants in 8 bits.
    """
    data = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2                           # 2**i values in (0.1, 1)
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data + [0.0, 1.0]), dtype=torch.float32)


CODEBOOKS = {"nf4": normal_map(), "fp4": fp4_map(), "int4": int4_map()}
DYNAMIC = dynamic_map()
BLOCKSIZE = 64      # values per absmax constant (bitsandbytes' and QLoRA's default)
DQ_BLOCKSIZE = 256  # blocks of absmax constants under double quantisation, as in QLoRA


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index into ``code`` of the level nearest to each value (a tie goes to the lower level).

    The bin edges are the midpoints between sorted levels; the 8-bit map finds a value's bin by binary
    search (``torch.bucketize``), a 4-bit code book counts the edges below it, 15 comparisons a value::

        code(x) = code_0 + sum_j [x > edge_j] * (code_{j+1} - code_j)     (code_j: the j-th level's code)

    in fp32 over CPU chunks of 32K values (cache-sized, one thread each): ~5x faster than bucketize
    and ~2.5x faster than counting in bool/uint8 (``benchmarks/nf4.py``).
    """
    order = torch.argsort(code, stable=True)                           # the j-th level has code order[j]
    levels = code[order]
    edges = (levels[:-1] + levels[1:]) / 2                             # the bin edges
    flat = scaled.reshape(-1)
    if len(edges) > 15:                                                # the 8-bit map: binary search
        idx = torch.bucketize(flat, edges)
        return order.to(torch.uint8)[idx]
    crossings = list(zip(edges.unbind(), (order[1:] - order[:-1]).tolist()))  # (edge_j, code_{j+1} - code_j)
    idx = torch.empty(flat.shape, dtype=torch.uint8, device=flat.device)
    size = 1 << 15 if flat.device.type == "cpu" else flat.numel()     # one chunk on an accelerator
    count = torch.empty(min(size, flat.numel()), device=flat.device)   # fp32 buffers, reused per chunk
    above = torch.empty_like(count)
    for chunk, out in zip(flat.split(size), idx.split(size)):
        c, a = count[: chunk.numel()].fill_(int(order[0])), above[: chunk.numel()]
        for edge, step in crossings:                                   # edge: a 0-dim fp32 tensor
            c.add_(torch.gt(chunk, edge, out=a), alpha=step)           # a = 1.0 where x > edge, else 0.0
        out.copy_(c)                                                   # whole numbers 0..15: exact
    return idx


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``x`` to fp32, zero-pad to whole blocks: ``(blocks (n_blocks, blocksize), absmax (n_blocks,))``.

    ``max_i |x_i| = max(max_i x_i, -min_i x_i)``: two reductions and no ``abs`` copy of the tensor.
    """
    flat = x.detach().reshape(-1).float()
    if flat.numel() % blocksize:
        flat = F.pad(flat, (0, -flat.numel() % blocksize))            # zeros leave each absmax unchanged
    blocks = flat.view(-1, blocksize)                                  # (n_blocks, blocksize)
    return blocks, torch.maximum(blocks.amax(dim=1), -blocks.amin(dim=1))


def check_blocksize(blocksize, what: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"{what} must be a positive power of two, got {blocksize!r}")


def check_settings(blocksize, double_quant, quant_type) -> None:
    """The options of :func:`quantize` (and of a 4-bit layer's ``NF4Config``), refused naming the option."""
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if not isinstance(quant_type, str) or quant_type not in CODEBOOKS:
        raise ValueError(f"quant_type must be one of {sorted(CODEBOOKS)}, got {quant_type!r}")


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """8-bit blockwise absmax quantisation with :func:`dynamic_map`: ``(codes uint8 (n,), absmax (n_blocks,))``."""
    blocks, absmax = _blocks(x, blocksize)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]       # in [-1, 1]
    codes = _nearest(scaled, DYNAMIC.to(x.device))
    return codes[: x.numel()], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    values = F.pad(DYNAMIC.to(codes.device)[codes.long()], (0, -codes.numel() % blocksize))
    return (values.view(-1, blocksize) * absmax[:, None]).reshape(-1)[: codes.numel()]


@dataclass
class QuantState:
    """Everything needed to undo :func:`quantize`, besides the packed codes.

    Without double quantisation ``absmax`` holds one fp32 constant per block. With it, ``absmax`` holds
    uint8 codes of ``absmax - offset`` and ``absmax2`` one fp32 scale per 256 blocks.
    ``record`` is what :func:`quantize` saw: the fields and a :func:`checksum` of every tensor, packed
    codes included; :func:`dequantize` refuses a state that no longer matches it.
    """
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax: torch.Tensor
    offset: torch.Tensor | None = None     # fp32 scalar: the mean absmax, subtracted before 8-bit
    absmax2: torch.Tensor | None = None    # fp32, one per DQ_BLOCKSIZE blocks
    record: dict | None = field(default=None, repr=False)  # set by quantize(): see describe()

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (decoded from 8 bits under double quantisation)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax2) + self.offset

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors stored for this one weight (code books are shared constants, not counted)."""
        names = ("absmax", "offset", "absmax2")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def describe(self, packed: torch.Tensor) -> dict:
        """The fields, and the :func:`checksum` of ``packed`` and of each of the state's tensors."""
        return dict(shape=tuple(self.shape), dtype=self.dtype, blocksize=self.blocksize,
                    quant_type=self.quant_type, packed=checksum(packed),
                    **{k: None if getattr(self, k) is None else checksum(getattr(self, k))
                       for k in ("absmax", "offset", "absmax2")})


def quantize(x: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = False, quant_type: str = "nf4"):
    """Blockwise absmax 4-bit quantisation: ``(packed uint8 (ceil(n/2),), QuantState)``.

    Worked example (one block of 4): x = [1.0, -2.0, 0.0, 0.4] has absmax 2; scaled: [0.5, -1, 0, 0.2];
    nearest NF4 levels 0.4407 (code 12), -1 (code 0), 0 (code 7), 0.1609 (code 9); packed bytes
    12·16 + 0 = 192 and 7·16 + 9 = 121; dequantised: [0.8814, -2, 0, 0.3219].

    Blocks whose absmax is below 1e-38 (subnormal) are scaled as if it were 1e-38, as in bitsandbytes.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (torch.Tensor), got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() == 0:
        raise ValueError("x is empty: there is nothing to quantise")
    check_settings(blocksize, double_quant, quant_type)
    blocks, absmax = _blocks(x, blocksize)
    if not bool(torch.isfinite(absmax).all()):  # a NaN or inf anywhere makes its block's absmax NaN or inf
        raise ValueError("x contains NaN or infinite values, which cannot be quantised")
    # x / absmax, written as bitsandbytes writes it (multiply by the reciprocal) so the rounding agrees
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]       # (n_blocks, blocksize), in [-1, 1]
    scaled = scaled.reshape(-1)[: x.numel()]                           # (n,)
    if x.numel() % 2:
        scaled = F.pad(scaled, (0, 1))                                 # an even count (a padded 0): whole bytes
    codes = _nearest(scaled, CODEBOOKS[quant_type].to(x.device))      # uint8
    packed = (codes[0::2] << 4) | codes[1::2]                          # (ceil(n/2),): high nibble first
    state = QuantState(x.shape, x.dtype, blocksize, quant_type, absmax)
    if double_quant:
        state.offset = absmax.mean()
        state.absmax, state.absmax2 = quantize_blockwise_8bit(absmax - state.offset)
    state.record = state.describe(packed)
    return packed, state


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of ``packed`` as int64, two per byte, high nibble first: ``(2 * n_bytes,)``."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1).long()


def dequantize(packed: torch.Tensor, state: QuantState, check: bool = True) -> torch.Tensor:
    """Undo :func:`quantize`: level[code] · absmax, in the original shape and dtype.

    The fields are always checked against each other (:func:`check_state`). ``check=False`` skips the
    checks that read the data (finite absmax, the recorded checksums: a pass over the bytes and a
    device sync); the 4-bit layer, which keeps its codes and state together, uses it.
    """
    check_state(packed, state, values=check)
    # one look-up per byte gives both of its levels: pairs[b] = (level[b >> 4], level[b & 15]), each
    # pair stored as one 64-bit word so that the look-up is a fast 1-D index_select
    code = CODEBOOKS[state.quant_type].to(packed.device)
    pairs = code[unpack(torch.arange(256, dtype=torch.uint8, device=packed.device))]  # (512,) = 256 pairs
    values = pairs.view(torch.int64).index_select(0, packed.reshape(-1).int()).view(torch.float32)
    if values.numel() % state.blocksize:
        values = F.pad(values, (0, -values.numel() % state.blocksize)) # whole blocks
    absmax = state.block_absmax()
    values = values.view(-1, state.blocksize)[: absmax.numel()].mul_(absmax[:, None])  # (n_blocks, blocksize)
    return values.reshape(-1)[: state.numel].view(state.shape).to(state.dtype)


def storage_bits(packed: torch.Tensor, state: QuantState) -> float:
    """Bits per parameter, measured from the bytes actually stored: packed codes + per-block constants."""
    nbytes = packed.numel() * packed.element_size()
    nbytes += sum(t.numel() * t.element_size() for t in state.tensors().values())
    return 8 * nbytes / state.numel


# --- the checks: a state that does not describe its bytes is refused ------------------------------------


def checksum(t: torch.Tensor) -> int:
    """A cheap checksum of a tensor's bytes: their sum taken as int32 words (zero-padded to whole words).

    Summing 4 bytes at a time is ~5x faster than summing bytes; it catches any single changed byte and
    a state paired with another tensor's codes (the order of the words is not covered).
    """
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if b.numel() % 4 or b.storage_offset() % 4:
        b = torch.cat([b, b.new_zeros(-b.numel() % 4)])               # a fresh, aligned copy
    return int(b.view(torch.int32).sum(dtype=torch.int64))


def check_state(packed: torch.Tensor, state: QuantState, values: bool = True) -> None:
    """Refuse a ``(packed, state)`` pair that :func:`dequantize` would decode into garbage, naming the field.

    Always, from the fields alone: each field's type, and sizes that agree with each other and with the
    packed bytes. With ``values`` (a pass over the data): finite, non-negative constants, and the fields
    and checksums recorded by :func:`quantize`.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be the QuantState returned by quantize(), got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be the uint8 tensor returned by quantize(), got {getattr(packed, 'dtype', type(packed))}")
    if not isinstance(state.quant_type, str) or state.quant_type not in CODEBOOKS:
        raise ValueError(f"state.quant_type must be one of {sorted(CODEBOOKS)}, got {state.quant_type!r}")
    if not (isinstance(state.dtype, torch.dtype) and state.dtype.is_floating_point):
        raise ValueError(f"state.dtype must be a floating-point torch.dtype, got {state.dtype!r}")
    check_blocksize(state.blocksize, "state.blocksize")
    shape = state.shape
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and torch.Size(shape).numel() > 0):
        raise ValueError(f"state.shape must be a non-empty torch.Size, got {shape!r}")
    n = torch.Size(shape).numel()
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"state.shape {tuple(shape)} describes {n} values ({(n + 1) // 2} bytes) but packed "
                         f"has {packed.numel()} bytes: state is from another tensor")
    n_blocks = -(-n // state.blocksize)
    if (state.offset is None) != (state.absmax2 is None):
        raise ValueError("state.offset and state.absmax2 (double quantisation) must both be set or both be None, "
                         f"got offset {'None' if state.offset is None else 'set'}, "
                         f"absmax2 {'None' if state.absmax2 is None else 'set'}")
    absmax_dtype = torch.uint8 if state.double_quant else torch.float32
    if isinstance(state.absmax, torch.Tensor) and state.absmax.dtype in (torch.uint8, torch.float32) \
            and state.absmax.dtype != absmax_dtype:
        raise ValueError(f"state.absmax holds {state.absmax.dtype} values but state.offset and state.absmax2 are "
                         f"{'set' if state.double_quant else 'None'}: with double quantisation absmax holds uint8 "
                         "codes, without it fp32 constants")
    _check_field("state.absmax", state.absmax, absmax_dtype, n_blocks,
                 f"one per block of state.blocksize={state.blocksize} of the {n} values of state.shape")
    if state.double_quant:
        _check_field("state.offset", state.offset, torch.float32, 1, "the mean absmax")
        _check_field("state.absmax2", state.absmax2, torch.float32, -(-n_blocks // DQ_BLOCKSIZE),
                     f"one per {DQ_BLOCKSIZE} of the {n_blocks} absmax constants")
    if not values:
        return
    scales = {"state.absmax2": state.absmax2} if state.double_quant else {"state.absmax": state.absmax}
    for name, t in scales.items():
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative: it holds maxima of absolute values")
    if state.double_quant and not bool(torch.isfinite(state.offset).all()):
        raise ValueError(f"state.offset must be finite, got {state.offset.item()}")
    if state.record is not None:
        now = state.describe(packed)
        for key, then in state.record.items():
            if now.get(key) == then:
                continue
            if key == "packed":
                raise ValueError("packed does not match the checksum quantize() recorded in state: "
                                 "state is from another tensor, or the bytes were changed")
            if key in ("absmax", "offset", "absmax2"):
                raise ValueError(f"state.{key} was changed after quantize(): its checksum differs from "
                                 "the recorded one")
            raise ValueError(f"state.{key} was changed after quantize(): it is {now.get(key)!r}, "
                             f"quantize() recorded {then!r}")


def _check_field(name: str, t, dtype: torch.dtype, numel: int, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise ValueError(f"{name} must be a {dtype} tensor ({what}), got {getattr(t, 'dtype', type(t).__name__)}")
    if t.numel() != numel:
        raise ValueError(f"{name} must hold {numel} values ({what}), got {t.numel()}")
