"""The :class:`Checkpoint` object that :func:`dcp_explorer.open` returns."""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import time
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cache as _cache
from .errors import ByteRangeError, ChunkFileMissing, DcpExplorerError, MetadataError
from .html import fmt_bytes
from .model import CheckpointIndex, ChunkInfo, TensorInfo
from .readers import get_reader, guess_reader
from .store import Store, open_store

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Checkpoint", "open_checkpoint"]


def _check_relative(name: str, where: str) -> None:
    """A data file named by metadata must stay inside the checkpoint directory."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or name == "":
        raise MetadataError(
            f"metadata names data file {name!r}, which is not a path inside the checkpoint directory; "
            "refusing to read outside it",
            path=where,
        )


class Checkpoint:
    """A checkpoint opened for inspection: metadata only, tables on demand.

    Use :func:`dcp_explorer.open` to make one.

    Attributes
    ----------
    index : CheckpointIndex
        The columnar metadata.
    store : Store
        Where it lives (read-only).
    warnings : list of str
        Problems found that did not stop opening.
    """

    def __init__(self, index: CheckpointIndex, store: Store, *, warnings: list[str] | None = None,
                 open_seconds: float | None = None, from_cache: bool = False) -> None:  # fmt: skip
        self.index = index
        self.store = store
        self.warnings = list(index.warnings) + list(warnings or [])
        self.open_seconds = open_seconds
        self.from_cache = from_cache

    # -- basics ---------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The location as given by the user."""
        return self.store.url

    @property
    def format(self) -> str:
        """Reader that produced the metadata (``"dcp"``, ``"safetensors"``, ``"hf_dcp_shards"``, ``"hf_quantized"``)."""
        return self.index.format

    @property
    def fqns(self) -> tuple[str, ...]:
        """Names of all entries, in checkpoint order."""
        return self.index.fqns

    def __len__(self) -> int:
        return len(self.index.fqns)

    def __contains__(self, fqn: object) -> bool:
        try:
            self.index.entry_index(fqn)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.index.fqns)

    def __getitem__(self, fqn: str) -> TensorInfo:
        """The :class:`TensorInfo` of ``fqn``."""
        return self.tensor(fqn)

    def tensor(self, fqn: str) -> TensorInfo:
        """The :class:`TensorInfo` of one entry; ``KeyError`` naming close matches when absent."""
        try:
            return self.index.tensor_info(self.index.entry_index(fqn))
        except KeyError:
            import difflib

            close = difflib.get_close_matches(fqn, self.index.fqns, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"{fqn!r} is not in {self.path}{hint}") from None

    def chunks_of(self, fqn: str) -> list[ChunkInfo]:
        """The stored chunks of one tensor, in stored order."""
        self.tensor(fqn)
        return self.index.chunks_of(fqn)

    def file_sizes(self) -> dict[str, int | None]:
        """Size on disk of every data file the metadata references (None when missing)."""
        out: dict[str, int | None] = {}
        for f in self.index.files:
            try:
                out[f] = self.store.size(f)
            except ChunkFileMissing:
                out[f] = None
        return out

    # -- data -----------------------------------------------------------------------------
    @cached_property
    def loader(self) -> Any:
        """The :class:`~dcp_explorer.load.Loader` that reads this checkpoint's tensor bytes."""
        from .load import Loader

        return Loader(self)

    def load(self, selection: Any, *, slices: Any = None, dtype: Any = None, dequantize: bool = True,
             trusted: bool = False, progress: bool | None = None, max_bytes: int | str | None = "default") -> Any:  # fmt: skip
        """Load tensors (or slices of them) into ``torch.Tensor``; reads only the bytes needed.

        Parameters
        ----------
        selection
            An fqn (returns one tensor), or a glob (``"model.layers.0.*"``), ``"re:<regex>"``, a
            compiled regex or a list of these (returns a dict fqn -> value).
        slices
            For a single tensor: a tuple of ints/slices or a string like ``"0:10, :"``; for several,
            a mapping fqn -> slices (or one spec applied to all).
        dtype
            Cast the result (``torch.float32`` or ``"float32"``).
        dequantize
            FP8 block-scaled and MXFP4 weights are dequantized (float32, or straight into ``dtype`` when it is
            bfloat16 / float16: each value rounded once, as torch's quantized reader does) unless ``False``,
            which returns the stored tensors. Problems with the pairs: :attr:`quant`, :meth:`quant_check`.
        trusted
            Bytes entries are decoded with an allow-list unpickler (plain containers, numbers,
            strings, bytes) unless ``True``, which uses ``torch.load(weights_only=False)`` and can
            execute code from the file.
        progress
            Show a progress bar (default: when loading more than 8 entries).
        max_bytes
            Refuse (:class:`~dcp_explorer.errors.MemoryBudgetError`, giving both numbers) a selection whose
            results (sliced, cast, dequantized) would take more bytes than this. Default
            ``$DCP_EXPLORER_MAX_LOAD_BYTES`` or 8 GiB; ``None``: no limit.

        Returns
        -------
        torch.Tensor, object, or dict

        Examples
        --------
        >>> import dcp_explorer
        >>> from dcp_explorer.samples import sample_path
        >>> ckpt = dcp_explorer.open(sample_path("llama_fsdp_ws4"))
        >>> w = ckpt.load("model.layers.0.attention.wq.weight", slices="0:4, :")  # reads only what the rows need
        >>> w.shape, w.dtype
        (torch.Size([4, 72]), torch.float32)
        >>> layer0 = ckpt.load("model.layers.0.*", progress=False)  # a glob: fqn -> tensor
        >>> len(layer0), tuple(layer0["model.layers.0.feed_forward.w1.weight"].shape)
        (9, (190, 72))
        >>> ckpt.load("optim.param_groups.0.betas")  # a bytes entry, via an allow-list unpickler
        (0.9, 0.999)
        """
        from .load import load

        return load(self, selection, slices=slices, dtype=dtype, dequantize=dequantize, trusted=trusted,
                    progress=progress, max_bytes=max_bytes)  # fmt: skip

    def export(self, selection: Any, out: str | os.PathLike[str], *, format: str = "safetensors", dtype: Any = None,
               rename: Any = None, dequantize: bool = True, max_shard_size: int = 5 << 30,
               progress: bool | None = None) -> list[Any]:  # fmt: skip
        """Write selected tensors as safetensors (streaming; sharded + index above ``max_shard_size``) or ``torch.save``.

        See :func:`dcp_explorer.export.export`. Returns the files written.
        """
        from .export import export

        return export(self, selection, out, format=format, dtype=dtype, rename=rename, dequantize=dequantize,
                      max_shard_size=max_shard_size, progress=progress)  # fmt: skip

    def diff(self, other: Any, **kwargs: Any) -> Any:
        """Compare with another checkpoint (this one is A); see :func:`dcp_explorer.diff.diff`."""
        from .diff import diff

        return diff(self, other, **kwargs)

    # -- tables ---------------------------------------------------------------------------
    @cached_property
    def tensors(self) -> pd.DataFrame:
        """One row per entry; see :func:`dcp_explorer.tables.tensors_table` for the columns."""
        from .tables import tensors_table

        return tensors_table(self.index)

    @cached_property
    def chunks(self) -> pd.DataFrame:
        """One row per stored chunk; see :func:`dcp_explorer.tables.chunks_table` for the columns."""
        from .tables import chunks_table

        return chunks_table(self.index)

    @cached_property
    def files(self) -> pd.DataFrame:
        """One row per data file; see :func:`dcp_explorer.tables.files_table` for the columns."""
        from .tables import files_table

        return files_table(self.index, self.file_sizes())

    @cached_property
    def quant(self) -> pd.DataFrame:
        """One row per quantized tensor (FP8 block-wise, MXFP4): shapes, bytes, scale statistics, problems.

        Cheap: reads the scale tensors, never the weights (see :meth:`quant_check` for that). See
        :func:`dcp_explorer.quant.quant_table` for the columns.
        """
        from .quant import quant_table

        return quant_table(self)

    def quant_check(self, names: Any = None, *, full: bool = True, dtype: Any = None,
                    progress: bool | None = None) -> pd.DataFrame:  # fmt: skip
        """:attr:`quant` plus a scan of the weights (all-zero blocks, NaN codes, overflow), slab by slab.

        See :func:`dcp_explorer.quant.quant_check`.
        """
        from .quant import quant_check

        return quant_check(self, names, full=full, dtype=dtype, progress=progress)

    def modules(self, depth: int = 2) -> pd.DataFrame:
        """Bytes and parameter counts by fqn prefix; see :func:`dcp_explorer.tables.modules_table`."""
        from .tables import modules_table

        return modules_table(self.index, depth)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: format, counts, bytes, dtypes, ranks, files."""
        idx = self.index
        t = self.tensors
        tens = t[t["kind"] == "tensor"]
        c = idx.chunks
        ranks = np.unique(c.rank[c.rank >= 0])
        return {
            "path": self.path,
            "format": self.format,
            "num_tensors": int(len(tens)),
            "num_bytes_items": int((t["kind"] == "bytes").sum()),
            "num_chunks": int(len(c)),
            "numel": int(tens["numel"].sum()),
            "tensor_bytes": int(tens["nbytes"].sum()),
            "dtypes": {str(k): int(v) for k, v in tens.groupby("dtype")["nbytes"].sum().items()},
            "num_files": len(idx.files),
            "saving_ranks": int(len(ranks)),
            "quantized": int(t["quant"].notna().sum()),
            "warnings": list(self.warnings),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"<dcp_explorer.Checkpoint {s['format']} {self.path!r}: {s['num_tensors']} tensors, "
            f"{s['num_bytes_items']} bytes items, {s['num_chunks']} chunks, {fmt_bytes(s['tensor_bytes'])} "
            f"in {s['num_files']} files>"
        )

    def _repr_html_(self) -> str:
        from .html import checkpoint_html

        return checkpoint_html(self)


def _layout_problems(index: CheckpointIndex, where: str) -> list[str]:
    """Tensors whose chunks leave holes, overlap or lie outside the tensor (warnings: loading checks again).

    Counts are per tensor: the chunks' elements (identical boxes, e.g. every rank's copy of a
    replicated tensor in per-rank metadata, counted once) against the tensor's. Vectorized, one
    pass per dim (3.5 M chunks: ~0.3 s; done once per parse, the result is cached with the index).
    """
    c = index.chunks
    n = len(index.fqns)
    shapes = list(index.shapes)
    for e, q in index.quant.items():  # chunks are in the stored shape
        if q.get("stored_shape") is not None:
            shapes[int(e)] = tuple(q["stored_shape"])
    is_tensor = index.kinds == 0
    cap = 1 << 62
    ints = [all(isinstance(x, int) for x in s) for s in shapes]
    numel = np.array(
        [min(max(math.prod(s), 0), cap) if ok else 0 for s, ok in zip(shapes, ints, strict=True)], np.int64
    )
    nd_entry = np.array([len(s) for s in shapes], np.int64)
    maxk = int(nd_entry.max(initial=0))
    shape_mat = np.zeros((n, maxk), np.int64)
    for e, (s, ok) in enumerate(zip(shapes, ints, strict=True)):
        if ok and s:
            shape_mat[e, : len(s)] = [min(max(x, 0), cap) for x in s]
    outside = np.zeros(n, bool)
    ent = c.entry.astype(np.intp)
    nd = np.diff(c.coord_start)
    wrong = nd != nd_entry[ent]
    outside[ent[wrong]] = True
    vol = np.ones(len(c), np.int64)
    nd[wrong] = 0  # their volume counts as 1; the tensor is reported as outside anyway
    counts = np.bincount(nd, minlength=1) if len(nd) else np.zeros(1, np.int64)
    for k in np.flatnonzero(counts).tolist():
        if k == 0:
            continue
        rows = np.flatnonzero(nd == k) if counts[k] != len(nd) else None
        base = c.coord_start[:-1] if rows is None else c.coord_start[rows]
        er = ent if rows is None else ent[rows]
        bad = np.zeros(len(base), bool)
        v = np.ones(len(base), np.int64)
        for j in range(k):
            o, z, d = c.offsets[base + j], c.sizes[base + j], shape_mat[:, j][er]
            bad |= (o < 0) | (z < 0) | (o > d - z)
            np.maximum(z, 0, out=z)
            v *= z
        if rows is None:
            vol = v
        else:
            vol[rows] = v
        outside[er[bad]] = True
    cs = np.zeros(len(c) + 1, np.int64)
    np.cumsum(vol, out=cs[1:])
    covered = cs[index.chunk_start[1:]] - cs[index.chunk_start[:-1]]
    # tensors to look at box by box: counts that do not add up, and (exactly, on a grid) those of few chunks
    nchunks = np.diff(index.chunk_start)
    look = np.flatnonzero(
        is_tensor & ~outside & ((covered != numel) | ((nchunks >= 2) & (nchunks <= _EXACT_CHUNKS)))
    )
    holes: list[tuple[int, int]] = []
    overlaps: list[tuple[int, int]] = []
    co = c.coord_start
    for e in look.tolist():
        a, b = int(index.chunk_start[e]), int(index.chunk_start[e + 1])
        k = int(nd_entry[e])
        if b - a <= _EXACT_CHUNKS:
            idx = co[a:b, None] + np.arange(k)
            lo, hi = c.offsets[idx], c.offsets[idx] + c.sizes[idx]
            split = np.flatnonzero(~((lo == 0) & (hi == shape_mat[e, :k])).all(0))
            if len(split) == 1:  # slabs along one dim (FSDP): sorted, each must start after the last ends
                dim = int(split[0])
                order = np.argsort(lo[:, dim], kind="stable")
                sl, sh = lo[order, dim], hi[order, dim]
                sl, sh = sl[sh > sl], sh[sh > sl]
                if (sl[1:] >= sh[:-1]).all():
                    got = int(vol[a:b].sum())
                    if got < numel[e]:
                        holes.append((e, got))
                    continue
            same = (lo[:, None] == lo[None]).all(-1) & (hi[:, None] == hi[None]).all(-1)
            keep = ~np.tril(same, -1).any(1)  # identical boxes (replicated copies) count once
            lo, hi = lo[keep], hi[keep]
            got = int(vol[a:b][keep].sum())
            meet = (np.maximum(lo[:, None], lo[None]) < np.minimum(hi[:, None], hi[None])).all(-1)
            np.fill_diagonal(meet, False)
            over = 0
            if meet.any():  # count exactly, on the grid of the chunks' boundaries
                got, over = _grid_cover(lo, hi, shapes[e]) if ints[e] else (got, 1)
        else:
            distinct = {(c.offsets[co[r] : co[r + 1]].tobytes(), c.sizes[co[r] : co[r + 1]].tobytes()): r
                        for r in range(a, b)}  # fmt: skip
            got = int(vol[list(distinct.values())].sum())
            over = max(0, got - int(numel[e]))
        if got < numel[e]:
            holes.append((e, got))
        if over:
            overlaps.append((e, over))
    out = []
    bad_e = np.flatnonzero(is_tensor & outside)
    if len(bad_e):
        e = int(bad_e[0])
        out.append(f"{where}: {len(bad_e)} tensor(s) have chunks outside their shape (negative offsets, offset + size "
                   f"past the end, or the wrong number of dims), e.g. {index.fqns[e]!r} of shape "
                   f"{list(index.shapes[e])}: the metadata is corrupt")  # fmt: skip
    if holes:
        e, got = holes[0]
        out.append(f"{where}: {len(holes)} tensor(s) have holes in their chunk lists, e.g. {index.fqns[e]!r}, whose "
                   f"chunks cover only {got:,} of its {int(numel[e]):,} elements (incomplete save or copy?); loading "
                   "a region that is not covered raises MetadataError")  # fmt: skip
    if overlaps:
        e, over = overlaps[0]
        out.append(f"{where}: {len(overlaps)} tensor(s) have overlapping chunks, e.g. {index.fqns[e]!r}, where "
                   f"{over:,} of its {int(numel[e]):,} elements are in more than one distinct chunk: their values "
                   "depend on the reading order")  # fmt: skip
    return out


#: Tensors of up to this many chunks are checked exactly (pairwise, then on a grid of the chunk
#: boundaries when some overlap); beyond, by element counts (an overlap that exactly offsets a
#: hole is then found when loading).
_EXACT_CHUNKS = 64


def _grid_cover(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int]:
    """(elements covered, elements covered more than once) by the boxes ``[lo, hi)`` (in bounds, few)."""
    cuts = [np.unique(np.concatenate(([0, d], lo[:, j], hi[:, j]))) for j, d in enumerate(shape)]
    count = np.zeros([len(x) - 1 for x in cuts], np.int32)
    for i in range(len(lo)):
        count[tuple(slice(int(np.searchsorted(x, lo[i, j])), int(np.searchsorted(x, hi[i, j])))
                    for j, x in enumerate(cuts))] += 1  # fmt: skip
    cell = np.ones((), np.int64)
    for x in cuts:
        cell = np.multiply.outer(cell, np.diff(x))
    return int(cell[count > 0].sum()), int(cell[count > 1].sum())


def _validate(index: CheckpointIndex, store: Store, strict: bool) -> list[str]:
    """Referenced files exist and byte ranges lie inside them; raise (strict) or collect."""
    problems: list[str] = []

    def fail(exc: DcpExplorerError) -> None:
        if strict:
            raise exc
        problems.append(str(exc))

    sizes = np.full(len(index.files), -1, np.int64)
    for i, f in enumerate(index.files):
        _check_relative(f, store.display(f))
        store.check_inside(f)
        try:
            sizes[i] = store.size(f)
        except ChunkFileMissing:
            what = "is a directory, not a file" if f in store.subdirs else "does not exist"
            fail(ChunkFileMissing(
                f"data file referenced by the metadata {what} (incomplete copy or interrupted save?)",
                path=store.display(f),
            ))  # fmt: skip
    c = index.chunks
    ok = c.file >= 0
    if ok.any():
        end = c.byte_offset[ok] + c.byte_length[ok]
        fsz = sizes[c.file[ok]]
        bad = (fsz >= 0) & ((end > fsz) | (c.byte_offset[ok] < 0) | (c.byte_length[ok] < 0))
        if bad.any():
            rows = np.flatnonzero(ok)[bad]
            r = int(rows[0])
            f = index.files[int(c.file[r])]
            e = int(c.entry[r])
            fail(ByteRangeError(
                f"{len(rows)} stored item(s) lie past the end of the file ({int(sizes[c.file[r]])} bytes), "
                f"e.g. a chunk of {index.fqns[e]!r} at bytes [{int(c.byte_offset[r])}, "
                f"{int(c.byte_offset[r] + c.byte_length[r])}): the file is truncated",
                path=store.display(f),
            ))  # fmt: skip
    for e, fi, o, ln, _t in [*((e, *v) for e, v in index.bytes_items.items()), *index.bytes_copies]:
        if fi >= 0 and sizes[fi] >= 0 and (o < 0 or ln < 0 or o + ln > sizes[fi]):
            fail(ByteRangeError(
                f"bytes item {index.fqns[e]!r} at [{o}, {o + ln}) lies past the end of the file "
                f"({int(sizes[fi])} bytes): the file is truncated",
                path=store.display(index.files[fi]),
            ))  # fmt: skip
    return problems


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    rank: int | None = None,
    strict: bool = True,
    cache: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Open a checkpoint's metadata (never its tensor data). See :func:`dcp_explorer.open`."""
    t0 = time.perf_counter()
    store = open_store(path, storage_options)
    reader = get_reader(format) if format else guess_reader(store)
    kwargs: dict[str, Any] = {"rank": rank} if rank is not None else {}
    key = None
    index = None
    from_cache = False
    if cache:
        files = reader.cache_files(store, **kwargs)
        stats = [(f, *store.stat_key(f)) for f in files or ()]
        if files and all(
            s[-1] is not None for s in stats
        ):  # no mtime/etag: a same-size rewrite would go unseen
            full = posixpath.join(store.root, "") if store.root else ""
            key = _cache.cache_key(
                reader.name, type(store.fs).__name__, full, sorted(kwargs.items()), stats,
            )  # fmt: skip
            index = _cache.load_cached(key)
            from_cache = index is not None
    if index is None:
        index = reader.open_index(store, **kwargs)
        # chunk-layout problems depend on the metadata alone: found once, cached with the index
        meta = index.attrs.get("metadata_files") if index.format == "dcp" else None
        where = store.display(meta[0]) if isinstance(meta, list) and len(meta) == 1 else store.url
        layout = _layout_problems(index, where) if rank is None else []  # one rank's view has holes
        if layout:
            index = dataclasses.replace(index, warnings=(*index.warnings, *layout))
        if key is not None:
            _cache.store_cached(key, index)
    problems = _validate(index, store, strict)
    return Checkpoint(
        index, store, warnings=problems, open_seconds=time.perf_counter() - t0, from_cache=from_cache
    )
