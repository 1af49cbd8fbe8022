"""Plain matplotlib functions used by the notebooks (and by the widgets in :mod:`minipeft.widgets`).

Each function takes numbers or a model and returns a ``matplotlib.figure.Figure`` (or the numbers it
draws), so it can be unit-tested without a screen and wired to sliders without re-running anything.
One file per topic: ``general`` (training curves, attention, sweeps), ``memory``, ``lora``, ``nf4``;
everything is importable from ``minipeft.plots``.
"""
from .general import (plot_attention, plot_histories, plot_param_footprint, plot_sweep, plot_sweep_selection,
                      sweep_numbers)
from .lora import energy_top_r, lowrank_numbers, phi_curve, plot_energy_curves, plot_lowrank, singular_values
from .memory import (GPU_SIZES_GB, MEMORY_COLORS, MEMORY_PARTS, gpu_fit, memory_estimate, plot_comparison,
                     plot_memory_breakdown, plot_memory_estimate, plot_memory_scaling)
from .nf4 import nf4_numbers, plot_codebooks, plot_nf4_bins, plot_normal_bins

__all__ = [
    "plot_histories", "plot_attention", "plot_sweep", "sweep_numbers", "plot_sweep_selection", "plot_param_footprint",
    "singular_values", "energy_top_r", "lowrank_numbers", "plot_energy_curves", "phi_curve", "plot_lowrank",
    "MEMORY_PARTS", "MEMORY_COLORS", "GPU_SIZES_GB", "plot_memory_breakdown", "gpu_fit", "memory_estimate",
    "plot_memory_estimate", "plot_memory_scaling", "plot_comparison",
    "plot_normal_bins", "plot_codebooks", "nf4_numbers", "plot_nf4_bins",
]
