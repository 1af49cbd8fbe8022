"""The ipywidgets front ends, driven without a browser: moving a control redraws the figure, and the
widget carries a PNG of its figure for front ends that cannot draw widgets (an untrusted notebook)."""
import base64
import io

import matplotlib
import pytest
import torch

matplotlib.use("Agg")  # a plain backend: the widgets must not depend on the notebook's inline one

import matplotlib.image  # noqa: E402
from IPython.display import Image  # noqa: E402

from minipeft import plots, widgets  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def shown(monkeypatch):
    """Every picture the widgets display in their Output, in order."""
    items = []
    monkeypatch.setattr(widgets, "display", lambda *objs, **kw: items.extend(objs))
    return items


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the plot functions behind the widgets returned, in order."""
    figures = []

    def spy(f):
        return lambda *a, **kw: figures.append(f(*a, **kw)) or figures[-1]

    for name in ("plot_memory_estimate", "plot_lowrank", "plot_nf4_bins", "plot_sweep_selection"):
        monkeypatch.setattr(plots, name, spy(getattr(plots, name)))
    return figures


def pictures(items):
    return [x for x in items if isinstance(x, Image)]


def test_memory_widget_redraws_and_greys_out_the_rank(shown, drawn):
    box = widgets.memory_widget()
    (preset, method, rank), (base_dtype, _), (batch, tokens, _) = (row.children for row in box.children[:3])
    assert len(pictures(shown)) == len(drawn) == 1 and not rank.disabled
    batch.value = 16
    assert len(pictures(shown)) == len(drawn) == 2
    assert "batch 16 x 512" in drawn[-1].axes[0].get_title()
    method.value = "prompt"
    assert rank.disabled and len(pictures(shown)) == 3
    method.value, base_dtype.value = "lora", "nf4"
    assert not rank.disabled
    assert "QLoRA" in drawn[-1].axes[0].get_xticklabels()[0].get_text()


def test_memory_widget_refuses_full_finetuning_of_4bit_weights(shown, capsys):
    box = widgets.memory_widget()
    n = len(pictures(shown))
    box.children[1].children[0].value = "nf4"
    box.children[0].children[1].value = "full"
    assert len(pictures(shown)) == n + 1   # the nf4 + lora figure; full + nf4 draws none
    assert "cannot train 4-bit weights" in capsys.readouterr().out
    assert "image/png" not in box._repr_mimebundle_()   # no stale picture of another setting


def test_memory_widget_switches_checkpointing_and_the_optimizer(shown, drawn):
    """Each switch redraws within a second and changes the bar as the formula says: checkpointing shrinks
    the activations, the 8-bit optimizer the optimizer state (LoRA r=8 on Llama-2-7B: its tensors are large
    enough to be 8-bit), and the label says which is on."""
    import time

    from minipeft.memory_formula import predict_memory
    box = widgets.memory_widget()
    (_, checkpointing), (_, _, optimizer) = box.children[1].children, box.children[2].children
    start = time.perf_counter()
    checkpointing.value = True
    optimizer.value = "adamw8bit"
    assert time.perf_counter() - start < 2.0 and len(pictures(shown)) == len(drawn) == 3
    label = drawn[-1].axes[0].get_xticklabels()[0].get_text()
    assert "checkpointing" in label and "adamw8bit" in label
    on = predict_memory("Llama-2-7B", "lora", 4, 512, base_dtype="bf16", r=8, targets="all-linear",
                        checkpointing=True, optimizer="adamw8bit")
    off = predict_memory("Llama-2-7B", "lora", 4, 512, base_dtype="bf16", r=8, targets="all-linear")
    assert on.activations < off.activations and on.optimizer < off.optimizer / 3
    assert f"total {on.total / 2 ** 30:.1f} GiB" in drawn[-1].axes[0].get_title()


def test_memory_widget_says_why_prefix_tuning_cannot_checkpoint(shown, capsys):
    box = widgets.memory_widget()
    box.children[1].children[1].value = True
    box.children[0].children[1].value = "prefix"
    assert "prefix" in capsys.readouterr().out and "image/png" not in box._repr_mimebundle_()


def test_the_widget_carries_its_last_picture_for_untrusted_front_ends(shown, drawn):
    box = widgets.memory_widget()
    box.children[2].children[0].value = 32
    bundle = box._repr_mimebundle_()
    assert VIEW in bundle and "text/plain" in bundle   # the widget itself, and the text of last resort
    png = base64.b64decode(bundle["image/png"])
    assert png.startswith(PNG_MAGIC) and png == pictures(shown)[-1].data   # the picture shown last
    height, width, _ = matplotlib.image.imread(io.BytesIO(png)).shape
    fig_w, fig_h = drawn[-1].get_size_inches() * drawn[-1].dpi
    # bbox_inches="tight" trims the margins (and may add a little for labels outside the axes)
    assert 0.5 * fig_w < width < 1.2 * fig_w and 0.5 * fig_h < height < 1.2 * fig_h


def test_nf4_bins_widget_follows_the_block_size(shown, drawn):
    torch.manual_seed(0)
    box = widgets.nf4_bins_widget({"w": torch.randn(32, 64)}, blocksize=64)
    (layer, blocksize, double_quant), (block, quant_type) = box.children[0].children, box.children[1].children
    assert block.max == 32 - 1                 # 2,048 weights in blocks of 64
    block.value = 31
    blocksize.value = 256
    assert block.max == 8 - 1 and block.value == 7
    quant_type.value = "int4"
    assert "INT4, blocksize 256" in drawn[-1]._suptitle.get_text()


def test_sweep_widget_redraws_the_selected_point(shown):
    slider = widgets.sweep_widget([1, 2, 4], [[0.1, 0.5, 0.9], [0.3, 0.5, 0.7]], xlabel="n").children[0]  # 2 seeds
    n = len(pictures(shown))
    slider.value = 2
    assert len(pictures(shown)) == n + 1


def test_lowrank_widget_redraws_for_each_rank(shown, drawn):
    g = torch.Generator().manual_seed(0)
    full = {"q": torch.randn(16, 16, generator=g), "v": torch.randn(16, 16, generator=g)}
    lora = {"q": torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)}   # only q has LoRA
    layer, rank = widgets.lowrank_widget(full, lora, r=2, max_rank=8).children[0].children
    assert list(layer.options) == ["q"]      # the layers present in both
    n = len(pictures(shown))
    rank.value = 5
    assert len(pictures(shown)) == len(drawn) == n + 1


def test_dashboard_tabs_the_three_widgets_and_carries_the_open_tabs_picture(shown, drawn):
    g = torch.Generator().manual_seed(0)
    full = {"q": torch.randn(16, 16, generator=g)}
    lora = {"q": torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)}
    tabs = widgets.dashboard(full, lora, {"w": torch.randn(8, 64, generator=g)}, r=2)
    assert tabs.titles == ("Low-rank updates", "NF4 bins", "Memory") and len(pictures(shown)) == 3
    for i, page in enumerate(tabs.children):
        tabs.selected_index = i
        assert tabs._repr_mimebundle_()["image/png"] == page._repr_mimebundle_()["image/png"]
    lowrank, nf4, memory = (page._repr_mimebundle_()["image/png"] for page in tabs.children)
    assert len({lowrank, nf4, memory}) == 3
