"""Pictures: each returns its Axes, draws what the data says, and leaves no global figure behind."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.collections import PatchCollection
from matplotlib.patches import Rectangle

import dcp_explorer
from dcp_explorer import viz


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_given_axes_create_no_pyplot_figure(samples):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    plt.close("all")
    viz.plot_chunk_map(dcp_explorer.open(samples["mixed"]), "model.grid", ax=Figure().add_subplot())
    assert plt.get_fignums() == []


def _collection(ax):
    cols = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(cols) == 1
    return cols[0]


@pytest.mark.parametrize("name,fqn", [
    ("llama_fsdp_tp_2x2", "model.layers.0.attention.wo.weight"),     # 2x2 grid of blocks
    ("llama_fsdp_tp_2x2", "model.layers.0.feed_forward.w1.weight"),  # strided rows
    ("mixed", "model.tiny_rows"),                                   # an empty chunk is not drawn
    ("mixed", "model.token_ids"),                                   # 1-D
    ("mxfp4", "model.layers.0.mlp.experts.gate_up_proj_blocks"),     # 4-D stored, folded
    ("mixed", "model.scalar"),                                      # 0-d
])  # fmt: skip
def test_chunk_map_draws_every_nonempty_chunk_with_its_rank(samples, name, fqn):
    ck = dcp_explorer.open(samples[name])
    ax = viz.plot_chunk_map(ck, fqn)
    pc = _collection(ax)
    chunks = ck.chunks[ck.chunks.fqn == fqn]
    nonempty = chunks[[all(s > 0 for s in sz) for sz in chunks["sizes"]]]
    assert len(pc.get_paths()) == len(nonempty)
    if (nonempty["rank"] >= 0).all():
        assert sorted(pc.get_array().tolist()) == sorted(nonempty["rank"].astype(float).tolist())
    # the rectangles tile exactly the stored elements (2-D case): total area == numel
    if len(ck.tensor(fqn).shape) == 2:
        area = sum(p.get_extents().width * p.get_extents().height for p in pc.get_paths())
        assert area == pytest.approx(sum(np.prod(s) for s in nonempty["sizes"]))
    assert fqn in ax.get_title()


def test_overlay_outlines_each_target_rank(samples):
    ck = dcp_explorer.open(samples["llama_fsdp_ws4"])
    plan = dcp_explorer.simulate_load(ck, 3, preset="fsdp")
    ax = viz.plot_reshard_overlay(plan, "model.layers.0.feed_forward.w1.weight")
    outlines = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(outlines) == 2 * 3  # a halo and a dashed line per rank
    labels = {t.get_text() for t in ax.texts}
    assert {"R0", "R1", "R2"} <= labels


def test_rank_bytes_bars_match_the_plan(samples):
    plan = dcp_explorer.simulate_load(samples["llama_fsdp_tp_2x2"], "dp=2,tp=2", preset="fsdp_tp")
    ax = viz.plot_rank_bytes(plan)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 2 * plan.world_size
    heights = np.array([b.get_height() for b in bars])
    pr = plan.per_rank
    scale = heights[: plan.world_size].max() / pr.bytes_needed.max()
    np.testing.assert_allclose(heights[: plan.world_size], pr.bytes_needed * scale, rtol=1e-9)


def test_many_ranks_use_lines_not_bars(samples):
    plan = dcp_explorer.simulate_load(samples["llama_fsdp_ws4"], 100, preset="fsdp")
    ax = viz.plot_rank_bytes(plan)
    assert not [p for p in ax.patches if isinstance(p, Rectangle)]
    assert ax.lines and ax.collections


def test_traffic_heatmap_shape_and_file_fanin(samples):
    plan = dcp_explorer.simulate_load(samples["llama_fsdp_ws4"], 3, preset="fsdp")
    ax = viz.plot_traffic(plan)
    im = ax.images[0]
    assert im.get_array().shape == plan.traffic.shape
    ax = viz.plot_file_fanin(plan)
    assert len([p for p in ax.patches if isinstance(p, Rectangle)]) == len(plan.per_file)


def test_module_bytes_sorted_with_rest(samples):
    ck = dcp_explorer.open(samples["llama_fsdp_ws2"])
    ax = viz.plot_module_bytes(ck, depth=3, top=4)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    m = ck.modules(depth=3)
    assert len(bars) == min(4, len(m)) + (len(m) > 4)
    widths = [b.get_width() for b in bars[:4]]
    assert widths == sorted(widths, reverse=True)


def test_given_axes_are_used(samples):
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    ck = dcp_explorer.open(samples["mixed"])
    assert viz.plot_chunk_map(ck, "model.grid", ax=ax) is ax
