"""Load-plan simulation: what every rank of a target mesh reads, exactly as DCP's planner would.

Pure: checkpoint metadata + a target layout -> an immutable :class:`LoadPlan`.  No torch, no
process group, no I/O.  The rules reproduced (torch 2.13, ``DefaultLoadPlanner``):

* ``dcp.load(sd)`` sorts the top-level keys, flattens the state dict (mappings always, lists
  of tensors/mappings), and plans each flat fqn in that order.  A missing key raises
  ``RuntimeError("Missing key in checkpoint state_dict: {fqn}.")`` (strict), a size mismatch
  ``ValueError("Size mismatch between saved {md.size} and current: {size} for {fqn}")``.
* A DTensor contributes its one local chunk (``_compute_local_shape_and_global_offset``,
  reproduced in :mod:`dcp_explorer.layout`); a plain tensor the whole tensor at offset 0;
  a bytes entry one ``BYTE_IO`` read.
* ``create_read_items_for_chunk_list``: sweep line over the dim with the largest extent,
  one ReadItem per overlapping saved chunk, ordered per local chunk by (saved end on the
  sweep dim, saved index).
* ``FileSystemReader`` reads each ReadItem's whole saved item (``byte_length``), so a
  chunk referenced k times is read k times; that is ``bytes_read`` below.

Tensors with the same shape, saved chunk layout and target placements share one pattern,
computed once with numpy for all ranks; per-tensor storage (files, byte lengths) is applied
on top, so a 405B checkpoint on 768 ranks is simulated in seconds without materialising
30 M rows unless asked (:meth:`LoadPlan.reads`).
"""

from __future__ import annotations

import fnmatch
import math
import re
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from .layout import (
    Mesh,
    Placement,
    Replicate,
    Shard,
    StridedShard,
    all_local_chunks,
    parse_mesh,
    parse_placements,
)
from .model import KIND_BYTES, CheckpointIndex, itemsize

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PRESETS",
    "ReadItemsPattern",
    "Problem",
    "LoadPlan",
    "create_read_items",
    "read_items_pattern",
    "resolve_placements",
    "simulate_load",
]


# --------------------------------------------------------------------------------------------
# the read-item algorithm
# --------------------------------------------------------------------------------------------
def _overlap(lo: Sequence[int], ls: Sequence[int], so: Sequence[int], ss: Sequence[int]) -> bool:
    return all(not (lo[i] >= so[i] + ss[i] or so[i] >= lo[i] + ls[i]) for i in range(len(lo)))


def create_read_items(
    saved: Sequence[tuple[Sequence[int], Sequence[int]]],
    local: Sequence[tuple[Sequence[int], Sequence[int]]],
) -> list[tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """torch's ``create_read_items_for_chunk_list`` on plain tuples (the general, multi-chunk form).

    Parameters
    ----------
    saved, local
        ``(offsets, sizes)`` of every saved chunk (in ``md.chunks`` order) and every local chunk.

    Returns
    -------
    list of (local_index, storage_index, dest_offsets, storage_offsets, lengths)
        In torch's order.
    """
    out: list[tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
    if not local or not saved:
        return out
    nd = len(local[0][0])
    sweep = 0
    if nd > 1:
        best = 0
        for d in range(nd):
            ext = max(o[d] + s[d] for o, s in (*local, *saved))
            if ext > best:
                best, sweep = ext, d
    if nd == 0:
        sb = [(0, 1)] * len(saved)
        lb = [(0, 1)] * len(local)
    else:
        sb = [(o[sweep], o[sweep] + s[sweep]) for o, s in saved]
        lb = [(o[sweep], o[sweep] + s[sweep]) for o, s in local]
    s_sorted = sorted(range(len(saved)), key=lambda i: sb[i][0])
    l_sorted = sorted(range(len(local)), key=lambda i: lb[i][0])
    active: list[tuple[int, int]] = []
    ptr = 0
    for li in l_sorted:
        lo, ls = local[li]
        start, end = lb[li]
        cut = bisect_right(active, (start, -1))
        if cut:
            del active[:cut]
        while ptr < len(s_sorted):
            si = s_sorted[ptr]
            if sb[si][0] >= end:
                break
            insort(active, (sb[si][1], si))
            ptr += 1
        for _, si in active:
            so, ss = saved[si]
            if not _overlap(lo, ls, so, ss):
                continue
            dest, stor, lens = [], [], []
            for d in range(nd):
                lens.append(min(so[d] + ss[d], lo[d] + ls[d]) - max(lo[d], so[d]))
                if so[d] > lo[d]:
                    stor.append(0)
                    dest.append(so[d] - lo[d])
                else:
                    stor.append(lo[d] - so[d])
                    dest.append(0)
            out.append((li, si, tuple(dest), tuple(stor), tuple(lens)))
    return out


@dataclass(frozen=True)
class ReadItemsPattern:
    """ReadItems of one tensor layout for every rank: one row per (rank, saved chunk) read.

    Rows are sorted by rank, then in torch's order within the rank.
    """

    rank: np.ndarray
    """int64 [P]: loading rank."""
    chunk: np.ndarray
    """int64 [P]: saved chunk index (position in the tensor's chunk list)."""
    dest_offsets: np.ndarray
    """int64 [P, ndim]: offsets inside the rank's local chunk."""
    storage_offsets: np.ndarray
    """int64 [P, ndim]: offsets inside the saved chunk."""
    lengths: np.ndarray
    """int64 [P, ndim]: extent of the read."""
    local_offsets: np.ndarray
    """int64 [R, ndim]: global offset of each rank's local chunk."""
    local_sizes: np.ndarray
    """int64 [R, ndim]: shape of each rank's local chunk."""
    participating: np.ndarray
    """bool [R]: whether the rank plans this tensor at all."""
    storage_index: np.ndarray | None = None
    """int64 [P] or None: ``storage_index.index`` where it is not ``chunk`` (a checkpoint with per-rank
    metadata: rank r plans against ``__r.metadata``, whose chunk list holds only what rank r saved)."""

    @cached_property
    def numel(self) -> np.ndarray:
        """int64 [P]: elements each read delivers."""
        return (
            np.prod(self.lengths, axis=1, dtype=np.int64)
            if self.lengths.shape[1]
            else np.ones(len(self.rank), np.int64)
        )

    @cached_property
    def rank_bounds(self) -> np.ndarray:
        """int64 [R+1]: rows of rank r are ``rank_bounds[r]:rank_bounds[r+1]``."""
        return np.searchsorted(self.rank, np.arange(len(self.local_offsets) + 1), side="left")


def _overlapping_on_dim(
    s0: np.ndarray, s1: np.ndarray, l0: np.ndarray, l1: np.ndarray, ranks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (rank, saved chunk) with ``l0[r] < s1[j]`` and ``s0[j] < l1[r]``, in no particular order.

    When the saved intervals sorted by (start, end) also have sorted ends (no interval nested
    in another with a different start: true of every DCP sharding), each rank's partners are
    a contiguous run of that order, found by binary search; otherwise all pairs are tested.
    """
    perm = np.lexsort((s1, s0))
    ends = s1[perm]
    if len(ends) > 1 and not (np.diff(ends) >= 0).all():
        m = (l0[ranks][:, None] < s1[None, :]) & (s0[None, :] < l1[ranks][:, None])
        ri, j = np.nonzero(m)
        return ranks[ri], j
    hi = np.searchsorted(s0[perm], l1[ranks], side="left")  # starts < l1
    lo = np.searchsorted(ends, l0[ranks], side="right")  # ends > l0
    cnt = np.maximum(hi - lo, 0)
    total = int(cnt.sum())
    r = np.repeat(ranks, cnt)
    pos = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt - lo, cnt)
    return r, perm[pos]


def read_items_pattern(
    saved_offsets: np.ndarray,
    saved_sizes: np.ndarray,
    local_offsets: np.ndarray,
    local_sizes: np.ndarray,
    participating: np.ndarray | None = None,
) -> ReadItemsPattern:
    """Vectorized :func:`create_read_items` for one local chunk per rank, all ranks at once.

    Parameters
    ----------
    saved_offsets, saved_sizes
        int64 ``[k, ndim]``: the saved chunks, in ``md.chunks`` order.
    local_offsets, local_sizes
        int64 ``[R, ndim]``: each rank's local chunk.
    participating
        bool ``[R]``: ranks that plan this tensor (default all).
    """
    so = np.asarray(saved_offsets, np.int64)
    ss = np.asarray(saved_sizes, np.int64)
    lo = np.asarray(local_offsets, np.int64)
    ls = np.asarray(local_sizes, np.int64)
    R, nd = lo.shape
    k = len(so)
    part = np.ones(R, bool) if participating is None else np.asarray(participating, bool)
    if k == 0 or R == 0:
        z = np.zeros((0, nd), np.int64)
        return ReadItemsPattern(np.zeros(0, np.int64), np.zeros(0, np.int64), z, z, z, lo, ls, part)
    se = so + ss
    le = lo + ls
    if nd == 0:
        r, j = np.nonzero(np.broadcast_to(part[:, None], (R, k)))
        z = np.zeros((len(r), 0), np.int64)
        return ReadItemsPattern(r.astype(np.int64), j.astype(np.int64), z, z, z, lo, ls, part)
    if R > 1:
        # ranks holding the same local chunk (replicated mesh dims) read the same items: plan each
        # distinct local chunk once, then give every rank the rows of its chunk
        _u, first, inv = np.unique(np.concatenate([lo, ls, part[:, None].astype(np.int64)], axis=1), axis=0,
                                   return_index=True, return_inverse=True)  # fmt: skip
        if 2 * len(first) <= R:
            sub = read_items_pattern(so, ss, lo[first], ls[first], part[first])
            inv = inv.reshape(-1)
            b = sub.rank_bounds
            cnt = (b[1:] - b[:-1])[inv]
            rank = np.repeat(np.arange(R, dtype=np.int64), cnt)
            idx = np.arange(len(rank), dtype=np.int64) + np.repeat(b[:-1][inv] - (np.cumsum(cnt) - cnt), cnt)
            return ReadItemsPattern(rank, sub.chunk[idx], sub.dest_offsets[idx], sub.storage_offsets[idx],
                                    sub.lengths[idx], lo, ls, part)  # fmt: skip
    # sweep dim per rank: largest max(offset + size) over local and saved chunks, ties -> lowest
    ext = np.maximum(se.max(axis=0)[None, :], le)
    sweep = np.argmax(ext, axis=1) if nd > 1 else np.zeros(R, np.int64)
    # torch reads saved chunk j for local chunk r when they overlap on every dim (j is then always in
    # its sweep-line's active list, so that list adds no condition). Test the dim that tells the saved
    # chunks apart best on all [R, k] pairs, the other dims only on the pairs that pass it.
    d0 = max(range(nd), key=lambda d: (len(np.unique(so[:, d])), -d))
    r, j = _overlapping_on_dim(so[:, d0], se[:, d0], lo[:, d0], le[:, d0], np.flatnonzero(part))
    for d in range(nd):
        if d != d0:
            keep = (lo[r, d] < se[j, d]) & (so[j, d] < le[r, d])
            r, j = r[keep], j[keep]
    # within a rank: torch iterates its active list ordered by (saved end on the sweep dim, index)
    # (one int64 key: rank, then the chunk's place in that order for the rank's sweep dim)
    place = np.zeros((nd, k), np.int64)
    for s in np.unique(sweep).tolist():
        place[s, np.lexsort((np.arange(k), se[:, s]))] = np.arange(k)
    key = r * k + place[sweep[r], j]
    if len(key) > 1 and not (key[1:] > key[:-1]).all():
        order = np.argsort(key, kind="stable")
        r, j = r[order], j[order]
    r, j = r.astype(np.int64), j.astype(np.int64)
    lo_r, le_r = lo[r], le[r]
    so_j, se_j = so[j], se[j]
    lengths = np.minimum(se_j, le_r) - np.maximum(lo_r, so_j)
    later = so_j > lo_r
    stor = np.where(later, 0, lo_r - so_j)
    dest = np.where(later, so_j - lo_r, 0)
    return ReadItemsPattern(r, j, dest, stor, lengths, lo, ls, part)


# --------------------------------------------------------------------------------------------
# target layouts
# --------------------------------------------------------------------------------------------
_COLWISE = (
    r"(^|\.)(wq|wk|wv|w1|w3|q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$",
    r"(^|\.)(tok_embeddings|embed_tokens|output|lm_head)\.weight$",
)
_ROWWISE = (r"(^|\.)(wo|w2|o_proj|down_proj)\.weight$",)


def _preset(name: str, mesh: Mesh) -> Callable[[str, tuple[int, ...]], tuple[Placement, ...] | None]:
    n = mesh.ndim
    if name == "replicate":
        return lambda fqn, shape: tuple(Replicate() for _ in range(n))
    if name == "fsdp":
        # FSDP2 over every mesh dim (a flattened data-parallel mesh): dim 0 sharded on each.
        return lambda fqn, shape: tuple(Shard(0) for _ in range(n)) if shape else None
    if name == "hsdp":
        if n != 2:
            raise ValueError(f"preset 'hsdp' needs a 2-D mesh (replicate, shard), got {mesh}")
        return lambda fqn, shape: (Replicate(), Shard(0)) if shape else None
    if name == "fsdp_tp":
        if n != 2:
            raise ValueError(f"preset 'fsdp_tp' needs a 2-D mesh (dp_shard, tp), got {mesh}")
        tp = mesh.shape[1]
        col = [re.compile(p) for p in _COLWISE]
        row = [re.compile(p) for p in _ROWWISE]

        def rule(fqn: str, shape: tuple[int, ...]) -> tuple[Placement, ...] | None:
            if not shape:
                return None
            base = _param_name(fqn)
            if len(shape) == 2 and any(p.search(base) for p in col):
                # TP Shard(0), then FSDP2 Shard(0) on dp: torch records _StridedShard(0, tp)
                return (StridedShard(0, tp), Shard(0))
            if len(shape) == 2 and any(p.search(base) for p in row):
                return (Shard(0), Shard(1))
            return (Shard(0), Replicate())  # norms etc.: FSDP only

        return rule
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")


#: Layout presets for :func:`simulate_load`.
PRESETS: dict[str, str] = {
    "fsdp": "FSDP2 (Shard(0)) over every mesh dim; 0-d tensors plain",
    "hsdp": "HSDP on a 2-D mesh: (Replicate(), Shard(0))",
    "fsdp_tp": "2-D mesh (dp_shard, tp), torchtitan Llama TP plan: colwise wq/wk/wv/w1/w3, embedding and "
    "output -> (_StridedShard(0, tp), Shard(0)); rowwise wo/w2 -> (Shard(0), Shard(1)); others (Shard(0), Replicate())",
    "replicate": "every tensor replicated on every rank (as DTensor)",
}

_OPTIM_SUFFIX = re.compile(r"\.(exp_avg|exp_avg_sq|momentum_buffer|max_exp_avg_sq|sum|square_avg|acc_delta)$")


def _param_name(fqn: str) -> str:
    """The parameter an fqn belongs to (``optim.state.X.exp_avg`` -> ``X``; ``model.X`` -> ``X``)."""
    base = _OPTIM_SUFFIX.sub("", fqn)
    for prefix in ("optim.state.", "model.", "module."):
        if base.startswith(prefix):
            base = base[len(prefix) :]
    return base


PlacementRules = Any  # str | sequence | mapping pattern -> spec | callable


def _match(pattern: Any, fqn: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(fqn) is not None
    if isinstance(pattern, str) and pattern.startswith("re:"):
        return re.search(pattern[3:], fqn) is not None
    return fnmatch.fnmatchcase(fqn, str(pattern))


def resolve_placements(
    mesh: Mesh, placements: PlacementRules = None, preset: str | None = None
) -> Callable[[str, tuple[int, ...]], tuple[Placement, ...] | None]:
    """A function ``(fqn, shape) -> placements`` (``None``: load as a plain tensor).

    ``placements`` may be: one spec for all tensors (``"S(0)"``, ``("SS(0,2)", "S(0)")``); a
    mapping ``{glob or 're:regex' or compiled regex: spec or None}`` (first match wins, then
    the preset, then plain); or a callable ``(fqn, shape) -> spec or None``. 0-d tensors are
    always plain.
    """
    base = _preset(preset, mesh) if preset else None

    def conv(spec: Any) -> tuple[Placement, ...] | None:
        if spec is None:
            return None
        pls = parse_placements(spec)
        if len(pls) != mesh.ndim:
            raise ValueError(
                f"placements {spec!r} give {len(pls)} entries for mesh {mesh} of {mesh.ndim} dims"
            )
        return pls

    if placements is None:
        fallback = base or (lambda fqn, shape: None)
        return lambda fqn, shape: fallback(fqn, shape) if shape else None
    if callable(placements) and not isinstance(placements, (str, Mapping)):
        fn = placements
        return lambda fqn, shape: conv(fn(fqn, shape)) if shape else None
    if isinstance(placements, Mapping):
        rules = [(p, conv(s)) for p, s in placements.items()]

        def by_rules(fqn: str, shape: tuple[int, ...]) -> tuple[Placement, ...] | None:
            if not shape:
                return None
            for p, pl in rules:
                if _match(p, fqn):
                    return pl
            return base(fqn, shape) if base else None

        return by_rules
    fixed = conv(placements)
    return lambda fqn, shape: fixed if shape else None


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Problem:
    """Something that would make ``dcp.load`` fail or behave unexpectedly."""

    fqn: str
    """The flat name concerned."""
    kind: str
    """``missing_key``, ``size_mismatch``, ``type_mismatch``, ``unexpected_key``, ``dtype_mismatch``,
    ``empty_shard``, ``placement_error``, ``quantized``, ``per_rank_metadata`` (saved with
    ``use_collectives=False``), ``partial_load`` (with per-rank metadata: a rank's shard only partly
    covered by what its own saving rank wrote; torch leaves the rest untouched)."""
    severity: str
    """``error`` (torch raises), ``warning`` (loads but probably not as meant) or ``info``."""
    reason: str
    """The message, in torch's words where torch raises."""


@dataclass(frozen=True)
class _Group:
    pattern: ReadItemsPattern
    entries: np.ndarray  # int64 entry indices (checkpoint) in the group
    placements: tuple[Placement, ...] | None


def _flatten_expected(sd: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not _is_tensor_spec(v):
            out.update(_flatten_expected(v, key + "."))
        elif isinstance(v, list) and _descend_list(v):
            out.update(_flatten_expected({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out


def _descend_list(v: list[Any]) -> bool:
    """Whether DCP flattens a list item by item (torch's ``_is_terminal``, negated): it holds a
    mapping, a tensor, or a list that is itself descended (``[[t]]`` -> ``key.0.0``)."""
    return any(
        isinstance(x, Mapping) or _is_tensor_like(x) or (isinstance(x, list) and _descend_list(x)) for x in v
    )


def _is_tensor_like(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _is_tensor_spec(v: Any) -> bool:
    return isinstance(v, Mapping) and "shape" in v and set(v) <= {"shape", "dtype", "placements"}


def _spec_of(v: Any) -> tuple[tuple[int, ...] | None, str | None, Any]:
    """(shape, dtype name, placements) of an expected value; shape None for non-tensors."""
    if _is_tensor_spec(v):
        dt = v.get("dtype")
        return (
            tuple(int(x) for x in v["shape"]),
            None if dt is None else str(dt).removeprefix("torch."),
            v.get("placements"),
        )
    if _is_tensor_like(v):
        pls = getattr(v, "placements", None)
        return tuple(int(x) for x in v.shape), str(v.dtype).removeprefix("torch."), pls
    if isinstance(v, tuple) and len(v) in (1, 2) and isinstance(v[0], (tuple, list)):
        return tuple(int(x) for x in v[0]), (str(v[1]).removeprefix("torch.") if len(v) == 2 else None), None
    return None, None, None


def _torch_size(shape: Sequence[int]) -> str:
    return f"torch.Size([{', '.join(str(int(s)) for s in shape)}])"


def _apply_rename(fqn: str, rename: Any) -> str:
    if rename is None:
        return fqn
    if callable(rename):
        return str(rename(fqn))
    for old, new in rename.items() if isinstance(rename, Mapping) else rename:
        if isinstance(old, re.Pattern):
            fqn = old.sub(new, fqn)
        elif fqn.startswith(old):
            fqn = new + fqn[len(old) :]
    return fqn


def _default_load_order(index: CheckpointIndex) -> list[str]:
    """fqns in the order ``dcp.load`` plans a state dict rebuilt from the checkpoint.

    The state dict is rebuilt as torch's ``set_element`` does (``_EmptyStateDictLoadPlanner``),
    entries in the checkpoint's order along their ``planner_data`` paths (a flat key when
    there is none, e.g. Hugging Face checkpoints), then flattened as ``dcp.load`` does:
    top-level keys sorted, nested mappings in insertion order (a key keeps the position of
    its first entry), lists by position.
    """
    root: dict[Any, Any] = {}
    for f in index.fqns:
        path = index.planner_data.get(f) or (f,)
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = f

    def walk(node: dict[Any, Any], keys: Iterable[Any]) -> Iterable[str]:
        for k in keys:
            v = node[k]
            if isinstance(v, dict):
                lst = all(type(x) is int for x in v)
                yield from walk(v, sorted(v) if lst else list(v))
            else:
                yield v

    return list(walk(root, sorted(root, key=str)))


class _IndexMemo:
    """What planning needs of a checkpoint that no target mesh changes, computed once per index.

    Kept on the (frozen) :class:`CheckpointIndex` like its fqn lookup, so a widget that
    re-simulates on every control change pays for these only on its first plan.
    """

    def __init__(self, index: CheckpointIndex) -> None:
        lookup = getattr(index, "__dict__", {}).get("_lookup")
        self.lookup: dict[str, int] = (
            lookup if lookup is not None else {f: i for i, f in enumerate(index.fqns)}
        )
        self.kinds: list[int] = [int(k) for k in index.kinds]
        self._sig_of: dict[int, int] = {}  # entry -> layout id
        self._sig_ids: dict[bytes, int] = {}  # layout -> id
        self._load_order: tuple[str, ...] | None = None
        self.summary: dict[tuple[bytes, str], tuple[Any, ...]] = {}  # LoadPlan._summary, per group of entries
        self.file_saving_rank: dict[int, int] = {}  # file -> saving rank of its first chunk + 1 (0: none)
        self.itemsize: np.ndarray | None = None  # bytes per element of each entry

    def load_order(self, index: CheckpointIndex) -> tuple[str, ...]:
        """:func:`_default_load_order` of ``index`` (the index this memo belongs to)."""
        if self._load_order is None:
            self._load_order = tuple(_default_load_order(index))
        return self._load_order

    def layout_sig(self, index: CheckpointIndex, e: int) -> int:
        """An id of tensor entry ``e``'s saved chunk layout: equal ids, equal chunk offsets and sizes."""
        s = self._sig_of.get(e)
        if s is None:
            c = index.chunks
            a, b = int(index.chunk_start[e]), int(index.chunk_start[e + 1])
            ca, cb = int(c.coord_start[a]), int(c.coord_start[b])
            # the chunk count first: 0-d chunks have no coordinates, so offsets/sizes alone
            # would put a 0-d tensor with k chunks in the group of one with a different k
            sig = f"{b - a}|".encode() + c.offsets[ca:cb].tobytes() + b"|" + c.sizes[ca:cb].tobytes()
            s = self._sig_of[e] = self._sig_ids.setdefault(sig, len(self._sig_ids))
        return s


def _index_memo(index: CheckpointIndex) -> _IndexMemo:
    d = getattr(index, "__dict__", None)
    memo = d.get("_plan_memo") if d is not None else None
    if memo is None:
        memo = _IndexMemo(index)
        if d is not None:
            object.__setattr__(index, "_plan_memo", memo)
    return memo


class LoadPlan:
    """What every rank of a target mesh reads when loading a checkpoint (immutable).

    Made by :func:`simulate_load`.  Summaries are computed per layout group without
    materialising every ReadItem; :meth:`reads_for` and :attr:`reads` materialise rows.
    """

    def __init__(self, index: CheckpointIndex, mesh: Mesh, order: list[tuple[str, int, int | None]],
                 groups: list[_Group], problems: list[Problem], reader: str, storage: str,
                 per_rank: frozenset[int] | None = None) -> None:  # fmt: skip
        self.index = index
        self.mesh = mesh
        self._order = order  # (fqn as loaded, checkpoint entry, group id or None for bytes)
        self._groups = groups
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.reader = reader
        self.storage = storage
        self._per_rank = per_rank  # per-rank metadata: ranks with their own __r.metadata

    # -- basics ---------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of loading ranks."""
        return self.mesh.size

    @property
    def ok(self) -> bool:
        """Whether ``dcp.load`` would get past planning (no error-level problem)."""
        return not any(p.severity == "error" for p in self.problems)

    @cached_property
    def _chunk_nbytes(self) -> np.ndarray:
        from .tables import chunk_nbytes

        return chunk_nbytes(self.index)

    @cached_property
    def _itemsize(self) -> np.ndarray:
        memo = _index_memo(self.index)
        if memo.itemsize is None:
            memo.itemsize = np.array([itemsize(d) for d in self.index.dtypes], np.float64)
        return memo.itemsize

    def _item_read_bytes(self, rows: np.ndarray) -> np.ndarray:
        """Bytes the storage reader reads for a ReadItem of saved chunk row(s) ``rows``."""
        c = self.index.chunks
        # partial reads: estimated by needed bytes below. (An annotated local: numpy's stubs type
        # fancy indexing of an ndarray of unknown dtype as Any.)
        out: np.ndarray = (
            np.maximum(c.byte_length[rows], 0) if self.storage == "whole_item" else self._chunk_nbytes[rows]
        )
        return out

    # -- summaries ------------------------------------------------------------------------
    def _group_reads(self) -> Iterable[tuple[ReadItemsPattern, np.ndarray, tuple[Any, ...]]]:
        """Each layout group with reads: (pattern, entries, storage facts of :meth:`_group_storage`)."""
        memo = _index_memo(self.index)
        for g in self._groups:
            p = g.pattern
            if len(p.rank) == 0:
                continue
            ents = g.entries
            # what the group's tensors store where (no mesh in it): computed once per checkpoint
            key = (ents.tobytes(), self.storage)
            st = memo.summary.get(key)
            if st is None:
                if len(memo.summary) >= 256:  # small entries, but bounded
                    memo.summary.clear()
                st = memo.summary[key] = self._group_storage(ents)
            yield p, ents, st

    def _read_bytes(self, p: ReadItemsPattern, st: tuple[Any, ...]) -> np.ndarray:
        """float64 [U, P]: bytes read by each read of the pattern, per storage signature of the group."""
        _isz_sum, _kfile_u, _krank_u, wsum, isz_u = st
        # (an annotated local: st's arrays are typed Any)
        out: np.ndarray = (
            wsum[:, p.chunk] if self.storage == "whole_item" else isz_u[:, None] * p.numel[None, :]
        )
        return out

    def _bytes_locs(self, e: int) -> dict[int | None, tuple[int, int, int, int]]:
        """Where loading ranks read bytes item ``e``: ``{None: loc}`` (every rank, the first copy), or
        with per-rank metadata ``{r: loc}`` (rank r reads the copy in its own ``__r_*.distcp``)."""
        idx = self.index
        first = idx.bytes_items.get(e)
        if first is None:
            return {}
        if self._per_rank is None:
            return {None: first}
        out: dict[int | None, tuple[int, int, int, int]] = {}
        for loc in [first, *self._bytes_copies.get(e, ())]:
            r = _file_rank(idx.files[loc[0]]) if loc[0] >= 0 else None
            if r is not None and r in self._per_rank and r < self.world_size:
                out.setdefault(r, loc)
        return out

    @cached_property
    def _bytes_copies(self) -> dict[int, list[tuple[int, int, int, int]]]:
        """``index.bytes_copies`` grouped by entry (one pass, not one per entry and rank)."""
        out: dict[int, list[tuple[int, int, int, int]]] = {}
        for e, *loc in self.index.bytes_copies:
            out.setdefault(e, []).append((loc[0], loc[1], loc[2], loc[3]))
        return out

    def _bytes_reads(self) -> Iterable[tuple[int, int, np.ndarray | slice]]:
        """(file index, byte length, loading ranks) of each bytes item the plan loads (read whole)."""
        for _fqn, e, gid in self._order:
            if gid is None and e >= 0:
                for r, loc in self._bytes_locs(e).items():
                    yield loc[0], loc[2], (slice(None) if r is None else np.array([r]))

    @cached_property
    def _summary(self) -> dict[str, Any]:
        R = self.world_size
        idx = self.index
        nf = len(idx.files)
        items = np.zeros(R, np.int64)
        needed = np.zeros(R, np.float64)
        read = np.zeros(R, np.float64)
        file_bytes = np.zeros(nf, np.float64)
        touched = np.zeros((nf, R), bool)  # file f read by rank r
        for p, ents, st in self._group_reads():
            isz_sum, kfile_u, _krank_u, wsum, _isz_u = st
            items += np.bincount(p.rank, minlength=R) * len(ents)
            needed += np.bincount(p.rank, weights=p.numel.astype(np.float64), minlength=R) * isz_sum
            # float64 sums of integral byte counts below 2**53 are exact: the order does not matter
            if self.storage == "whole_item":  # = _read_bytes(...).sum(axis=0), same additions
                read += np.bincount(p.rank, weights=wsum.sum(axis=0)[p.chunk], minlength=R)
            else:
                read += np.bincount(p.rank, weights=self._read_bytes(p, st).sum(axis=0), minlength=R)
            U, k = kfile_u.shape
            if U > 1 and k <= 16 and self.storage == "whole_item":
                # many tensors stored apart, few chunks each (0-d optimizer steps): every rank reading
                # chunk c reads it from each file holding a copy of c; work per chunk, not per read
                for cc in range(k):
                    rr = p.rank[p.chunk == cc]
                    fu = kfile_u[:, cc]
                    ok = fu >= 0
                    if not len(rr) or not ok.any():
                        continue
                    file_bytes += np.bincount(fu[ok], weights=wsum[ok, cc], minlength=nf) * len(rr)
                    touched[np.ix_(np.unique(fu[ok]), rr)] = True
                continue
            w = self._read_bytes(p, st)
            files = kfile_u[:, p.chunk]  # [U, P]
            ranks_up = np.broadcast_to(p.rank[None, :], files.shape)
            ok = files >= 0
            file_bytes += np.bincount(files[ok], weights=w[ok], minlength=nf)
            touched[files[ok], ranks_up[ok]] = True
        for f, ln, rs in self._bytes_reads():
            items[rs] += 1
            needed[rs] += ln
            read[rs] += ln
            if f >= 0:
                file_bytes[f] += ln * (R if isinstance(rs, slice) else len(rs))
                touched[f, rs] = True
        return dict(items=items, needed=needed, read=read, rank_nfiles=np.count_nonzero(touched, axis=0),
                    file_bytes=file_bytes, file_nranks=np.count_nonzero(touched, axis=1))  # fmt: skip

    @cached_property
    def _traffic_matrix(self) -> np.ndarray:
        """float64 [saving rank + 1, loading rank] bytes read; row 0: unknown saving rank."""
        R = self.world_size
        c = self.index.chunks
        memo = _index_memo(self.index)
        nsave = int(c.rank.max(initial=-1)) + 2
        traffic: np.ndarray = np.zeros(nsave * R, np.float64)  # flat, then [nsave, R]
        for p, _ents, st in self._group_reads():
            w = self._read_bytes(p, st)
            saving = st[2][:, p.chunk].astype(np.int64) + 1
            ranks_up = np.broadcast_to(p.rank[None, :], saving.shape)
            traffic += np.bincount((saving * R + ranks_up).ravel(), weights=w.ravel(), minlength=nsave * R)
        traffic = traffic.reshape(nsave, R)
        for f, ln, rs in self._bytes_reads():
            # bytes items have no saving-rank row: the file's rank
            sr = memo.file_saving_rank.get(f)
            if sr is None:
                sr = memo.file_saving_rank[f] = (int(c.rank[np.flatnonzero(c.file == f)[0]]) + 1
                                                 if f >= 0 and (c.file == f).any() else 0)  # fmt: skip
            traffic[sr, rs] += ln
        return traffic

    def _group_storage(self, ents: np.ndarray) -> tuple[Any, ...]:
        """Storage facts of a layout group's tensors for :attr:`_summary` (independent of the mesh).

        Work on the tensors' chunk tables ([T, k]) rather than on every read ([T, P], P >> k at
        scale): tensors whose chunks sit in the same files on the same saving ranks (the common
        case: U == 1) are summed per chunk first, then spread over the reads once.
        Returns ``(itemsize sum, files [U, k], saving ranks [U, k], whole-item bytes [U, k] or
        None, itemsize sums [U] or None)``.
        """
        idx = self.index
        c = idx.chunks
        cs = idx.chunk_start[ents]
        isz = self._itemsize[ents]
        k = int(idx.chunk_start[ents[0] + 1]) - int(cs[0])
        krows = cs[:, None] + np.arange(k)[None, :]  # [T, k]
        kfile, krank = c.file[krows], c.rank[krows]
        if len(ents) == 1:
            inv, reps = np.zeros(1, np.int64), np.zeros(1, np.int64)
        else:
            sig = np.concatenate([kfile.astype(np.int64), krank.astype(np.int64)], axis=1)
            seen: dict[bytes, int] = {}
            inv = np.array([seen.setdefault(row.tobytes(), len(seen)) for row in sig], np.int64)
            reps = np.unique(inv, return_index=True)[1]  # first tensor of each signature
        U = len(reps)
        wsum = isz_u = None
        if self.storage == "whole_item":
            wk = np.maximum(c.byte_length[krows], 0).astype(np.float64)  # [T, k]
            flat = (inv[:, None] * k + np.arange(k)[None, :]).ravel()
            wsum = np.bincount(flat, weights=wk.ravel(), minlength=U * k).reshape(U, k)
        else:
            isz_u = np.bincount(inv, weights=isz, minlength=U)
        return isz.sum(), kfile[reps], krank[reps], wsum, isz_u

    @cached_property
    def per_rank(self) -> pd.DataFrame:
        """One row per loading rank.

        Columns
        -------
        rank : int
        coordinate : tuple of int
            Mesh coordinate (row-major, as ``init_device_mesh``).
        read_items : int
            ReadItems the rank's local plan has.
        bytes_needed : int
            Bytes of the target tensors' elements the rank receives.
        bytes_read : int
            Bytes the storage reader reads for the rank (``FileSystemReader``: the whole saved
            item once per ReadItem).
        amplification : float
            ``bytes_read / bytes_needed``.
        files_opened : int
            Distinct data files the rank reads from.
        """
        import pandas as pd

        s = self._summary
        coords = self.mesh.coordinates()
        with np.errstate(divide="ignore", invalid="ignore"):
            amp = np.where(s["needed"] > 0, s["read"] / s["needed"], np.nan)
        return pd.DataFrame(
            {
                "rank": np.arange(self.world_size, dtype=np.int64),
                "coordinate": pd.Series([tuple(map(int, c)) for c in coords], dtype=object),
                "read_items": s["items"],
                "bytes_needed": s["needed"].astype(np.int64),
                "bytes_read": s["read"].astype(np.int64),
                "amplification": amp,
                "files_opened": s["rank_nfiles"].astype(np.int64),
            }
        )

    @cached_property
    def per_file(self) -> pd.DataFrame:
        """One row per data file.

        Columns
        -------
        file : str
        num_ranks : int
            Loading ranks that read from it.
        bytes_read : int
            Bytes read from it by all ranks together.
        """
        import pandas as pd

        s = self._summary
        return pd.DataFrame(
            {
                "file": pd.Series(self.index.files, dtype=object),
                "num_ranks": s["file_nranks"].astype(np.int64),
                "bytes_read": s["file_bytes"].astype(np.int64),
            }
        )

    @cached_property
    def traffic(self) -> pd.DataFrame:
        """Bytes read, saving rank (rows; -1 unknown) x loading rank (columns)."""
        import pandas as pd

        t = self._traffic_matrix
        keep = t.sum(axis=1) > 0
        labels = np.arange(-1, t.shape[0] - 1)
        return pd.DataFrame(t[keep].astype(np.int64), index=pd.Index(labels[keep], name="saving_rank"),
                            columns=pd.Index(np.arange(self.world_size), name="loading_rank"))  # fmt: skip

    def totals(self) -> dict[str, Any]:
        """Headline numbers over all ranks."""
        s = self._summary
        needed, read = float(s["needed"].sum()), float(s["read"].sum())
        return {
            "world_size": self.world_size,
            "mesh": str(self.mesh),
            "read_items": int(s["items"].sum()),
            "bytes_needed": int(needed),
            "bytes_read": int(read),
            "amplification": read / needed if needed else float("nan"),
            "errors": sum(p.severity == "error" for p in self.problems),
            "warnings": sum(p.severity == "warning" for p in self.problems),
            "ok": self.ok,
        }

    @property
    def problems_table(self) -> pd.DataFrame:
        """``plan.problems`` as a table (fqn, kind, severity, reason)."""
        import pandas as pd

        return pd.DataFrame([(p.fqn, p.kind, p.severity, p.reason) for p in self.problems],
                            columns=["fqn", "kind", "severity", "reason"])  # fmt: skip

    # -- rows -----------------------------------------------------------------------------
    def reads_for(self, ranks: int | Iterable[int]) -> pd.DataFrame:
        """The ReadItems of the given rank(s), in torch's order; see :attr:`reads` for the columns."""
        import pandas as pd

        rs = [ranks] if isinstance(ranks, (int, np.integer)) else list(ranks)
        idx = self.index
        c = idx.chunks
        cols: dict[str, list[Any]] = {k: [] for k in (
            "rank", "fqn", "type", "dest_offset", "dest_offsets", "storage_offset", "storage_chunk",
            "storage_offsets", "lengths", "file", "byte_offset", "byte_length", "bytes_needed")}  # fmt: skip
        vals: tuple[Any, ...]  # one row, in the order of cols
        v: Any
        for r in rs:
            if not 0 <= r < self.world_size:
                raise ValueError(f"rank {r} is not in the target mesh of {self.world_size} ranks")
            for fqn, e, gid in self._order:
                if gid is None:
                    locs = self._bytes_locs(e) if e >= 0 else {}
                    loc = locs.get(None, locs.get(r))
                    if loc is None:
                        continue
                    f, o, ln, _t = loc
                    vals = (r, fqn, "bytes", None, (0,), None, None, (0,), (0,),
                            idx.files[f] if f >= 0 else None, o, ln, ln)  # fmt: skip
                    for k, v in zip(cols, vals, strict=True):
                        cols[k].append(v)
                    continue
                p = self._groups[gid].pattern
                a, b = int(p.rank_bounds[r]), int(p.rank_bounds[r + 1])
                if a == b:
                    continue
                cs = int(idx.chunk_start[e])
                isz = self._itemsize[e]
                dest_off = tuple(int(x) for x in p.local_offsets[r])
                sidx = p.storage_index
                for q in range(a, b):
                    j = int(p.chunk[q])
                    row = cs + j
                    ca, cb = int(c.coord_start[row]), int(c.coord_start[row + 1])
                    f = int(c.file[row])
                    vals = (r, fqn, "tensor", dest_off, tuple(p.dest_offsets[q].tolist()),
                            tuple(c.offsets[ca:cb].tolist()), j if sidx is None else int(sidx[q]),
                            tuple(p.storage_offsets[q].tolist()),
                            tuple(p.lengths[q].tolist()), idx.files[f] if f >= 0 else None,
                            int(c.byte_offset[row]), int(c.byte_length[row]), int(p.numel[q] * isz))  # fmt: skip
                    for k, v in zip(cols, vals, strict=True):
                        cols[k].append(v)
        df = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in cols.items()})
        for k in ("rank", "byte_offset", "byte_length", "bytes_needed"):
            df[k] = df[k].astype(np.int64)
        return df

    @cached_property
    def reads(self) -> pd.DataFrame:
        """Every ReadItem of every rank (materialised: for a 405B model on 768 ranks, fsdp_tp, 17 M rows).

        Columns
        -------
        rank : int
            Loading rank.
        fqn : str
            Flat name as loaded.
        type : str
            ``"tensor"`` or ``"bytes"`` (``LoadItemType.BYTE_IO``).
        dest_offset : tuple of int
            Global offset of the rank's local chunk (``dest_index.offset``).
        dest_offsets : tuple of int
            Offsets inside the local chunk.
        storage_offset : tuple of int
            Global offset of the saved chunk (``storage_index.offset``).
        storage_chunk : int
            Index of the saved chunk (``storage_index.index``).
        storage_offsets : tuple of int
            Offsets inside the saved chunk.
        lengths : tuple of int
            Extent of the read.
        file, byte_offset, byte_length : str, int, int
            Where the saved item is stored.
        bytes_needed : int
            Bytes of elements the read delivers.
        """
        return self.reads_for(range(self.world_size))

    def __repr__(self) -> str:
        t = self.totals()
        return (f"<dcp_explorer.LoadPlan {t['mesh']} ({t['world_size']} ranks): {t['read_items']:,} read items, "
                f"{t['bytes_needed']:,} B needed, {t['bytes_read']:,} B read (x{t['amplification']:.2f}), "
                f"{t['errors']} errors, {t['warnings']} warnings>")  # fmt: skip

    def _repr_html_(self) -> str:
        from .html import plan_html

        return plan_html(self)


_RANK_FILE = re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$")


def _file_rank(name: str) -> int | None:
    """The saving rank in a DCP data file's name (``__{rank}_{n}.distcp``), else None."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else None


def _per_rank_pattern(
    so: np.ndarray, ss: np.ndarray, lo: np.ndarray, ls: np.ndarray, saver: np.ndarray, ranks: set[int]
) -> ReadItemsPattern:
    """The reads of one layout group when rank r plans against ``__r.metadata`` alone: rank r's local
    chunk against the saved chunks saving rank r wrote (torch's sweep then sees only those), with
    ``storage_index.index`` their place in that rank's list. A rank whose metadata lacks the tensor
    does not participate (see :func:`_per_rank_problems`)."""
    R, nd = lo.shape
    part = np.zeros(R, bool)
    rows: list[tuple[np.ndarray, ...]] = []
    for r in range(R):
        mine = np.flatnonzero(saver == r) if r in ranks else np.zeros(0, np.int64)
        if len(mine) == 0:
            continue
        part[r] = True
        sub = read_items_pattern(so[mine], ss[mine], lo[r : r + 1], ls[r : r + 1])
        n = len(sub.rank)
        rows.append((np.full(n, r, np.int64), mine[sub.chunk], sub.chunk, sub.dest_offsets, sub.storage_offsets,
                     sub.lengths))  # fmt: skip
    if not rows:
        z = np.zeros((0, nd), np.int64)
        e = np.zeros(0, np.int64)
        return ReadItemsPattern(e, e, z, z, z, lo, ls, part, e)
    rank, chunk, sidx, dest, stor, lens = (np.concatenate(x) for x in zip(*rows, strict=True))
    return ReadItemsPattern(rank, chunk, dest, stor, lens, lo, ls, part, sidx)


def _per_rank_problems(
    pat: ReadItemsPattern, fqns: list[str], strict: bool, ranks: set[int], problems: list[Problem]
) -> None:
    """What per-rank planning makes of a layout group: ranks whose ``__r.metadata`` lacks the tensors
    (torch: ``Missing key``), and ranks whose local chunk is only partly covered by what their saving
    rank wrote (torch loads the covered part and says nothing)."""
    R = len(pat.local_offsets)
    lacking = [r for r in range(R) if r in ranks and not pat.participating[r]]  # others: no metadata at all
    more = f" (and {len(fqns) - 1} more tensors of this layout)" if len(fqns) > 1 else ""
    if lacking:
        which = f"{lacking[:8]}{'...' if len(lacking) > 8 else ''}"
        if strict:
            problems.append(Problem(fqns[0], "missing_key", "error",
                                    f"Missing key in checkpoint state_dict: {fqns[0]}. (in __r.metadata of loading "
                                    f"rank(s) {which}){more}"))  # fmt: skip
        else:
            problems.append(Problem(fqns[0], "missing_key", "warning",
                                    f"not in __r.metadata of loading rank(s) {which}: skipped there{more}"))  # fmt: skip
    need = (
        np.prod(pat.local_sizes, axis=1, dtype=np.int64) if pat.local_sizes.shape[1] else np.ones(R, np.int64)
    )
    got = np.bincount(pat.rank, weights=pat.numel, minlength=R).astype(np.int64)
    short = [r for r in range(R) if pat.participating[r] and got[r] < need[r]]
    if short:
        r = short[0]
        problems.append(Problem(fqns[0], "partial_load", "warning",
                                f"{len(short)} rank(s) read only part of their shard from what their own saving rank "
                                f"wrote (rank {r}: {got[r]:,} of {need[r]:,} elements); torch leaves the rest as it "
                                f"was, silently{more}"))  # fmt: skip


def simulate_load(
    ckpt: Any,
    mesh: Any = 1,
    placements: PlacementRules = None,
    *,
    preset: str | None = None,
    state_dict: Mapping[str, Any] | None = None,
    rename: Any = None,
    strict: bool = True,
    storage: str | None = None,
) -> LoadPlan:
    """Simulate ``dcp.load`` of ``ckpt`` on every rank of ``mesh``, as DCP's planner would.

    Parameters
    ----------
    ckpt
        A :class:`~dcp_explorer.checkpoint.Checkpoint` (or its ``CheckpointIndex``).
    mesh
        Target mesh: ``"dp=96,tp=8"``, ``{"dp": 96, "tp": 8}``, ``(4, 2)`` or a world size.
    placements
        Target placements per tensor: one spec for all (``"S(0)"``), a mapping of fqn globs
        (or ``"re:..."``) to specs, or a callable ``(fqn, shape) -> spec``; ``None`` entries
        and unmatched tensors are loaded as plain tensors (every rank reads all of it).
    preset
        ``"fsdp"``, ``"hsdp"``, ``"fsdp_tp"`` or ``"replicate"`` (see :data:`PRESETS`); rules in
        ``placements`` take precedence.
    state_dict
        The state dict the load would fill (fqn -> tensor, DTensor, meta tensor, ``(shape, dtype)``
        or ``{"shape":, "dtype":, "placements":}``; nested mappings are flattened as DCP does).
        Default: every entry of the checkpoint with its saved shape.
    rename
        Maps the state dict's fqns to the checkpoint's: ``{"old_prefix": "new_prefix"}``, a list
        of ``(compiled regex, replacement)`` or a callable.
    strict
        As ``DefaultLoadPlanner(allow_partial_load=not strict)``: missing keys are errors.
    storage
        How the reader reads a ReadItem: ``"whole_item"`` (``FileSystemReader``: the whole saved
        item, default for DCP) or ``"partial"`` (``HuggingFaceStorageReader``: just the slice).

    Returns
    -------
    LoadPlan
    """
    index: CheckpointIndex = getattr(ckpt, "index", ckpt)
    m = parse_mesh(mesh)
    rule = resolve_placements(m, placements, preset)
    if storage is None:
        storage = "whole_item" if index.format == "dcp" else "partial"
    problems: list[Problem] = []
    md_files = list(index.attrs.get("metadata_files") or [])
    # per-rank metadata (dcp.save with use_collectives=False): torch plans loading rank r against
    # __r.metadata alone, whose chunks are those saving rank r wrote (in the merged view's order)
    per_rank: set[int] | None = None
    if index.format == "dcp" and md_files and ".metadata" not in md_files:
        ranks_with = sorted(int(f[2:].split(".")[0]) for f in md_files if f.startswith("__"))
        if len(ranks_with) > 1:  # the merged view; one rank's view (open(path, rank=r)) is planned as is
            per_rank = set(ranks_with)
            problems.append(Problem("*", "per_rank_metadata", "warning",
                                    "saved with use_collectives=False: there is no global .metadata, so torch plans "
                                    "rank r against __r.metadata alone and each rank reads only what saving rank r "
                                    "wrote (planned so here)"))  # fmt: skip
            missing = [r for r in range(m.size) if r not in per_rank]
            if missing:
                problems.append(Problem("*", "per_rank_metadata", "error",
                                        f"no __r.metadata for loading rank(s) {missing[:8]}"
                                        f"{'...' if len(missing) > 8 else ''}: torch finds no metadata for them "
                                        "and fails"))  # fmt: skip
        else:
            problems.append(Problem("*", "per_rank_metadata", "warning",
                                    "saved with use_collectives=False: this is one rank's __r.metadata, planned as "
                                    "if every loading rank read it (torch gives each rank its own)"))  # fmt: skip
    memo = _index_memo(index)
    lookup = memo.lookup
    # what is loaded, in dcp.load's order
    wanted: list[tuple[str, str, Any]] = []  # (fqn as loaded, checkpoint fqn, expected value or None)
    if state_dict is None:
        for f in memo.load_order(index):
            wanted.append((f, f, None))
    else:
        top = sorted(state_dict)
        flat = _flatten_expected({k: state_dict[k] for k in top})
        for f, v in flat.items():
            wanted.append((f, _apply_rename(f, rename), v))
        loaded = {ck for _, ck, _ in wanted}
        for f in index.fqns:
            if f not in loaded:
                problems.append(Problem(f, "unexpected_key", "info",
                                        "in the checkpoint but not in the state dict: not loaded"))  # fmt: skip

    order: list[tuple[str, int, int | None]] = []
    group_of: dict[tuple[Any, ...], int] = {}
    group_entries: list[list[int]] = []
    group_keys: list[tuple[Any, ...]] = []
    c = index.chunks
    kinds = memo.kinds
    checked: dict[tuple[Any, int], None] = {}  # (placements, ndim) already found valid

    for fqn, ck, expected in wanted:
        e = lookup.get(ck)
        if e is None:
            if strict:
                problems.append(
                    Problem(fqn, "missing_key", "error", f"Missing key in checkpoint state_dict: {ck}.")
                )
            else:
                problems.append(
                    Problem(
                        fqn, "missing_key", "warning", f"not in the checkpoint ({ck}): skipped (strict=False)"
                    )
                )
            continue
        exp_shape, exp_dtype, exp_pls = _spec_of(expected) if expected is not None else (None, None, None)
        if kinds[e] == KIND_BYTES:
            if exp_shape is not None:
                problems.append(Problem(fqn, "type_mismatch", "warning",
                                        f"the checkpoint stores {ck} as bytes (a pickled object) but the state dict "
                                        "holds a tensor: dcp.load will try to torch.load it into the tensor"))  # fmt: skip
            order.append((fqn, e, None))
            continue
        shape = tuple(index.shapes[e])
        if expected is not None and exp_shape is None:
            problems.append(Problem(fqn, "type_mismatch", "error",
                                    f"Invalid checkpoint metadata for {fqn}, expected BytesStorageMetadata but found "
                                    "<class 'torch.distributed.checkpoint.metadata.TensorStorageMetadata'>"))  # fmt: skip
            continue
        if exp_shape is not None and exp_shape != shape:
            problems.append(Problem(fqn, "size_mismatch", "error",
                                    f"Size mismatch between saved {_torch_size(shape)} and current: "
                                    f"{_torch_size(exp_shape)} for {fqn}"))  # fmt: skip
            continue
        if exp_dtype is not None and index.dtypes[e] is not None and exp_dtype != index.dtypes[e]:
            problems.append(Problem(fqn, "dtype_mismatch", "warning",
                                    f"saved as {index.dtypes[e]}, loaded into {exp_dtype}: values are cast"))  # fmt: skip
        if index.quant.get(e, {}).get("format") == "mxfp4":
            problems.append(Problem(fqn, "quantized", "warning",
                                    "MXFP4 through torch 2.13's QuantizedHuggingFaceStorageReader fills only the first "
                                    "G values of the last dim (its chunk keeps the stored shape)"))  # fmt: skip
        try:
            pls = parse_placements(exp_pls) if exp_pls is not None else rule(fqn, shape)
            if pls is not None and (pls, len(shape)) not in checked:
                if len(pls) != m.ndim:
                    raise ValueError(f"{len(pls)} placements for mesh {m} of {m.ndim} dims")
                for p in pls:
                    if not isinstance(p, Replicate) and not -len(shape) <= p.dim < len(shape):
                        raise ValueError(f"placement {p} shards dim {p.dim} of a {len(shape)}-d tensor")
                checked[pls, len(shape)] = None
        except ValueError as ex:
            problems.append(Problem(fqn, "placement_error", "error", str(ex)))
            continue
        key: tuple[Any, ...] = (shape, pls, memo.layout_sig(index, e))
        if per_rank is not None:  # which rank saved which chunk decides what each rank sees
            key += (c.rank[int(index.chunk_start[e]) : int(index.chunk_start[e + 1])].tobytes(),)
        gid = group_of.get(key)
        if gid is None:
            gid = group_of[key] = len(group_keys)
            group_keys.append(key)
            group_entries.append([])
        group_entries[gid].append(e)
        order.append((fqn, e, gid))

    groups: list[_Group] = []
    R = m.size
    for (shape, pls, *_sig), ents in zip(group_keys, group_entries, strict=True):
        e0 = ents[0]
        a, b = int(index.chunk_start[e0]), int(index.chunk_start[e0 + 1])
        nd = len(shape)
        ca = int(c.coord_start[a])
        so = c.offsets[ca : ca + (b - a) * nd].reshape(b - a, nd)
        ss = c.sizes[ca : ca + (b - a) * nd].reshape(b - a, nd)
        if pls is None:
            lo = np.zeros((R, nd), np.int64)
            ls = np.tile(np.asarray(shape, np.int64), (R, 1))
        else:
            ls, lo = all_local_chunks(shape, m, pls)
            empty = (ls == 0).any(axis=1) if nd else np.zeros(R, bool)
            if empty.any() and math.prod(shape) > 0:
                problems.append(Problem(index.fqns[e0], "empty_shard", "info",
                                        f"{int(empty.sum())} rank(s) get an empty shard under {tuple(map(str, pls))}"
                                        + (f" (and {len(ents) - 1} more tensors of this layout)" if len(ents) > 1 else "")))  # fmt: skip
        if per_rank is None:
            pat = read_items_pattern(so, ss, lo, ls)
        else:
            pat = _per_rank_pattern(so, ss, lo, ls, np.asarray(c.rank[a:b], np.int64), per_rank)
            _per_rank_problems(pat, [index.fqns[e] for e in ents], strict, per_rank, problems)
        groups.append(_Group(pat, np.asarray(ents, np.int64), pls))
    reader = "FileSystemReader" if index.format == "dcp" else "HuggingFaceStorageReader"
    return LoadPlan(index, m, order, groups, problems, reader, storage,
                    None if per_rank is None else frozenset(per_rank))  # fmt: skip
