"""Pictures of quantized tensors: each returns the Axes it drew on, with the artists we expect.

No ``plt.show()`` (patched to fail), figures closed after every test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import dcp_explorer as dx

torch = pytest.importorskip("torch")
mpl = pytest.importorskip("matplotlib")
mpl.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle, StepPatch  # noqa: E402

from dcp_explorer import quant as Q  # noqa: E402
from dcp_explorer import viz_quant as V  # noqa: E402

FP8 = "model.layers.0.self_attn.q_proj.weight"
MXB = "model.layers.0.mlp.experts.gate_up_proj_blocks"


@pytest.fixture(autouse=True)
def _clean(private_cache, monkeypatch):
    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("plt.show() called"))
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def fp8(samples):
    return dx.open(samples["fp8_block"], cache=False)


@pytest.fixture(scope="module")
def mx(samples):
    return dx.open(samples["mxfp4"], cache=False)


@pytest.fixture(scope="module")
def originals():
    from dcp_explorer.samples import _fp8_reference

    return _fp8_reference()[1]


def _image(ax) -> AxesImage:
    imgs = [a for a in ax.get_children() if isinstance(a, AxesImage)]
    assert len(imgs) == 1
    return imgs[0]


def test_scales_heatmap_fp8(fp8):
    fig, ax = plt.subplots()
    out = V.plot_quant_scales(fp8, FP8, ax=ax)
    assert out is ax
    im = _image(ax)
    assert isinstance(im.norm, LogNorm)
    assert im.get_array().shape == (3, 2)  # 300 x 200 in 128 x 128 blocks
    raw = Q.block_stats(fp8, FP8, weights=False).scale
    assert np.array_equal(np.asarray(im.get_array()), raw)
    assert len(fig.axes) == 2, "a colorbar"
    assert "block scales" in ax.get_title() and FP8 in ax.get_title()
    assert "column block" in ax.get_xlabel() and "row block" in ax.get_ylabel()


def test_scales_heatmap_from_stats_and_new_figure(mx):
    st = Q.block_stats(mx, MXB, weights=False)
    ax = V.plot_quant_scales(st)
    assert ax.figure is not None and _image(ax).get_array().shape == (4 * 128, 3)
    assert "group" in ax.get_xlabel()
    sl = V.plot_quant_scales(mx, MXB, slices=(2,))
    assert _image(sl).get_array().shape == (128, 3)


def test_scales_heatmap_marks_bad_blocks(fp8, samples, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst = tmp_path / "bad"
    shutil.copytree(samples["fp8_block"], dst)
    wm = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    f = dst / wm[FP8 + "_scale_inv"]
    with safe_open(str(f), "pt") as so:
        tensors = {k: so.get_tensor(k) for k in so.keys()}  # noqa: SIM118
        meta = so.metadata()
    s = tensors[FP8 + "_scale_inv"]
    s[0, 0], s[1, 1] = float("nan"), 0.0
    save_file(tensors, str(f), metadata=meta)
    ck = dx.open(dst, cache=False)
    ax = V.plot_quant_scales(ck, FP8)
    arr = _image(ax).get_array()
    assert arr.mask.sum() == 2 and "2 blocks not drawable" in ax.get_title()


def test_codes_histogram(fp8, mx):
    ax = V.plot_quant_codes(fp8, FP8)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 256
    assert sum(b.get_height() for b in bars) == 300 * 200
    assert ax.get_yscale() == "log"
    ax = V.plot_quant_codes(Q.block_stats(mx, MXB), log=False)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 16 and sum(b.get_height() for b in bars) == 4 * 128 * 96
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["0", "0.5", "1"]
    assert ax.get_yscale() == "linear"


def test_values_histogram(fp8):
    st = Q.block_stats(fp8, FP8, bins=51)
    ax = V.plot_quant_values(st)
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert len(steps) == 1
    vals, edges = steps[0].get_data()[:2]
    assert len(vals) == 51 and vals.sum() == 300 * 200
    assert "dequantized value" in ax.get_xlabel()
    with pytest.raises(ValueError, match="bins"):
        V.plot_quant_values(Q.block_stats(fp8, FP8, bins=0))


@pytest.mark.parametrize("quantity", ["dynamic_range", "utilization", "absmax"])
def test_dynamic_range_heatmap(fp8, quantity):
    st = Q.block_stats(fp8, FP8)
    ax = V.plot_quant_dynamic_range(st, quantity=quantity)
    im = _image(ax)
    assert im.get_array().shape == (3, 2)
    assert isinstance(im.norm, LogNorm) == (quantity == "absmax")
    want = {"dynamic_range": st.dynamic_range_bits, "utilization": st.utilization, "absmax": st.absmax}[
        quantity
    ]
    assert np.allclose(np.asarray(im.get_array()), want)
    with pytest.raises(ValueError, match="quantity"):
        V.plot_quant_dynamic_range(st, quantity="nope")
    with pytest.raises(ValueError, match="weights=True"):
        V.plot_quant_dynamic_range(Q.block_stats(fp8, FP8, weights=False))


@pytest.mark.parametrize("metric", ["rel", "max"])
def test_error_heatmap_against_reference(fp8, originals, metric):
    fig, ax = plt.subplots()
    V.plot_quant_error(fp8, FP8, originals, ax=ax, metric=metric)
    im = _image(ax)
    assert isinstance(im.norm, LogNorm) and im.get_array().shape == (3, 2)
    st = Q.block_stats(fp8, FP8, reference=originals)
    want = st.error_rel if metric == "rel" else st.error_max
    assert np.allclose(np.asarray(im.get_array()), want)
    assert f"vs {FP8}" in ax.get_title()
    assert len(fig.axes) == 2


def test_error_needs_a_reference(fp8):
    with pytest.raises(TypeError, match="reference"):
        V.plot_quant_error(fp8, FP8)
    with pytest.raises(ValueError, match="reference="):
        V.plot_quant_error(Q.block_stats(fp8, FP8))
    with pytest.raises(TypeError, match="BlockStats"):
        V.plot_quant_codes(fp8)


def test_slice_keeps_global_block_numbers(fp8):
    ax = V.plot_quant_scales(fp8, FP8, slices="200:, 150:")
    left, right, bottom, top = _image(ax).get_extent()
    assert (left, right, bottom, top) == (0.5, 1.5, 2.5, 0.5)  # block rows 1-2, block column 1


def test_no_global_state_changes(fp8):
    rc = dict(mpl.rcParams)
    n = len(plt.get_fignums())
    fig, ax = plt.subplots()
    V.plot_quant_scales(fp8, FP8, ax=ax)
    V.plot_quant_codes(fp8, FP8, ax=ax)
    assert len(plt.get_fignums()) == n + 1, "drawing on ax makes no new figure"
    assert dict(mpl.rcParams) == rc
