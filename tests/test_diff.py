"""``dcp_explorer.diff``: known edits are reported exactly, and nothing else.

The edited checkpoints are made here with torch itself: the ``llama_fsdp_ws1`` sample is loaded
with torch's ``_load_state_dict_from_keys``, edited (one tensor scaled, one row changed, one key
removed, one renamed, one cast to bf16, one bytes entry changed) and saved again with
``dcp.save(no_dist=True)``, ``HuggingFaceStorageWriter`` or ``torch.save``. Statistics are
checked against float64 torch computations on the loaded tensors, never against dcp_explorer.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcp_explorer
from dcp_explorer import NotACheckpointError
from dcp_explorer.diff import CHANGES, STATUSES, CheckpointDiff, run_distributed

torch = pytest.importorskip("torch")

SCALED = "model.layers.0.attention.wq.weight"
ROW = "model.tok_embeddings.weight"
REMOVED = "model.layers.1.ffn_norm.weight"
RENAMED_FROM, RENAMED_TO = "model.norm.weight", "model.final_norm.weight"
CAST = "model.output.weight"
BYTES = "optim.param_groups.0.lr"
EDITED_ROW = 7
BF16_RTOL = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest errs by at most 2**-9 relative
# float32/bf16/fp16/fp8 pairs are compared in float32 (dcp_explorer.diff._Stats): rel_l2, cosine and
# mean_abs_diff agree with float64 to ~1e-7 relative, checked to this; the rest is exact
F32_REL = 1e-6


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's parse cache."""
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(tmp_path / "dcpx-cache"))


def _load(path: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys(checkpoint_id=str(path))


def _dcp_save(sd: dict[str, Any], path: Any) -> str:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return str(path)


@pytest.fixture(scope="module")
def base_sd(samples) -> dict[str, Any]:
    """The trained llama weights + AdamW state of ``llama_fsdp_ws1``, as torch loads them."""
    return _load(samples["llama_fsdp_ws1"])


@pytest.fixture(scope="module")
def edited(samples, base_sd, tmp_path_factory) -> str:
    """``llama_fsdp_ws1`` with six known edits, saved by ``dcp.save(no_dist=True)``."""
    sd = copy.deepcopy(base_sd)
    m = sd["model"]
    m[SCALED.removeprefix("model.")] = m[SCALED.removeprefix("model.")] * 1.5
    m[ROW.removeprefix("model.")][EDITED_ROW] += 1.0
    del m[REMOVED.removeprefix("model.")]
    m[RENAMED_TO.removeprefix("model.")] = m.pop(RENAMED_FROM.removeprefix("model."))
    m[CAST.removeprefix("model.")] = m[CAST.removeprefix("model.")].to(torch.bfloat16)
    sd["optim"]["param_groups"][0]["lr"] = 0.5
    return _dcp_save(sd, tmp_path_factory.mktemp("edited") / "ckpt")


@pytest.fixture(scope="module")
def edited_diff(samples, edited) -> CheckpointDiff:
    return dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, progress=False)


def _by_fqn(d: CheckpointDiff) -> dict[str, Any]:
    return {r.fqn: r for r in d.rows}


def _changed(d: CheckpointDiff) -> dict[str, tuple[str, ...]]:
    return {r.fqn: r.changes for r in d.rows if r.changes}


def _f64(t: Any) -> Any:
    return t.detach().to(torch.float64)


# ----------------------------------------------------------------------------- known edits


def test_known_edits_are_reported_exactly(edited_diff):
    assert _changed(edited_diff) == {
        SCALED: ("values",),
        ROW: ("values",),
        REMOVED: ("only_in_a",),
        RENAMED_FROM: ("only_in_a",),
        RENAMED_TO: ("only_in_b",),
        CAST: ("dtype", "values"),
        BYTES: ("bytes",),
    }
    rows = _by_fqn(edited_diff)
    others = [r for f, r in rows.items() if not r.changes]
    assert len(others) == 96 - 6 and all(r.status == "equal" and r.equal for r in others)
    assert not edited_diff.equal and not edited_diff.errors
    assert rows[BYTES].detail == "0.01 != 0.5"
    s = edited_diff.summary()
    assert s["status"] == {"equal": 90, "different": 4, "only_in_a": 2, "only_in_b": 1}
    assert s["changes"] == {"only_in_a": 2, "only_in_b": 1, "dtype": 1, "values": 3, "bytes": 1}


def test_statistics_match_torch(edited_diff, base_sd, edited):
    rows = _by_fqn(edited_diff)
    new = _load(edited)["model"]
    for fqn in (SCALED, ROW, CAST):
        r = rows[fqn]
        a = _f64(base_sd["model"][fqn.removeprefix("model.")])
        b = _f64(new[fqn.removeprefix("model.")])
        d = (a - b).abs()
        assert r.numel == a.numel()
        assert r.max_abs_diff == float(d.max())
        assert r.mean_abs_diff == pytest.approx(float(d.mean()), rel=F32_REL)
        assert r.rel_l2 == pytest.approx(float(d.norm() / a.norm()), rel=F32_REL)
        cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=0))
        assert r.cosine == pytest.approx(cos, rel=F32_REL)
        assert r.num_outside == int((d > 0).sum())
        first = torch.nonzero(d.flatten())[0].item()
        assert r.first_diff_index == tuple(int(i) for i in np.unravel_index(first, tuple(a.shape)))
        assert r.num_nonfinite == 0
    assert rows[SCALED].rel_l2 == pytest.approx(0.5, rel=1e-7)  # 1.5 * w rounds in float32
    assert rows[SCALED].cosine == pytest.approx(1.0, rel=F32_REL)
    assert rows[ROW].num_outside == 72 and rows[ROW].first_diff_index == (EDITED_ROW, 0)
    assert rows[CAST].dtype_a == "float32" and rows[CAST].dtype_b == "bfloat16"


def test_rename_and_tolerance_leave_nothing_but_the_real_edits(samples, edited):
    d = dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, rename={RENAMED_FROM: RENAMED_TO},
                          rtol=BF16_RTOL, ignore=["dtype"], progress=False)  # fmt: skip
    assert _changed(d) == {SCALED: ("values",), ROW: ("values",), REMOVED: ("only_in_a",), CAST: ("dtype",),
                           BYTES: ("bytes",)}  # fmt: skip
    rows = _by_fqn(d)
    assert rows[RENAMED_TO].fqn_a == RENAMED_FROM and rows[RENAMED_TO].status == "equal"
    assert rows[CAST].status == "close" and rows[CAST].num_outside == 0 and not rows[CAST].equal
    # tolerance: the scaled tensor differs by 50 % everywhere, the row by 1.0
    loose = dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, select=[SCALED, ROW], atol=1.0 + 1e-6,
                              rtol=0.5 + 1e-9, progress=False)  # fmt: skip
    assert {r.fqn: r.status for r in loose.rows} == {SCALED: "close", ROW: "close"} and loose.equal


def test_select_matches_either_spelling(samples, edited):
    d = dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, select="model.layers.0.*", progress=False)
    assert {r.fqn for r in d.rows} == {
        f for f in dcp_explorer.open(edited).fqns if f.startswith("model.layers.0.")
    }
    with pytest.raises(KeyError, match="matches no entry"):
        dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, select="nothing.*")


# ----------------------------------------------------------------------------- layouts and formats


def _torch_layouts(path: Any) -> dict[str, set[tuple[Any, ...]]]:
    """fqn -> {(offsets, sizes, saving rank)} of its non-empty chunks, from torch's own metadata reader."""
    import re

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata()
    out: dict[str, set[tuple[Any, ...]]] = {}
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        out[fqn] = set()
        for i, c in enumerate(m.chunks):
            if 0 in c.sizes:
                continue
            info = md.storage_data[MetadataIndex(fqn, c.offsets, i)]
            rank = int(re.match(r"__(\d+)_", info.relative_path).group(1))
            out[fqn].add((tuple(c.offsets), tuple(c.sizes), rank))
    return out


def test_resharded_4_to_2_is_equal_with_a_layout_change(samples):
    d = dcp_explorer.diff(samples["llama_fsdp_ws4"], samples["llama_fsdp_ws2"], progress=False)
    t = d.table
    assert d.equal and set(t["status"]) == {"equal"}
    la, lb = _torch_layouts(samples["llama_fsdp_ws4"]), _torch_layouts(samples["llama_fsdp_ws2"])
    tensors = t[t["kind"] == "tensor"]
    assert set(tensors["fqn"]) == set(la)
    for r in tensors.itertuples():
        assert r.layout_changed == (la[r.fqn] != lb[r.fqn]), r.fqn
        if r.shape_a:  # every parameter and Adam moment is sharded 4 -> 2 ways
            assert (r.chunks_a, r.chunks_b, r.layout_changed) == (4, 2, True)
        else:  # 0-d Adam steps: written once, by whichever rank dedup chose
            assert (r.chunks_a, r.chunks_b) == (1, 1)
    assert set(_changed(d).values()) == {("layout",)}
    strict = dcp_explorer.diff(
        samples["llama_fsdp_ws4"], samples["llama_fsdp_ws2"], ignore=(), progress=False
    )
    assert not strict.equal and len(strict.differences) == int(tensors["layout_changed"].sum()) >= 63


def test_fsdp_tp_layout(samples):
    """FSDP x TP chunks (strided rows, 2-D grids, other saving ranks) compare as the same logical tensors."""
    d = dcp_explorer.diff(
        samples["llama_fsdp_tp_2x2"], samples["llama_fsdp_ws4"], select="model.*", progress=False
    )
    rows = _by_fqn(d)
    la, lb = _torch_layouts(samples["llama_fsdp_tp_2x2"]), _torch_layouts(samples["llama_fsdp_ws4"])
    for f, r in rows.items():
        assert r.layout_changed == (la[f] != lb[f]), f
    assert rows["model.layers.0.attention.wo.weight"].layout_changed  # a 2x2 grid vs 4 row blocks
    # the same four row blocks, but rows 63:126 and 126:189 saved by the other ranks: placement changed
    assert {b[:2] for b in la[ROW]} == {b[:2] for b in lb[ROW]} and rows[ROW].layout_changed
    a, b = _load(samples["llama_fsdp_tp_2x2"])["model"], _load(samples["llama_fsdp_ws4"])["model"]
    for f, r in rows.items():
        x, y = _f64(a[f.removeprefix("model.")]), _f64(b[f.removeprefix("model.")])
        assert r.equal == bool(torch.equal(x, y))
        assert r.max_abs_diff == float((x - y).abs().max())


def test_dcp_to_hf_bf16_conversion(samples):
    d = dcp_explorer.diff(samples["llama_fsdp_ws1"], samples["hf_rank0"], select="model.*", rename={"model.": ""},
                          progress=False)  # fmt: skip
    assert len(d.rows) == 21 and set(_changed(d).values()) == {("dtype", "values")}
    ok = dcp_explorer.diff(samples["llama_fsdp_ws1"], samples["hf_rank0"], select="model.*", rename={"model.": ""},
                           rtol=BF16_RTOL, ignore=["layout", "dtype"], progress=False)  # fmt: skip
    assert ok.equal and set(ok.table["status"]) == {"close"}
    assert set(_changed(ok).values()) == {("dtype",)}
    # the same values as a bf16 cast made by torch
    hf = _load(samples["llama_fsdp_ws1"])["model"]
    for r in ok.rows:
        a = _f64(hf[r.fqn])
        b = _f64(hf[r.fqn].to(torch.bfloat16))
        assert r.max_abs_diff == float((a - b).abs().max())


def test_dcp_to_hf_fp32_conversion_is_exact(samples, base_sd, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    out = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(base_sd["model"]), storage_writer=HuggingFaceStorageWriter(str(out), save_distributed=False),
                 no_dist=True)  # fmt: skip
    d = dcp_explorer.diff(
        samples["llama_fsdp_ws1"], out, select="model.*", rename={"model.": ""}, progress=False
    )
    assert d.format_b != "dcp" and len(d.rows) == 21
    assert d.equal and set(d.table["status"]) == {"equal"} and not _changed(d)


def test_torch_save_file(samples, base_sd, tmp_path):
    """A whole nested state dict in one ``torch.save`` file flattens to DCP's names."""
    f = tmp_path / "full.pt"
    torch.save(base_sd, f)
    d = dcp_explorer.diff(samples["llama_fsdp_ws4"], f, progress=False)
    assert d.format_b == "torch_save" and len(d.rows) == 96
    assert d.equal and set(d.table["status"]) == {"equal"}
    flat = tmp_path / "model.pt"
    torch.save({k: v.to(torch.bfloat16) for k, v in base_sd["model"].items()}, flat)
    d2 = dcp_explorer.diff(flat, samples["hf_rank0"], progress=False)
    assert d2.equal and set(d2.table["status"]) == {"equal"}  # same bf16 bits


def test_in_memory_state_dicts_and_checkpoint_objects(samples, base_sd):
    ck = dcp_explorer.open(samples["llama_fsdp_ws2"])
    d = dcp_explorer.diff(ck, base_sd, progress=False)
    assert d.equal and d.format_a == "dcp" and d.format_b == "state_dict"


def test_mixed_sample_formats(samples):
    for other in ("mixed_zstd", "mixed_per_rank"):
        d = dcp_explorer.diff(samples["mixed"], samples[other], progress=False)
        t = d.table
        assert d.equal and set(t["status"]) == {"equal"}, d.report()
        assert set(t[t["kind"] == "bytes"]["fqn"]) >= {"extra.cfg.name", "step", "extra.history"}


def test_quantized_self_diff(samples):
    for name in ("fp8_block", "mxfp4"):
        for deq in (True, False):
            d = dcp_explorer.diff(samples[name], samples[name], dequantize=deq, progress=False)
            assert d.equal and set(d.table["status"]) == {"equal"}


def test_dequantized_fp8_against_its_float32_values(samples, tmp_path):
    from safetensors.torch import save_file

    ck = dcp_explorer.open(samples["fp8_block"])
    w = "model.layers.0.self_attn.q_proj.weight"
    orig = ck.load(w)
    ref = orig.clone()
    ref[3, 4] += 1.0
    save_file({w: ref}, str(tmp_path / "w.safetensors"))
    d = dcp_explorer.diff(ck, tmp_path / "w.safetensors", select=w, progress=False)
    (r,) = d.rows
    assert r.dtype_changed and r.status == "different" and r.num_outside == 1 and r.first_diff_index == (3, 4)
    assert r.max_abs_diff == float(
        abs(ref[3, 4].double() - orig[3, 4].double())
    )  # 1.0 up to float32 rounding


# ----------------------------------------------------------------------------- structure


def test_shape_and_kind_changes(base_sd):
    a = {"w": torch.ones(3, 4), "k": torch.ones(2), "obj": {"x": 1}}
    b = {"w": torch.ones(4, 3), "k": 5, "obj": {"x": 2}}
    d = dcp_explorer.diff(a, b, progress=False)
    rows = _by_fqn(d)
    assert rows["w"].status == "shape_changed" and rows["w"].changes == ("shape",)
    assert rows["k"].status == "kind_changed" and rows["k"].changes == ("kind",)
    assert rows["obj.x"].status == "different" and rows["obj.x"].changes == ("bytes",)


def test_rename_rules():
    a = {
        "model.layers.0.attention.wq.weight": torch.ones(2),
        "model.tok": torch.zeros(1),
        "drop.me": torch.ones(1),
    }
    b = {"layers.0.self_attn.q_proj.weight": torch.ones(2), "embed": torch.zeros(1)}
    rules = {"model.tok": "embed", r"re:^model\.layers\.(\d+)\.attention\.wq\.": r"layers.\1.self_attn.q_proj.",
             "drop.": None}  # fmt: skip
    d = dcp_explorer.diff(a, b, rename=rules, progress=False)
    assert d.equal and {r.fqn: r.fqn_a for r in d.rows} == {
        "layers.0.self_attn.q_proj.weight": "model.layers.0.attention.wq.weight",
        "embed": "model.tok",
    }
    d2 = dcp_explorer.diff(a, b, rename=lambda f: "embed" if f == "model.tok" else None, progress=False)
    assert _changed(d2) == {"layers.0.self_attn.q_proj.weight": ("only_in_b",)}
    with pytest.raises(ValueError, match="maps both"):
        dcp_explorer.diff(a, b, rename=lambda f: "same")
    with pytest.raises(ValueError, match="ignore"):
        dcp_explorer.diff(a, b, ignore=["nonsense"])


def test_missing_checkpoint_raises(samples, tmp_path):
    with pytest.raises(NotACheckpointError):
        dcp_explorer.diff(samples["mixed"], tmp_path / "nope")


# ----------------------------------------------------------------------------- the numeric kernel


def _reference_stats(a: np.ndarray, b: np.ndarray, atol: float, rtol: float, same_dtype_bits: tuple | None):
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    fin = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))
    d = np.abs(np.where(fin, a, 0) - np.where(fin, b, 0))
    outside = int(((d > atol + rtol * np.abs(np.where(fin, b, 0))) & fin).sum() + (~fin & ~same).sum())
    neq = same_dtype_bits[0].ravel() != same_dtype_bits[1].ravel() if same_dtype_bits is not None else ~same
    return {
        "equal": not neq.any(),
        "first": int(np.argmax(neq)) if neq.any() else None,
        "num_outside": outside,
        "num_nonfinite": int((~fin).sum()),
        "max_abs_diff": float(d[fin].max()) if fin.any() else math.nan,
        "mean_abs_diff": float(d[fin].mean()) if fin.any() else math.nan,
        "ssa": float(np.dot(np.where(fin, a, 0), np.where(fin, a, 0))),
        "ssd": float(np.dot(d, d)),
    }


DTYPES = ("float32", "bfloat16", "float16", "float64", "int32", "float8_e4m3fn")
IEEE = ("float32", "bfloat16", "float16", "float64")  # dtypes with NaN and inf


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3),
    dt_a=st.sampled_from(DTYPES),
    dt_b=st.sampled_from(DTYPES),
    edits=st.integers(0, 6),
    nans=st.integers(0, 3),
    atol=st.sampled_from([0.0, 1e-3, 0.5]),
    rtol=st.sampled_from([0.0, 1e-2]),
    sub=st.integers(1, 9),
    block=st.sampled_from([1, 4, 24, 64, 4096]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_a_direct_computation(shape, dt_a, dt_b, edits, nans, atol, rtol, sub, block, seed):
    """Any dtypes, NaN/inf, tolerances, sub-block and block sizes: the streamed statistics equal a direct one."""
    with pytest.MonkeyPatch.context() as mp:
        dmod = importlib.import_module("dcp_explorer.diff")

        mp.setattr(dmod, "_SUB", sub)
        _check_kernel(dmod, shape, dt_a, dt_b, edits, nans, atol, rtol, block, seed)


def _check_kernel(dmod, shape, dt_a, dt_b, edits, nans, atol, rtol, block, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    a = base.to(getattr(torch, dt_a))
    b = base.clone()
    n = b.numel()
    if n:
        for _ in range(edits):
            b.view(-1)[int(torch.randint(n, (1,), generator=g))] += float(torch.randn(1, generator=g))
        specials = [math.nan, math.inf, -math.inf]
        for k in range(nans):
            i = int(torch.randint(n, (1,), generator=g))
            if dt_b.startswith("float") and dt_b != "float8_e4m3fn":
                b.view(-1)[i] = specials[k % 3]
            if dt_a.startswith("float") and dt_a != "float8_e4m3fn" and k % 2 == 0:
                a.view(-1)[i] = specials[k % 3]
    with np.errstate(all="ignore"):
        b = b.to(getattr(torch, dt_b))
    d = dmod.diff({"t": a}, {"t": b}, atol=atol, rtol=rtol, block_bytes=block, progress=False)
    (r,) = d.rows
    bits = None
    if dt_a == dt_b:
        iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        bits = (a.view(iv).numpy(), b.view(iv).numpy()) if a.numel() else (np.zeros(0), np.zeros(0))
    ref = _reference_stats(a.to(torch.float64).numpy(), b.to(torch.float64).numpy(), atol, rtol, bits)
    f32 = {dt_a, dt_b} <= {"float32", "bfloat16", "float16", "float8_e4m3fn"}  # compared in float32
    rel_mean, rel_l2 = (F32_REL, F32_REL) if f32 else (1e-12, 1e-9)
    assert r.dtype_changed == (dt_a != dt_b)
    assert r.equal == ref["equal"]
    assert r.num_outside == ref["num_outside"]
    assert r.num_nonfinite == ref["num_nonfinite"]
    first = ref["first"]
    assert r.first_diff_index == (
        None if first is None else tuple(int(i) for i in np.unravel_index(first, shape))
    )
    if math.isnan(ref["max_abs_diff"]):
        assert r.max_abs_diff is None or math.isnan(r.max_abs_diff)
    else:
        assert r.max_abs_diff == ref["max_abs_diff"]
        assert r.mean_abs_diff == pytest.approx(ref["mean_abs_diff"], rel=rel_mean, abs=1e-300)
    if ref["ssa"] > 0 and not r.equal:
        assert r.rel_l2 == pytest.approx(math.sqrt(ref["ssd"] / ref["ssa"]), rel=rel_l2)
    assert r.status == ("equal" if r.equal else "close" if r.num_outside == 0 else "different")


def test_large_tensor_spans_many_blocks_and_subblocks():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 1000, generator=g)
    b = a.clone()
    b[299, 999] = 7.0
    b[150, :500] *= 2
    d = dcp_explorer.diff({"x": a}, {"x": b}, block_bytes=64 << 10, progress=False)
    (r,) = d.rows
    dd = (_f64(a) - _f64(b)).abs()
    assert r.num_outside == int((dd > 0).sum()) and r.first_diff_index == (150, 0)
    assert r.max_abs_diff == float(dd.max())
    assert r.rel_l2 == pytest.approx(float(dd.norm() / _f64(a).norm()), rel=F32_REL)


DTS32 = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16"), ("float16", "float16"),
         ("float8_e4m3fn", "float32")]  # fmt: skip


@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-3, 0.0), (1e-4, 1e-2)], ids=["exact", "atol", "rtol"])
@pytest.mark.parametrize("dts", DTS32, ids="-".join)
def test_float32_path_matches_a_float64_reference(dts, tol, monkeypatch):
    """Float32-family pairs are compared in float32 sub-blocks (``_Stats._diff32``): on a million random
    values with known edits (an identical prefix, a training-step-like change everywhere after it,
    a constant offset, an outlier whose |d| rounds in float32, an identical stretch, NaN/inf) and on
    values too small or too large for float32 squares (float64 sub-blocks), ``rel_l2``, ``cosine``
    and ``mean_abs_diff`` agree with float64 numpy to ``F32_REL``; ``max_abs_diff``, counts,
    ``first_diff_index`` and ``equal`` are exact."""
    dmod = importlib.import_module("dcp_explorer.diff")
    used = {"f32": 0, "f64": 0}
    orig = dmod._Stats._diff32

    def spy(self, *args, **kw):
        r = orig(self, *args, **kw)
        used["f32" if r is not None else "f64"] += 1
        return r

    monkeypatch.setattr(dmod._Stats, "_diff32", spy)
    dt_a, dt_b = dts
    atol, rtol = tol
    g = np.random.default_rng(7)
    shape = (1000, 999)  # ~15 float32 sub-blocks of 65 536 elements; rows of 999 (not 1024-aligned)
    n = math.prod(shape)
    base = g.standard_normal(n) * 3
    other = base.copy()
    other[70_000:] += 1e-3 * g.standard_normal(n - 70_000)  # [0, 70 000) identical
    other[100_000:110_000] = base[100_000:110_000] + 0.5  # a constant offset: many ties for max |d|
    other[150_000:300_000] = base[150_000:300_000]  # identical again, after differences
    base[333_333], other[333_333] = 1 + 2**-23, -16.0  # the largest |d|, 17 + 2**-23: 17 in float32
    if "float8_e4m3fn" not in dts:
        base[900_000], other[900_000] = math.nan, math.nan  # NaN == NaN
        other[900_001] = math.inf  # a non-finite mismatch
    # "u": float32 squares underflow (RMS 3e-30) then overflow (3e25; not in fp16/fp8)
    ubase = g.standard_normal(300 * 999) * 3
    ubase[:200_000] *= 1e-30
    if "float16" not in dts and "float8_e4m3fn" not in dts:
        ubase[250_000:251_000] *= 1e25
    uother = ubase * (1 + 1e-3 * g.standard_normal(ubase.size))
    sides = []
    for x, dt in ((base, dt_a), (other, dt_b), (ubase, dt_a), (uother, dt_b)):
        sides.append(torch.from_numpy(x.reshape(-1, 999)).to(getattr(torch, dt)))
    d = dmod.diff({"t": sides[0], "u": sides[2]}, {"t": sides[1], "u": sides[3]}, atol=atol, rtol=rtol,
                  block_bytes=1 << 18, progress=False)  # fmt: skip
    assert used["f32"] >= 10 and used["f64"] >= 1  # both paths taken (fp16 and fp8: no under/overflow)
    for r, a, b in ((d.rows[0], sides[0], sides[1]), (d.rows[1], sides[2], sides[3])):
        fa, fb = a.to(torch.float64).numpy().ravel(), b.to(torch.float64).numpy().ravel()
        bits = None
        if dt_a == dt_b:
            iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
            bits = (a.view(iv).numpy(), b.view(iv).numpy())
        ref = _reference_stats(fa, fb, atol, rtol, bits)
        assert r.equal is False and ref["equal"] is False
        assert r.first_diff_index == tuple(int(i) for i in np.unravel_index(ref["first"], tuple(a.shape)))
        assert r.num_outside == ref["num_outside"]
        assert r.num_nonfinite == ref["num_nonfinite"]
        assert r.max_abs_diff == ref["max_abs_diff"]  # exact, though found from float32 differences
        assert r.mean_abs_diff == pytest.approx(ref["mean_abs_diff"], rel=F32_REL)
        assert r.rel_l2 == pytest.approx(math.sqrt(ref["ssd"] / ref["ssa"]), rel=F32_REL)
        fin = np.isfinite(fa) & np.isfinite(fb)
        xa, xb = np.where(fin, fa, 0), np.where(fin, fb, 0)
        cos = float(np.dot(xa, xb) / (np.linalg.norm(xa) * np.linalg.norm(xb)))
        assert r.cosine == pytest.approx(cos, rel=F32_REL)
    if dts == ("float32", "float32"):
        assert d.rows[0].max_abs_diff == 17 + 2**-23


def test_read_ahead_of_the_next_tensor(monkeypatch):
    """The first block of the next tensor is read while the current one's last block is compared:
    every row is what comparing that tensor alone gives, also when the current tensor needs its
    identical prefix again (a read on the main thread) and when reading the next one fails."""
    dmod = importlib.import_module("dcp_explorer.diff")
    g = torch.Generator().manual_seed(3)
    a = {k: torch.randn(1024, 1024, generator=g) for k in "pqrstu"}
    b = {k: v.clone() for k, v in a.items()}
    b["p"][700:] += 1e-3  # identical prefix, then different: norms_of_prefix while "q" is read ahead
    b["q"] += 1e-3 * torch.randn(1024, 1024, generator=g)  # every value changed
    b["s"] = b["s"].to(torch.bfloat16)  # other dtype: other raw buffers
    b["u"][0, 0] = math.nan
    kw = dict(block_bytes=1 << 20, progress=False)  # 4 blocks of 256 Ki elements per tensor
    single = {k: dmod.diff({k: a[k]}, {k: b[k]}, **kw) for k in a}
    alone = {k: x.rows[0] for k, x in single.items()}
    ahead = []
    orig = dmod._Comparer._read

    def spy(self, p, *args):
        ahead.append((p.fqn, threading.current_thread() is not threading.main_thread()))
        return orig(self, p, *args)

    monkeypatch.setattr(dmod._Comparer, "_read", spy)
    d = dmod.diff(a, b, **kw)
    assert [r.fqn for r in d.rows] == list("pqrstu") and {r.fqn: r for r in d.rows} == alone
    assert ahead == [(k, True) for k in "pqrstu" for _ in range(4)]  # every block read on the reader thread
    assert d.bytes_read == sum(x.bytes_read for x in single.values())

    real = dmod._TorchSource.read

    def fails_on_r(self, e, *args):
        if e.fqn == "r":
            raise OSError("disk on fire")
        return real(self, e, *args)

    monkeypatch.setattr(dmod._TorchSource, "read", fails_on_r)
    rows = {r.fqn: r for r in dmod.diff(a, b, **kw).rows}
    assert rows["r"].status == "error" and "disk on fire" in rows["r"].detail
    assert all(rows[k] == alone[k] for k in "pqstu")


def test_memory_is_bounded_by_block_bytes(tmp_path):
    """A 32 MiB tensor per side, compared in 1 MiB blocks: Python/numpy allocations stay a few MiB."""
    from safetensors.torch import save_file

    x = torch.arange(8 << 20, dtype=torch.float32).reshape(2048, 4096)
    save_file({"x": x}, str(tmp_path / "a.safetensors"))
    x[1000, 5] = -1
    save_file({"x": x}, str(tmp_path / "b.safetensors"))
    del x
    tracemalloc.start()
    try:
        d = dcp_explorer.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", block_bytes=1 << 20,
                              progress=False)  # fmt: skip
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (r,) = d.rows
    assert r.num_outside == 1 and r.first_diff_index == (1000, 5)
    assert peak < 8 << 20, f"peak traced allocation {peak / 2**20:.1f} MiB"
    # both tensors once, then A's identical prefix (rows 0:1024, the 1 MiB blocks before the
    # difference) again for the norms that rel_l2 and cosine need
    assert d.bytes_read == 2 * (32 << 20) + (16 << 20)
    x64 = torch.arange(8 << 20, dtype=torch.float64)
    assert r.rel_l2 == pytest.approx((1000 * 4096 + 5 + 1) / float(x64.norm()), rel=F32_REL)


# ----------------------------------------------------------------------------- results


def test_fail_fast(samples, edited, tmp_path, base_sd):
    d = dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, fail_fast=True, progress=False)
    assert d.stopped_early and not d.equal and d.bytes_read == 0  # structural changes: nothing read
    assert "not_compared" in set(d.table["status"])
    sd = copy.deepcopy(base_sd)
    sd["model"]["layers.1.feed_forward.w2.weight"][3, 3] += 1
    one = _dcp_save(sd, tmp_path / "one")
    d2 = dcp_explorer.diff(samples["llama_fsdp_ws1"], one, fail_fast=True, progress=False)
    order = [r.fqn for r in d2.rows]
    i = order.index("model.layers.1.feed_forward.w2.weight")
    assert d2.stopped_early and d2.rows[i].status == "different"
    assert {r.status for r in d2.rows[:i]} == {"equal"}
    assert {r.status for r in d2.rows[i + 1 :]} <= {"not_compared"}


def test_table_columns_and_json_roundtrip(edited_diff):
    t = edited_diff.table
    assert list(t.columns) == [
        "fqn", "status", "changes", "kind", "fqn_a", "fqn_b", "dtype_a", "dtype_b", "shape_a", "shape_b",
        "chunks_a", "chunks_b", "dtype_changed", "layout_changed", "equal", "numel", "max_abs_diff",
        "mean_abs_diff", "rel_l2", "cosine", "num_outside", "num_nonfinite", "first_diff_index", "detail",
    ]  # fmt: skip
    assert set(t["status"]) <= set(STATUSES)
    assert all(set(c.split(",")) <= set(CHANGES) | {""} for c in t["changes"])
    back = CheckpointDiff.from_dict(json.loads(json.dumps(edited_diff.to_dict())))
    assert back.rows == edited_diff.rows and back.equal == edited_diff.equal
    assert len(edited_diff.differences) == 7


def test_html_and_report_escape_and_show_changes(edited_diff):
    html = edited_diff._repr_html_()
    assert "different" in html and SCALED in html and "<script" not in html
    evil = dcp_explorer.diff({"<script>x</script>": torch.ones(1)}, {"<script>x</script>": torch.zeros(1)})
    h = evil._repr_html_()
    assert "<script>" not in h and "&lt;script&gt;" in h
    text = edited_diff.report()
    assert text.splitlines()[-1].startswith("DIFFERENT") and REMOVED in text and "first at [7, 0]" in text


def test_block_map(samples, edited_diff):
    m = edited_diff.block_map(ROW, block=(8, 8))
    assert m.shape == (32, 9)
    assert np.all(m[0] == pytest.approx(1.0, abs=1e-6)) and not m[1:].any()
    mean = edited_diff.block_map(ROW, block=(8, 8), stat="mean")
    assert mean[0] == pytest.approx(np.full(9, 1 / 8), abs=1e-6)
    count = edited_diff.block_map(ROW, block=(8, 8), stat="count", block_bytes=4096)
    assert count.sum() == 72 and count[0].tolist() == [8.0] * 9
    with pytest.raises(ValueError, match="same shape"):
        edited_diff.block_map(REMOVED)
    json_only = CheckpointDiff.from_dict(edited_diff.to_dict())  # reopens both sides from their paths
    assert np.array_equal(json_only.block_map(SCALED, block=16), edited_diff.block_map(SCALED, block=16))


# ----------------------------------------------------------------------------- command line, processes


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dcp_explorer.cli", "diff", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_cli_exit_codes(samples, edited):
    ok = _cli(str(samples["llama_fsdp_ws4"]), str(samples["llama_fsdp_ws2"]))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith("EQUAL")
    bad = _cli(str(samples["llama_fsdp_ws1"]), edited, "--json", "--rename", f"{RENAMED_FROM}={RENAMED_TO}")
    assert bad.returncode == 1, bad.stderr
    out = json.loads(bad.stdout)
    assert out["equal"] is False and out["summary"]["changes"]["values"] == 3
    assert {r["fqn"] for r in out["rows"] if r["status"] == "only_in_a"} == {REMOVED}
    tol = _cli(str(samples["llama_fsdp_ws1"]), str(samples["hf_rank0"]), "--select", "model.*", "--rename",
               "model.=", "--rtol", str(BF16_RTOL), "--ignore", "layout", "dtype")  # fmt: skip
    assert tol.returncode == 0, tol.stdout + tol.stderr
    err = _cli(str(samples["mixed"]), "/does/not/exist")
    assert err.returncode == 2 and "error" in err.stderr


def test_diff_imports_no_torch_for_dcp_and_safetensors(samples):
    code = textwrap.dedent("""
        import sys, dcp_explorer
        d = dcp_explorer.diff(sys.argv[1], sys.argv[2], progress=False)
        d.table; d.summary(); d._repr_html_()
        print(d.equal, 'torch' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(samples["llama_fsdp_ws4"]), str(samples["llama_fsdp_ws2"])],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_two_processes_give_the_single_process_report(samples, edited):
    kw = dict(rename={RENAMED_FROM: RENAMED_TO}, rtol=1e-3, block_bytes=4096)
    single = dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, progress=False, **kw)
    multi = run_distributed(samples["llama_fsdp_ws1"], edited, nproc=2, timeout=180, **kw)
    assert multi.world_size == 2
    assert multi.rows == single.rows
    cols = [c for c in single.table.columns]
    assert multi.table[cols].astype(str).equals(single.table[cols].astype(str))
    assert multi.equal == single.equal is False
