"""Widgets driven by setting traits, without a browser: outputs follow the library's answers."""

from __future__ import annotations

import pytest

import dcp_explorer
from dcp_explorer.widgets import CheckpointBrowser, ReshardExplorer

PNG = b"\x89PNG"


def png(v) -> bool:
    return bytes(v).startswith(PNG)


@pytest.fixture()
def tp(samples):
    return dcp_explorer.open(samples["llama_fsdp_tp_2x2"])


def test_browser_filter_select_and_preview(tp):
    b = CheckpointBrowser(tp)
    assert len(b.tensor.options) == len(tp.fqns)
    b.search.value = "attention.wq"
    assert [v for _, v in b.tensor.options] == [f for f in tp.fqns if "attention.wq" in f]
    b.search.value = "model.layers.*.feed_forward.w2.weight"
    assert [v for _, v in b.tensor.options] == [
        "model.layers.0.feed_forward.w2.weight",
        "model.layers.1.feed_forward.w2.weight",
    ]
    fqn = "model.layers.1.feed_forward.w2.weight"
    b.tensor.value = fqn
    assert png(b.chunk_map.value)
    for c in tp.chunks_of(fqn):  # every chunk's file and byte range is listed
        assert c.file in b.details.value and f"{c.byte_offset:,}" in b.details.value
    b.preview_button.click()
    want = tp.load(fqn)
    assert f"{want.min().item():.6g}" in b.preview.value and f"{want.max().item():.6g}" in b.preview.value
    assert png(b.histogram.value)
    assert b.error.value == ""


def test_browser_bytes_entry_and_modules(samples):
    ck = dcp_explorer.open(samples["mixed"])
    b = CheckpointBrowser(ck)
    b.tensor.value = "extra.cfg.betas"
    assert "bytes" in b.details.value and bytes(b.chunk_map.value) == b""
    b.preview_button.click()
    assert repr(ck.load("extra.cfg.betas")) in b.preview.value
    b.depth.value = 1
    for m in ck.modules(depth=1)["module"]:
        assert m in b.modules.value


def test_browser_bad_regex_matches_nothing_without_error(tp):
    b = CheckpointBrowser(tp)
    b.search.value = "re:[unclosed"
    assert b.tensor.options == () and b.error.value == ""


def test_reshard_explorer_follows_controls(tp):
    r = ReshardExplorer(tp, "dp_shard=2,tp=2", preset="fsdp_tp")
    want = dcp_explorer.simulate_load(tp, "dp_shard=2,tp=2", preset="fsdp_tp").totals()
    assert f"{want['read_items']:,} read items" in r.totals.value and png(r.rank_bytes.value)
    r.world_size.value = 3
    assert r.mesh.value == "dp_shard=3,tp=2"
    want = dcp_explorer.simulate_load(tp, "dp_shard=3,tp=2", preset="fsdp_tp").totals()
    assert f"{want['read_items']:,} read items" in r.totals.value
    r.mesh.value = "world=5"
    assert r.world_size.value == 5 and r.world_size.description == "world"
    r.preset.value = "fsdp"
    assert r.plan.world_size == 5
    # lazy tabs: the overlay renders when shown, and follows the tensor
    r.tabs.selected_index = 2
    first = bytes(r.overlay.value)
    assert png(first)
    r.tensor.value = "model.layers.0.attention.wo.weight"
    assert png(r.overlay.value) and bytes(r.overlay.value) != first
    r.tabs.selected_index = 3
    assert "no problems" in r.problems.value


def test_reshard_explorer_shows_errors_in_the_widget(tp):
    r = ReshardExplorer(tp, 4)
    r.mesh.value = "dp=x"
    assert "not an int" in r.error.value
    r.mesh.value = "dp=2,tp=2"
    r.preset.value = "fsdp_tp"
    assert r.error.value == ""


def test_static_fallbacks(tp):
    b = CheckpointBrowser(tp)
    bundle = b._repr_mimebundle_()
    assert (
        "application/vnd.jupyter.widget-view+json" in bundle
        and "dcp_explorer.Checkpoint" in bundle["text/html"]
    )
    r = ReshardExplorer(tp, 2)
    assert "LoadPlan" in r._repr_mimebundle_()["text/html"]
