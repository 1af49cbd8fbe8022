"""Thin ipywidgets front ends: each wires sliders to a plain, unit-tested function of :mod:`minipeft.plots`.

Headless runs (CI, nbval) never move a slider, which is why the work lives in those functions.
"""
from __future__ import annotations
