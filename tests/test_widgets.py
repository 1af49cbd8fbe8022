"""The ipywidgets front ends, driven without a browser: moving a control redraws the figure."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")  # a plain backend: the widgets must not depend on the notebook's inline one

import IPython.display  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from minipeft import widgets  # noqa: E402


@pytest.fixture
def shown(monkeypatch):
    """Everything the widgets pass to IPython's display(), in order."""
    items = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: items.extend(objs))
    return items


def figures(items):
    return [x for x in items if isinstance(x, Figure)]


def test_memory_widget_redraws_and_greys_out_the_rank(shown):
    widgets.memory_widget()
    box = shown[-1]
    (preset, method, rank), base_dtype, (batch, tokens) = box.children[0].children, box.children[1], box.children[2].children
    assert len(figures(shown)) == 1 and not rank.disabled
    batch.value = 16
    assert len(figures(shown)) == 2
    assert "batch 16 x 512" in figures(shown)[-1].axes[0].get_title()
    method.value = "prompt"
    assert rank.disabled and len(figures(shown)) == 3
    method.value, base_dtype.value = "lora", "nf4"
    assert not rank.disabled
    assert "QLoRA" in figures(shown)[-1].axes[0].get_xticklabels()[0].get_text()


def test_memory_widget_refuses_full_finetuning_of_4bit_weights(shown, capsys):
    widgets.memory_widget()
    box = shown[-1]
    n = len(figures(shown))
    box.children[1].value = "nf4"
    box.children[0].children[1].value = "full"
    assert len(figures(shown)) == n + 1   # the nf4 + lora figure; full + nf4 draws none
    assert "cannot train 4-bit weights" in capsys.readouterr().out


def test_nf4_bins_widget_follows_the_block_size(shown):
    torch.manual_seed(0)
    widgets.nf4_bins_widget({"w": torch.randn(32, 64)}, blocksize=64)
    box = shown[-1]
    (layer, blocksize, double_quant), (block, quant_type) = box.children[0].children, box.children[1].children
    assert block.max == 32 - 1                 # 2,048 weights in blocks of 64
    blocksize.value = 256
    assert block.max == 8 - 1
    quant_type.value = "int4"
    assert "INT4, blocksize 256" in figures(shown)[-1]._suptitle.get_text()


def test_sweep_widget_redraws_the_selected_point(shown):
    widgets.sweep_widget([1, 2, 4], [[0.1, 0.5, 0.9], [0.3, 0.5, 0.7]], xlabel="n")   # two seeds
    slider = shown[-1].children[0]
    n = len(figures(shown))
    slider.value = 2
    assert len(figures(shown)) == n + 1


def test_lowrank_widget_redraws_for_each_rank(shown):
    g = torch.Generator().manual_seed(0)
    full = {"q": torch.randn(16, 16, generator=g), "v": torch.randn(16, 16, generator=g)}
    lora = {"q": torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)}   # only q has LoRA
    widgets.lowrank_widget(full, lora, r=2, max_rank=8)
    layer, rank = shown[-1].children[0].children
    assert list(layer.options) == ["q"]      # the layers present in both
    n = len(figures(shown))
    rank.value = 5
    assert len(figures(shown)) == n + 1
