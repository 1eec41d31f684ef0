"""The notebooks and widgets in a real browser: JupyterLab driven through Debian's chromium.

JupyterLab runs as a subprocess on 127.0.0.1 (port 0; the URL is read from the runtime dir's
``jpserver-<pid>.json``), with empty token, temporary ``JUPYTER_*`` dirs and a temporary copy of
``notebooks/``. Playwright drives the system ``chromium`` (never a downloaded browser). For every
notebook in ``notebooks/``, and for a small notebook written here (``CheckpointBrowser`` and
``ReshardExplorer`` on a sample, so the browser machinery is tested even without notebooks):

1. open it, wait until its kernel is connected, idle, and answers a request;
2. run all cells and wait until every code cell has run (failing at once on an error output);
3. check that each widget output is rendered as ipywidgets 8 views (``.widget-*`` elements), not
   as a text or HTML fallback, and that its pictures loaded;
4. change a control of the first widget (a slider, else a dropdown, else a text box holding a
   number) as a user would, and wait for one of its outputs to change;
5. save element screenshots under ``test-artifacts/browser/``.

Every wait has a timeout, and pytest-timeout bounds each test, so a hang fails the test and
still stops the server and the browser. The tests skip, saying why, only when no chromium
executable can be found (``.ci/run`` installs Debian's ``chromium`` when it is missing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts" / "browser"

# what BROWSER_TESTS.md found to work headless here (no sandbox as root, no background traffic)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_TIMEOUT = 90  # s until jpserver-<pid>.json exists and /api/status answers
PAGE_TIMEOUT = 90  # s for the front end to load and open a notebook
KERNEL_TIMEOUT = 120  # s for the kernel to be connected, idle and answering
RUN_TIMEOUT = 420  # s for "run all" (02 runs a real 2-process dcp.load)
CHANGE_TIMEOUT = 90  # s for an output to follow a control
TEST_TIMEOUT = 600  # pytest-timeout per test

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# ipywidgets 8 view classes; a missing widget manager shows text or the HTML fallback instead
WIDGET_SELECTOR = ".widget-vbox, .widget-hbox, .widget-box, .widget-inline-hbox, .widget-html, .widget-image"
OUTPUT_SELECTOR = ".widget-html-content, img.widget-image, .widget-output"

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)

SMOKE_NOTEBOOK = "browser_smoke.ipynb"
SMOKE_SAMPLE = "llama_fsdp_tp_2x2"


# ------------------------------------------------------------------------------------------------
# the server and the browser
# ------------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _smoke_notebook(sample_dir: Path) -> dict[str, Any]:
    """A small notebook: CheckpointBrowser and ReshardExplorer on one sample checkpoint."""

    def code(src: str, i: int) -> dict[str, Any]:
        return {"cell_type": "code", "id": f"smoke-{i}", "metadata": {}, "execution_count": None,
                "outputs": [], "source": src}  # fmt: skip

    cells = [
        "import dcp_explorer as dx\n"
        "from dcp_explorer.widgets import CheckpointBrowser, ReshardExplorer\n"
        f"ckpt = dx.open({str(sample_dir)!r})\n"
        "print(len(ckpt.fqns), 'entries')",
        "CheckpointBrowser(ckpt)",
        'ReshardExplorer(ckpt, "dp_shard=2,tp=2", preset="fsdp_tp")',
    ]
    return {
        "cells": [code(s, i) for i, s in enumerate(cells)],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },  # fmt: skip
        "nbformat": 4,
        "nbformat_minor": 5,
    }


@dataclass
class Lab:
    url: str
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and its kernels (its own process group), politely first."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = _chromium()
    if path is None:
        pytest.skip("no chromium executable on PATH (.ci/run installs Debian's 'chromium' with apt-get; "
                    "apt-get was unavailable or failed here)")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path], chromium_path: str
) -> Iterator[Lab]:
    """JupyterLab on 127.0.0.1 over a temporary copy of the notebooks plus the smoke notebook."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    if NOTEBOOKS.is_dir():
        shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    root.mkdir(exist_ok=True)
    (root / SMOKE_NOTEBOOK).write_text(json.dumps(_smoke_notebook(samples[SMOKE_SAMPLE]), indent=1))
    dirs = {k: base / k.lower() for k in ("JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
                                          "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR")}  # fmt: skip
    for d in dirs.values():
        d.mkdir()
    # no news/update pop-up over the screenshots, no toasts
    ns = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "apputils-extension"
    ns.mkdir(parents=True)
    (ns / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
    )
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    env["DCP_EXPLORER_CACHE"] = str(base / "parse-cache")  # the kernels' parse cache: a private one
    env.pop("JUPYTER_TOKEN", None)
    log = base / "server.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
           "--ServerApp.port=0", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
           "--PasswordIdentityProvider.hashed_password=", "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={root}"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    try:
        info = dirs["JUPYTER_RUNTIME_DIR"] / f"jpserver-{proc.pid}.json"
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        url = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            # the runtime dir is ours alone: jpserver-<pid>.json, or the one server file there if
            # the launcher ran the server under another pid
            found = [info] if info.exists() else sorted(info.parent.glob("jpserver-*.json"))
            if url is None and found:
                try:
                    url = json.loads(found[0].read_text())["url"]
                except (ValueError, KeyError):
                    url = None  # written but not complete yet
            if url is not None:
                try:
                    with urllib.request.urlopen(f"{url.rstrip('/')}/api/status", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
            time.sleep(0.25)
        else:
            pytest.fail(f"jupyter lab did not start in {SERVER_START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
        yield Lab(url=url.rstrip("/") + "/", root=root, proc=proc, log=log)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def chromium_browser(chromium_path: str) -> Iterator[Any]:
    """Debian's chromium under Playwright (named so as not to clash with pytest-playwright's ``browser``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (never 'playwright install': "
                    "the tests use the system chromium)")  # fmt: skip
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True, timeout=60_000
        )
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


@pytest.fixture()
def page(chromium_browser: Any, lab: Lab) -> Iterator[Any]:
    # tall enough that a whole widget fits: JupyterLab scrolls inside its own panel, and an element
    # screenshot of something taller than the viewport catches the toolbars over it
    ctx = chromium_browser.new_context(viewport={"width": 1500, "height": 2400})
    ctx.set_default_timeout(PAGE_TIMEOUT * 1000)
    pg = ctx.new_page()
    console: list[str] = []
    pg.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    pg.console_errors = console  # type: ignore[attr-defined]
    try:
        yield pg
    finally:
        # free the kernel (each holds torch; the server stops the rest at the end), best effort: the page
        # may be gone after a timeout
        with contextlib.suppress(Exception):
            pg.evaluate("""async () => {
                const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                if (w && w.sessionContext) {
                    await Promise.race([w.sessionContext.shutdown(), new Promise(r => setTimeout(r, 15000))]);
                }
            }""")  # fmt: skip
        ctx.close()


# ------------------------------------------------------------------------------------------------
# driving a notebook
# ------------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_STATE_JS = f"""() => {{
    const w = window.jupyterapp.shell.currentWidget;
    const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
    const errors = [];
    let pending = 0, cells = 0, views = 0;
    for (const c of w.content.widgets) {{
        if (c.model.type !== 'code') continue;
        if (c.model.sharedModel.getSource().trim() === '') continue;  // empty cells are not run
        cells++;
        if (c.model.executionCount === null) pending++;
        for (let i = 0; i < c.model.outputs.length; i++) {{
            const o = c.model.outputs.get(i);
            if (o.type === 'error') {{
                const j = o.toJSON();
                errors.push(`cell ${{cells}}: ${{j.ename}}: ${{j.evalue}}\\n${{(j.traceback || []).join('\\n')}}`);
            }}
            if (o.data && o.data['{WIDGET_VIEW}']) views++;
        }}
    }}
    return {{pending, cells, views, errors, status: kernel ? kernel.status : null,
            connection: kernel ? kernel.connectionStatus : null}};
}}"""


def _state(page: Any) -> dict[str, Any]:
    return page.evaluate(_STATE_JS)


def open_notebook(page: Any, lab: Lab, name: str) -> None:
    """Open ``name`` in JupyterLab and wait until its kernel answers."""
    # ?reset: a fresh workspace, not the previous test's open notebooks (and their kernels)
    page.goto(f"{lab.url}lab/tree/{name}?reset", wait_until="domcontentloaded")
    page.wait_for_function(
        """(name) => {
            const app = window.jupyterapp;
            const w = app && app.shell.currentWidget;
            return !!(w && w.context && w.context.path.endsWith(name) && w.content && w.content.widgets.length
                      && w.sessionContext);
        }""",
        arg=name,
        timeout=PAGE_TIMEOUT * 1000,
    )  # fmt: skip
    # "idle" shows in the toolbar before the kernel is connected: wait for the real status...
    page.wait_for_function(
        """() => {
            const s = window.jupyterapp.shell.currentWidget.sessionContext;
            const k = s.session && s.session.kernel;
            return !!(k && k.connectionStatus === 'connected' && k.status === 'idle');
        }""",
        timeout=KERNEL_TIMEOUT * 1000,
    )  # fmt: skip
    # ...and for an answer to a request
    ok = page.evaluate(
        """async (ms) => {
            const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const timeout = new Promise((resolve) => setTimeout(() => resolve(null), ms));
            const reply = await Promise.race([k.requestKernelInfo(), timeout]);
            return !!(reply && reply.content && reply.content.status === 'ok');
        }""",
        KERNEL_TIMEOUT * 1000,
    )  # fmt: skip
    assert ok, f"the kernel of {name} did not answer kernel_info in {KERNEL_TIMEOUT} s"


def run_all(page: Any, name: str) -> dict[str, Any]:
    """Run every cell and wait until all have run; fail at once on an error output."""
    before = _state(page)
    assert before["cells"] > 0, f"{name} has no code cell"
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    deadline = time.monotonic() + RUN_TIMEOUT
    st = before
    while time.monotonic() < deadline:
        st = _state(page)
        if st["errors"]:
            pytest.fail(f"{name}: a cell raised:\n" + _ANSI.sub("", "\n\n".join(st["errors"]))[-6000:])
        if st["pending"] == 0 and st["status"] == "idle":
            return st
        if st["connection"] not in ("connected", "connecting", None):
            pytest.fail(f"{name}: the kernel connection is {st['connection']} (status {st['status']})")
        time.sleep(0.5)
    pytest.fail(f"{name}: {st['pending']} of {st['cells']} code cells still not run after {RUN_TIMEOUT} s "
                f"(kernel {st['status']})")  # fmt: skip


def widget_outputs(page: Any) -> Any:
    """Output areas showing a widget view (a locator over ``.jp-OutputArea-output`` elements)."""
    return page.locator(".jp-OutputArea-output").filter(has=page.locator(WIDGET_SELECTOR))


def check_widgets_rendered(page: Any, name: str, expected_views: int) -> None:
    """Every widget output is an ipywidgets 8 view whose pictures loaded; no fallback text."""
    outs = widget_outputs(page)
    page.wait_for_function(
        """([sel, n]) => {
            const outs = [...document.querySelectorAll('.jp-OutputArea-output')];
            return outs.filter(o => o.querySelector(sel)).length >= n
                   && !outs.some(o => o.innerText.includes('Loading widget...'));
        }""",
        arg=[WIDGET_SELECTOR, expected_views],
        timeout=PAGE_TIMEOUT * 1000,
    )  # fmt: skip
    assert outs.count() >= expected_views
    text = page.locator(".jp-NotebookPanel .jp-OutputArea").all_inner_texts()
    for t in text:
        for bad in ("Error displaying widget", "VBox(children=", "HBox(children="):
            assert bad not in t, f"{name}: an output shows {bad!r} instead of a widget view:\n{t[:500]}"
    # the pictures inside widgets are real images (decoded, non-empty)
    page.wait_for_function(
        """() => [...document.querySelectorAll('.jp-OutputArea-output img.widget-image')]
                 .filter(i => i.getAttribute('src')).every(i => i.complete)""",
        timeout=PAGE_TIMEOUT * 1000,
    )  # fmt: skip
    # an Image widget with no value yet (lazy tabs, nothing selected) shows an empty blob: skip those
    sizes = page.evaluate(
        """async () => Promise.all([...document.querySelectorAll('.jp-OutputArea-output img.widget-image')]
            .filter(i => i.getAttribute('src'))
            .map(async i => [(await (await fetch(i.src)).blob()).size, i.naturalWidth]))"""
    )  # fmt: skip
    shown = [w for size, w in sizes if size > 0]
    assert shown, f"{name}: its widgets show no picture"
    assert all(w > 0 for w in shown), f"{name}: {sum(w == 0 for w in shown)} widget image(s) did not decode"


_FINGERPRINT_JS = f"""(el) => [...el.querySelectorAll('{OUTPUT_SELECTOR}')]
    .map(e => e.tagName === 'IMG' ? 'img:' + (e.getAttribute('src') || '') : e.innerHTML).join('\\u0001')"""


def fingerprint(out: Any) -> str:
    """The outputs inside one widget (HTML contents and image sources), not its controls."""
    return out.evaluate(_FINGERPRINT_JS)


def wait_settled(out: Any, quiet: float = 1.5, timeout: float = CHANGE_TIMEOUT) -> str:
    """Wait until the widget's outputs stop changing for ``quiet`` seconds (an update sends several)."""
    deadline = time.monotonic() + timeout
    last, since = fingerprint(out), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = fingerprint(out)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def wait_changed(out: Any, before: str, timeout: float = CHANGE_TIMEOUT) -> bool:
    """Whether the widget's outputs differ from ``before`` within ``timeout``; then let them settle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fingerprint(out) != before:
            wait_settled(out)
            return True
        time.sleep(0.25)
    return False


def _bump_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return None if m is None else text[: m.start()] + str(int(m.group()) + 1) + text[m.end() :]


def change_a_control(page: Any, out: Any) -> str | None:
    """Change the first slider (keyboard), else dropdown (another option), else number in a text box.

    Returns a description of what was changed and how the outputs followed, or None when the
    widget has no control of those kinds. Fails when a control changed but no output followed.
    """
    tried = []
    sliders = out.locator(".widget-slider .noUi-handle")
    if sliders.count():
        h = sliders.first
        now, top = h.get_attribute("aria-valuenow"), h.get_attribute("aria-valuemax")
        before = fingerprint(out)
        h.focus()
        key = (
            "ArrowLeft" if now is not None and top is not None and float(now) >= float(top) else "ArrowRight"
        )
        h.press(key)
        after_value = h.get_attribute("aria-valuenow")
        tried.append(f"slider {now} -> {after_value}")
        if wait_changed(out, before):
            return tried[-1]
    dropdowns = out.locator(".widget-dropdown select")
    for i in range(dropdowns.count()):
        sel = dropdowns.nth(i)
        options = sel.locator("option").all_text_contents()
        if len(options) < 2:
            continue
        current = sel.evaluate("(s) => s.selectedIndex")
        pick = 1 if current == 0 else 0
        before = fingerprint(out)
        sel.select_option(index=pick)
        tried.append(f"dropdown {options[current] if current >= 0 else None!r} -> {options[pick]!r}")
        if wait_changed(out, before):
            return tried[-1]
        break
    texts = out.locator(".widget-text input")
    for i in range(texts.count()):
        box = texts.nth(i)
        new = _bump_number(box.input_value())
        if new is None:
            continue
        before = fingerprint(out)
        box.fill(new)
        box.press("Enter")
        tried.append(f"text -> {new!r}")
        if wait_changed(out, before):
            return tried[-1]
        break
    if tried:
        pytest.fail(f"no output of the widget changed in {CHANGE_TIMEOUT} s after: {'; '.join(tried)}")
    return None


def shot(locator: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path), animations="disabled")
    assert path.stat().st_size > 1000
    return path


def exercise_notebook(page: Any, lab: Lab, name: str) -> dict[str, Any]:
    """Open, run all, check the widget views, change a control, take screenshots."""
    stem = Path(name).stem
    open_notebook(page, lab, name)
    st = run_all(page, name)
    result: dict[str, Any] = {"views": st["views"], "changed": None}
    if st["views"]:
        check_widgets_rendered(page, name, st["views"])
        outs = widget_outputs(page)
        for i in range(outs.count()):
            wait_settled(outs.nth(i), quiet=1.0)
            shot(outs.nth(i), f"{stem}-widget{i}")
        for i in range(outs.count()):  # the first widget that has a control
            out = outs.nth(i)
            out.scroll_into_view_if_needed()
            what = change_a_control(page, out)
            if what is not None:
                result["changed"] = what
                shot(out, f"{stem}-widget{i}-changed")
                break
    else:
        shot(page.locator(".jp-NotebookPanel").first, f"{stem}-notebook")
    errors = [e for e in page.console_errors if "widget" in e.lower()]
    assert not errors, f"{name}: widget errors in the browser console: {errors[:5]}"
    return result


# ------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------
NOTEBOOK_NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) if NOTEBOOKS.is_dir() else []


def test_widgets_work_in_a_real_browser(page: Any, lab: Lab) -> None:
    """The smoke notebook: both widgets render, and their outputs follow the controls through the kernel."""
    res = exercise_notebook(page, lab, SMOKE_NOTEBOOK)
    print(f"{SMOKE_NOTEBOOK}: {res['views']} widget view(s); changed: {res['changed']}")
    assert res["views"] == 2
    assert res["changed"] and res["changed"].startswith("slider"), res  # CheckpointBrowser's module depth
    browser_out, reshard_out = widget_outputs(page).nth(0), widget_outputs(page).nth(1)

    # CheckpointBrowser: filter names, pick a tensor -> its chunk map appears
    count = browser_out.locator(".widget-html-content", has_text="entries match")
    total = int(re.search(r"of ([\d,]+) entries", count.inner_text()).group(1).replace(",", ""))
    box = browser_out.locator(".widget-text input").first
    box.fill("model.layers.*.attention.wq.weight")
    box.press("Enter")
    page.wait_for_function(
        "(el) => /^\\s*2 of/.test(el.innerText)", arg=count.element_handle(), timeout=CHANGE_TIMEOUT * 1000
    )  # two layers' wq in the sample
    select = browser_out.locator(".widget-select select")
    assert select.locator("option").count() == 2
    select.select_option(index=1)
    img = browser_out.locator("img.widget-image").first
    page.wait_for_function("(i) => i.getAttribute('src') && i.complete && i.naturalWidth > 100",
                           arg=img.element_handle(), timeout=CHANGE_TIMEOUT * 1000)  # fmt: skip
    assert "model.layers.1.attention.wq.weight" in browser_out.inner_text()
    assert total > 2
    shot(browser_out, "browser_smoke-checkpoint-browser-selected")

    # ReshardExplorer: type a new mesh -> the slider and the totals follow
    mesh = reshard_out.locator(".widget-text input").first
    assert mesh.input_value() == "dp_shard=2,tp=2"
    totals = reshard_out.locator(".widget-html-content", has_text="read items").first
    mesh.fill("dp_shard=3,tp=2")
    mesh.press("Enter")
    page.wait_for_function("(el) => el.innerText.includes('dp_shard=3,tp=2 (6 ranks)')",
                           arg=totals.element_handle(), timeout=CHANGE_TIMEOUT * 1000)  # fmt: skip
    readout = reshard_out.locator(".widget-slider .widget-readout").first
    page.wait_for_function("(r) => r.innerText.trim() === '3'", arg=readout.element_handle(),
                           timeout=CHANGE_TIMEOUT * 1000)  # fmt: skip
    # and the preset dropdown: fsdp on a 2-D mesh -> the totals change again
    before = totals.inner_text()
    reshard_out.locator(".widget-dropdown select").first.select_option("fsdp")
    page.wait_for_function("([el, t]) => el.innerText !== t", arg=[totals.element_handle(), before],
                           timeout=CHANGE_TIMEOUT * 1000)  # fmt: skip
    assert "will load" in totals.inner_text()
    wait_settled(reshard_out)  # the picture follows the totals line
    shot(reshard_out, "browser_smoke-reshard-explorer-dp3")


@pytest.mark.skipif(not NOTEBOOK_NAMES, reason="no notebooks in notebooks/ (the smoke test still runs)")
@pytest.mark.parametrize("name", NOTEBOOK_NAMES or ["(none)"])
def test_notebook_runs_in_a_real_browser(page: Any, lab: Lab, name: str) -> None:
    res = exercise_notebook(page, lab, name)
    print(f"{name}: {res['views']} widget view(s); changed: {res['changed']}")  # shown with -s / -rP
    if res["views"]:
        assert res["changed"] is not None, (
            f"{name}: its widgets have no slider, dropdown or numeric text box to change"
        )
