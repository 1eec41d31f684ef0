"""QuantViewer and DiffViewer driven by setting traits, without a browser: outputs follow the library's answers."""

from __future__ import annotations

import html
import json
import shutil

import numpy as np
import pytest

import dcp_explorer
from dcp_explorer.quant import block_stats, quant_check
from dcp_explorer.widgets import DiffViewer, QuantViewer
from dcp_explorer.widgets.diff import parse_block
from dcp_explorer.widgets.quant import _default_slices

torch = pytest.importorskip("torch")

PNG = b"\x89PNG"
VICTIM = "model.layers.0.self_attn.q_proj.weight"


def png(v) -> bool:
    return bytes(v).startswith(PNG)


def png_size(v) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk."""
    b = bytes(v)
    assert b.startswith(PNG)
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture()
def fp8(samples):
    return dcp_explorer.open(samples["fp8_block"])


@pytest.fixture()
def mx(samples):
    return dcp_explorer.open(samples["mxfp4"])


@pytest.fixture(scope="module")
def corrupted(samples, tmp_path_factory):
    """The FP8 sample with one zero and one NaN scale in ``q_proj``."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("fp8bad") / "fp8_corrupted"
    shutil.copytree(samples["fp8_block"], out)
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    f = out / wm[VICTIM + "_scale_inv"]
    t = load_file(f)
    t[VICTIM + "_scale_inv"][1, 0] = 0.0
    t[VICTIM + "_scale_inv"][2, 1] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def fp8_originals():
    from dcp_explorer.samples import _fp8_reference

    return _fp8_reference()[1]


# ------------------------------------------------------------------------------------------------
# QuantViewer
# ------------------------------------------------------------------------------------------------
def test_quant_viewer_lists_every_row_of_ckpt_quant_and_follows_the_selection(fp8):
    q = QuantViewer(fp8)
    assert [v for _, v in q.tensor.options] == list(fp8.quant.fqn)
    for fqn in fp8.quant.fqn:
        q.tensor.value = fqn
        assert q.error.value == ""
        want = block_stats(fp8, fqn)
        assert q.block_stats.fqn == fqn and q.block_stats.grid_shape == want.grid_shape
        np.testing.assert_array_equal(q.block_stats.scale, want.scale)
        np.testing.assert_array_equal(q.block_stats.code_counts, want.code_counts)
        row = fp8.quant.set_index("fqn").loc[fqn]
        for k in ("partner", "scale_dtype"):
            assert html.escape(str(row[k])) in q.row.value
        assert f"{int(row['num_blocks']):,}" in q.row.value and f"{int(row['stored_bytes']):,}" in q.row.value
        assert f"{float(np.nanmax(want.absmax)):.6g}" in q.stats.value
        assert all(png(getattr(q, k).value) for k in ("scales", "codes", "values", "dynamic_range"))
        assert bytes(q.block_error.value) == b""  # no reference
        # ...so the error picture is hidden, and only it (each picture has a layout of its own)
        assert q.block_error.layout.display == "none"
        assert all(
            getattr(q, k).layout.display is None for k in ("scales", "codes", "values", "dynamic_range")
        )
        assert "no problems found (scales and weights checked)" in q.problems.value
    assert q.error_metric.disabled
    pics = [q.scales, q.codes, q.values, q.dynamic_range, q.block_error]
    assert len({id(p.layout) for p in pics}) == len(pics)


def test_quant_viewer_region_and_range_controls(mx):
    fqn = mx.quant.fqn.iloc[0]
    q = QuantViewer(mx, fqn=fqn)
    full = q.block_stats
    assert q.slices.value == "" and full.region == ((0, 0, 0), tuple(mx.quant.logical_shape.iloc[0]))
    q.slices.value = "1"  # expert 1
    want = block_stats(mx, fqn, slices=(1,))
    assert q.block_stats.region == want.region and q.block_stats.grid_origin == want.grid_origin
    np.testing.assert_array_equal(q.block_stats.scale, want.scale)
    assert "[1:2, 0:128, 0:96]" in q.stats.value
    before = bytes(q.dynamic_range.value)
    q.range_quantity.value = "utilization"
    assert png(q.dynamic_range.value) and bytes(q.dynamic_range.value) != before
    # a new tensor starts on its default region
    q.tensor.value = mx.quant.fqn.iloc[1]
    assert q.slices.value == "" and q.block_stats.fqn == mx.quant.fqn.iloc[1]
    assert q.error.value == ""


def test_quant_viewer_shows_problems_from_quant_check(corrupted):
    bad = dcp_explorer.open(corrupted)
    q = QuantViewer(bad, fqn=VICTIM)
    want = quant_check(bad, [VICTIM], progress=False).iloc[0]
    assert set(want["problems"]) == {"scale_nan", "scale_zero", "zero_blocks"}
    for code, msg in zip(want["problems"], want["messages"], strict=True):
        assert f"<code>{code}</code>" in q.problems.value and html.escape(msg) in q.problems.value
    assert "all-zero blocks</th><td>1<" in q.stats.value
    assert "scale_nan" in q.tensor.label  # flagged in the dropdown (from ckpt.quant)
    # scales-only check: the weight scan's finding disappears, the scale findings stay
    q.scan_weights.value = False
    cheap = quant_check(bad, [VICTIM], full=False, progress=False).iloc[0]
    assert set(cheap["problems"]) == {"scale_nan", "scale_zero"}
    assert "zero_blocks" not in q.problems.value and "scale_zero" in q.problems.value
    assert "weights not scanned" in q.problems.value
    assert q.error.value == ""


def test_quant_viewer_tensor_that_cannot_be_dequantized(samples, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "no_scale"
    shutil.copytree(samples["fp8_block"], out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    scale = VICTIM + "_scale_inv"
    f = out / index["weight_map"].pop(scale)
    t = load_file(f)
    del t[scale]
    save_file(t, f, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    ck = dcp_explorer.open(out)
    q = QuantViewer(ck, fqn=VICTIM)
    assert "missing_partner" in ck.quant.set_index("fqn").loc[VICTIM, "problems"]
    assert "<code>missing_partner</code>" in q.problems.value and "not dequantizable" in q.problems.value
    assert "cannot be dequantized" in q.stats.value and q.block_stats is None
    assert bytes(q.scales.value) == b"" and q.error.value == ""
    q.tensor.value = "model.layers.1.self_attn.o_proj.weight"  # its neighbours are fine
    assert png(q.scales.value) and "no problems found" in q.problems.value


def test_quant_viewer_error_map_with_a_reference(fp8, fp8_originals):
    fqn = "model.layers.0.self_attn.q_proj.weight"
    q = QuantViewer(fp8, reference=fp8_originals, fqn=fqn)
    want = block_stats(fp8, fqn, reference=fp8_originals)
    np.testing.assert_array_equal(q.block_stats.error_max, want.error_max)
    assert png(q.block_error.value) and not q.error_metric.disabled
    assert f"{float(want.error_rel.max()):.6g}" in q.stats.value
    rel = bytes(q.block_error.value)
    q.error_metric.value = "max"
    assert png(q.block_error.value) and bytes(q.block_error.value) != rel
    # a reference without this tensor: no error map, a note instead of an error
    q2 = QuantViewer(fp8, reference={"something.else": torch.zeros(1)}, fqn=fqn)
    assert q2.error.value == "" and bytes(q2.block_error.value) == b""
    assert "has no tensor of this name" in q2.stats.value


def test_quant_viewer_shows_callback_errors_in_the_widget(fp8):
    q = QuantViewer(fp8)
    q.slices.value = "0:2, :, :"  # too many dims for a 2-D tensor
    assert q.error.value and "Error" in q.error.value
    assert bytes(q.scales.value) == b""  # stale pictures are cleared, not left behind
    q.slices.value = "0:130, :"
    assert q.error.value == "" and png(q.scales.value)


def test_quant_viewer_without_quantized_tensors(samples):
    q = QuantViewer(dcp_explorer.open(samples["mixed"]))
    assert q.tensor.options == () and "no quantized tensors" in q.row.value and q.error.value == ""
    with pytest.raises(KeyError):
        QuantViewer(dcp_explorer.open(samples["fp8_block"]), fqn="model.norm.weight")


def test_default_region_of_a_huge_tensor():
    assert _default_slices((300, 200)) == ""
    assert _default_slices((128, 4096, 2880)) == "0"  # one expert
    assert _default_slices((1 << 20, 1024)) == f"0:{(1 << 26) // 1024}"


def test_quant_viewer_static_fallback(fp8):
    q = QuantViewer(fp8)
    bundle = q._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    h = bundle["text/html"]
    assert "QuantViewer" in h and "data:image/png;base64" in h
    for f in fp8.quant.fqn:
        assert html.escape(f) in h


# ------------------------------------------------------------------------------------------------
# DiffViewer
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edited(samples, tmp_path_factory):
    """``llama_fsdp_ws1``'s model weights with known edits, saved by ``dcp.save(no_dist=True)``."""
    import warnings

    import torch.distributed.checkpoint as dcp

    sd = dcp_explorer.open(samples["llama_fsdp_ws1"]).load("model.*", progress=False)
    sd["model.layers.0.attention.wq.weight"][:16, :16] *= 1.5
    sd["model.tok_embeddings.weight"][7] += 1.0
    del sd["model.layers.1.ffn_norm.weight"]
    sd["model.final_norm.weight"] = sd.pop("model.norm.weight")
    out = tmp_path_factory.mktemp("edited") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(out), no_dist=True)
    return out


@pytest.fixture()
def d_edit(samples, edited):
    return dcp_explorer.diff(samples["llama_fsdp_ws1"], edited, select="model.*", progress=False)


def test_diff_viewer_status_filter_follows_the_table(d_edit):
    v = DiffViewer(d_edit)
    t = d_edit.table
    values = [val for _, val in v.status.options]
    assert values[:2] == ["all", "changed"] and set(values[2:]) == set(t.status)
    assert len(v.rows) == len(t) and f"{len(t):,} of {len(t):,} entries" in v.count.value
    for s in set(t.status):
        v.status.value = s
        assert list(v.rows.fqn) == list(t[t.status == s].fqn)
        assert [n for _, n in v.tensor.options] == list(t[t.status == s].fqn)
        for f in t[t.status == s].fqn:
            assert html.escape(f) in v.table.value
    v.status.value = "only_in_b"
    assert list(v.rows.fqn) == ["model.final_norm.weight"]
    # each _a/_b pair is one column: the value once when both sides agree, else "a → b"
    assert "<th>dtype</th>" in v.table.value and "<th>dtype_a</th>" not in v.table.value
    assert "— → float32" in v.table.value and "(72,)" in v.table.value
    v.status.value = "different"
    assert "float32 → float32" not in v.table.value and "(251, 72) → " not in v.table.value
    v.status.value = "changed"
    assert list(v.rows.fqn) == list(t[t.changes != ""].fqn)
    v.status.value = "all"
    v.search.value = "norm"
    assert set(v.rows.fqn) == {f for f in t.fqn if "norm" in f}
    v.search.value = "re:^model\\.layers\\.0\\.attention"
    assert set(v.rows.fqn) == {f for f in t.fqn if f.startswith("model.layers.0.attention")}
    v.status.value = "only_in_a"
    assert v.tensor.options == () and "no entries match" in v.table.value and v.error.value == ""


def test_diff_viewer_block_map_follows_the_library(d_edit):
    v = DiffViewer(d_edit, block=8)
    # opens on the first tensor whose values differ
    assert v.tensor.value == d_edit.differences.fqn.iloc[0]
    v.tensor.value = "model.layers.0.attention.wq.weight"
    np.testing.assert_array_equal(v.last_block_map, d_edit.block_map("model.layers.0.attention.wq.weight", 8))
    assert int((v.last_block_map > 0).sum()) == 4 and png(v.block_map.value)
    row = d_edit.table.set_index("fqn").loc["model.layers.0.attention.wq.weight"]
    assert (
        f"{row['max_abs_diff']:.6g}" in v.details.value and f"{int(row['num_outside']):,}" in v.details.value
    )
    v.stat.value = "count"
    np.testing.assert_array_equal(v.last_block_map,
                                  d_edit.block_map("model.layers.0.attention.wq.weight", 8, stat="count"))  # fmt: skip
    assert v.last_block_map.max() == 64
    v.block.value = "16, 72"
    assert v.last_block_map.shape == (5, 1)
    want = d_edit.block_map("model.layers.0.attention.wq.weight", (16, 72), stat="count")
    np.testing.assert_array_equal(v.last_block_map, want)
    # the picture follows the tile grid's shape (5 x 1: tall; 1 x 9: wide), and the widget shows it at
    # its own aspect ratio instead of stretching it to the height of the details beside it
    tall = png_size(v.block_map.value)
    v.block.value = "72, 8"
    wide = png_size(v.block_map.value)
    assert tall[1] > wide[1] and wide[0] > 2 * wide[1]
    assert v.block_map.layout.height == "auto" and v.block_map.layout.align_self == "flex-start"
    # rows that cannot be mapped: a note, no picture, no error
    v.tensor.value = "model.norm.weight"
    assert bytes(v.block_map.value) == b"" and v.last_block_map is None
    assert "no block map: only in a" in v.details.value and v.error.value == ""


def test_diff_viewer_large_tensors_wait_for_the_button(d_edit, monkeypatch):
    import dcp_explorer.widgets.diff as W

    monkeypatch.setattr(W, "AUTO_MAP_ELEMENTS", 1000)
    v = DiffViewer(d_edit, block=8)
    v.tensor.value = "model.layers.0.attention.wq.weight"  # 5,184 elements
    assert bytes(v.block_map.value) == b"" and "draw block map" in v.details.value
    v.draw_button.click()
    assert png(v.block_map.value) and int((v.last_block_map > 0).sum()) == 4
    v.tensor.value = "model.layers.0.attention_norm.weight"  # 72 elements: drawn at once
    assert png(v.block_map.value)


def test_diff_viewer_shows_callback_errors_in_the_widget(d_edit):
    v = DiffViewer(d_edit)
    v.tensor.value = "model.layers.0.attention.wq.weight"
    v.block.value = "zz"
    assert "not a tile size" in v.error.value and bytes(v.block_map.value) == b""
    v.block.value = "8,8,8"  # more dims than the tensor: the library's ValueError
    assert "more dims" in v.error.value
    v.block.value = "8"
    assert v.error.value == "" and png(v.block_map.value)


def test_diff_viewer_equal_diff_and_static_fallback(samples):
    d = dcp_explorer.diff(samples["llama_fsdp_ws4"], samples["llama_fsdp_ws2"], progress=False)
    v = DiffViewer(d)
    assert "EQUAL" in v.summary.value and "layout" in v.summary.value
    assert [val for _, val in v.status.options] == ["all", "changed", "equal"]
    m = v.last_block_map
    assert m is not None and not m.any()  # identical: every tile 0
    bundle = v._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert (
        "dcp_explorer.CheckpointDiff" in bundle["text/html"]
        and "data:image/png;base64" in bundle["text/html"]
    )


def test_parse_block():
    assert parse_block("64") == 64
    assert parse_block("8, 16") == (8, 16) and parse_block("8x16") == (8, 16)
    with pytest.raises(ValueError):
        parse_block("")
