"""The read-only guarantee: every public operation leaves a checkpoint directory exactly as it was.

Copies of the samples (every format) are made read-only (files 0444, directories 0555) and every
public operation runs on them: open (cold and warm parse cache, strict and lenient, one rank of
per-rank metadata), the tables, ``quant``/``quant_check``, ``simulate_load`` and the plan's tables,
``load`` (everything, slices, casts, raw quantized), ``diff``, ``export`` to a directory elsewhere
(and refused inside), the widgets, the plots and the CLI. After each operation:

* every file's bytes (sha256), size and mtime, every directory's mtime and the set of names are
  unchanged, and no file appeared;
* no file inside was opened for writing, and no remove/rename/mkdir/chmod/utime/truncate/link
  happened inside (audit hooks, ``tests/_guard.py``) -- this is what holds when the tests run as
  root, for whom the permission bits alone stop nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _guard import watching

import dcp_explorer as dx

torch = pytest.importorskip("torch")

NAMES = ("mixed", "mixed_per_rank", "mixed_zstd", "llama_fsdp_ws2", "llama_fsdp_tp_2x2", "hf_rank0",
         "hf_distributed", "hf_consolidated", "fp8_block", "mxfp4")  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        else:
            out[rel] = (
                "f",
                stat.S_IMODE(st.st_mode),
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def _chmod_tree(root: Path, file_mode: int, dir_mode: int) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        p.chmod(dir_mode if p.is_dir() else file_mode)
    root.chmod(dir_mode)


@pytest.fixture(scope="module")
def ro(samples, tmp_path_factory):
    """name -> read-only copy of that sample (all under one read-only directory)."""
    root = tmp_path_factory.mktemp("readonly") / "ckpts"
    root.mkdir()
    for n in NAMES:
        shutil.copytree(samples[n], root / n)
    _chmod_tree(root, 0o444, 0o555)
    try:
        yield {n: root / n for n in NAMES} | {"_root": root}
    finally:
        _chmod_tree(root, 0o644, 0o755)  # so that pytest can clean up


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(tmp_path / "dcpx-cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


# ------------------------------------------------------------------------------------------ operations
def op_open_and_tables(ro: dict[str, Path], out: Path) -> None:
    for n in NAMES:
        for strict in (True, False):
            for _ in range(2):  # cold, then from the parse cache
                ck = dx.open(ro[n], strict=strict)
                ck.tensors, ck.chunks, ck.files, ck.summary(), repr(ck), ck._repr_html_()
                for depth in (1, 2, 3):
                    ck.modules(depth)
                for fqn in ck.fqns:
                    if ck.tensor(fqn).kind == "tensor":
                        ck.chunks_of(fqn)
                ck.file_sizes()
    _ = dx.open(ro["mixed_per_rank"], rank=2).tensors
    _ = dx.open(ro["hf_rank0"] / "model-00001-of-00003.safetensors").tensors  # a single file
    _ = dx.open(ro["mixed"] / ".metadata", format="dcp").chunks


def op_quant(ro: dict[str, Path], out: Path) -> None:
    for n in ("fp8_block", "mxfp4"):
        ck = dx.open(ro[n])
        _ = ck.quant
        ck.quant_check()


def op_simulate(ro: dict[str, Path], out: Path) -> None:
    tp = dx.open(ro["llama_fsdp_tp_2x2"])
    for mesh, preset in (("dp_shard=2,tp=2", "fsdp_tp"), (3, "fsdp"), ("dp=2", "replicate")):
        plan = dx.simulate_load(tp, mesh, preset=preset)
        plan.per_rank, plan.per_file, plan.traffic, plan.totals(), plan.problems_table, plan._repr_html_()
        plan.reads_for(0), plan.reads
    dx.simulate_load(str(ro["mixed"]), 2).totals()
    dx.simulate_load(dx.open(ro["hf_distributed"]), 3).totals()


def op_load(ro: dict[str, Path], out: Path) -> None:
    for n in NAMES:
        ck = dx.open(ro[n])
        ck.load("*")
        name = next(f for f in ck.fqns if ck.tensor(f).kind == "tensor" and len(ck.tensor(f).shape) == 2)
        ck.load(name, slices="0:2, 1:", dtype="float64")
        if ck.index.quant:
            ck.load("*", dequantize=False)
        ck.loader.close()


def op_diff(ro: dict[str, Path], out: Path) -> None:
    d = dx.diff(ro["llama_fsdp_ws2"], ro["llama_fsdp_tp_2x2"], atol=1e-6)
    _ = d.table, d.summary(), d.report(), d._repr_html_(), repr(d)
    d2 = dx.diff(dx.open(ro["mixed"]), ro["mixed_zstd"])
    _ = d2.table, d2.equal
    _ = dx.diff(ro["hf_rank0"], ro["hf_consolidated"]).table


def op_export(ro: dict[str, Path], out: Path) -> None:
    ck = dx.open(ro["mixed"])
    ck.export("model.*", out / "st")
    ck.export("*", out / "all.pt", format="torch")
    dx.open(ro["fp8_block"]).export("*", out / "fp8", max_shard_size=100_000)
    with pytest.raises(dx.DcpExplorerError, match="inside the checkpoint"):
        ck.export("*", ro["mixed"] / "copy")


def op_widgets(ro: dict[str, Path], out: Path) -> None:
    from dcp_explorer.widgets import CheckpointBrowser, DiffViewer, QuantViewer, ReshardExplorer

    tp = dx.open(ro["llama_fsdp_tp_2x2"])
    b = CheckpointBrowser(tp)
    b.search.value = "attention"
    b.tensor.value = "model.layers.0.attention.wq.weight"
    b.preview_button.click()
    b.depth.value = 1
    assert b.error.value == ""
    mixed = CheckpointBrowser(dx.open(ro["mixed"]))
    mixed.tensor.value = "extra.cfg.betas"
    mixed.preview_button.click()
    r = ReshardExplorer(tp, "dp_shard=2,tp=2", preset="fsdp_tp")
    r.world_size.value = 3
    for i in range(4):
        r.tabs.selected_index = i
    assert r.error.value == ""
    q = QuantViewer(dx.open(ro["fp8_block"]))
    q.tensor.value = (
        q.tensor.options[-1][1] if isinstance(q.tensor.options[-1], tuple) else q.tensor.options[-1]
    )
    QuantViewer(dx.open(ro["mxfp4"]))
    DiffViewer(dx.diff(ro["llama_fsdp_ws2"], ro["llama_fsdp_tp_2x2"]))


def op_plots(ro: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcp_explorer import viz, viz_quant

    tp = dx.open(ro["llama_fsdp_tp_2x2"])
    plan = dx.simulate_load(tp, "dp_shard=2,tp=2", preset="fsdp_tp")
    viz.plot_chunk_map(tp, "model.layers.0.attention.wq.weight")
    viz.plot_reshard_overlay(plan, "model.layers.0.attention.wq.weight")
    viz.plot_rank_bytes(plan), viz.plot_traffic(plan), viz.plot_file_fanin(plan)
    fp8 = dx.open(ro["fp8_block"])
    viz_quant.plot_quant_scales(fp8, fp8.quant.fqn.iloc[0])
    viz_quant.plot_quant_codes(fp8, fp8.quant.fqn.iloc[0])
    plt.close("all")


def op_cli(ro: dict[str, Path], out: Path, capsys: Any = None) -> None:
    from dcp_explorer.cli import main

    tp = str(ro["llama_fsdp_tp_2x2"])
    assert main(["info", tp]) == 0
    assert main(["info", str(ro["mixed_per_rank"]), "--rank", "1", "--json"]) == 0
    assert (
        main(["plan", tp, "--mesh", "dp_shard=2,tp=2", "--preset", "fsdp_tp", "--csv", str(out / "plan.csv")])
        == 0
    )
    assert main(["load", tp, "model.layers.0.attention.wq.weight", "--slice", "0:3, :"]) == 0
    assert main(["load", str(ro["mixed"]), "extra.cfg.betas"]) == 0
    assert main(["export", str(ro["hf_rank0"]), "--to", str(out / "cli-export")]) == 0
    assert main(["diff", str(ro["mixed"]), str(ro["mixed_zstd"])]) == 0


OPERATIONS: dict[str, Callable[..., None]] = {
    "open_and_tables": op_open_and_tables,
    "quant": op_quant,
    "simulate_load": op_simulate,
    "load": op_load,
    "diff": op_diff,
    "export_elsewhere": op_export,
    "widgets": op_widgets,
    "plots": op_plots,
    "cli": op_cli,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_operation_leaves_checkpoints_untouched(
    name: str, ro: dict[str, Path], tmp_path: Path, capsys
) -> None:
    root = ro["_root"]
    before = snapshot(root)
    out = tmp_path / "out"
    out.mkdir()
    with watching() as w:
        OPERATIONS[name](ro, out)
    capsys.readouterr()
    writes = w.writes_under(root)
    assert writes == [], f"{name} wrote inside a checkpoint: {writes[:5]}"
    after = snapshot(root)
    assert sorted(after) == sorted(before), f"{name}: names changed: {set(after) ^ set(before)}"
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], f"{name} changed {changed[:5]}"
    if name in ("export_elsewhere", "cli"):
        assert any(out.rglob("*.safetensors")), "the export went somewhere else"


def test_directories_are_really_read_only(ro: dict[str, Path]) -> None:
    """The fixture does make the copies read-only (for a non-root user the OS then refuses writes too)."""
    for p in [ro["_root"], *ro["_root"].rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o222 == 0, p
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            (ro["mixed"] / "new-file").write_bytes(b"")
