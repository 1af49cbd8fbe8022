"""Memory: measured and predicted breakdowns, which GPU sizes hold them, the comparison plot.

Units: binary, GiB = 2**30 bytes (MiB = 2**20, KiB = 2**10). GPUs keep their names as sold, "a 24 GB GPU",
and such a card holds 24 GiB (NVIDIA's 16 / 24 / 40 / 48 / 80 GB cards carry that many GiB: nvidia-smi
reports 81,920 MiB for an 80 GB A100), so ``GPU_SIZES_GB`` is compared with totals in GiB.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")
MEMORY_COLORS = ("#4c72b0", "#dd8452", "#c44e52", "#55a868")
GPU_SIZES_GB = (16, 24, 40, 48, 80)  # as sold; each holds that many GiB
UNITS = {"KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}


def plot_memory_breakdown(breakdowns: dict, ax=None, unit: str = "MiB", title: str = "memory of one training step"):
    """Stacked bars of ``{label: MemoryBreakdown}``: weights, gradients, optimizer state, activations.
    ``unit``: "KiB", "MiB" or "GiB"."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    scale = UNITS[unit]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 * len(breakdowns) + 2.5, 3.5))
    labels = list(breakdowns)
    bottom = np.zeros(len(labels))
    for part, color in zip(MEMORY_PARTS, MEMORY_COLORS):
        values = np.array([breakdowns[k].parts()[part] / scale for k in labels])
        ax.bar(labels, values, bottom=bottom, color=color, label=part)
        bottom += values
    ax.set(ylabel=unit, title=title)
    ax.tick_params(axis="x", labelrotation=30)
    for t in ax.get_xticklabels():
        t.set_ha("right")
    ax.legend(fontsize=8)
    return fig


def gpu_fit(breakdown, sizes_gb=GPU_SIZES_GB) -> dict[int, bool]:
    """Which GPUs (sold as "N GB", holding N GiB) hold the step: ``{16: False, 24: True, ...}``."""
    return {g: breakdown.total <= g * 2 ** 30 for g in sizes_gb}


def memory_estimate(preset: str = "Llama-2-7B", method: str = "lora", r: int = 8, base_dtype: str = "bf16",
                    batch_size: int = 4, seq_len: int = 512, checkpointing: bool = False, optimizer: str = "adamw"):
    """The memory widget's numbers: ``(MemoryBreakdown, {GPU size: fits})`` from the formula."""
    from ..memory_formula import predict_memory
    options = {"r": r, "targets": "all-linear"} if method in ("lora", "qlora") else {}
    p = predict_memory(preset, method, batch_size, seq_len, base_dtype=base_dtype, checkpointing=checkpointing,
                       optimizer=optimizer, **options)
    return p, gpu_fit(p)


def plot_memory_estimate(preset: str = "Llama-2-7B", method: str = "lora", r: int = 8, base_dtype: str = "bf16",
                         batch_size: int = 4, seq_len: int = 512, checkpointing: bool = False,
                         optimizer: str = "adamw"):
    """One predicted stacked bar (GiB) with the common GPU sizes drawn across: what fits where."""
    p, fits = memory_estimate(preset, method, r, base_dtype, batch_size, seq_len, checkpointing, optimizer)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    name = "QLoRA" if (method, base_dtype) == ("lora", "nf4") else method
    label = name + (f" r={r}" if method in ("lora", "qlora") else "") + f", {base_dtype} base"
    extras = [name for name, on in (("checkpointing", checkpointing), (optimizer, optimizer != "adamw")) if on]
    label += "\n" + ", ".join(extras) if extras else ""
    plot_memory_breakdown({label: p}, ax=ax, unit="GiB", title="")
    ax.tick_params(axis="x", labelrotation=0)
    ax.get_xticklabels()[0].set_ha("center")
    top = max(p.total / 2 ** 30, 1.0)
    ymax = max(1.6 * top, min(fits) * 1.1)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(0, ymax)
    ax.legend(fontsize=8, loc="upper left")
    # one label per group of GPU lines closer than 6 % of the axis (they would print on top of each other)
    groups: list[list[int]] = []
    for g in sorted(g for g in fits if g <= ymax):
        ax.axhline(g, color="green" if fits[g] else "gray", ls="--", lw=1)
        if groups and g - groups[-1][-1] < 0.06 * ymax and fits[g] == fits[groups[-1][-1]]:
            groups[-1].append(g)
        else:
            groups.append([g])
    for group in groups:
        sizes = ", ".join(str(g) for g in group)
        ax.text(0.5, group[-1], f" {sizes} GB GPU {'fits' if fits[group[-1]] else 'too small'}", va="bottom",
                fontsize=8)
    fits_text = ", ".join(f"{g} GB" for g, ok in fits.items() if ok) or "none of the 16-80 GB GPUs"
    ax.set_title(f"{preset}, batch {batch_size} x {seq_len} tokens\ntotal {p.total / 2 ** 30:.1f} GiB; fits: {fits_text}",
                 fontsize=10)
    return fig


def plot_memory_scaling(model="Llama-2-7B", methods=None, batch_sizes=(1, 2, 4, 8, 16, 32, 64), seq_len: int = 512,
                        base_dtype: str = "bf16", ax=None):
    """Predicted total memory (GiB) against batch size, one line per method ``{label: (method, options)}``.

    The lines start far apart (weights, gradients, optimizer state) but rise with the same slope
    (activations), so at large batches the saving of a PEFT method shrinks in proportion.
    """
    from ..memory_formula import predict_memory
    methods = methods or {"full": ("full", {}), "LoRA r=8 (all linear)": ("lora", {"r": 8, "targets": "all-linear"})}
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.8))
    for label, (method, options) in methods.items():
        totals = [predict_memory(model, method, b, seq_len, base_dtype=base_dtype, **options).total / 2 ** 30
                  for b in batch_sizes]
        ax.plot(batch_sizes, totals, "o-", label=label)
    for i, g in enumerate(GPU_SIZES_GB):
        ax.axhline(g, color="gray", ls=":", lw=0.8,
                   label="GPUs: " + ", ".join(map(str, GPU_SIZES_GB)) + " GB" if i == 0 else None)
    ax.set(xlabel="batch size (sequences)", ylabel="GiB", ylim=(0, None),
           title=f"{model if isinstance(model, str) else 'model'}, {seq_len} tokens, {base_dtype} base")
    ax.legend(fontsize=8)
    return fig


def plot_comparison(results, axes=None):
    """Accuracy (mean +- std over seeds) against trainable parameters and against measured training memory."""
    fig, axes = (axes[0].figure, axes) if axes is not None else plt.subplots(1, 2, figsize=(11, 4))
    points = [(r, (r.trainable, r.memory.total / 2 ** 20)) for r in results]
    for i, ax in enumerate(axes):
        xs = [np.log10(x[i]) if i == 0 else x[i] for _, x in points]   # axis 0 is logarithmic
        span = (max(xs) - min(xs)) or 1.0
        for j, (r, x) in enumerate(points):
            ax.errorbar(x[i], r.mean, yerr=r.std, fmt="o", capsize=3, label=r.label)
            # two points close together: the lower one's label goes below it, so the two do not overlap
            lower = any(k != j and abs(xs[j] - xs[k]) < 0.08 * span and 0 <= points[k][0].mean - r.mean < 0.06
                        and (points[k][0].mean > r.mean or k < j) for k in range(len(points)))
            ax.annotate(r.key, (x[i], r.mean), textcoords="offset points", xytext=(5, -12 if lower else 4), fontsize=8)
        ax.margins(x=0.08)  # room for the rightmost label
    axes[0].set(xscale="log", xlabel="trainable parameters (log)", ylabel="exact match", title="accuracy vs trainable parameters")
    axes[1].set(xlabel="training memory of one step (MiB)", ylabel="exact match", title="accuracy vs memory")
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=7, loc="best")
    return fig
