"""How fast each widget answers a control move, on the kernel's side (compute the figure and render it).

    python benchmarks/widgets.py

Every control of the three lecture widgets is moved a few times; each move runs the widget's redraw
synchronously (ipywidgets calls its observers when a value is set), so the time printed is what the kernel
spends before the browser can show the new picture. The browser adds its own part (sending the PNG and
painting it): `make browser` reports the whole round trip, including the test's settle window.
The low-rank and NF4 widgets get the shipped base's linear weights and random matrices of the same shapes
as the "trained" updates (the redraw cost depends on the shapes, not on the values).
"""
from __future__ import annotations

import statistics
import time

import matplotlib

matplotlib.use("Agg")
import ipywidgets as w  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import minipeft as mp  # noqa: E402
from minipeft import widgets  # noqa: E402

CONTROLS = (w.IntSlider, w.FloatSlider, w.Dropdown, w.Checkbox, w.ToggleButtons)


def controls(box) -> list:
    """Every control inside a widget box, depth first."""
    found = []
    for child in getattr(box, "children", ()):
        found += [child] if isinstance(child, CONTROLS) else controls(child)
    return found


def values(c) -> list:
    """A few values to move ``c`` through: its ends for a slider, its first options for a menu."""
    if isinstance(c, (w.IntSlider, w.FloatSlider)):
        return [c.max, c.min] * 3
    if isinstance(c, w.Checkbox):
        return [not c.value, c.value] * 2
    options = [o[1] if isinstance(o, tuple) else o for o in c.options][:4]
    return options[1:] + options[:1] if len(options) > 1 else []


def main() -> None:
    base = mp.load_base()
    weights = {n: m.weight.detach() for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "head"}
    g = torch.Generator().manual_seed(0)
    lora = {n: torch.randn(weights[n].shape, generator=g) for n in weights if n.endswith(("q_proj", "v_proj"))}
    full = {n: torch.randn(weights[n].shape, generator=g) for n in lora}
    boxes = {"memory": widgets.memory_widget(), "low-rank updates": widgets.lowrank_widget(full, lora, r=8),
             "NF4 bins": widgets.nf4_bins_widget(weights)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; milliseconds per move, kernel side")
    worst = 0.0
    for name, box in boxes.items():
        for c in controls(box):
            times = []
            for v in values(c):
                t0 = time.perf_counter()
                c.value = v
                times.append(time.perf_counter() - t0)
            if times:
                worst = max(worst, max(times))
                print(f"{name:17s} {type(c).__name__:14s} {c.description!s:24.24s} median {1000 * statistics.median(times):5.0f}"
                      f"  max {1000 * max(times):5.0f}  ({len(times)} moves)")
    print(f"slowest move of any control: {1000 * worst:.0f} ms")


if __name__ == "__main__":
    main()
