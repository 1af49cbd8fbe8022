"""Training curves, attention maps, sweeps (accuracy against a setting) and parameter footprints."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def plot_histories(histories: dict, ax=None, smooth: int = 10, title: str = "training loss"):
    """Loss curves of several runs, ``{label: History}``, smoothed by a moving average of ``smooth`` steps."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    for label, hist in histories.items():
        ax.plot(*_smoothed(hist.loss, smooth), label=label)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    return fig


def _smoothed(loss, k: int):
    """``(steps, moving average of the loss over k steps)``."""
    loss = np.asarray(loss)
    k = max(1, min(k, len(loss)))
    return np.arange(k, len(loss) + 1), np.convolve(loss, np.ones(k) / k, mode="valid")


def plot_attention(weights, labels_q, labels_k=None, ax=None, title: str = "attention weights",
                   colorbar: bool | None = None):
    """Heat map of one head's attention ``weights`` (T_query, T_key) with characters on the axes.
    ``colorbar``: draw its colour bar (default: only on a figure of its own; on a caller's axes the caller
    may want one bar shared by several maps, all drawn on the same 0..1 scale)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 4))
    labels_k = labels_q if labels_k is None else labels_k
    image = ax.imshow(np.asarray(weights), cmap="viridis", vmin=0, vmax=1)
    if colorbar or (colorbar is None and len(fig.axes) == 1):
        fig.colorbar(image, ax=ax, label="attention weight")
    ax.set_xticks(range(len(labels_k)), labels_k, fontsize=8)
    ax.set_yticks(range(len(labels_q)), labels_q, fontsize=8)
    ax.set(xlabel="key (attended to)", ylabel="query (attending)", title=title)
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
        mean, std = v.mean(0), v.std(0, ddof=1 if len(v) > 1 else 0)  # sample std over seeds
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label, color=f"C{i}")
        if best:
            b = int(np.argmax(mean) if best == "max" else np.argmin(mean))
            ax.plot(xs[b], mean[b], "*", ms=16, color=f"C{i}", markeredgecolor="k", zorder=5)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return fig


def sweep_numbers(x, values, selected) -> dict:
    """Mean and sample std (ddof 1, as everywhere in the course) over seeds of ``values`` (n_seeds, len(x))
    at each x, and at the ``selected`` x; the std is 0 for one seed."""
    v = np.asarray(values, dtype=float).reshape(-1, len(x))
    i = list(x).index(selected)
    ddof = 1 if v.shape[0] > 1 else 0
    return dict(mean=v.mean(0), std=v.std(0, ddof=ddof), index=i, selected_mean=float(v[:, i].mean()),
                selected_std=float(v[:, i].std(ddof=ddof)), n_seeds=v.shape[0])


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
            axes[0, 1].plot(*_smoothed(hist.loss, 10), label=f"seed {k}")
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
