"""Opening and browsing a checkpoint imports neither torch nor any widget or plotting library.

Run in a fresh interpreter (this one has torch loaded already); the child prints
``sys.modules`` and the parent checks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "ipywidgets", "matplotlib")

CHILD = textwrap.dedent(
    """
    import json, sys
    import dcp_explorer
    after_import = sorted(sys.modules)
    opened = {}
    for path in sys.argv[1:]:
        for _ in range(2):  # cold, then from the parse cache
            ck = dcp_explorer.open(path)
            ck.tensors; ck.chunks; ck.files; ck.modules(); ck.summary(); ck._repr_html_(); repr(ck)
            for fqn in ck.fqns:
                ck.chunks_of(fqn)
        opened[path] = [ck.format, len(ck.fqns), ck.from_cache]
    print(json.dumps({"after_import": after_import, "after_use": sorted(sys.modules), "opened": opened}))
    """
)


def _run_child(paths, tmp_path):
    env = dict(os.environ, DCP_EXPLORER_CACHE=str(tmp_path / "dcpx-cache"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(modules):
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.fixture(scope="module")
def child_report(samples, tmp_path_factory):
    names = [n for n in ("mixed", "mixed_per_rank", "llama_fsdp_tp_2x2", "hf_rank0", "hf_distributed", "mxfp4")
             if n in samples]  # fmt: skip
    return names, _run_child([samples[n] for n in names], tmp_path_factory.mktemp("lazy"))


def test_import_is_light(child_report):
    _names, report = child_report
    assert _heavy(report["after_import"]) == []


def test_open_and_browse_is_light(child_report, samples):
    names, report = child_report
    assert len(report["opened"]) == len(names)
    formats = {v[0] for v in report["opened"].values()}
    assert "dcp" in formats and formats - {"dcp"}, "both a DCP and a safetensors sample were opened"
    assert any(v[2] for v in report["opened"].values()), "the cached path was exercised"
    assert all(v[1] > 0 for v in report["opened"].values())
    assert _heavy(report["after_use"]) == []


def test_the_check_can_fail(tmp_path):
    """The child's report does see a heavy import when there is one."""
    code = "import json, sys, torch; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "torch" in _heavy(json.loads(out.stdout))
