"""The notebooks in ``notebooks/``: committed clean, and they run headless from top to bottom.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (working directory: a temporary
folder; parse cache: a private one), as a new user would run it. A run fails on any error output or
any warning/traceback on stderr; then its content is checked -- the widget views exist (with their
static HTML fallback and, in the saved widget state, their pictures), and key text and pictures
appear -- never exact saved outputs.
"""

from __future__ import annotations

import base64
import pathlib
import time
from typing import Any

import nbclient  # with nbformat, installed by jupyterlab (through nbconvert): no silent skip in CI
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01_browse_checkpoint", "02_simulate_resharding", "03_quantized_tensors", "04_diff_checkpoints")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PNG = b"\x89PNG"
# seconds per cell: above 02's verify cell, which waits up to 360 s for `dcp_explorer.verify` (itself
# stopping at 300 s with the workers' logs), so a slow or stuck run fails with its own diagnosis
CELL_TIMEOUT = 400
IOPUB_TIMEOUT = 60  # seconds to wait for a cell's outputs after its execution reply
NOTEBOOK_BUDGET = 120  # seconds per notebook: they aim at ~30 s on 2 cores; this only catches a runaway


def _read(name: str) -> Any:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


# ------------------------------------------------------------------------------------------------
# committed state
# ------------------------------------------------------------------------------------------------
def test_the_four_notebooks_are_there():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    for c in code:
        assert c.outputs == [], f"cell {c.get('id')} of {name} has saved outputs"
        assert c.execution_count is None, f"cell {c.get('id')} of {name} has an execution count"
    assert "widgets" not in nb.metadata, f"{name} carries saved widget state"
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_is_where_a_user_points_at_their_checkpoint(name):
    nb = _read(name)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.source.lstrip().startswith("CKPT") and "= None" in first.source
    assert "/path" in first.source or "e.g." in first.source
    # the story is told in markdown between the code cells
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= len(kinds) // 3


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_make_their_own_data(name):
    src = "\n".join(c.source for c in _read(name).cells if c.cell_type == "code")
    assert "make_samples(" in src


# ------------------------------------------------------------------------------------------------
# executed
# ------------------------------------------------------------------------------------------------
class Run:
    """An executed notebook and helpers to look at its outputs."""

    def __init__(self, nb: Any, seconds: float) -> None:
        self.nb = nb
        self.seconds = seconds
        self.outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        st = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {})
        self.models: dict[str, Any] = st.get("state", {})

    def text(self) -> str:
        """All stdout and text/plain + text/html outputs, joined."""
        parts = []
        for o in self.outputs:
            if o.output_type == "stream" and o.name == "stdout":
                parts.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                parts.append(str(o.data.get("text/plain", "")))
                parts.append(str(o.data.get("text/html", "")))
        return "\n".join(parts)

    def pngs(self) -> list[bytes]:
        return [base64.b64decode(o.data["image/png"]) for o in self.outputs
                if o.output_type in ("execute_result", "display_data") and "image/png" in o.data]  # fmt: skip

    def widget_views(self) -> list[Any]:
        """(model_id, text/html fallback) of every widget displayed."""
        out = []
        for o in self.outputs:
            if o.output_type in ("execute_result", "display_data") and WIDGET_VIEW in o.data:
                out.append((o.data[WIDGET_VIEW]["model_id"], str(o.data.get("text/html", ""))))
        return out

    def descendants(self, model_id: str) -> list[dict[str, Any]]:
        """Every widget model reachable from ``model_id`` through its children (saved widget state)."""
        seen: set[str] = set()
        todo = [model_id]
        out = []
        while todo:
            mid = todo.pop()
            if mid in seen or mid not in self.models:
                continue
            seen.add(mid)
            m = self.models[mid]
            out.append(m)
            for ref in m["state"].get("children", []) or []:
                todo.append(str(ref).removeprefix("IPY_MODEL_"))
        return out

    def widget_pngs(self, model_id: str) -> list[bytes]:
        """The non-empty PNG values of the Image widgets inside a displayed widget."""
        pics = []
        for m in self.descendants(model_id):
            if m["model_name"] != "ImageModel":
                continue
            for b in m.get("buffers", []):
                if b["path"] == ["value"]:
                    data = base64.b64decode(b["data"])
                    if data.startswith(PNG):
                        pics.append(data)
        return pics

    def widget_html(self, model_id: str) -> str:
        return "\n".join(str(m["state"].get("value", "")) for m in self.descendants(model_id)
                         if m["model_name"] == "HTMLModel")  # fmt: skip


_RUNS: dict[str, Run] = {}


@pytest.fixture(scope="module")
def run_notebook(samples, tmp_path_factory):
    """name -> Run, executing each notebook once per test session (after the samples are built)."""

    def run(name: str) -> Run:
        if name not in _RUNS:
            nb = _read(name)
            work = tmp_path_factory.mktemp(f"nb-{name[:2]}")
            mp = pytest.MonkeyPatch()
            mp.setenv("DCP_EXPLORER_CACHE", str(work / "dcpx-cache"))  # the kernel inherits it
            mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
            try:
                # a loaded CI machine can deliver a cell's last outputs seconds after its reply: wait for
                # them (nbclient's default, 4 s, then drops them silently), and fail if they never come
                client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                                 iopub_timeout=IOPUB_TIMEOUT, raise_on_iopub_timeout=True,
                                                 resources={"metadata": {"path": str(work)}})  # fmt: skip
                t0 = time.perf_counter()
                client.execute()
                seconds = time.perf_counter() - t0
            finally:
                mp.undo()
            _RUNS[name] = Run(nb, seconds)
        return _RUNS[name]

    return run


@pytest.mark.parametrize("name", NAMES)
def test_runs_without_errors_or_warnings(run_notebook, name):
    r = run_notebook(name)
    errors = [o for o in r.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    noisy = [o.text for o in r.outputs if o.output_type == "stream" and o.name == "stderr"
             and any(w in o.text for w in ("Traceback", "Error", "Warning", "warn"))]  # fmt: skip
    assert not noisy, f"{name} printed to stderr:\n{noisy[0][:2000]}"
    assert r.seconds < NOTEBOOK_BUDGET, f"{name} took {r.seconds:.0f} s"
    # every code cell ran and a widget display is always the last expression of its cell
    for c in r.nb.cells:
        if c.cell_type == "code":
            assert c.execution_count is not None


def test_01_browse(run_notebook):
    r = run_notebook("01_browse_checkpoint")
    text = r.text()
    assert "dcp_explorer.Checkpoint" in text  # the HTML card
    for col in ("num_chunks", "byte_offset", "size_on_disk", "module"):  # tensors, chunks, files, modules
        assert col in text
    assert "model.layers.0.feed_forward.w1.weight[4, 72]" in text and "bytes of the" in text  # slice load
    assert "(0.9, 0.999)" in text  # a bytes item, decoded by the restricted unpickler
    assert "UnsafePickleError" in text and "builtins.print" in text
    assert "this code ran while the checkpoint was opened!" not in text  # the payload never ran
    assert len(r.pngs()) >= 2  # chunk maps, module bytes
    (view,) = r.widget_views()
    mid, fallback = view
    assert "dcp_explorer.Checkpoint" in fallback
    assert len(r.widget_pngs(mid)) >= 2  # the chunk map and the preview histogram
    assert "bytes read" in r.widget_html(mid)  # the preview ran


def test_02_resharding(run_notebook):
    r = run_notebook("02_simulate_resharding")
    text = r.text()
    assert "LoadPlan" in text
    for col in ("bytes_needed", "amplification", "num_ranks", "loading_rank", "storage_offsets"):
        assert col in text
    assert "will it load? False" in text and "size_mismatch" in text and "missing_key" in text
    (cell,) = [c for c in r.nb.cells if c.cell_type == "code" and "dcp_explorer.verify" in c.source]
    verify = "".join(o.get("text", "") for o in cell.outputs)
    assert "rank 0: OK" in verify and "rank 1: OK" in verify and "exit code 0" in verify, (
        cell.outputs
    )  # dcp.load agreed
    assert len(r.pngs()) >= 2
    (view,) = r.widget_views()
    mid, fallback = view
    assert "LoadPlan" in fallback
    assert r.widget_pngs(mid)  # the visible tab's picture
    assert "will load" in r.widget_html(mid)


def test_03_quantized(run_notebook):
    r = run_notebook("03_quantized_tensors")
    text = r.text()
    assert "codes x block scale == ckpt.load: True" in text
    assert "bits_per_value" in text and "4.25" in text  # ckpt.quant of both samples
    assert "largest relative block error" in text
    assert "scale_nan" in text and "zero_blocks" in text  # the corrupted copy is caught
    assert len(r.pngs()) >= 3
    views = r.widget_views()
    assert len(views) == 2
    (good, good_html), (bad, bad_html) = views
    assert "QuantViewer" in good_html and "QuantViewer" in bad_html
    assert len(r.widget_pngs(good)) == 5  # scales, range, codes, values and the error vs the reference
    assert len(r.widget_pngs(bad)) == 4  # no reference for the corrupted copy
    assert "no problems found" in r.widget_html(good)
    html = r.widget_html(bad)
    assert "scale_nan" in html and "scale_zero" in html and "zero_blocks" in html
    assert "scale_nan" in bad_html  # the static fallback shows the problems too


def test_04_diff(run_notebook):
    r = run_notebook("04_diff_checkpoints")
    text = r.text()
    assert "CheckpointDiff" in text and "EQUAL" in text
    assert "{'layout':" in text  # resharded: layout changes, ignored
    assert "dtype float32 -> bfloat16" in text and "equal within bf16 rounding: True" in text
    for s in ("only_in_a", "only_in_b", "(7, 0)"):  # the edits, exactly
        assert s in text
    assert "non-zero: 4" in text  # the block map finds the edited 16x16 corner
    assert len(r.pngs()) >= 1
    (view,) = r.widget_views()
    mid, fallback = view
    assert "CheckpointDiff" in fallback and "data:image/png;base64" in fallback
    assert len(r.widget_pngs(mid)) == 1
    html = r.widget_html(mid)
    assert "DIFFERENT" in html and "model.tok_embeddings.weight" in html
