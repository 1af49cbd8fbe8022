"""The lecture dashboard served by Voilà (``make dashboard``), in a real browser.

Voilà runs ``notebooks/lecture_dashboard.ipynb`` (quick mode) and serves its outputs as a page. Checked:
the page shows no error; the three tabs are there and the dashboard spans the page; in each tab the
controls' labels are readable (not cut off, 12 px or more) and the page down to the tab's bottom fits a
1400 x 1000 window (no scrolling: the lecturer switches tabs, nothing else); every control (slider, menu, toggle, check box) redraws the tab's figure:
the picture changes, one picture stays (nothing stacked) and it never blanks out; in a narrow window
nothing spills over the right edge. Screenshots: ``tests/browser/artifacts/dashboard-*.png``.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, _free_port
from test_lab import JS_WATCH, JS_WATCHED_MIN, _wait

DASHBOARD = ROOT / "notebooks" / "lecture_dashboard.ipynb"
TABS = ["Low-rank updates", "NF4 bins", "Memory"]
WINDOW, NARROW = {"width": 1400, "height": 1000}, {"width": 1024, "height": 768}
UPDATE_TIMEOUT_S = 120

# Tags the open tab's page with data-minipeft-page; returns what it shows and how it fits the window.
JS_PAGE = """() => {
  const tabs = document.querySelector('.widget-tab');
  if (!tabs) return null;
  const pages = Array.from(tabs.querySelectorAll('.widget-tab-contents > *'));
  pages.forEach(p => p.removeAttribute('data-minipeft-page'));
  const open = pages.find(p => p.offsetParent !== null);
  if (!open) return null;
  open.dataset.minipeftPage = '1';
  const box = tabs.getBoundingClientRect();
  const labels = Array.from(open.querySelectorAll('.widget-label, .widget-checkbox label'))
    .filter(l => l.offsetParent !== null && l.textContent.trim());
  return {
    title: (tabs.querySelector('.lm-TabBar-tab.lm-mod-current') || {}).innerText,
    tabs: Array.from(tabs.querySelectorAll('.lm-TabBar-tab')).map(t => t.innerText.trim()),
    pictures: Array.from(open.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).map(i => i.src),
    cut: labels.filter(l => l.scrollWidth > l.clientWidth + 1).map(l => l.textContent.trim()),
    small: labels.filter(l => parseFloat(getComputedStyle(l).fontSize) < 12).map(l => l.textContent.trim()),
    controls: {slider: open.querySelectorAll('.widget-slider .noUi-handle').length,
               dropdown: open.querySelectorAll('.widget-dropdown select').length,
               toggle: open.querySelectorAll('.widget-toggle-buttons').length,
               checkbox: open.querySelectorAll('.widget-checkbox input').length},
    width: box.width, bottom: box.bottom + window.scrollY, window: [window.innerWidth, window.innerHeight],
    overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
    widest: Math.max(0, ...Array.from(open.querySelectorAll('img')).map(i => i.getBoundingClientRect().right)) - box.right,
    errors: (document.body.innerText.match(/There was an error[^\\n]*|Traceback[^\\n]*|Error displaying widget[^\\n]*/g) || []),
  };
}"""

JS_DISABLED = "() => Array.from(document.querySelectorAll('[data-minipeft-page] select:disabled, [data-minipeft-page] input:disabled')).length"


@pytest.fixture(scope="module")
def voila(browser, artifacts, tmp_path_factory):
    """``voila notebooks/lecture_dashboard.ipynb`` on 127.0.0.1 with a random token; yields the page's URL."""
    if not DASHBOARD.exists():
        pytest.skip(f"{DASHBOARD.name} does not exist yet")
    try:
        import voila  # noqa: F401
    except ImportError:
        pytest.skip("the `voila` package is missing (in the dev extra): `.venv/bin/pip install voila`")
    tmp = tmp_path_factory.mktemp("voila")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, MINIPEFT_QUICK="1", JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_DATA_DIR=str(tmp / "data"))
    cmd = [sys.executable, "-m", "voila", str(DASHBOARD), "--no-browser", "--Voila.ip=127.0.0.1", f"--port={port}",
           "--Voila.port_retries=0", f"--Voila.token={token}", "--show_tracebacks=True"]
    log = open(artifacts / "voila-server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Voilà exited with code {proc.returncode}; see {log.name}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Voilà did not listen within 120 s; see {log.name}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/?token={token}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _digest(pictures) -> list[str]:
    return [hashlib.sha1(p.encode()).hexdigest()[:12] for p in pictures]


def _controls(page):
    """(kind, locator) of every control on the open tab, in page order."""
    scope = "[data-minipeft-page] "
    kinds = {"slider": ".widget-slider .noUi-handle", "dropdown": ".widget-dropdown select",
             "toggle": ".widget-toggle-buttons", "checkbox": ".widget-checkbox input"}
    found = [(kind, loc.nth(k)) for kind, css in kinds.items()
             for loc in [page.locator(scope + css)] for k in range(loc.count())]
    return sorted(found, key=lambda kl: (kl[1].bounding_box()["y"] // 20, kl[1].bounding_box()["x"]))


def _change(page, kind, control):
    """Change one control as a user would; returns (what was done, how to put it back or None)."""
    if kind == "slider":
        before, top = control.get_attribute("aria-valuenow"), control.get_attribute("aria-valuemax")
        control.focus()
        page.keyboard.press("Home" if before == top else "End")
        after = control.get_attribute("aria-valuenow")
        assert after != before, f"the slider did not move (value {before})"
        return f"slider {before} -> {after}", None
    if kind == "dropdown":
        options = control.locator("option").all_inner_texts()
        current = control.evaluate("s => s.options[s.selectedIndex].text")
        choice = options[(options.index(current) + 1) % len(options)]
        control.select_option(label=choice)
        return f"menu {current!r} -> {choice!r}", lambda: control.select_option(label=current)
    if kind == "toggle":
        button = control.locator("button:not(.mod-active)").first
        current = control.locator("button.mod-active").first
        label = button.inner_text().strip()
        button.click()
        return f"toggle -> {label!r}", lambda: current.click()
    control.click()
    return "check box", lambda: control.click()


def _redrawn(page, before: list[str], what: str):
    """Wait until the open tab's picture changed and held still for two polls 0.5 s apart."""
    seen = []

    def settled():
        now = _digest(page.evaluate(JS_PAGE)["pictures"])
        seen.append(now)
        return len(seen) > 1 and seen[-1] == seen[-2] and now and now != before

    _wait(page, settled, UPDATE_TIMEOUT_S, f"the figure to redraw after {what}", poll_s=0.5)


def test_dashboard_in_voila(browser, voila, artifacts):
    context = browser.new_context(viewport=WINDOW)
    page = context.new_page()
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
    report = []
    try:
        t0 = time.monotonic()
        page.goto(voila, wait_until="commit", timeout=120_000)
        # Voilà runs the notebook first (quick mode: two short training runs on a cold cache)
        first = _wait(page, lambda: (lambda s: s if s and (s["pictures"] or s["errors"]) else None)(
            page.evaluate(JS_PAGE)), float(os.environ.get("MINIPEFT_BROWSER_TIMEOUT", "900")),
            "the dashboard's first picture", poll_s=1.0)
        report.append(f"lecture_dashboard (Voilà, quick mode): first picture after {time.monotonic() - t0:.0f} s")
        assert not first["errors"], f"the dashboard shows errors: {first['errors']}; see voila-server.log"
        assert first["tabs"] == TABS, f"tabs {first['tabs']}, expected {TABS}"
        assert first["overflow"] <= 0, f"the page is {first['overflow']} px wider than the window"
        assert first["width"] >= 0.9 * WINDOW["width"], f"the dashboard spans {first['width']:.0f} px of {WINDOW['width']}"
        for title in TABS:
            page.locator(".widget-tab .lm-TabBar-tab", has_text=title).click()
            s = _wait(page, lambda: (lambda s: s if s and s["title"] == title and s["pictures"] else None)(
                page.evaluate(JS_PAGE)), 60, f"the tab {title!r} to show its figure")
            slug = title.lower().replace(" ", "-")
            page.screenshot(path=str(artifacts / f"dashboard-{slug}.png"))
            assert len(s["pictures"]) == 1, f"{title}: {len(s['pictures'])} pictures"
            assert not s["cut"], f"{title}: labels {s['cut']} are cut off"
            assert not s["small"], f"{title}: labels {s['small']} are in a font under 12 px"
            assert s["bottom"] <= WINDOW["height"], (f"{title}: the dashboard ends {s['bottom']:.0f} px down the page, "
                                                     f"the window is {WINDOW['height']} px high: it needs scrolling")
            controls = _controls(page)
            assert len(controls) == sum(s["controls"].values()) and controls, f"{title}: controls {s['controls']}"
            for kind, control in controls:
                before, disabled = _digest(s["pictures"]), page.evaluate(JS_DISABLED)
                page.evaluate(JS_WATCH, {"node": "[data-minipeft-page]", "pictures": "img"})
                t1 = time.monotonic()
                did, undo = _change(page, kind, control)
                _redrawn(page, before, f"{title}: {did}")
                s = page.evaluate(JS_PAGE)
                fewest = page.evaluate(JS_WATCHED_MIN)
                assert len(s["pictures"]) == 1, f"{title}: {len(s['pictures'])} pictures after {did}: stacked"
                assert fewest >= 1, f"{title}: the figure blanked out while redrawing after {did}"
                report.append(f"  {title}: {did}: redrawn in {time.monotonic() - t1:.1f} s, one picture, no blank")
                if undo and page.evaluate(JS_DISABLED) > disabled:  # it greyed out another control: put it back
                    before = _digest(s["pictures"])
                    undo()
                    _redrawn(page, before, f"{title}: undoing {did}")
                    s = page.evaluate(JS_PAGE)
            page.screenshot(path=str(artifacts / f"dashboard-{slug}-after.png"))
        page.set_viewport_size(NARROW)
        page.wait_for_timeout(1000)
        s = page.evaluate(JS_PAGE)
        page.screenshot(path=str(artifacts / "dashboard-narrow.png"))
        assert s["overflow"] <= 0 and s["widest"] <= 1, (
            f"in a {NARROW['width']} px window the page spills over the right edge by {max(s['overflow'], s['widest']):.0f} px")
        uncaught = [c for c in console if c.startswith("uncaught")]
        assert not uncaught, f"the page raised: {uncaught[-5:]}"
    finally:
        (artifacts / "dashboard.console.txt").write_text("\n".join(console) + "\n")
        with open(artifacts / "report.txt", "a") as f:
            f.write("\n".join(report) + "\n")
        context.close()
