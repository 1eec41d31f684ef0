"""Meshes and placements -> each rank's chunk of a tensor, exactly as DTensor computes it (pure).

A :class:`Mesh` is a tuple of named dims (``"dp=96,tp=8"`` or ``{"dp_shard": 96, "tp": 8}``);
ranks map to mesh coordinates as ``init_device_mesh`` does (row-major, ``numpy.unravel_index``).
Placements are :class:`Shard`, :class:`StridedShard` (torch's ``_StridedShard``, FSDP2 + TP)
and :class:`Replicate`, written as strings ``"S(0)"``, ``"SS(0,2)"``, ``"R"`` or given as
torch ``Placement`` objects.

:func:`local_chunk` matches ``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``:
placements apply left to right over mesh dims with ``torch.chunk`` sizing on the current
local size; nested shards on one dim compose; a rank's chunk is recorded as its local shape
and the global index of its first element per dim (an empty shard's offset is the dim's
size).  Index sets are kept as runs ``(start, length)``, so even ``_StridedShard`` on a
128k-row dim stays small.

This module imports neither torch nor numpy-heavy plotting; it is pure Python + numpy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Mesh",
    "Shard",
    "StridedShard",
    "Replicate",
    "Placement",
    "parse_mesh",
    "parse_placement",
    "parse_placements",
    "chunk_range",
    "local_chunk",
    "all_local_chunks",
]


@dataclass(frozen=True, slots=True)
class Shard:
    """``Shard(dim)``: split tensor dim ``dim`` over a mesh dim with ``torch.chunk`` sizing."""

    dim: int
    """Tensor dim that is split."""

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True, slots=True)
class StridedShard:
    """torch's ``_StridedShard(dim, split_factor)``: split into ``split_factor`` pieces, chunk each.

    The rank takes its chunk of every piece (FSDP2 over a TP-sharded dim produces it).
    """

    dim: int
    """Tensor dim that is split."""
    split_factor: int
    """Number of pieces the dim is first cut into."""

    def __str__(self) -> str:
        return f"SS({self.dim},{self.split_factor})"


@dataclass(frozen=True, slots=True)
class Replicate:
    """``Replicate()``: every rank of the mesh dim holds the whole (current local) tensor."""

    def __str__(self) -> str:
        return "R"


Placement = Shard | StridedShard | Replicate

_PLACEMENT_RE = re.compile(
    r"^\s*(?:(?P<r>R|Replicate\(\s*\))|(?P<s>S|Shard)\(\s*(?:dim\s*=\s*)?(?P<sd>-?\d+)\s*\)"
    r"|(?P<ss>SS|_StridedShard|StridedShard)\(\s*(?:dim\s*=\s*)?(?P<ssd>-?\d+)\s*,\s*"
    r"(?:(?:split_factor|sf)\s*=\s*)?(?P<sf>\d+)\s*\))\s*$"
)


def parse_placement(p: Any) -> Placement:
    """A placement from a string (``"S(0)"``, ``"SS(0,2)"``, ``"R"``), our classes or torch's.

    Raises
    ------
    ValueError
        Unknown spelling, or a ``Partial`` placement (which DCP cannot checkpoint).
    """
    if isinstance(p, (Shard, StridedShard, Replicate)):
        return p
    if isinstance(p, str):
        m = _PLACEMENT_RE.match(p)
        if not m:
            raise ValueError(f"unknown placement {p!r}; write 'R', 'S(dim)' or 'SS(dim,split_factor)'")
        if m.group("r"):
            return Replicate()
        if m.group("s"):
            return Shard(int(m.group("sd")))
        return StridedShard(int(m.group("ssd")), int(m.group("sf")))
    name = type(p).__name__
    if name == "_StridedShard":
        return StridedShard(int(p.dim), int(p.split_factor))
    if name == "Shard":
        return Shard(int(p.dim))
    if name == "Replicate":
        return Replicate()
    if name in ("Partial", "_Partial", "_NormPartial", "MaskPartial"):
        raise ValueError(f"{name} placements cannot be checkpointed by DCP (reduce the tensor first)")
    raise ValueError(f"unknown placement {p!r}")


def parse_placements(ps: Any) -> tuple[Placement, ...]:
    """A tuple of placements from a sequence or a comma/space separated string ``"SS(0,2), S(0)"``."""
    if isinstance(ps, str):
        parts = re.findall(
            r"SS\([^)]*\)|_StridedShard\([^)]*\)|StridedShard\([^)]*\)|S\([^)]*\)|Shard\([^)]*\)|Replicate\(\s*\)|R",
            ps,
        )
        if not parts:
            raise ValueError(f"no placements in {ps!r}")
        return tuple(parse_placement(p) for p in parts)
    return tuple(parse_placement(p) for p in ps)


@dataclass(frozen=True, slots=True)
class Mesh:
    """A device mesh: named dims and their sizes (rank -> coordinate is row-major)."""

    names: tuple[str, ...]
    """Mesh dim names, e.g. ``("dp_shard", "tp")``."""
    shape: tuple[int, ...]
    """Mesh dim sizes."""

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shape):
            raise ValueError(f"mesh has {len(self.names)} names but {len(self.shape)} sizes")
        if not self.shape or any(int(s) < 1 for s in self.shape):
            raise ValueError(f"mesh sizes must be >= 1, got {self.shape}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"mesh dim names repeat: {self.names}")

    @property
    def size(self) -> int:
        """Number of ranks."""
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        """Number of mesh dims."""
        return len(self.shape)

    def coordinate(self, rank: int) -> tuple[int, ...]:
        """Mesh coordinate of ``rank``."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is not in a mesh of {self.size} ranks")
        return tuple(int(c) for c in np.unravel_index(rank, self.shape))

    def coordinates(self) -> np.ndarray:
        """int64 ``[size, ndim]``: the coordinate of every rank."""
        return np.stack(np.unravel_index(np.arange(self.size), self.shape), axis=1).astype(np.int64)

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in zip(self.names, self.shape, strict=True))


def parse_mesh(mesh: Any) -> Mesh:
    """A :class:`Mesh` from ``"dp=96,tp=8"``, ``{"dp": 96, "tp": 8}``, ``(4, 2)``, an int or a Mesh."""
    if isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, (int, np.integer)):
        return Mesh(("world",), (int(mesh),))
    if isinstance(mesh, str):
        if mesh.strip().isdigit():
            return parse_mesh(int(mesh))
        items = [p for p in re.split(r"[,\s]+", mesh.strip()) if p]
        names, sizes = [], []
        for i, it in enumerate(items):
            if "=" in it:
                k, v = it.split("=", 1)
            elif "x" in it.lower() and len(items) == 1:
                return parse_mesh(tuple(int(x) for x in it.lower().split("x")))
            else:
                k, v = f"dim{i}", it
            names.append(k.strip())
            try:
                sizes.append(int(v))
            except ValueError:
                raise ValueError(f"mesh size {v!r} in {mesh!r} is not an int") from None
        return Mesh(tuple(names), tuple(sizes))
    if isinstance(mesh, Mapping):
        return Mesh(tuple(str(k) for k in mesh), tuple(int(v) for v in mesh.values()))
    if isinstance(mesh, Iterable):
        shape = tuple(int(s) for s in mesh)
        return Mesh(tuple(f"dim{i}" for i in range(len(shape))), shape)
    raise ValueError(f"cannot make a mesh from {mesh!r}")


def chunk_range(n: int, k: int, i: int) -> tuple[int, int]:
    """``(start, size)`` of piece ``i`` when ``torch.chunk`` splits ``n`` into ``k`` (empty pieces padded)."""
    full = -(-n // k) if n else 0
    start = min(full * i, n)
    return start, max(0, min(n, full * (i + 1)) - start)


Runs = tuple[tuple[int, int], ...]


def _select(runs: Runs, start: int, length: int) -> list[tuple[int, int]]:
    """Positions ``[start, start+length)`` of the concatenated runs, as runs."""
    out: list[tuple[int, int]] = []
    pos = 0
    end = start + length
    for s, n in runs:
        a, b = max(start, pos), min(end, pos + n)
        if a < b:
            out.append((s + a - pos, b - a))
        pos += n
        if pos >= end:
            break
    return out


def _merge(runs: list[tuple[int, int]]) -> Runs:
    out: list[tuple[int, int]] = []
    for s, n in runs:
        if n == 0:
            continue
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return tuple(out)


def _shard_runs(runs: Runs, size: int, p: Shard | StridedShard, k: int, i: int) -> Runs:
    """Index set of piece ``i`` of ``k`` when the current index set ``runs`` (of ``size``) is split by ``p``."""
    if isinstance(p, StridedShard):
        picked: list[tuple[int, int]] = []
        for j in range(p.split_factor):
            fs, fl = chunk_range(size, p.split_factor, j)
            ss, sl = chunk_range(fl, k, i)
            picked.extend(_select(runs, fs + ss, sl))
        return _merge(picked)
    s, n = chunk_range(size, k, i)
    return _merge(_select(runs, s, n))


def local_chunk(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    placements: Sequence[Any],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local_shape, global_offset)`` of the rank at ``coordinate``, as DTensor computes it.

    Equal to ``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``.
    """
    pls = parse_placements(placements)
    if len(pls) != len(mesh_shape):
        raise ValueError(f"{len(pls)} placements for a mesh of {len(mesh_shape)} dims")
    shape = [int(s) for s in global_shape]
    runs: dict[int, Runs] = {}
    for md, p in enumerate(pls):
        if isinstance(p, Replicate):
            continue
        d = p.dim if p.dim >= 0 else p.dim + len(shape)
        if not 0 <= d < len(shape):
            raise ValueError(f"placement {p} shards dim {p.dim} of a {len(shape)}-d tensor")
        cur = runs.get(d, ((0, shape[d]),) if shape[d] else ())
        new = _shard_runs(cur, shape[d], p, int(mesh_shape[md]), int(coordinate[md]))
        shape[d] = sum(n for _, n in new)
        runs[d] = new
    offsets = [0] * len(shape)
    for d, r in runs.items():
        offsets[d] = r[0][0] if r else int(global_shape[d])
    return tuple(shape), tuple(offsets)


def _chunk_ranges(n: np.ndarray, k: int, i: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`chunk_range` over arrays: ``n`` int64 ``[R]``, ``i`` an int or int64 ``[R]``."""
    full = -(-n // k)  # 0 when n == 0, as chunk_range
    start = np.minimum(full * i, n)
    return start, np.maximum(0, np.minimum(n, full * (i + 1)) - start)


def _select_many(
    starts: np.ndarray, lens: np.ndarray, a: np.ndarray, n: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_select` for every row at once: runs ``[R, M]`` (empty runs allowed), positions ``[a, a+n)``."""
    pos = np.cumsum(lens, axis=1) - lens
    lo = np.maximum(a[:, None], pos)
    hi = np.minimum((a + n)[:, None], pos + lens)
    return starts + lo - pos, np.maximum(hi - lo, 0)


def all_local_chunks(
    global_shape: Sequence[int], mesh: Any, placements: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Local shapes and global offsets of every rank of ``mesh``: two int64 arrays ``[ranks, ndim]``.

    The same answer as :func:`local_chunk` for each rank, computed for all ranks at once: each
    tensor dim's index set is kept as runs ``[ranks, runs]`` (empty runs are carried along
    instead of being dropped, which changes neither positions nor the first element).
    """
    m = parse_mesh(mesh)
    pls = parse_placements(placements)
    if len(pls) != m.ndim:
        raise ValueError(f"{len(pls)} placements for mesh {m} of {m.ndim} dims")
    shape = [int(s) for s in global_shape]
    nd = len(shape)
    R = m.size
    sizes = np.empty((R, nd), np.int64)
    offs = np.zeros((R, nd), np.int64)
    sizes[:] = np.asarray(shape, np.int64)
    coords = None
    runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # dim -> (starts, lens), each [R, M]
    for md, p in enumerate(pls):
        if isinstance(p, Replicate):
            continue
        d = p.dim if p.dim >= 0 else p.dim + nd
        if not 0 <= d < nd:
            raise ValueError(f"placement {p} shards dim {p.dim} of a {nd}-d tensor")
        if coords is None:
            coords = m.coordinates()
        k, i = int(m.shape[md]), coords[:, md]
        if d not in runs:
            runs[d] = (np.zeros((R, 1), np.int64), np.full((R, 1), shape[d], np.int64))
        st, ln = runs[d]
        size = ln.sum(axis=1)
        if isinstance(p, StridedShard):
            parts = []
            for j in range(p.split_factor):
                fs, fl = _chunk_ranges(size, p.split_factor, j)
                ss, sl = _chunk_ranges(fl, k, i)
                parts.append(_select_many(st, ln, fs + ss, sl))
            st = np.concatenate([s for s, _ in parts], axis=1) if parts else np.zeros((R, 0), np.int64)
            ln = np.concatenate([n for _, n in parts], axis=1) if parts else np.zeros((R, 0), np.int64)
        else:
            a, n = _chunk_ranges(size, k, i)
            st, ln = _select_many(st, ln, a, n)
        keep = ln.any(axis=0)  # drop runs empty on every rank (order kept)
        runs[d] = (st[:, keep], ln[:, keep])
    for d, (st, ln) in runs.items():
        sizes[:, d] = ln.sum(axis=1)
        if not ln.shape[1]:
            offs[:, d] = shape[d]  # an empty index set's offset is the dim's size
            continue
        nonempty = ln > 0
        first = st[np.arange(R), np.argmax(nonempty, axis=1)]
        offs[:, d] = np.where(nonempty.any(axis=1), first, shape[d])
    return sizes, offs
