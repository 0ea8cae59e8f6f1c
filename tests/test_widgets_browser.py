"""The interactive figures in real JupyterLab, in headless Chromium: open each notebook with widgets, run its cells
up to its last widget in smoke mode (the cells after it are nbval's, which runs every cell), move every control of
its widgets and check that the figure the widget draws changes.

Needs Debian's `chromium` (or $CHROMIUM naming a Chromium or Chrome binary) and the `playwright` package, driven with
that executable (no browser download); `make test` installs both where it can. Skips with the reason otherwise."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("02_guided_distillation.ipynb", "03_rectified_flow.ipynb", "12_leaderboard.ipynb")
RUN_TIMEOUT_S = 600
WIDGET = re.compile(r"ipywidgets|\.widget\(\)")     # a cell that builds an interactive figure

pytestmark = pytest.mark.slow


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free local port, serving copies of the notebooks (smoke mode, offline)."""
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (make install does)")
    if chromium() is None:
        pytest.skip("no Chromium found: install Debian's chromium (apt-get install chromium) or set $CHROMIUM")
    root = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "solutions" / name, as_version=4)
        last = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and WIDGET.search(c.source))
        nb.cells = nb.cells[:last + 1]
        nbformat.write(nb, root / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # every cell in the page, not only those in view (JupyterLab's windowing): the test reads every cell's prompt
    settings = root / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    env = {**os.environ, "COURSE_MODE": "smoke", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(root / "settings")}
    env.pop("MPLBACKEND", None)                       # the kernel draws inline, as for a student
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
                               f"--port={port}", "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=",
                               "--ServerApp.password=", f"--ServerApp.root_dir={root}",
                               f"--LabApp.workspaces_dir={root / 'workspaces'}",
                               "--ServerApp.disable_check_xsrf=True"],         # a local server without auth
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start: {(root / 'server.log').read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def prompts(page) -> list[str]:
    """Every code cell's input prompt: "[ ]:" not run, "[*]:" queued or running, "[12]:" done."""
    return page.locator(".jp-CodeCell .jp-InputPrompt").evaluate_all("els => els.map(e => e.textContent.trim())")


def run_all(page, url: str) -> None:
    """Open the notebook, wait for its kernel, run all cells from JupyterLab's Run menu and wait until every code cell
    has its execution count (on a loaded machine the kernel can take many seconds to start, and cells go idle
    between each other); fail on an error."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", state="attached", timeout=120_000)
    page.wait_for_selector(".jp-StatusBar-Widget:has-text('| Idle')", timeout=180_000)  # the kernel is up
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    errors = page.locator(f"{stderr}:has-text('Traceback')")          # Run All stops at a cell that fails
    t0 = time.time()
    while not all(re.fullmatch(r"\[\d+\]:", p) for p in prompts(page)) and not errors.count():
        assert time.time() - t0 < RUN_TIMEOUT_S, f"the notebook did not finish running: prompts {prompts(page)}"
        page.wait_for_timeout(1000)
    assert errors.count() == 0, errors.first.inner_text()[-2000:]


def widget_images(page) -> list[str]:
    """The images the widgets' output areas show now (each data URL's length and a sample of its middle and end:
    enough to tell two figures apart)."""
    return page.locator(".widget-output img").evaluate_all(
        "els => els.map(e => e.src.length + ':' + e.src.slice(200, 600) + e.src.slice(-300))")


def settled(page) -> list[str]:
    """The widgets' images once they stop changing (a control can trigger more than one redraw)."""
    last = widget_images(page)
    for _ in range(40):
        page.wait_for_timeout(750)
        now = widget_images(page)
        if now == last:
            return now
        last = now
    return last


def wait_for_change(page, before: list[str], what: str) -> None:
    for _ in range(120):
        page.wait_for_timeout(500)
        now = widget_images(page)
        if now and now != before:
            return
    pytest.fail(f"moving {what} did not change the widget's figure")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_control_redraws_its_figure(browser, lab, name):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        # a workspace of its own, reset: JupyterLab would otherwise reopen the previous notebook's tab beside it, and
        # on a loaded machine that tab can take the focus that Run All acts on
        run_all(page, f"{lab}/lab/workspaces/{Path(name).stem}/tree/{name}?reset")
        assert widget_images(page), "no widget drew a figure"
        moved = 0
        for i in range(page.locator(".noUi-handle").count()):          # sliders (FloatSlider, SelectionSlider)
            before = settled(page)
            handle = page.locator(".noUi-handle").nth(i)
            handle.scroll_into_view_if_needed()
            handle.focus()
            for key in ("ArrowRight", "ArrowRight"):
                page.keyboard.press(key)
            wait_for_change(page, before, f"slider {i}")
            moved += 1
        for i in range(page.locator(".widget-dropdown select").count()):  # dropdowns
            select = page.locator(".widget-dropdown select").nth(i)
            options = select.locator("option").evaluate_all("els => els.map(e => e.value)")
            if len(options) < 2:
                continue
            before = settled(page)
            select.select_option(options[1])
            wait_for_change(page, before, f"dropdown {i}")
            moved += 1
        for i in range(page.locator(".widget-toggle-buttons").count()):  # toggle buttons: press the next one
            group = page.locator(".widget-toggle-buttons").nth(i).locator("button")
            if group.count() < 2:
                continue
            before = settled(page)
            active = lambda j: "mod-active" in (group.nth(j).get_attribute("class") or "")
            target = next(j for j in range(group.count()) if not active(j))
            group.nth(target).click()
            wait_for_change(page, before, f"toggle buttons {i}")
            moved += 1
        assert moved >= 1
    finally:
        page.close()
        shut_down_kernels(lab)


def shut_down_kernels(lab: str) -> None:
    """End the notebook's kernel (JupyterLab keeps it after the page closes; it would share the CPU with the next)."""
    import json

    for session in json.load(urllib.request.urlopen(f"{lab}/api/sessions", timeout=10)):
        urllib.request.urlopen(urllib.request.Request(f"{lab}/api/sessions/{session['id']}", method="DELETE"),
                               timeout=30)
