"""Property tests: layout and read-item planning against torch's own pure helpers.

No process group, no files: each example calls torch's private reference functions
(``_compute_local_shape_and_global_offset``, ``create_read_items_for_chunk_list``) and the
pure-numpy reimplementations in :mod:`dcp_explorer.layout` / :mod:`dcp_explorer.plan`.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from _strategies import Box, tiling
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch.distributed.checkpoint.metadata import (  # noqa: E402
    ChunkStorageMetadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list  # noqa: E402
from torch.distributed.tensor import Replicate as TReplicate  # noqa: E402
from torch.distributed.tensor import Shard as TShard  # noqa: E402
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

from dcp_explorer.layout import Replicate, Shard, StridedShard, all_local_chunks, local_chunk  # noqa: E402
from dcp_explorer.plan import create_read_items, read_items_pattern  # noqa: E402

#: ``DCPX_HYPOTHESIS_EXAMPLES=4000`` for a deeper search (4000 examples each: ~100 s on 2 cores).
SETTINGS = settings(
    max_examples=int(os.environ.get("DCPX_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------
def placement_st(ndim: int) -> st.SearchStrategy:
    """R, S(d) or SS(d, sf) for a tensor of ``ndim`` dims (only R for 0-d)."""
    if ndim == 0:
        return st.just(Replicate())
    d = st.integers(0, ndim - 1)
    return st.one_of(
        st.just(Replicate()),
        d.map(Shard),
        st.builds(StridedShard, d, st.integers(1, 4)),
    )


@st.composite
def mesh_placements(draw: st.DrawFn, ndim: int) -> tuple[tuple[int, ...], tuple]:
    """A mesh of 1-3 dims of sizes 1-5 and placements for a tensor of ``ndim`` dims."""
    mesh = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    pls = tuple(draw(st.lists(placement_st(ndim), min_size=len(mesh), max_size=len(mesh))))
    return mesh, pls


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple]:
    """(global shape, mesh shape, placements): shapes with 0 and uneven sizes."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 13), min_size=ndim, max_size=ndim)))
    mesh, pls = draw(mesh_placements(ndim))
    return shape, mesh, pls


def to_torch(p: object) -> object:
    if isinstance(p, Replicate):
        return TReplicate()
    if isinstance(p, StridedShard):
        return _StridedShard(p.dim, split_factor=p.split_factor)
    return TShard(p.dim)


@st.composite
def box_in(draw: st.DrawFn, shape: tuple[int, ...]) -> Box:
    """Any (possibly empty) box inside ``shape``."""
    offs, sizes = [], []
    for n in shape:
        o = draw(st.integers(0, n))
        offs.append(o)
        sizes.append(draw(st.integers(0, n - o)))
    return tuple(offs), tuple(sizes)


@st.composite
def chunk_lists(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box], list[Box]]:
    """A shape and arbitrary (overlapping, empty, unordered) saved and requested chunk lists."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    saved = draw(st.lists(box_in(shape), min_size=0, max_size=6))
    local = draw(st.lists(box_in(shape), min_size=0, max_size=5))
    return shape, saved, local


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def tsm(shape: tuple[int, ...], saved: list[Box]) -> TensorStorageMetadata:
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=torch.float32),
        size=torch.Size(shape),
        chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in saved],
    )


def torch_items(shape: tuple[int, ...], saved: list[Box], local: list[Box]) -> list[tuple]:
    """torch's ReadItems as (local_index, storage_index, dest_offsets, storage_offsets, lengths)."""
    chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in local]
    items = create_read_items_for_chunk_list("t", tsm(shape, saved), chunks)
    out = []
    for it in items:
        assert it.dest_index.offset == torch.Size(local[it.dest_index.index][0])
        assert it.storage_index.offset == torch.Size(saved[it.storage_index.index][0])
        out.append((it.dest_index.index, it.storage_index.index, tuple(it.dest_offsets),
                    tuple(it.storage_offsets), tuple(it.lengths)))  # fmt: skip
    return out


def box_arrays(boxes: list[Box], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """The offsets and the sizes of ``boxes``: two int64 arrays of shape ``(len(boxes), ndim)``."""
    offs = np.array([o for o, _ in boxes], np.int64).reshape(len(boxes), ndim)
    sizes = np.array([s for _, s in boxes], np.int64).reshape(len(boxes), ndim)
    return offs, sizes


def saved_chunks(shape: tuple[int, ...], mesh: tuple[int, ...], pls: tuple) -> list[Box]:
    """The chunks DCP saves for a tensor placed so: each distinct local chunk once, in rank order."""
    sizes, offs = all_local_chunks(shape, mesh, pls)
    return list(
        dict.fromkeys((tuple(o), tuple(s)) for o, s in zip(offs.tolist(), sizes.tolist(), strict=True))
    )


def pattern_rows(pat: object, r: int) -> list[tuple]:
    """Rank ``r``'s rows of a :class:`ReadItemsPattern`, in the form of :func:`torch_items`."""
    a, b = int(pat.rank_bounds[r]), int(pat.rank_bounds[r + 1])
    return [(0, int(pat.chunk[q]), tuple(pat.dest_offsets[q].tolist()), tuple(pat.storage_offsets[q].tolist()),
             tuple(pat.lengths[q].tolist())) for q in range(a, b)]  # fmt: skip


# ------------------------------------------------------------------------------------------
# layout.local_chunk == torch's _compute_local_shape_and_global_offset
# ------------------------------------------------------------------------------------------
@SETTINGS
@given(layouts())
def test_local_chunk_matches_torch(layout: tuple) -> None:
    shape, mesh, pls = layout
    tpls = [to_torch(p) for p in pls]
    sizes, offs = all_local_chunks(shape, mesh, pls)
    for r, coord in enumerate(itertools.product(*(range(m) for m in mesh))):
        expected = _compute_local_shape_and_global_offset(shape, mesh, list(coord), tpls)
        got = local_chunk(shape, mesh, coord, pls)
        assert got == (tuple(expected[0]), tuple(expected[1])), (shape, mesh, pls, coord)
        assert (tuple(sizes[r]), tuple(offs[r])) == got  # the broadcasting all-ranks version


def test_local_chunk_examples() -> None:
    """The worked examples of DCP_FORMAT.md section 4."""
    sizes = [local_chunk((10,), (4,), (i,), ["S(0)"])[0][0] for i in range(4)]
    assert sizes == [3, 3, 3, 1]
    assert [local_chunk((3,), (4,), (i,), ["S(0)"]) for i in range(4)][-1] == ((0,), (3,))
    got = [local_chunk((10, 7), (2, 2), c, ["SS(0,2)", "S(0)"]) for c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert got == [((3, 7), (0, 0)), ((3, 7), (5, 0)), ((2, 7), (3, 0)), ((2, 7), (8, 0))]


# ------------------------------------------------------------------------------------------
# plan.create_read_items == torch's create_read_items_for_chunk_list
# ------------------------------------------------------------------------------------------
@SETTINGS
@given(chunk_lists())
def test_create_read_items_matches_torch(case: tuple) -> None:
    shape, saved, local = case
    assert create_read_items(saved, local) == torch_items(shape, saved, local)


@SETTINGS
@given(st.data())
def test_read_items_pattern_matches_torch(data: st.DataObject) -> None:
    """The vectorized all-ranks form, one local chunk per rank, equals torch rank by rank."""
    ndim = data.draw(st.integers(0, 3), label="ndim")
    shape = tuple(data.draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim), label="shape"))
    saved = data.draw(st.lists(box_in(shape), min_size=0, max_size=6), label="saved")
    local = data.draw(st.lists(box_in(shape), min_size=1, max_size=6), label="local (one per rank)")
    part = np.array(
        data.draw(st.lists(st.booleans(), min_size=len(local), max_size=len(local)), label="part")
    )
    so, ss = box_arrays(saved, ndim)
    lo, ls = box_arrays(local, ndim)
    for participating in (None, part):
        pat = read_items_pattern(so, ss, lo, ls, participating)
        for r in range(len(local)):
            got = pattern_rows(pat, r)
            expected = torch_items(shape, saved, [local[r]])
            if participating is not None and not participating[r]:
                expected = []
            assert got == expected, (r, shape, saved, local[r])


@SETTINGS
@given(layouts(), st.data())
def test_read_items_pattern_on_mesh_layouts(layout: tuple, data: st.DataObject) -> None:
    """Saved on one mesh layout, loaded on another: each rank's reads equal torch's."""
    shape, mesh, pls = layout
    mesh2, pls2 = data.draw(mesh_placements(len(shape)), label="target")
    saved = saved_chunks(shape, mesh, pls)
    ls, lo = all_local_chunks(shape, mesh2, pls2)
    pat = read_items_pattern(*box_arrays(saved, len(shape)), lo, ls)
    for r in range(len(lo)):
        assert pattern_rows(pat, r) == torch_items(
            shape, saved, [(tuple(lo[r].tolist()), tuple(ls[r].tolist()))]
        )


# ------------------------------------------------------------------------------------------
# coverage: tilings are read exactly once, and the reads reassemble the tensor
# ------------------------------------------------------------------------------------------
@SETTINGS
@given(st.data())
def test_tilings_cover_every_element_once(data: st.DataObject) -> None:
    ndim = data.draw(st.integers(1, 3), label="ndim")
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim), label="shape"))
    saved = data.draw(tiling(shape), label="saved")
    local = data.draw(tiling(shape), label="local")
    items = create_read_items(saved, local)
    full = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    counts = {li: np.zeros(local[li][1], np.int64) for li in range(len(local))}
    rebuilt = {li: np.full(local[li][1], -1, np.int64) for li in range(len(local))}
    for li, si, dest, stor, lens in items:
        (lo_, _), (so_, ss_) = local[li], saved[si]
        d = tuple(slice(a, a + n) for a, n in zip(dest, lens, strict=True))
        s = tuple(slice(a, a + n) for a, n in zip(stor, lens, strict=True))
        saved_data = full[tuple(slice(o, o + n) for o, n in zip(so_, ss_, strict=True))]
        counts[li][d] += 1
        rebuilt[li][d] = saved_data[s]
    for li, (lo_, ls_) in enumerate(local):
        assert (counts[li] == 1).all(), (li, counts[li])
        np.testing.assert_array_equal(
            rebuilt[li], full[tuple(slice(o, o + n) for o, n in zip(lo_, ls_, strict=True))]
        )
    # the vectorized form agrees on coverage (one local chunk per "rank")
    pat = read_items_pattern(*box_arrays(saved, ndim), *box_arrays(local, ndim))
    per_rank = np.bincount(pat.rank, weights=pat.numel, minlength=len(local))
    assert per_rank.tolist() == [float(np.prod(s)) for _, s in local]
    assert int(pat.numel.sum()) == int(np.prod(shape))


@SETTINGS
@given(layouts(), st.data())
def test_mesh_layouts_cover_every_element_once(src: tuple, data: st.DataObject) -> None:
    """Any saved mesh layout (deduplicated) covers every target rank's chunk exactly once."""
    shape, mesh, pls = src
    mesh2, pls2 = data.draw(mesh_placements(len(shape)), label="target")
    saved_o, saved_s = box_arrays(saved_chunks(shape, mesh, pls), len(shape))
    # _StridedShard chunks are not boxes (DCP records only the first offset): keep contiguous layouts
    if any(isinstance(p, StridedShard) and p.split_factor > 1 for p in pls + pls2):
        return
    ls, lo = all_local_chunks(shape, mesh2, pls2)
    pat = read_items_pattern(saved_o, saved_s, lo, ls)
    per_rank = (
        np.bincount(pat.rank, weights=pat.numel, minlength=len(lo)) if len(pat.rank) else np.zeros(len(lo))
    )
    want = np.prod(ls, axis=1) if len(shape) else np.ones(len(lo))
    assert per_rank.tolist() == want.astype(float).tolist()


# ------------------------------------------------------------------------------------------
# the simulator flattens a state dict as dcp.load does
# ------------------------------------------------------------------------------------------
_leaves = st.one_of(
    st.builds(lambda n: torch.empty(n), st.integers(0, 3)),
    st.integers(0, 9),
    st.none(),
    st.just("s"),
)
_keys = st.sampled_from(["a", "b", "w", "0", "x.y"])
_trees = st.recursive(
    _leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.tuples(kids),
        st.dictionaries(_keys, kids, max_size=3),
    ),
    max_leaves=10,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["model", "optim", "extra", "step"]), _trees, min_size=1, max_size=3))
def test_flatten_matches_torch(sd: dict) -> None:
    """Flat names and their order: mappings always descended, lists only when they hold tensors,
    mappings or such lists (``[[t]]``), tuples never."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    from dcp_explorer.plan import _flatten_expected

    top = {k: sd[k] for k in sorted(sd)}  # dcp.load sorts the top-level keys
    try:
        expected = list(flatten_state_dict(top)[0])
    except ValueError:  # torch: "duplicated flatten key" (e.g. {"x.y": .., "x": {"y": ..}})
        return
    assert list(_flatten_expected(top)) == expected
