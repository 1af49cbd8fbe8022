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
