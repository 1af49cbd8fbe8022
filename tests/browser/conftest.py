"""Fixtures of the browser test: JupyterLab on a loopback port, headless Chromium driven by Playwright.

JupyterLab serves a temporary COPY of the notebooks (outputs stripped; and, for the stored view, copies
as committed in ``untrusted/`` and ``trusted/``), so the committed notebooks are never touched. Without Chromium or the ``playwright`` package every test here is skipped with the reason,
unless ``MINIPEFT_BROWSER_REQUIRED=1`` (set by CI) turns the skip into a failure. The test runs only when
asked for by path (``make browser``, ``pytest tests/browser``) or with ``MINIPEFT_BROWSER=1``.

Environment: ``MINIPEFT_CHROMIUM`` (path to the browser, default ``/usr/bin/chromium``),
``MINIPEFT_BROWSER_TIMEOUT`` (seconds for one notebook to run all its cells, default 900),
``MINIPEFT_BROWSER_ARTIFACTS`` (where screenshots and logs go, default ``tests/browser/artifacts``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbformat.sign import NotebookNotary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ARTIFACTS = Path(os.environ.get("MINIPEFT_BROWSER_ARTIFACTS", HERE / "artifacts"))
SERVER_START_TIMEOUT_S = 120
# Chromium as root on a machine without network or GPU: no sandbox, no GPU, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def _unavailable(reason: str):
    """Skip on a developer's machine; fail where the browser test must run (CI sets MINIPEFT_BROWSER_REQUIRED=1)."""
    if os.environ.get("MINIPEFT_BROWSER_REQUIRED") == "1":
        pytest.fail(f"{reason} (MINIPEFT_BROWSER_REQUIRED=1, so this is an error, not a skip)")
    pytest.skip(reason)


def _asked_for(config) -> bool:
    """Run only when named (``pytest tests/browser``, ``make browser``): not inside ``pytest tests -k lora``."""
    if os.environ.get("MINIPEFT_BROWSER") == "1":
        return True
    paths = [(config.invocation_params.dir / a.split("::")[0]).resolve() for a in config.args]
    return any(p == HERE or HERE in p.parents for p in paths)


def pytest_collection_modifyitems(config, items):
    if _asked_for(config):
        return
    skip = pytest.mark.skip(reason="the browser test runs on its own: `make browser` (or pytest tests/browser)")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


def pytest_ignore_collect(collection_path, config):
    """The fixture notebook is opened by the browser test, not collected by nbval as a course notebook."""
    return collection_path.suffix == ".ipynb" and collection_path.parent == HERE or None


def find_chromium() -> str | None:
    candidates = [os.environ.get("MINIPEFT_CHROMIUM"), "/usr/bin/chromium",
                  shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """The screenshots and logs of this run (those of an earlier run are removed first)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in (*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.txt"), *ARTIFACTS.glob("*.log")):
        old.unlink()
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser(artifacts):
    """Headless Debian Chromium (Playwright's own browser download is not used)."""
    chromium = find_chromium()
    if chromium is None:
        _unavailable("Chromium not found: `apt-get install chromium` (or set MINIPEFT_CHROMIUM=/path/to/chrome) "
                     "to run the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the `playwright` package is missing: `.venv/bin/pip install playwright` to run the browser test")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
    except Exception:
        pw.stop()
        raise
    yield b
    try:
        b.close()
    finally:
        pw.stop()


@dataclass
class Lab:
    """A running JupyterLab: where it is, its token, and the folder it serves."""
    port: int
    token: str
    root: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 10):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self):
        """Stop every kernel (one notebook's kernel must not keep the 2 CI cores busy during the next)."""
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE", timeout=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_outputs(path: Path):
    """Clear outputs, execution counts and saved widget state: everything seen later is made in the browser."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb.get("metadata", {}).pop("widgets", None)
    path.write_text(json.dumps(nb, indent=1))


@pytest.fixture(scope="session")
def lab(browser, artifacts, tmp_path_factory):
    """JupyterLab from this Python environment on 127.0.0.1, serving a stripped copy of the notebooks."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for nb in HERE.glob("*.ipynb"):
        shutil.copy(nb, root / nb.name)
    for nb in root.glob("*.ipynb"):
        strip_outputs(nb)
    # The notebooks as committed (outputs and widget state kept), for the stored view: once as a fresh clone
    # opens them (not trusted), once trusted (signed in this server's own, otherwise empty, notary).
    data = tmp / "data"
    data.mkdir()
    notary = NotebookNotary(data_dir=str(data))
    for view in ("untrusted", "trusted"):
        (root / view).mkdir()
        for path in (ROOT / "notebooks").glob("*.ipynb"):
            nb = nbformat.read(path, as_version=4)
            nb.metadata["minipeft_browser_test"] = view  # the two copies differ: signing one leaves the other
            if view == "trusted":
                notary.sign(nb)
            nbformat.write(nb, root / view / path.name)
    # JupyterLab settings of its own: no news or update checks (no network), no user workspace or config.
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, MINIPEFT_QUICK="1", JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_DATA_DIR=str(data))
    lab = Lab(port=_free_port(), token=secrets.token_hex(16), root=root)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={lab.port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={lab.token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly"]
    log = open(artifacts / "jupyter-server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {proc.returncode}; see {log.name}")
            try:
                lab.api("status", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S} s; see {log.name}")
                time.sleep(0.5)
        yield lab
    finally:
        _stop(proc, lab)
        log.close()


def _stop(proc: subprocess.Popen, lab: Lab):
    """Shut kernels and server down politely, then by signal; bounded at every step."""
    if proc.poll() is None:
        try:
            lab.shutdown_kernels()
            lab.api("shutdown", method="POST")
        except Exception:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@dataclass
class Tab:
    """A browser tab and the console errors it logged."""
    page: object
    console: list


@pytest.fixture
def tab(browser, lab, artifacts, request):
    """A fresh browser tab; its console errors are written next to the screenshots."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
    yield Tab(page, console)
    name = request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
    (artifacts / f"{Path(name).stem}.console.txt").write_text("\n".join(console) + "\n")
    context.close()
    lab.shutdown_kernels()
