"""Thin ipywidgets front ends: each wires sliders to a plain, unit-tested function of :mod:`minipeft.plots`.

Headless runs (CI, nbval) never move a slider, which is why the work lives in those functions.

Each function returns its widget (a notebook cell ending with the call shows it). The widget is shown with
a PNG of its figure next to the widget view: a front end that cannot run widgets (a notebook JupyterLab does
not trust, which is every freshly cloned one; GitHub; nbviewer) shows that picture instead of the text
``VBox(children=...``. A trusted notebook stored with its widget state
(``--ExecutePreprocessor.store_widget_state=True``) draws the widget itself from that state.
"""
from __future__ import annotations

import base64
import io

import ipywidgets as w
from IPython.display import Image, display


class _WithPicture:
    """Adds the PNG of ``self._picture()`` (if any) to the widget's display bundle."""

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        png = self._picture()
        if png is not None:
            bundle["image/png"] = base64.b64encode(png).decode()
        return bundle


class _FigureBox(_WithPicture, w.VBox):
    """Rows of controls above an ``Output`` holding ``plot(**values)``, redrawn on every change (after
    ``before(**values)``, for controls that follow others)."""

    def __init__(self, rows, controls: dict, plot, before=None):
        self._out, self._png, self._plot, self._before = w.Output(), None, plot, before
        super().__init__([*rows, self._out])
        w.interactive_output(self._draw, controls)

    def _picture(self):
        return self._png

    def _draw(self, **values):
        """Replace the figure with ``plot(**values)`` (a ValueError from it is printed instead)."""
        import matplotlib.pyplot as plt

        if self._before:
            self._before(**values)
        self._out.clear_output(wait=True)  # the old figure stays until the new one is shown: no flicker
        with self._out:
            try:
                fig = self._plot(**values)
            except ValueError as e:  # a combination the formula refuses, e.g. full fine-tuning of 4-bit weights
                self._png = None
                print(e)
                return
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", bbox_inches="tight")  # rendered once, whatever the backend
            plt.close(fig)
            self._png = buffer.getvalue()
            display(Image(self._png))


class _Tabs(_WithPicture, w.Tab):
    """Tabs of figure widgets; the picture is the open tab's."""

    def _picture(self):
        return self.children[self.selected_index or 0]._picture()


def dashboard(deltas_full: dict, deltas_lora: dict, weights: dict, r: int = 8) -> w.Tab:
    """The lecture's three widgets in tabs: low-rank updates, NF4 bins, memory (arguments as there)."""
    pages = {"Low-rank updates": lowrank_widget(deltas_full, deltas_lora, r), "NF4 bins": nf4_bins_widget(weights),
             "Memory": memory_widget()}
    return _Tabs(children=list(pages.values()), titles=list(pages), layout=w.Layout(width="100%"))


# --- memory ---------------------------------------------------------------------------------------


def memory_widget() -> w.VBox:
    """Model preset, method, LoRA rank, base precision, gradient checkpointing, batch, sequence length and
    optimizer -> the predicted bar and the GPU sizes it fits (:func:`minipeft.plots.plot_memory_estimate`)."""
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
        checkpointing=w.Checkbox(value=False, description="gradient checkpointing"),
        batch_size=w.IntSlider(value=4, min=1, max=64, description="batch"),
        seq_len=w.Dropdown(options=[128, 256, 512, 1024, 2048, 4096], value=512, description="tokens"),
        optimizer=w.Dropdown(options=[("AdamW, fp32 state", "adamw"), ("8-bit AdamW", "adamw8bit"),
                                      ("paged 8-bit AdamW", "paged_adamw8bit")], value="adamw",
                             description="optimizer"),
    )

    def rank_only_for_lora(method, **_):
        controls["r"].disabled = method != "lora"

    return _FigureBox([w.HBox([controls["preset"], controls["method"], controls["r"]]),
                       w.HBox([controls["base_dtype"], controls["checkpointing"]]),
                       w.HBox([controls["batch_size"], controls["seq_len"], controls["optimizer"]])],
                      controls, plot_memory_estimate, before=rank_only_for_lora)


# --- LoRA -----------------------------------------------------------------------------------------


def lowrank_widget(deltas_full: dict, deltas_lora: dict, r: int = 8, max_rank: int = 64) -> w.VBox:
    """A layer menu and a rank slider over :func:`minipeft.plots.plot_lowrank`.

    ``deltas_full`` / ``deltas_lora``: ``{layer name: dW}`` from full fine-tuning and from LoRA (the
    layers present in both are offered)."""
    from .plots import plot_lowrank

    layers = [name for name in deltas_lora if name in deltas_full]
    controls = dict(layer=w.Dropdown(options=layers, value=layers[0], description="layer"),
                    r=w.IntSlider(value=r, min=1, max=max_rank, description="rank r"))

    def plot(layer, r):
        return plot_lowrank(deltas_full[layer], deltas_lora[layer], r, layer, max_rank)

    return _FigureBox([w.HBox([controls["layer"], controls["r"]])], controls, plot)


# --- NF4 ------------------------------------------------------------------------------------------


def nf4_bins_widget(weights: dict, blocksize: int = 64) -> w.VBox:
    """Layer, block, block size, code book and double quantisation over :func:`minipeft.plots.plot_nf4_bins`.

    ``weights``: ``{layer name: weight tensor}``."""
    from .plots import plot_nf4_bins

    names = list(weights)
    controls = dict(
        layer=w.Dropdown(options=names, value=names[0], description="layer"),
        block=w.IntSlider(value=0, min=0, max=weights[names[0]].numel() // blocksize - 1, description="block"),
        blocksize=w.Dropdown(options=[16, 32, 64, 128, 256, 1024, 4096], value=blocksize, description="block size"),
        quant_type=w.ToggleButtons(options=["nf4", "fp4", "int4"], value="nf4", description="code book"),
        double_quant=w.Checkbox(value=False, description="double quantisation"),
    )

    def n_blocks(layer, blocksize):
        return -(-weights[layer].numel() // blocksize)

    def follow(layer, blocksize, **_):  # the block slider follows the layer and the block size
        controls["block"].max = n_blocks(layer, blocksize) - 1

    def plot(layer, block, blocksize, quant_type, double_quant):
        block = min(block, n_blocks(layer, blocksize) - 1)
        return plot_nf4_bins(weights[layer], block, blocksize, quant_type, double_quant, layer)

    return _FigureBox([w.HBox([controls["layer"], controls["blocksize"], controls["double_quant"]]),
                       w.HBox([controls["block"], controls["quant_type"]])], controls, plot, before=follow)


# --- prompt tuning, prefix tuning, adapters ----------------------------------------------------------


def sweep_widget(x, values, histories=None, xlabel: str = "", ylabel: str = "exact match", title: str = "") -> w.VBox:
    """A slider over the stored sweep ``x`` (for example the number of virtual tokens) redrawing
    :func:`minipeft.plots.plot_sweep_selection`; nothing is retrained."""
    from .plots import plot_sweep_selection

    slider = w.SelectionSlider(options=list(x), value=list(x)[-1], description=xlabel or "x")

    def plot(selected):
        return plot_sweep_selection(x, values, selected, histories, xlabel, ylabel, title)

    return _FigureBox([slider], dict(selected=slider), plot)
