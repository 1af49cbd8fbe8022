"""The stored view: each widget notebook as committed, opened in JupyterLab WITHOUT running it.

A student who opens a freshly cloned notebook must see each widget's last picture, not the text
``VBox(children=(HBox(...``. Two ways to open it, both checked for every notebook whose code makes a widget:

* not trusted (every freshly cloned notebook: JupyterLab draws no widget from a notebook it does not trust):
  the widget's output shows the picture the widget stored next to its view (``image/png`` in the bundle);
* trusted (File > Trust Notebook, or a notebook the student ran and saved): the widget is drawn by the
  widget front end from the widget state stored in the notebook (``store_widget_state=True`` when the
  outputs were stored), its figure inside it.

Screenshots of each widget cell go to ``tests/browser/artifacts/<notebook>-stored-<view>-cell<i>.png``.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbformat
import pytest

from test_lab import JS_CUT_LABELS, _wait  # noqa: F401  (one definition of the shared page helpers)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent.parent / "notebooks"
VIEW = "application/vnd.jupyter.widget-view+json"
STATE = "application/vnd.jupyter.widget-state+json"
MAKES_WIDGET = re.compile(r"\b\w+_widget\(|\bwidgets\.dashboard\(|\binteract(?:ive|ive_output)?\(|\bipywidgets\b")

# Per code cell holding widget views: whether the notebook is trusted, what each view's bundle stores, and
# what the page shows. Tags each such cell's node with data-minipeft-cell.
JS_STORED = """([path, VIEW]) => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.context || w.context.path !== path || !w.context.isReady || !w.content || !w.content.widgets.length) return null;
  const out = [];
  w.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    const views = cell.model.outputs.toJSON().filter(x => x.data && x.data[VIEW]);
    if (!views.length) return;
    cell.node.dataset.minipeftCell = String(i);
    const area = cell.node.querySelector('.jp-Cell-outputArea') || document.createElement('div');  // not drawn yet
    const shown = s => Array.from(area.querySelectorAll(s)).filter(x => x.complete && x.naturalWidth > 0).length;
    out.push({
      index: i, trusted: cell.model.trusted, source: cell.model.sharedModel.getSource(),
      stored_pictures: views.filter(x => x.data['image/png']).length,
      model_ids: views.map(x => x.data[VIEW].model_id),
      widget_imgs: shown('.jupyter-widgets img'), picture_imgs: shown('.jp-OutputArea-output[data-mime-type="image/png"] img'),
      drawn_widgets: area.querySelectorAll('.jp-OutputArea-output > .jupyter-widgets, .jp-OutputArea-output.jupyter-widgets').length,
      text: area.innerText.slice(0, 160),
    });
  });
  return {cells: out};
}"""


# JupyterLab draws only the cells near the view: bring cell i there (and make it the active cell).
JS_SCROLL_TO = """async (i) => {
  const nb = window.jupyterapp.shell.currentWidget.content;
  nb.activeCellIndex = i;
  await nb.scrollToItem(i, 'start');
}"""


def _cells(page, path: str) -> list[dict]:
    return (page.evaluate(JS_STORED, [path, VIEW]) or {"cells": []})["cells"]


def _widget_notebooks():
    names = []
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        if any(MAKES_WIDGET.search("".join(c["source"])) for c in cells if c["cell_type"] == "code"):
            names.append(path.name)
    return names


@pytest.mark.parametrize("view", ["untrusted", "trusted"])
@pytest.mark.parametrize("name", _widget_notebooks(), ids=lambda n: Path(n).stem)
def test_stored_widgets_show_their_picture(tab, lab, artifacts, name, view):
    page, path, stem = tab.page, f"{view}/{name}", Path(name).stem
    t0 = time.monotonic()
    page.goto(lab.url(f"lab/workspaces/stored-{view}-{stem}/tree/{path}") + "&reset",
              wait_until="domcontentloaded", timeout=120_000)
    cells = _wait(page, lambda: page.evaluate(JS_STORED, [path, VIEW]), 180, f"{path} to open")["cells"]
    assert all(c["trusted"] == (view == "trusted") for c in cells), f"{path}: not {view} as prepared"
    widget_cells = [c for c in cells if MAKES_WIDGET.search(c["source"])]
    assert widget_cells, f"{name} stores no widget output: store its outputs (nbconvert --execute)"
    state = nbformat.read(NOTEBOOK_DIR / name, as_version=4).metadata.get("widgets", {}).get(STATE, {}).get("state", {})
    problems = []
    for c in widget_cells:
        i = c["index"]
        # what the stored notebook lacks is known without waiting for the page
        if view == "untrusted" and not c["stored_pictures"]:
            problems.append(f"cell {i}: its output stores no picture next to the widget view (stored with a "
                            "minipeft older than the widgets' picture: store its outputs again)")
        if view == "trusted" and not all(m in state for m in c["model_ids"]):
            problems.append(f"cell {i}: the notebook stores no widget state for it (store its outputs with "
                            "--ExecutePreprocessor.store_widget_state=True)")
        page.evaluate(JS_SCROLL_TO, i)
        cell = page.locator(f'[data-minipeft-cell="{i}"]')
        want = "widget_imgs" if view == "trusted" else "picture_imgs"
        try:  # in view, JupyterLab draws the output (a widget restores its state first)
            c = _wait(page, lambda: next((x for x in _cells(page, path) if x["index"] == i and x[want]), None),
                      10 if problems else 60, f"cell {i} of {path} to show a picture")
        except pytest.fail.Exception:
            c = next(x for x in _cells(page, path) if x["index"] == i)
            problems.append(f"cell {i}: shows no picture in the {view} view, but {c['text'][:100]!r}")
        cell.screenshot(path=str(artifacts / f"{stem}-stored-{view}-cell{i}.png"))
        if view == "trusted" and c["drawn_widgets"]:
            cut = page.evaluate(JS_CUT_LABELS, i)
            if cut:
                problems.append(f"cell {i}: widget labels {cut} are cut off")
    with open(artifacts / "report.txt", "a") as f:
        f.write(f"{name} ({view}, not run): {len(widget_cells)} widget cell(s), {len(problems)} problem(s), "
                f"{time.monotonic() - t0:.0f} s\n")
    assert not problems, f"{name} opened {view} without running it:\n  " + "\n  ".join(problems)
