"""The course the way a student meets it: each widget notebook opened in JupyterLab in a real browser.

Widget notebooks: 06, 07, 09 (named below; skipped while missing) and every notebook whose code makes a
widget (a ``*_widget(`` call, ``interact``, ``ipywidgets``).

For every notebook: Run > Run All Cells, wait until the kernel is idle, then check that
  * no cell shows an error and every code cell ran;
  * every widget is drawn by the front end (not its text fallback, not "Error displaying widget");
  * every widget cell has controls with readable (not cut-off) labels and a figure, without a re-run;
  * moving a slider (a dropdown or toggle where there is none) redraws the figure below it:
    the image changes, no second figure is stacked under it, and it never blanks out in between.
Screenshots of each widget cell before and after the move go to ``tests/browser/artifacts/``.

nbval cannot see any of this: it runs the kernel side only. Run with ``make browser``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NOTEBOOK_DIR = HERE.parent.parent / "notebooks"
# The fixture first: it checks the browser, JupyterLab and the widget front end apart from any lesson.
# Then the widget notebooks named by the issue, and any other notebook whose code makes a widget.
FIXTURE = "widget_fixture.ipynb"
WIDGET_NOTEBOOKS = ["06_lora.ipynb", "07_nf4_quantization.ipynb", "09_comparison.ipynb"]
MAKES_WIDGET = re.compile(r"\b\w+_widget\(|\binteract(?:ive|ive_output)?\(|\bipywidgets\b")
# MINIPEFT_BROWSER_NOTEBOOKS="01_transformer_from_scratch.ipynb,..." checks other notebooks the same way.
EXTRA = [n for n in os.environ.get("MINIPEFT_BROWSER_NOTEBOOKS", "").split(",") if n]
UPDATE_TIMEOUT_S = 120  # one widget callback (a plot) after a slider move

# ---- JavaScript run in the page (JupyterLab exposes its app as window.jupyterapp, see conftest) ----

# Kernel status, cells still running ([*]), code cells that ran, and whether any shows an error.
JS_STATE = """(path) => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.context || w.context.path !== path || !w.content || !w.content.model) return null;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.model.cells;
  let code = 0, ran = 0, errors = 0;
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    if (c.type !== 'code' || !c.sharedModel.getSource().trim()) continue;
    code++;
    if (c.executionCount !== null && c.executionCount !== undefined) ran++;
    for (let j = 0; j < c.outputs.length; j++) if (c.outputs.get(j).type === 'error') errors++;
  }
  const running = Array.from(w.content.node.querySelectorAll('.jp-InputArea-prompt'))
    .filter(p => p.textContent.includes('*')).length;
  return {kernel: kernel ? kernel.status : null, code, ran, errors, running};
}"""

# Per code cell: its errors, whether it holds widget views, and what the front end drew for them.
# Tags each cell's node with data-minipeft-cell so that Python can find it again.
JS_CELLS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const out = [];
  w.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    cell.node.dataset.minipeftCell = String(i);
    const o = cell.model.outputs.toJSON();
    const node = cell.node;
    const q = s => node.querySelectorAll('.jp-Cell-outputArea ' + s).length;
    out.push({
      index: i,
      errors: o.filter(x => x.output_type === 'error').map(x => x.ename + ': ' + x.evalue),
      widget_views: o.filter(x => x.data && x.data['application/vnd.jupyter.widget-view+json']).length,
      // a widget view shown as its text/plain or image/png fallback: the widget front end is missing or broken
      // (a closed widget, such as a finished tqdm bar, legitimately shows nothing at all)
      fallback: Array.from(node.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output'))
        .filter((x, k) => o[k] && o[k].data && o[k].data['application/vnd.jupyter.widget-view+json']
                          && ['text/plain', 'image/png'].includes(x.dataset.mimeType)).length,
      sliders: q('.widget-slider .noUi-handle'),
      dropdowns: q('.widget-dropdown select'),
      toggles: q('.widget-toggle-buttons button'),
      checkboxes: q('.widget-checkbox input'),
      broken: (node.querySelector('.jp-Cell-outputArea').innerText
               .match(/Error displaying widget[^\\n]*|Error rendering[^\\n]*/g) || []),
      count: cell.model.executionCount,
      source: cell.model.sharedModel.getSource().slice(0, 80),
    });
  });
  return out;
}"""

# The figures in a cell's output (inline PNG/SVG images, canvases) and the text of its Output widgets.
JS_FIGURES = """(i) => {
  const node = document.querySelector(`[data-minipeft-cell="${i}"] .jp-Cell-outputArea`);
  const imgs = Array.from(node.querySelectorAll('img')).map(x => x.src);
  const svgs = Array.from(node.querySelectorAll('.jp-RenderedSVG svg')).map(x => x.outerHTML);
  const canvases = Array.from(node.querySelectorAll('canvas')).map(x => { try { return x.toDataURL(); } catch (e) { return ''; } });
  const text = Array.from(node.querySelectorAll('.widget-output')).map(x => x.innerText).join('\\n');
  return {figures: imgs.concat(svgs, canvases), text};
}"""

# Watches a node (w.node, a CSS selector) while a widget redraws: the fewest pictures (w.pictures) it ever
# showed (a flicker shows 0). Also used by test_dashboard.py.
JS_WATCH = """(w) => {
  const node = document.querySelector(w.node);
  const count = () => node.querySelectorAll(w.pictures).length;
  window.__minipeftMin = count();
  if (window.__minipeftObserver) window.__minipeftObserver.disconnect();
  window.__minipeftObserver = new MutationObserver(() => { window.__minipeftMin = Math.min(window.__minipeftMin, count()); });
  window.__minipeftObserver.observe(node, {childList: true, subtree: true});
}"""
JS_WATCHED_MIN = "() => { window.__minipeftObserver.disconnect(); return window.__minipeftMin; }"

# Widget labels whose text does not fit (cut off with an ellipsis): a student cannot read them.
JS_CUT_LABELS = """(i) => Array.from(document.querySelectorAll(`[data-minipeft-cell="${i}"] .jp-Cell-outputArea .widget-label`))
  .filter(l => l.offsetParent !== null && l.textContent.trim() && l.scrollWidth > l.clientWidth + 1)
  .map(l => l.textContent.trim())"""


def _exists(name: str) -> bool:
    return (NOTEBOOK_DIR / name).exists() or (HERE / name).exists()


def _makes_widget(path: Path) -> bool:
    cells = json.loads(path.read_text())["cells"]
    return any(MAKES_WIDGET.search("".join(c["source"])) for c in cells if c["cell_type"] == "code")


def _params():
    widget_nbs = sorted(set(WIDGET_NOTEBOOKS) | {p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if _makes_widget(p)})
    names = [FIXTURE] + widget_nbs + [n for n in EXTRA if n not in widget_nbs]
    return [pytest.param(n, n == FIXTURE or n in widget_nbs, id=Path(n).stem,
                         marks=[] if _exists(n) else [pytest.mark.skip(reason=f"{n} does not exist yet")])
            for n in names]


def _digest(figures) -> list[str]:
    return [hashlib.sha1(f.encode()).hexdigest()[:12] for f in figures]


def _wait(page, predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll ``predicate()`` until it returns a true value; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        page.wait_for_timeout(poll_s * 1000)


def open_notebook(page, lab, name: str):
    # a workspace of its own, reset: JupyterLab must not reopen (and start kernels for) earlier tests' notebooks
    page.goto(lab.url(f"lab/workspaces/{Path(name).stem}/tree/{name}") + "&reset",
              wait_until="domcontentloaded", timeout=120_000)
    _wait(page, lambda: (page.evaluate(JS_STATE, name) or {}).get("kernel") == "idle", 180,
          f"{name} to open with an idle kernel")


def run_all(page, name: str, timeout_s: float) -> dict:
    """Run > Run All Cells from the menu, as a student would; wait until it finished or stopped at an error."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    def finished():
        s = page.evaluate(JS_STATE, name)
        if s and s["kernel"] in ("dead", "unknown"):
            pytest.fail(f"the kernel of {name} died ({s})")
        done = s and s["kernel"] == "idle" and s["running"] == 0 and (s["ran"] == s["code"] or s["errors"])
        return s if done else None

    return _wait(page, finished, timeout_s, f"{name} to run all its cells", poll_s=1.0)


def change_control(page, cell) -> str:
    """Move the cell's first slider by a third of its track (a drag, then the keyboard if the drag did
    nothing); without a slider, pick another dropdown option or toggle button. Returns what it did."""
    handle = cell.locator(".widget-slider .noUi-handle").first
    if handle.count():
        handle.scroll_into_view_if_needed()
        before = handle.get_attribute("aria-valuenow")
        track = cell.locator(".widget-slider .noUi-base").first.bounding_box()
        h = handle.bounding_box()
        x, y = h["x"] + h["width"] / 2, h["y"] + h["height"] / 2
        right = x < track["x"] + track["width"] / 2
        target = track["x"] + track["width"] * (0.8 if right else 0.2)
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(target, y, steps=6)
        page.mouse.up()
        if handle.get_attribute("aria-valuenow") == before:
            handle.focus()
            page.keyboard.press("End" if right else "Home")
        after = handle.get_attribute("aria-valuenow")
        assert after != before, f"the slider did not move (value {before})"
        label = cell.locator(".widget-slider .widget-label").first.inner_text().strip()
        return f"moved slider '{label}' from {before} to {after}"
    select = cell.locator(".widget-dropdown select").first
    if select.count():
        options = select.locator("option").all_inner_texts()
        current = select.evaluate("s => s.options[s.selectedIndex] ? s.options[s.selectedIndex].text : ''")
        choice = next(o for o in options if o != current)
        select.select_option(label=choice)
        return f"chose '{choice}' in a dropdown"
    button = cell.locator(".widget-toggle-buttons button:not(.mod-active)").first
    button.click()
    return f"clicked toggle '{button.inner_text().strip()}'"


@pytest.mark.parametrize("name, widgets_required", _params())
def test_notebook_in_jupyterlab(tab, lab, artifacts, name, widgets_required):
    page, stem = tab.page, Path(name).stem
    t0 = time.monotonic()
    open_notebook(page, lab, name)
    state = run_all(page, name, float(os.environ.get("MINIPEFT_BROWSER_TIMEOUT", "900")))
    run_s = time.monotonic() - t0
    page.screenshot(path=str(artifacts / f"{stem}.png"))
    cells = page.evaluate(JS_CELLS)

    where = {c["index"]: f"cell {c['index']} (In [{c['count']}])" for c in cells}
    errors = [f"{where[c['index']]}: {e}" for c in cells for e in c["errors"]]
    assert not errors, f"{name} shows errors after Run All: {errors}\nconsole: {tab.console[-5:]}"
    assert state["ran"] == state["code"], f"only {state['ran']} of {state['code']} code cells ran"

    undrawn = [where[c["index"]] for c in cells if c["fallback"]]
    broken = [f"{where[c['index']]}: {b}" for c in cells for b in c["broken"]]
    assert not undrawn, (f"widgets of cells {undrawn} are shown as text, not drawn: is the ipywidgets "
                         f"front end (jupyterlab_widgets) installed and matching? console: {tab.console[-5:]}")
    assert not broken, f"widgets failed to render: {broken}\nconsole: {tab.console[-5:]}"

    controlled = [c for c in cells if c["widget_views"] and (c["sliders"] or c["dropdowns"] or c["toggles"])]
    if widgets_required:
        assert controlled, f"{name} shows no widget with a slider, dropdown or toggle"
        assert any(c["sliders"] for c in controlled), f"{name} has widgets but no slider"
    report = [f"{name}: ran {state['code']} code cells in {run_s:.0f} s (JupyterLab, quick mode)"]
    for c in controlled:
        i, at = c["index"], where[c["index"]]
        cell = page.locator(f'[data-minipeft-cell="{i}"]')
        cell.scroll_into_view_if_needed()
        cut = page.evaluate(JS_CUT_LABELS, i)
        assert not cut, (f"{at}: widget labels {cut} are cut off; give the control "
                         f"style={{'description_width': 'initial'}} or a shorter description")
        before = page.evaluate(JS_FIGURES, i)
        assert before["figures"], f"{at} shows its controls but no figure until a control is moved"
        cell.screenshot(path=str(artifacts / f"{stem}-cell{i}-before.png"))

        page.evaluate(JS_WATCH, {"node": f'[data-minipeft-cell="{i}"] .jp-Cell-outputArea',
                                 "pictures": "img, .jp-RenderedSVG svg, canvas"})
        t1 = time.monotonic()
        did = change_control(page, cell)

        seen = []  # (figure digests, kernel idle) of the last polls

        def settled():
            """Changed, and the same in two polls 1 s apart with the kernel idle (drags queue several redraws)."""
            now = _digest(page.evaluate(JS_FIGURES, i)["figures"])
            seen.append((now, (page.evaluate(JS_STATE, name) or {}).get("kernel") == "idle"))
            return len(seen) > 1 and seen[-1] == seen[-2] == (now, True) and now != _digest(before["figures"])

        _wait(page, settled, UPDATE_TIMEOUT_S, f"{at} to redraw its figure after it {did}", poll_s=1.0)
        after = page.evaluate(JS_FIGURES, i)
        fewest = page.evaluate(JS_WATCHED_MIN)
        cell.screenshot(path=str(artifacts / f"{stem}-cell{i}-after.png"))
        n_before, n_after = len(before["figures"]), len(after["figures"])
        assert n_after == n_before, (
            f"{at}: {n_before} figure(s) before, {n_after} after it {did}: figures are stacked "
            "instead of redrawn (draw into an Output with clear_output(wait=True))")
        assert fewest >= n_before, (
            f"{at}: the figure blanked out ({fewest} of {n_before} shown) while redrawing after it {did}: "
            "it flickers (use clear_output(wait=True))")
        report.append(f"  {at} `{c['source'].splitlines()[0]}`: {did}; figure redrawn in "
                      f"{time.monotonic() - t1:.1f} s; {n_after} figure(s), no stacking, no blank")
    with open(artifacts / "report.txt", "a") as f:
        f.write("\n".join(report) + "\n")
