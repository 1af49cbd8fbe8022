"""Plain matplotlib functions used by the notebooks (and by the widgets in :mod:`minipeft.widgets`).

Each function takes numbers or a model and returns a ``matplotlib.figure.Figure`` (or the numbers it
draws), so it can be unit-tested without a screen and wired to sliders without re-running anything.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

# --- general: training curves, attention -----------------------------------------------------------


def plot_histories(histories: dict, ax=None, smooth: int = 10, title: str = "training loss"):
    """Loss curves of several runs, ``{label: History}``, smoothed by a moving average of ``smooth`` steps."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    for label, hist in histories.items():
        loss = np.asarray(hist.loss)
        k = max(1, min(smooth, len(loss)))
        ax.plot(np.arange(k, len(loss) + 1), np.convolve(loss, np.ones(k) / k, mode="valid"), label=label)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    return fig


def plot_attention(weights, labels_q, labels_k=None, ax=None, title: str = "attention weights"):
    """Heat map of one head's attention ``weights`` (T_query, T_key) with characters on the axes."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 4))
    labels_k = labels_q if labels_k is None else labels_k
    ax.imshow(np.asarray(weights), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels_k)), labels_k, fontsize=8)
    ax.set_yticks(range(len(labels_q)), labels_q, fontsize=8)
    ax.set(xlabel="key (attended to)", ylabel="query (attending)", title=title)
    return fig


# --- memory: measured and predicted breakdowns, GPU fit, the comparison ------------------------------

MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")
MEMORY_COLORS = ("#4c72b0", "#dd8452", "#c44e52", "#55a868")
GPU_SIZES_GB = (16, 24, 40, 80)


def plot_memory_breakdown(breakdowns: dict, ax=None, unit: str = "MB", title: str = "memory of one training step"):
    """Stacked bars of ``{label: MemoryBreakdown}``: weights, gradients, optimizer state, activations."""
    scale = {"kB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30}[unit]
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
    """Which GPU memory sizes (GB, 2^30 bytes) hold the step: ``{16: False, 24: True, ...}``."""
    return {g: breakdown.total <= g * 2 ** 30 for g in sizes_gb}


def memory_estimate(preset: str = "Llama-2-7B", method: str = "lora", r: int = 8, base_dtype: str = "bf16",
                    batch_size: int = 4, seq_len: int = 512):
    """The memory widget's numbers: ``(MemoryBreakdown, {GPU GB: fits})`` from the formula."""
    from .memory_formula import predict_memory
    options = {"r": r, "targets": "all-linear"} if method in ("lora", "qlora") else {}
    p = predict_memory(preset, method, batch_size, seq_len, base_dtype=base_dtype, **options)
    return p, gpu_fit(p)


def plot_memory_estimate(preset: str = "Llama-2-7B", method: str = "lora", r: int = 8, base_dtype: str = "bf16",
                         batch_size: int = 4, seq_len: int = 512):
    """One predicted stacked bar (GB) with the common GPU sizes drawn across: what fits where."""
    p, fits = memory_estimate(preset, method, r, base_dtype, batch_size, seq_len)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    name = "QLoRA" if (method, base_dtype) == ("lora", "nf4") else method
    label = name + (f" r={r}" if method in ("lora", "qlora") else "") + f", {base_dtype} base"
    plot_memory_breakdown({label: p}, ax=ax, unit="GB", title="")
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
        ax.text(0.5, group[-1], f" {sizes} GB {'fits' if fits[group[-1]] else 'too small'}", va="bottom", fontsize=8)
    fits_text = ", ".join(f"{g} GB" for g, ok in fits.items() if ok) or "none of 16/24/40/80 GB"
    ax.set_title(f"{preset}, batch {batch_size} x {seq_len} tokens\ntotal {p.total / 2 ** 30:.1f} GB; fits: {fits_text}",
                 fontsize=10)
    return fig


def plot_memory_scaling(model="Llama-2-7B", methods=None, batch_sizes=(1, 2, 4, 8, 16, 32, 64), seq_len: int = 512,
                        base_dtype: str = "bf16", ax=None):
    """Predicted total memory (GB) against batch size, one line per method ``{label: (method, options)}``.

    The lines start far apart (weights, gradients, optimizer state) but rise with the same slope
    (activations), so at large batches the saving of a PEFT method shrinks in proportion.
    """
    from .memory_formula import predict_memory
    methods = methods or {"full": ("full", {}), "LoRA r=8 (all linear)": ("lora", {"r": 8, "targets": "all-linear"})}
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.8))
    for label, (method, options) in methods.items():
        totals = [predict_memory(model, method, b, seq_len, base_dtype=base_dtype, **options).total / 2 ** 30
                  for b in batch_sizes]
        ax.plot(batch_sizes, totals, "o-", label=label)
    for i, g in enumerate(GPU_SIZES_GB):
        ax.axhline(g, color="gray", ls=":", lw=0.8,
                   label="GPU memory: " + ", ".join(map(str, GPU_SIZES_GB)) + " GB" if i == 0 else None)
    ax.set(xlabel="batch size (sequences)", ylabel="GB", ylim=(0, None),
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
    axes[1].set(xlabel="training memory of one step (MB)", ylabel="exact match", title="accuracy vs memory")
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=7, loc="best")
    return fig


# --- LoRA: spectra of weight updates, the low-rank widget, sweeps -----------------------------------


def singular_values(delta) -> np.ndarray:
    """Singular values of a weight update ``delta`` (tensor or array), largest first, in float64."""
    return np.linalg.svd(_np(delta), compute_uv=False)


def _np(a) -> np.ndarray:
    return np.asarray(a.detach().cpu().double() if hasattr(a, "detach") else a, dtype=np.float64)


def energy_top_r(s, r: int) -> float:
    """Share of the update's energy (squared Frobenius norm) in its top ``r`` directions:
    ``sum(s[:r]^2) / sum(s^2)``. By Eckart-Young the best rank-r approximation then misses
    ``||dW - dW_r||_F / ||dW||_F = sqrt(1 - energy)``."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    return float(s2[:r].sum() / s2.sum()) if s2.sum() > 0 else 1.0


def lowrank_numbers(delta_full, delta_lora, r: int) -> dict:
    """The numbers the low-rank widget shows for rank ``r``.

    ``energy``/``rel_error``: the full update's top r directions and its best rank-r approximation;
    ``random_energy``: the same for a Gaussian matrix of that shape (no structure at all); ``phi``:
    subspace similarity of the LoRA update's top min(r, its rank) directions with the full update's
    top r, and ``chance``, what random directions would give (r / d).
    """
    from .lora import subspace_similarity
    full, lora = _np(delta_full), _np(delta_lora)
    s_full, s_lora = singular_values(full), singular_values(lora)
    lora_rank = int((s_lora > 1e-6 * s_lora[0]).sum()) if s_lora[0] > 0 else 0
    energy = energy_top_r(s_full, r)
    noise = np.random.default_rng(0).standard_normal(full.shape)
    phi = subspace_similarity(lora, full, min(lora_rank, r), r) if lora_rank else 0.0
    return dict(r=r, energy=energy, rel_error=float(np.sqrt(max(0.0, 1 - energy))),
                random_energy=energy_top_r(singular_values(noise), r), lora_rank=lora_rank, phi=phi,
                chance=min(1.0, r / full.shape[0]))


def plot_energy_curves(deltas: dict, r: int = 8, ax=None, max_rank: int = 128):
    """Cumulative energy of each update's top-k directions vs k, one curve per layer (coloured by
    the layer's kind, the last part of its name), with a random matrix of each shape for comparison."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4))
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in deltas))
    shapes = {}
    for name, delta in deltas.items():
        kind = name.rsplit(".", 1)[-1]
        s2 = singular_values(delta) ** 2
        k = np.arange(1, min(max_rank, len(s2)) + 1)
        ax.plot(k, np.cumsum(s2)[:len(k)] / s2.sum(), color=f"C{kinds.index(kind)}", alpha=0.7,
                label=kind if kind not in shapes else None)
        shapes.setdefault(kind, np.shape(_np(delta)))
    for shape in dict.fromkeys(shapes.values()):
        s2 = singular_values(np.random.default_rng(0).standard_normal(shape)) ** 2
        k = np.arange(1, min(max_rank, len(s2)) + 1)
        ax.plot(k, np.cumsum(s2)[:len(k)] / s2.sum(), "--", color="gray",
                label=f"random {shape[0]}x{shape[1]} matrix")
    ax.axvline(r, color="k", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="number of top directions k", ylabel="share of the update's energy",
           ylim=(0, 1.02), title="how much of $\\Delta W$ its top k directions hold")
    ax.legend(fontsize=8, ncol=2)
    return fig


def phi_curve(delta_lora, delta_full, ranks, i: int | None = None) -> np.ndarray:
    """``phi(LoRA, full, min(i, j), j)`` for each j in ``ranks`` (``i``: default all of LoRA's directions),
    the subspace similarity of :func:`minipeft.lora.subspace_similarity` with each SVD done once."""
    U_lora = np.linalg.svd(_np(delta_lora), full_matrices=False)[0]
    U_full = np.linalg.svd(_np(delta_full), full_matrices=False)[0]
    i = U_lora.shape[1] if i is None else i
    overlap = (U_lora.T @ U_full) ** 2  # (k, k): squared cosines between the two sets of directions
    return np.array([overlap[:min(i, j), :j].sum() / min(i, j) for j in ranks])


def plot_lowrank(delta_full, delta_lora, r: int, layer: str = "", max_rank: int = 64):
    """The low-rank widget's picture for one layer and rank ``r``: spectra, rank-r error, similarity."""
    num = lowrank_numbers(delta_full, delta_lora, r)
    full, lora = _np(delta_full), _np(delta_lora)
    s_full, s_lora = singular_values(full), singular_values(lora)
    s_noise = singular_values(np.random.default_rng(0).standard_normal(full.shape))
    ranks = np.arange(1, min(max_rank, len(s_full)) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))

    ax = axes[0]
    ax.plot(ranks, s_full[:len(ranks)], ".-", color="C0", label="full fine-tuning $\\Delta W$")
    k = num["lora_rank"]
    ax.plot(np.arange(1, k + 1), s_lora[:k], "o-", color="C1", label=f"LoRA $\\Delta W$ (rank {k})")
    ax.axvspan(0.5, r + 0.5, color="C0", alpha=0.12)
    ax.set(yscale="log", xlabel="direction (strongest first)", ylabel="singular value",
           title=f"top {r} directions: {100 * num['energy']:.0f} % of the full update")
    ax.legend(fontsize=8)

    ax = axes[1]
    ax.plot(ranks, [np.sqrt(max(0.0, 1 - energy_top_r(s_full, j))) for j in ranks], color="C0",
            label="full fine-tuning $\\Delta W$")
    ax.plot(ranks, [np.sqrt(max(0.0, 1 - energy_top_r(s_noise, j))) for j in ranks], "--", color="gray",
            label="random matrix (no structure)")
    ax.plot([r], [num["rel_error"]], "o", color="C3")
    ax.set(xlabel="rank r", ylabel="relative error of best rank-r copy", ylim=(0, 1.02),
           title=f"a rank-{r} copy misses {100 * num['rel_error']:.0f} % of it")
    ax.legend(fontsize=8)

    ax = axes[2]
    if k:
        ax.plot(ranks, phi_curve(lora, full, ranks, k), color="C1", label=f"LoRA's top min(j, {k}) directions")
        ax.plot(ranks, phi_curve(lora, full, ranks, 1), color="C2", label="LoRA's strongest direction")
        ax.plot(ranks, [min(1.0, j / full.shape[0]) for j in ranks], "--", color="gray",
                label="chance (random directions)")
        ax.plot([r], [num["phi"]], "o", color="C3")
        ax.legend(fontsize=8)
    ax.set(xlabel="top j directions of full fine-tuning", ylabel="subspace similarity $\\phi$",
           ylim=(0, 1.02), title=f"LoRA inside full's top {r}: $\\phi$ = {num['phi']:.2f} "
                                 f"(chance {num['chance']:.2f})")
    fig.suptitle(f"{layer}: how low-rank is the update?" if layer else "how low-rank is the update?")
    fig.tight_layout()
    return fig


def plot_sweep(x, results: dict, xlabel: str, ylabel: str = "exact match", logx: bool = True,
               ax=None, title: str = "", best: str | None = None):
    """Mean +- std over seeds per curve: ``results = {label: array (n_seeds, len(x))}``, or with
    ``x=None`` each curve brings its own x, ``{label: (x, array)}``. ``best="max"`` (or ``"min"``)
    stars each curve's best point."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.8))
    for i, (label, values) in enumerate(results.items()):
        xs, values = (x, values) if x is not None else values
        v = np.asarray(values, dtype=float).reshape(-1, len(xs))
        mean, std = v.mean(0), v.std(0)
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label, color=f"C{i}")
        if best:
            b = int(np.argmax(mean) if best == "max" else np.argmin(mean))
            ax.plot(xs[b], mean[b], "*", ms=16, color=f"C{i}", markeredgecolor="k", zorder=5)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return fig


# --- NF4: code books, the normal bins, the NF4 bins widget ------------------------------------------


def plot_normal_bins(offset: float | None = None, ax=None):
    """The N(0, 1) density cut at the 16 NF4 levels (in standard deviations): neighbouring levels enclose
    equal probability, (offset - 1/2)/8 on the positive side and (offset - 1/2)/7 on the negative side."""
    import torch

    from . import nf4
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
    from . import nf4
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


def nf4_numbers(weight, block: int = 0, blocksize: int = 64, quant_type: str = "nf4",
                double_quant: bool = False) -> dict:
    """What the NF4 bins widget shows: quantise the whole ``weight``, then look at block ``block``.

    Returns the block's values and absmax, the levels and bin edges in the block's units, its
    dequantised values, the relative RMS error ``||W - W_hat|| / ||W||`` of the block and of the
    whole tensor, and bits per parameter measured from the stored tensors.
    """
    import torch

    from . import nf4
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


def plot_nf4_bins(weight, block: int = 0, blocksize: int = 64, quant_type: str = "nf4",
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


# --- prompt tuning, prefix tuning, adapters: stored sweeps, parameter footprints --------------------


def sweep_numbers(x, values, selected) -> dict:
    """Mean and std over seeds of ``values`` (n_seeds, len(x)) at each x, and at the ``selected`` x."""
    v = np.asarray(values, dtype=float).reshape(-1, len(x))
    i = list(x).index(selected)
    return dict(mean=v.mean(0), std=v.std(0), index=i, selected_mean=float(v[:, i].mean()),
                selected_std=float(v[:, i].std()), n_seeds=v.shape[0])


def plot_sweep_selection(x, values, selected, histories=None, xlabel: str = "", ylabel: str = "exact match",
                         title: str = ""):
    """The sweep widget's picture: mean +- std over x with ``selected`` highlighted (left) and, given
    ``histories = {x: [History, ...]}``, the loss curves of the selected runs (right)."""
    num = sweep_numbers(x, values, selected)
    fig, axes = plt.subplots(1, 2 if histories else 1, figsize=(11 if histories else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.errorbar(range(len(x)), num["mean"], yerr=num["std"], marker="o", capsize=3)
    ax.plot(num["index"], num["selected_mean"], "o", ms=14, mfc="none", mec="C3", mew=2)
    ax.set_xticks(range(len(x)), [str(v) for v in x])
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.05, 1.05),
           title=f"{title} {xlabel}={selected}: {num['selected_mean']:.2f} ± {num['selected_std']:.2f} "
                 f"({num['n_seeds']} seed{'s' * (num['n_seeds'] > 1)})".strip())
    if histories:
        for k, hist in enumerate(histories[selected]):
            loss = np.asarray(hist.loss)
            w = max(1, min(10, len(loss)))
            axes[0, 1].plot(np.arange(w, len(loss) + 1), np.convolve(loss, np.ones(w) / w, mode="valid"),
                            label=f"seed {k}")
        axes[0, 1].set(xlabel="step", ylabel="loss", yscale="log", title=f"training loss, {xlabel}={selected}")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_param_footprint(counts: dict, total: int, ax=None, title: str = "trainable parameters"):
    """Horizontal bars of trainable parameters per method (log scale), labelled with % of ``total``."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 0.45 * len(counts) + 1.2))
    labels, n = list(counts), np.array(list(counts.values()), dtype=float)
    ax.barh(range(len(n)), n, color=[f"C{i}" for i in range(len(n))])
    for i, v in enumerate(n):
        ax.text(v * 1.1, i, f"{int(v):,} ({100 * v / total:.2f} %)", va="center", fontsize=8)
    ax.set_yticks(range(len(n)), labels)
    ax.invert_yaxis()
    ax.set(xscale="log", xlim=(n.min() / 2, n.max() * 20), xlabel=f"trainable parameters (log; base: {total:,})",
           title=title)
    return fig
