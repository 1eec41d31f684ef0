"""Reader for torch.distributed.checkpoint ``FileSystemWriter`` checkpoints.

Reads ``.metadata`` (or the per-rank ``__{rank}.metadata`` files that
``dcp.save(..., use_collectives=False)`` writes) with the restricted unpickler and turns
it into numpy columns.  Never imports torch.
"""

from __future__ import annotations

import re
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np

from ..errors import MetadataError, UnsupportedError
from ..model import KIND_BYTES, KIND_TENSOR, CheckpointIndex, ChunkColumns
from ..store import Store
from ._safe_pickle import (
    BytesStorageMetadata,
    MetadataIndex,
    StorageInfo,
    TensorStorageMetadata,
    load_metadata_pickle,
)
from .base import BackendEntrypoint

__all__ = ["DcpReader", "parse_metadata", "rank_of_file"]

METADATA = ".metadata"
_PER_RANK = re.compile(r"^__(\d+)\.metadata$")
_DISTCP = re.compile(r"^__(\d+)_(\d+)\.distcp$")

# class-level defaults for fields a pickle may omit (None-valued fields are dropped)
MetadataIndex.offset = None  # type: ignore[attr-defined]
MetadataIndex.index = None  # type: ignore[attr-defined]
StorageInfo.transform_descriptors = None  # type: ignore[attr-defined]


def rank_of_file(name: str) -> int:
    """Saving rank encoded in a ``__{rank}_{n}.distcp`` file name (-1 when not that form)."""
    m = _DISTCP.match(name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def per_rank_metadata_files(names: Any) -> list[tuple[int, str]]:
    """``(rank, name)`` of the ``__{rank}.metadata`` files among ``names``, by rank."""
    out = []
    for n in names:
        m = _PER_RANK.match(n)
        if m:
            out.append((int(m.group(1)), n))
    return sorted(out)


def _as_tuple(v: Any, what: str, path: str) -> tuple[int, ...]:
    if not isinstance(v, tuple) or not all(isinstance(x, int) and -(1 << 63) <= x < 1 << 63 for x in v):
        raise MetadataError(f"{what} is {v!r}, expected a torch.Size of (64-bit) ints", path=path)
    return v


def parse_metadata(md: Any, path: str) -> CheckpointIndex:
    """Turn unpickled stand-in ``Metadata`` into a :class:`CheckpointIndex`.

    Entries keep the key order of ``state_dict_metadata``; chunks keep each tensor's
    ``chunks`` order; storage locations come from ``storage_data``.

    Raises
    ------
    MetadataError
        The objects do not have the shape of DCP metadata.
    """
    d = getattr(md, "__dict__", None)
    if not isinstance(d, dict) or not isinstance(d.get("state_dict_metadata"), dict):
        raise MetadataError(
            f"the pickle holds a {type(md).__name__}, expected torch.distributed.checkpoint Metadata "
            "with a state_dict_metadata dict",
            path=path,
        )
    sdm: dict[str, Any] = d["state_dict_metadata"]
    fqns = tuple(sdm)
    n = len(fqns)
    kinds = np.zeros(n, dtype=np.int8)
    dtypes: list[str | None] = [None] * n
    shapes: list[tuple[int, ...]] = [()] * n
    counts = np.zeros(n, dtype=np.int64)
    ndims = np.zeros(n, dtype=np.int64)
    chunk_lists: list[list[Any]] = []
    for i, (fqn, meta) in enumerate(sdm.items()):
        if not isinstance(fqn, str):
            raise MetadataError(f"state_dict_metadata key {fqn!r} is not a string", path=path)
        if isinstance(meta, TensorStorageMetadata):
            md_d = meta.__dict__
            props = md_d.get("properties")
            dt = getattr(props, "dtype", None)
            if not isinstance(dt, str):
                raise MetadataError(f"tensor {fqn!r} has no dtype in its properties", path=path)
            size = _as_tuple(md_d.get("size"), f"size of {fqn!r}", path)
            chunks = md_d.get("chunks")
            if not isinstance(chunks, list):
                raise MetadataError(f"chunks of {fqn!r} is not a list", path=path)
            dtypes[i] = str(dt)
            shapes[i] = size
            counts[i] = len(chunks)
            ndims[i] = len(size)
            chunk_lists.append(chunks)
        elif isinstance(meta, BytesStorageMetadata):
            kinds[i] = KIND_BYTES
        else:
            raise MetadataError(
                f"entry {fqn!r} is a {type(meta).__name__}, expected TensorStorageMetadata or "
                "BytesStorageMetadata",
                path=path,
            )
    chunk_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=chunk_start[1:])
    m = int(chunk_start[-1])
    entry = np.repeat(np.arange(n, dtype=np.int32), counts)
    per_chunk_ndim = np.repeat(ndims, counts)
    coord_start = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(per_chunk_ndim, out=coord_start[1:])
    total = int(coord_start[-1])
    all_chunks = list(chain.from_iterable(chunk_lists))
    del chunk_lists
    try:
        offs_t = list(map(attrgetter("offsets"), all_chunks))
        sizes_t = list(map(attrgetter("sizes"), all_chunks))
        lens_ok = np.fromiter(map(len, offs_t), np.int64, m) == per_chunk_ndim
        lens_ok &= np.fromiter(map(len, sizes_t), np.int64, m) == per_chunk_ndim
        if not lens_ok.all():  # before reading the coordinates: the counts would not add up
            bad = int(np.flatnonzero(~lens_ok)[0])
            raise MetadataError(
                f"a chunk of {fqns[int(entry[bad])]!r} has a different number of dims than the tensor",
                path=path,
            )
        offsets = np.fromiter(chain.from_iterable(offs_t), dtype=np.int64, count=total)
        sizes = np.fromiter(chain.from_iterable(sizes_t), dtype=np.int64, count=total)
    except (AttributeError, TypeError, ValueError) as e:
        if isinstance(e, MetadataError):
            raise
        raise MetadataError(f"a chunk's offsets/sizes are not torch.Size of ints ({e})", path=path) from e
    del all_chunks, offs_t, sizes_t

    files: dict[str, int] = {}
    transforms: dict[str, int] = {}
    file_col = np.full(m, -1, dtype=np.int32)
    boff = np.full(m, -1, dtype=np.int64)
    blen = np.full(m, -1, dtype=np.int64)
    tcol = np.full(m, -1, dtype=np.int16)
    bytes_items: dict[int, tuple[int, int, int, int]] = {}
    warnings: list[str] = []
    storage = d.get("storage_data")
    if storage is not None:
        if not isinstance(storage, dict):
            raise UnsupportedError(
                f"storage_data is a {type(storage).__name__}: written by a custom storage writer, "
                "expected FileSystemWriter's dict of MetadataIndex -> _StorageInfo",
                path=path,
            )
        _attach_storage(storage, fqns, kinds, chunk_start, coord_start, offsets, path,
                        files, transforms, file_col, boff, blen, tcol, bytes_items, warnings)  # fmt: skip
    file_names = tuple(files)
    ranks_of_files = np.array([rank_of_file(f) for f in file_names] + [-1], dtype=np.int32)
    rank = ranks_of_files[file_col]  # -1 index -> the trailing -1
    chunks = ChunkColumns(entry, coord_start, offsets, sizes, file_col, boff, blen, rank, tcol)

    planner = d.get("planner_data")
    planner_data = planner if isinstance(planner, dict) else {}
    sm = d.get("storage_meta")
    smd = getattr(sm, "__dict__", {}) if sm is not None else {}
    attrs = {
        "version": d.get("version"),
        "checkpoint_id": None if smd.get("checkpoint_id") is None else str(smd.get("checkpoint_id")),
        "save_id": smd.get("save_id"),
        "modules": list(smd.get("modules") or []),
    }
    return CheckpointIndex(
        format="dcp",
        fqns=fqns,
        kinds=kinds,
        dtypes=tuple(dtypes),
        shapes=tuple(shapes),
        chunk_start=chunk_start,
        chunks=chunks,
        files=file_names,
        transforms=tuple(transforms),
        bytes_items=bytes_items,
        planner_data=planner_data,
        attrs=attrs,
        warnings=tuple(warnings),
    )


def _attach_storage(storage: dict[Any, Any], fqns: tuple[str, ...], kinds: np.ndarray,
                    chunk_start: np.ndarray, coord_start: np.ndarray, offsets: np.ndarray, path: str,
                    files: dict[str, int], transforms: dict[str, int], file_col: np.ndarray,
                    boff: np.ndarray, blen: np.ndarray, tcol: np.ndarray,
                    bytes_items: dict[int, tuple[int, int, int, int]], warnings: list[str]) -> None:  # fmt: skip
    """Fill the storage columns from ``storage_data`` (MetadataIndex -> _StorageInfo)."""
    keys = list(storage)
    vals = list(storage.values())
    k = len(keys)
    if not all(map(MetadataIndex.__instancecheck__, keys)):
        raise MetadataError("a storage_data key is not a MetadataIndex", path=path)
    if not all(map(StorageInfo.__instancecheck__, vals)):
        raise UnsupportedError(
            "a storage_data value is not a FileSystemWriter _StorageInfo (custom storage writer?)",
            path=path,
        )
    lookup = {f: i for i, f in enumerate(fqns)}
    try:
        ent = np.fromiter(map(lookup.__getitem__, map(attrgetter("fqn"), keys)), np.int64, k)
    except KeyError as e:
        raise MetadataError(
            f"storage_data names {e.args[0]!r}, which state_dict_metadata lacks", path=path
        ) from e
    except (AttributeError, TypeError) as e:
        raise MetadataError(f"a storage_data key has no valid fqn ({e})", path=path) from e
    rel = list(map(attrgetter("relative_path"), vals))
    if not all(isinstance(r, str) for r in rel):
        raise MetadataError("a _StorageInfo.relative_path is not a string", path=path)
    fid = np.fromiter(map(lambda r: files.setdefault(r, len(files)), rel), np.int32, k)
    try:
        o = np.fromiter(map(attrgetter("offset"), vals), np.int64, k)
        ln = np.fromiter(map(attrgetter("length"), vals), np.int64, k)
    except (TypeError, ValueError, OverflowError) as e:
        raise MetadataError(f"a _StorageInfo offset/length is not an int ({e})", path=path) from e
    tds = list(map(attrgetter("transform_descriptors"), vals))
    tid = np.full(k, -1, dtype=np.int16)
    for i, td in enumerate(tds):
        if td:
            if not isinstance(td, (list, tuple)) or not all(isinstance(x, str) for x in td):
                raise MetadataError(f"transform_descriptors {td!r} is not a list of strings", path=path)
            tid[i] = transforms.setdefault("+".join(td), len(transforms))
    key_off = list(map(attrgetter("offset"), keys))
    hint = list(map(attrgetter("index"), keys))

    is_bytes = kinds[ent] == KIND_BYTES
    for i in np.flatnonzero(is_bytes).tolist():
        bytes_items[int(ent[i])] = (int(fid[i]), int(o[i]), int(ln[i]), int(tid[i]))
    tens = np.flatnonzero(~is_bytes)
    # rows from the index hints, checked against the key's offsets; fall back to a search
    ent_t = ent[tens]
    hint_t = np.fromiter(
        (h if isinstance(h, int) else -1 for h in map(hint.__getitem__, tens)), np.int64, len(tens)
    )
    cnt = chunk_start[ent_t + 1] - chunk_start[ent_t]
    ok = (hint_t >= 0) & (hint_t < cnt)
    rows = np.where(ok, chunk_start[ent_t] + hint_t, -1)
    koffs = [key_off[i] for i in tens]
    ndim = coord_start[rows + 1] - coord_start[rows]
    okl = np.fromiter((isinstance(x, tuple) for x in koffs), bool, len(tens))
    lens = np.fromiter((len(x) if isinstance(x, tuple) else -1 for x in koffs), np.int64, len(tens))
    ok &= okl & (lens == ndim)
    if ok.any():
        flat = np.fromiter(chain.from_iterable(koffs[j] for j in np.flatnonzero(ok)), np.int64)
        starts = coord_start[rows[ok]]
        nd = ndim[ok]
        idx = np.repeat(starts, nd) + (np.arange(int(nd.sum())) - np.repeat(np.cumsum(nd) - nd, nd))
        eq = offsets[idx] == flat
        bad_chunk = np.zeros(int(ok.sum()), bool)
        np.logical_or.at(bad_chunk, np.repeat(np.arange(len(nd)), nd), ~eq)
        okpos = np.flatnonzero(ok)
        ok[okpos[bad_chunk]] = False
    bad = np.flatnonzero(~ok)
    if len(bad):  # no usable hint: look the offsets up among the tensor's chunks
        by_offset: dict[tuple[int, tuple[int, ...]], int] = {}
        for en in np.unique(ent_t[bad]).tolist():
            for r in range(int(chunk_start[en]), int(chunk_start[en + 1])):
                by_offset.setdefault((en, tuple(offsets[coord_start[r] : coord_start[r + 1]].tolist())), r)
        for j in bad.tolist():
            en = int(ent_t[j])
            off = koffs[j]
            found = by_offset.get((en, off)) if isinstance(off, tuple) else None
            if found is None:
                raise MetadataError(
                    f"storage_data has a chunk of {fqns[en]!r} at offset {off!r} that the tensor's "
                    "chunk list does not have",
                    path=path,
                )
            rows[j] = found
    seen = np.zeros(len(file_col), bool)
    seen[rows] = True
    file_col[rows] = fid[tens]
    boff[rows] = o[tens]
    blen[rows] = ln[tens]
    tcol[rows] = tid[tens]
    if not seen.all():
        # storage_data is keyed by (fqn, offset) only: chunks of a tensor with equal offsets
        # (e.g. several 0-d chunks) share one stored item, which torch reads for each of them
        stored: dict[tuple[int, bytes], int] = {}
        ent_of = np.repeat(np.arange(len(fqns)), np.diff(chunk_start))
        for row in np.flatnonzero(seen).tolist():
            stored.setdefault(
                (int(ent_of[row]), offsets[coord_start[row] : coord_start[row + 1]].tobytes()), row
            )
        for row in np.flatnonzero(~seen).tolist():
            src = stored.get((int(ent_of[row]), offsets[coord_start[row] : coord_start[row + 1]].tobytes()))
            if src is not None:
                file_col[row], boff[row], blen[row], tcol[row] = (
                    file_col[src],
                    boff[src],
                    blen[src],
                    tcol[src],
                )
                seen[row] = True
    missing = int((~seen).sum())
    if missing:
        first = int(np.flatnonzero(~seen)[0])
        en = int(np.searchsorted(chunk_start, first, side="right") - 1)
        warnings.append(f"{missing} chunk(s) have no storage location, e.g. a chunk of {fqns[en]!r}")
    missing_bytes = [fqns[i] for i in np.flatnonzero(kinds == KIND_BYTES) if int(i) not in bytes_items]
    if missing_bytes:
        warnings.append(
            f"{len(missing_bytes)} bytes item(s) have no storage location, e.g. {missing_bytes[0]!r}"
        )


def read_metadata_file(store: Store, name: str) -> CheckpointIndex:
    """Parse one DCP metadata file: the C scanner when built, else the restricted unpickler.

    Both give the same index (tests compare them); both refuse unknown globals.
    """
    where = store.display(name)
    with store.open(name) as f:
        from ._fast import fast_parse

        index = fast_parse(f, where)
        if index is not None:
            return index
        f.seek(0)
        md = load_metadata_pickle(f, where)
    try:
        return parse_metadata(md, where)
    except (OverflowError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        if isinstance(e, MetadataError):
            raise
        raise MetadataError(f"metadata has an invalid structure ({type(e).__name__}: {e})", path=where) from e


def merge_indexes(parts: list[CheckpointIndex]) -> CheckpointIndex:
    """Merge per-rank indexes (``use_collectives=False``): entries in first-seen order, chunks by rank."""
    if len(parts) == 1:
        return parts[0]
    fqns: dict[str, int] = {}
    for p in parts:
        for f in p.fqns:
            fqns.setdefault(f, len(fqns))
    names = tuple(fqns)
    n = len(names)
    kinds = np.zeros(n, np.int8)
    dtypes: list[str | None] = [None] * n
    shapes: list[tuple[int, ...]] = [()] * n
    files: dict[str, int] = {}
    transforms: dict[str, int] = {}
    rows: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # (part, row)
    bytes_items: dict[int, tuple[int, int, int, int]] = {}
    bytes_copies: list[tuple[int, int, int, int, int]] = []  # every rank's own copy, beyond the first
    warnings: list[str] = []
    planner: dict[str, Any] = {}
    fmaps, tmaps = [], []
    for pi, p in enumerate(parts):
        fmaps.append(np.array([files.setdefault(f, len(files)) for f in p.files] + [-1], np.int32))
        tmaps.append(
            np.array([transforms.setdefault(t, len(transforms)) for t in p.transforms] + [-1], np.int16)
        )
        planner.update(p.planner_data)
        warnings.extend(p.warnings)
        for e, f in enumerate(p.fqns):
            g = fqns[f]
            kinds[g] = p.kinds[e]
            if p.kinds[e] == KIND_TENSOR:
                if dtypes[g] is not None and (dtypes[g], shapes[g]) != (p.dtypes[e], p.shapes[e]):
                    warnings.append(f"per-rank metadata files disagree on the dtype/shape of {f!r}")
                dtypes[g], shapes[g] = p.dtypes[e], p.shapes[e]
                rows[g].extend((pi, r) for r in range(int(p.chunk_start[e]), int(p.chunk_start[e + 1])))
            elif e in p.bytes_items:
                fi, o, ln, t = p.bytes_items[e]
                loc = (int(fmaps[pi][fi]), o, ln, int(tmaps[pi][t]))
                if g not in bytes_items:
                    bytes_items[g] = loc
                else:
                    bytes_copies.append((g, *loc))
    counts = np.array([len(r) for r in rows], np.int64)
    chunk_start = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=chunk_start[1:])
    cols: dict[str, list[Any]] = {
        k: [] for k in ("entry", "file", "byte_offset", "byte_length", "rank", "transform")
    }
    offs: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    nd: list[int] = []
    for g, lst in enumerate(rows):
        for pi, r in lst:
            c = parts[pi].chunks
            a, b = int(c.coord_start[r]), int(c.coord_start[r + 1])
            offs.append(c.offsets[a:b])
            sizes.append(c.sizes[a:b])
            nd.append(b - a)
            cols["entry"].append(g)
            cols["file"].append(fmaps[pi][c.file[r]])
            cols["byte_offset"].append(c.byte_offset[r])
            cols["byte_length"].append(c.byte_length[r])
            cols["rank"].append(c.rank[r])
            cols["transform"].append(tmaps[pi][c.transform[r]])
    coord_start = np.zeros(len(nd) + 1, np.int64)
    np.cumsum(nd, out=coord_start[1:])

    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)

    chunks = ChunkColumns(
        np.array(cols["entry"], np.int32), coord_start, cat(offs), cat(sizes),
        np.array(cols["file"], np.int32), np.array(cols["byte_offset"], np.int64),
        np.array(cols["byte_length"], np.int64), np.array(cols["rank"], np.int32),
        np.array(cols["transform"], np.int16),
    )  # fmt: skip
    attrs = dict(parts[0].attrs)
    return CheckpointIndex(
        format="dcp", fqns=names, kinds=kinds, dtypes=tuple(dtypes), shapes=tuple(shapes),
        chunk_start=chunk_start, chunks=chunks, files=tuple(files), transforms=tuple(transforms),
        bytes_items=bytes_items, bytes_copies=tuple(bytes_copies), planner_data=planner, attrs=attrs,
        warnings=tuple(warnings),
    )  # fmt: skip


class DcpReader(BackendEntrypoint):
    """torch.distributed.checkpoint ``FileSystemWriter`` output (``.metadata`` + ``__*_*.distcp``)."""

    name = "dcp"
    looks_for = "a '.metadata' file or per-rank '__<rank>.metadata' files (torch.distributed.checkpoint)"

    def guess_can_open(self, store: Store) -> bool:
        if store.selected is not None and store.selected != METADATA and not _PER_RANK.match(store.selected):
            return False
        return METADATA in store.listing or bool(per_rank_metadata_files(store.listing))

    def metadata_files(self, store: Store, rank: int | None = None) -> list[str]:
        """The metadata file(s) to read: ``.metadata``, or every (or one) ``__{rank}.metadata``."""
        if rank is None and (store.selected == METADATA or METADATA in store.listing):
            return [METADATA]
        per_rank = per_rank_metadata_files(store.listing)
        if rank is not None:
            name = f"__{rank}.metadata"
            if name not in store.listing:
                raise MetadataError(
                    f"no per-rank metadata for rank {rank}: found {[n for _, n in per_rank] or 'none'}",
                    path=store.display(name),
                )
            return [name]
        if store.selected and _PER_RANK.match(store.selected):
            return [store.selected]
        return [n for _, n in per_rank]

    def cache_files(self, store: Store, rank: int | None = None, **kwargs: Any) -> list[str] | None:
        return self.metadata_files(store, rank)

    def open_index(self, store: Store, *, rank: int | None = None, **kwargs: Any) -> CheckpointIndex:
        parts = []
        names = self.metadata_files(store, rank)
        for name in names:
            parts.append(read_metadata_file(store, name))
        index = merge_indexes(parts)
        attrs = dict(index.attrs)
        attrs["metadata_files"] = names
        return _replace(index, attrs=attrs)


def _replace(index: CheckpointIndex, **changes: Any) -> CheckpointIndex:
    import dataclasses

    return dataclasses.replace(index, **changes)
