"""NF4: code books, the normal bins, the NF4 bins widget's numbers and picture."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..nf4 import BLOCKSIZE


def plot_normal_bins(offset: float | None = None, ax=None):
    """The N(0, 1) density cut at the 16 NF4 levels (in standard deviations): neighbouring levels enclose
    equal probability, (offset - 1/2)/8 on the positive side and (offset - 1/2)/7 on the negative side."""
    import torch

    from .. import nf4
    offset = nf4.NF4_OFFSET if offset is None else offset
    sigma = torch.special.ndtri(torch.tensor(offset, dtype=torch.float64)).item()  # the largest level, in sd
    levels = nf4.normal_map(offset).double().numpy() * sigma
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3))
    z = np.linspace(-3.2, 3.2, 641)
    pdf = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
    ax.plot(z, pdf, color="k", lw=1)
    for i, (a, b) in enumerate(zip(levels[:-1], levels[1:])):
        inside = (z >= a) & (z <= b)
        ax.fill_between(z[inside], pdf[inside], color=f"C{i % 2}", alpha=0.35, lw=0)
    ax.vlines(levels, 0, np.exp(-levels ** 2 / 2) / np.sqrt(2 * np.pi), color="C3", lw=1)
    ax.set(xlabel="weight / standard deviation", ylabel="density",
           title=f"NF4 levels at normal quantiles (offset {offset:.7f}: the outermost at {sigma:.3f} sd)")
    fig.tight_layout()
    return fig


def plot_codebooks(codebooks: dict | None = None, ax=None):
    """The 16 levels of each 4-bit code book (NF4, FP4, INT4 by default) on [-1, 1], one row each."""
    from .. import nf4
    codebooks = nf4.CODEBOOKS if codebooks is None else codebooks
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 0.5 + 0.6 * len(codebooks)))
    for row, (name, code) in enumerate(codebooks.items()):
        used = np.unique(np.asarray(code, dtype=np.float64).clip(-1, 1))
        ax.plot(used, np.full_like(used, -row), "|", ms=18, mew=2, color=f"C{row}")
        ax.text(-1.08, -row, name, ha="right", va="center")
    ax.set(xlim=(-1.3, 1.05), ylim=(-len(codebooks) + 0.5, 0.5), yticks=[], xlabel="level (x / absmax)",
           title="16 codes, three ways to spend them")
    fig.tight_layout()
    return fig


def nf4_numbers(weight, block: int = 0, blocksize: int = BLOCKSIZE, quant_type: str = "nf4",
                double_quant: bool = False) -> dict:
    """What the NF4 bins widget shows: quantise the whole ``weight``, then look at block ``block``.

    Returns the block's values and absmax, the levels and bin edges in the block's units, its
    dequantised values, the relative RMS error ``||W - W_hat|| / ||W||`` of the block and of the
    whole tensor, and bits per parameter measured from the stored tensors.
    """
    import torch

    from .. import nf4
    w = weight.detach().float().cpu()
    packed, state = nf4.quantize(w, blocksize, double_quant, quant_type)
    n_blocks = state.block_absmax().numel()
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < n_blocks:
        raise ValueError(f"block must be an integer in [0, {n_blocks}), got {block!r}")
    w_hat = nf4.dequantize(packed, state)
    flat, flat_hat = w.reshape(-1), w_hat.reshape(-1)
    sl = slice(block * blocksize, min((block + 1) * blocksize, flat.numel()))
    absmax = state.block_absmax()[block].item()
    levels = torch.sort(nf4.CODEBOOKS[quant_type]).values.clamp(-1, 1).unique()

    def rel(a, b):
        return (a - b).norm().item() / max(a.norm().item(), 1e-30)

    return dict(values=flat[sl].numpy(), dequantized=flat_hat[sl].numpy(), absmax=absmax,
                unit_levels=levels.numpy(), levels=(levels * absmax).numpy(), edges=((levels[1:] + levels[:-1]) / 2 * absmax).numpy(),
                block_error=rel(flat[sl], flat_hat[sl]), tensor_error=rel(flat, flat_hat),
                bits_per_param=nf4.storage_bits(packed, state), n_blocks=n_blocks,
                scaled=(torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
                        / state.block_absmax().clamp(min=1e-30)[:, None]).reshape(-1)[: flat.numel()].numpy())


def plot_nf4_bins(weight, block: int = 0, blocksize: int = BLOCKSIZE, quant_type: str = "nf4",
                  double_quant: bool = False, layer: str = ""):
    """The NF4 bins widget's picture: one block's histogram with the levels (solid) and bin edges
    (dashed), and every value of the layer divided by its block's absmax, with the same levels."""
    num = nf4_numbers(weight, block, blocksize, quant_type, double_quant)
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    ax = axes[0]
    counts, _, _ = ax.hist(num["values"], bins=40, color="C0", alpha=0.7, label="block values")
    ax.vlines(num["levels"], 0, 1, transform=ax.get_xaxis_transform(), color="C3", lw=1.2, label="levels")
    ax.vlines(num["edges"], 0, 1, transform=ax.get_xaxis_transform(), color="gray", lw=0.8, ls="--",
              label="bin edges")
    ax.plot(num["values"], np.full(len(num["values"]), -0.03), "|", color="C0",
            transform=ax.get_xaxis_transform(), clip_on=False)
    ax.set(xlabel="weight", ylabel="count", title=f"block {block} of {num['n_blocks']}: absmax "
           f"{num['absmax']:.3f}, error {100 * num['block_error']:.1f} %")
    ax.set_ylim(0, 1.35 * counts.max())  # head room: the legend sits above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax = axes[1]
    ax.hist(num["scaled"], bins=200, range=(-1, 1), color="C1", alpha=0.7)
    ax.vlines(num["unit_levels"], 0, 1, transform=ax.get_xaxis_transform(),
              color="C3", lw=1.2)
    ax.set(xlabel="weight / its block's absmax", ylabel="count",
           title=f"whole layer: error {100 * num['tensor_error']:.2f} %, {num['bits_per_param']:.3f} bits/param")
    dq = " + double quant" if double_quant else ""
    fig.suptitle(f"{layer} {quant_type.upper()}, blocksize {blocksize}{dq}".strip())
    fig.tight_layout()
    return fig
