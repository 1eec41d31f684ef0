"""The :class:`Checkpoint` object that :func:`dcp_explorer.open` returns."""

from __future__ import annotations

import html
import os
import posixpath
import time
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cache as _cache
from .errors import ByteRangeError, ChunkFileMissing, DcpExplorerError, MetadataError
from .model import KIND_BYTES, CheckpointIndex, ChunkInfo, TensorInfo
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

    def __iter__(self):  # type: ignore[no-untyped-def]
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
             trusted: bool = False, progress: bool | None = None, max_bytes: int | None = None) -> Any:  # fmt: skip
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
            FP8 block-scaled and MXFP4 weights are dequantized (float32) unless ``False``.
        trusted
            Bytes entries are decoded with an allow-list unpickler (plain containers, numbers,
            strings, bytes) unless ``True``, which uses ``torch.load(weights_only=False)`` and can
            execute code from the file.
        progress
            Show a progress bar (default: when loading more than 8 entries).
        max_bytes
            Refuse a selection whose raw size exceeds this (unless sliced).

        Returns
        -------
        torch.Tensor, object, or dict

        Examples
        --------
        >>> w = ckpt.load("model.layers.0.attention.wq.weight", slices="0:4, :")   # doctest: +SKIP
        >>> ckpt.load("model.layers.0.*")                                          # doctest: +SKIP
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
            f"{s['num_bytes_items']} bytes items, {s['num_chunks']} chunks, {_fmt_bytes(s['tensor_bytes'])} "
            f"in {s['num_files']} files>"
        )

    def _repr_html_(self) -> str:
        from .html import checkpoint_html

        return checkpoint_html(self)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _validate(index: CheckpointIndex, store: Store, strict: bool) -> list[str]:
    """Referenced files exist and byte ranges lie inside them; raise (strict) or collect."""
    problems: list[str] = []

    def fail(exc: DcpExplorerError) -> None:
        if strict:
            raise exc
        problems.append(str(exc))

    sizes = np.full(len(index.files), -1, np.int64)
    root_real = os.path.realpath(store.root) if store.is_local else None
    for i, f in enumerate(index.files):
        _check_relative(f, store.display(f))
        if root_real is not None:
            real = os.path.realpath(store.full_path(f))
            if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
                raise MetadataError(
                    f"data file {f!r} resolves to {real}, outside the checkpoint directory (a symlink?); "
                    "refusing to read outside it",
                    path=store.display(f),
                )
        try:
            sizes[i] = store.size(f)
        except ChunkFileMissing:
            fail(ChunkFileMissing(
                "data file referenced by the metadata does not exist (incomplete copy or interrupted save?)",
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
        if files and all(s[-1] is not None for s in stats):  # no mtime/etag: a same-size rewrite would go unseen
            full = posixpath.join(store.root, "") if store.root else ""
            key = _cache.cache_key(
                reader.name, type(store.fs).__name__, full, sorted(kwargs.items()), stats,
            )  # fmt: skip
            index = _cache.load_cached(key)
            from_cache = index is not None
    if index is None:
        index = reader.open_index(store, **kwargs)
        if key is not None:
            _cache.store_cached(key, index)
    problems = _validate(index, store, strict)
    return Checkpoint(index, store, warnings=problems, open_seconds=time.perf_counter() - t0, from_cache=from_cache)
