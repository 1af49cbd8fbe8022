"""The course's figures: what a reader needs to read them (colour bars, the spread they claim to show)."""
import math

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minipeft import plots  # noqa: E402


def test_an_attention_map_of_its_own_has_a_colour_bar_on_the_0_to_1_scale():
    fig = plots.plot_attention(np.eye(3), list("abc"))
    heat, bar = fig.axes                                   # the map and its colour bar, nothing else
    assert bar.get_ylabel() == "attention weight"
    assert heat.images[0].get_clim() == (0, 1)
    plt.close(fig)


def test_maps_on_the_callers_axes_leave_the_shared_bar_to_the_caller_unless_asked():
    fig, axes = plt.subplots(1, 2)
    plots.plot_attention(np.eye(2), list("ab"), ax=axes[0])
    assert len(fig.axes) == 2                              # no bar added to a grid of maps
    plots.plot_attention(np.eye(2), list("ab"), ax=axes[1], colorbar=True)
    assert len(fig.axes) == 3
    plt.close(fig)


def test_sweep_error_bars_are_the_sample_std_over_seeds():
    fig = plots.plot_sweep([1, 2], {"a": [[0.1, 0.5], [0.2, 0.9]]}, "x")
    bars = fig.axes[0].containers[0]                        # the errorbar container of curve "a"
    segments = bars.lines[2][0].get_segments()              # one vertical segment per x
    half_heights = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    # by hand, n = 2: sample std = |a - b| / sqrt(2)
    np.testing.assert_allclose(half_heights, [0.1 / math.sqrt(2), 0.4 / math.sqrt(2)], rtol=1e-9)
    plt.close(fig)
