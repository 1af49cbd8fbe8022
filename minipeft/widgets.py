"""Thin ipywidgets front ends: each wires sliders to a plain, unit-tested function of :mod:`minipeft.plots`.

Headless runs (CI, nbval) never move a slider, which is why the work lives in those functions.
"""
from __future__ import annotations


def _show(fig):
    """Draw ``fig`` into the current output area and close it (works with any matplotlib backend)."""
    import matplotlib.pyplot as plt
    from IPython.display import display
    display(fig)
    plt.close(fig)


# --- memory ---------------------------------------------------------------------------------------


def memory_widget():
    """Model preset, method, LoRA rank, base precision, batch and sequence length -> the predicted bar
    and the GPU sizes it fits (:func:`minipeft.plots.plot_memory_estimate`)."""
    import ipywidgets as w
    from IPython.display import display

    from .methods import METHODS
    from .presets import PRESETS
    from .plots import plot_memory_estimate

    controls = dict(
        preset=w.Dropdown(options=list(PRESETS), value="Llama-2-7B", description="model"),
        method=w.Dropdown(options=list(METHODS), value="lora", description="method"),
        r=w.Dropdown(options=[1, 2, 4, 8, 16, 32, 64, 128], value=8, description="LoRA rank"),
        base_dtype=w.ToggleButtons(options=["fp32", "bf16", "nf4"], value="bf16", description="base weights",
                                   style={"description_width": "initial", "button_width": "64px"},
                                   tooltips=["32-bit", "16-bit (bfloat16)", "4-bit NF4 (with LoRA: QLoRA)"]),
        batch_size=w.IntSlider(value=4, min=1, max=64, description="batch"),
        seq_len=w.Dropdown(options=[128, 256, 512, 1024, 2048, 4096], value=512, description="tokens"),
    )
    out = w.Output()

    def draw(**kwargs):
        out.clear_output(wait=True)
        with out:
            try:
                fig = plot_memory_estimate(**kwargs)
            except ValueError as e:  # a combination the formula refuses, e.g. full fine-tuning of 4-bit weights
                print(e)
                return
            _show(fig)

    def rank_only_for_lora(change):
        controls["r"].disabled = change["new"] != "lora"

    controls["method"].observe(rank_only_for_lora, names="value")
    w.interactive_output(draw, controls)
    display(w.VBox([w.HBox([controls["preset"], controls["method"], controls["r"]]), controls["base_dtype"],
                    w.HBox([controls["batch_size"], controls["seq_len"]]), out]))


# --- LoRA -----------------------------------------------------------------------------------------


def lowrank_widget(deltas_full: dict, deltas_lora: dict, r: int = 8, max_rank: int = 64):
    """A layer menu and a rank slider over :func:`minipeft.plots.plot_lowrank`.

    ``deltas_full`` / ``deltas_lora``: ``{layer name: dW}`` from full fine-tuning and from LoRA (the
    layers present in both are offered)."""
    import ipywidgets as w
    from IPython.display import display

    from .plots import plot_lowrank

    layers = [name for name in deltas_lora if name in deltas_full]
    controls = dict(layer=w.Dropdown(options=layers, value=layers[0], description="layer"),
                    r=w.IntSlider(value=r, min=1, max=max_rank, description="rank r"))
    out = w.Output()

    def draw(layer, r):
        out.clear_output(wait=True)
        with out:
            _show(plot_lowrank(deltas_full[layer], deltas_lora[layer], r, layer, max_rank))

    w.interactive_output(draw, controls)
    display(w.VBox([w.HBox([controls["layer"], controls["r"]]), out]))


# --- NF4 ------------------------------------------------------------------------------------------


def nf4_bins_widget(weights: dict, blocksize: int = 64):
    """Layer, block, block size, code book and double quantisation over :func:`minipeft.plots.plot_nf4_bins`.

    ``weights``: ``{layer name: weight tensor}``."""
    import ipywidgets as w
    from IPython.display import display

    from .plots import plot_nf4_bins

    names = list(weights)
    controls = dict(
        layer=w.Dropdown(options=names, value=names[0], description="layer"),
        block=w.IntSlider(value=0, min=0, max=weights[names[0]].numel() // blocksize - 1, description="block"),
        blocksize=w.Dropdown(options=[16, 32, 64, 128, 256, 1024, 4096], value=blocksize, description="block size"),
        quant_type=w.ToggleButtons(options=["nf4", "fp4", "int4"], value="nf4", description="code book"),
        double_quant=w.Checkbox(value=False, description="double quantisation"),
    )
    out = w.Output()

    def draw(layer, block, blocksize, quant_type, double_quant):
        n_blocks = -(-weights[layer].numel() // blocksize)
        controls["block"].max = n_blocks - 1  # the slider follows the layer and the block size
        out.clear_output(wait=True)
        with out:
            _show(plot_nf4_bins(weights[layer], min(block, n_blocks - 1), blocksize, quant_type, double_quant, layer))

    w.interactive_output(draw, controls)
    display(w.VBox([w.HBox([controls["layer"], controls["blocksize"], controls["double_quant"]]),
                    w.HBox([controls["block"], controls["quant_type"]]), out]))


# --- prompt tuning, prefix tuning, adapters ----------------------------------------------------------


def sweep_widget(x, values, histories=None, xlabel: str = "", ylabel: str = "exact match", title: str = ""):
    """A slider over the stored sweep ``x`` (for example the number of virtual tokens) redrawing
    :func:`minipeft.plots.plot_sweep_selection`; nothing is retrained."""
    import ipywidgets as w
    from IPython.display import display

    from .plots import plot_sweep_selection

    slider = w.SelectionSlider(options=list(x), value=list(x)[-1], description=xlabel or "x")
    out = w.Output()

    def draw(selected):
        out.clear_output(wait=True)
        with out:
            _show(plot_sweep_selection(x, values, selected, histories, xlabel, ylabel, title))

    w.interactive_output(draw, dict(selected=slider))
    display(w.VBox([slider, out]))
