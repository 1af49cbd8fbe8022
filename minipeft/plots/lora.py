"""LoRA: spectra of weight updates and the low-rank widget's numbers and picture."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..lora import subspace_similarity


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
    """``phi(LoRA, full, min(i, j), j)`` for each j in ``ranks`` (``i``: default all of LoRA's directions):
    :func:`minipeft.lora.subspace_similarity`, each SVD done once."""
    i = min(_np(delta_lora).shape) if i is None else i
    ranks = [int(j) for j in ranks]
    return np.array(subspace_similarity(_np(delta_lora), _np(delta_full), [min(i, j) for j in ranks], ranks))


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
