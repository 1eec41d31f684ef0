"""Fast reader for DCP ``.metadata``: the C scanner in ``_dcpscan``.

``.metadata`` is a pickle of millions of small objects (a 405B model saved on 1024 ranks:
458 MB, 3.5 M chunks).  Unpickling it, even with the restricted unpickler, builds all of
them and keeps every intermediate tuple in the memo.  ``_dcpscan`` instead runs a
restricted pickle VM in C whose values are small tagged words: the hot objects
(``ChunkStorageMetadata``, ``MetadataIndex``, ``_StorageInfo``, ``torch.Size``) become rows
of C arrays that end up, without copies, as the numpy columns of the index.

:func:`fast_parse` gives exactly what ``parse_metadata(load_metadata_pickle(f, path), path)``
gives, or ``None`` when the extension is missing or the pickle has a structure the scanner
does not model (custom planner objects, re-built objects, non-dict ``storage_data``...): the
caller then uses that reference path, which reports its own errors.  It refuses the same
globals as the restricted unpickler (same :class:`UnsafePickleError`), and raises
:class:`MetadataError` for input the unpickler would also reject (truncated, garbled).
Nothing from the file is imported, called or executed; torch is never imported.
"""

from __future__ import annotations

import io
from typing import IO, Any

import numpy as np

from ..errors import MetadataError, UnsafePickleError
from ..model import KIND_BYTES, CheckpointIndex, ChunkColumns
from . import _safe_pickle as _sp

try:  # the optional C extension (setup.py builds it when a compiler is available)
    from . import _dcpscan
except ImportError:  # pragma: no cover - depends on the build
    # mypy cannot spell "this module or None" and keep the module's types (_dcpscan.pyi)
    _dcpscan = None  # type: ignore[assignment]

__all__ = ["fast_parse", "available"]

_CONFIG: tuple[dict[tuple[str, str], int], dict[str, str], list[Any]] | None = None


def available() -> bool:
    """Whether the C scanner is importable."""
    return _dcpscan is not None


def _config() -> tuple[dict[tuple[str, str], int], dict[str, str], list[Any]]:
    """The allow-list as scanner codes (by identity of the stand-ins), dtype names, path functions."""
    global _CONFIG
    if _CONFIG is None:
        m = _dcpscan
        known = [
            (_sp.Metadata, m.G_METADATA), (_sp.TensorStorageMetadata, m.G_TSM),
            (_sp.BytesStorageMetadata, m.G_BSM), (_sp.ChunkStorageMetadata, m.G_CHUNK),
            (_sp.TensorProperties, m.G_TP), (_sp.MetadataIndex, m.G_MIDX), (_sp.StorageMeta, m.G_SMETA),
            (_sp._mem_format, m.G_MEMFMT), (_sp.StorageInfo, m.G_SINFO), (tuple, m.G_SIZE),
            (_sp._layout, m.G_LAYOUT), (_sp._posix_path, m.G_POSIX), (_sp._windows_path, m.G_WINPATH),
            (dict, m.G_ODICT),
        ]  # fmt: skip
        gmap = {}
        for key, obj in _sp.ALLOWED_GLOBALS.items():
            # an allow-listed global the scanner has no model for gets code 0: the scanner
            # then hands the file to the reference reader as soon as the pickle uses it
            gmap[key] = next((code for o, code in known if o is obj), 0)
        dtmap = {name: str(_sp._dtype(name)) for name in _sp._TORCH_DTYPES}
        funcs: list[Any] = [None] * m.G_NCODES
        funcs[m.G_POSIX] = _sp._posix_path
        funcs[m.G_WINPATH] = _sp._windows_path
        _CONFIG = (gmap, dtmap, funcs)
    return _CONFIG


def _refuse(module: str, name: str, path: str) -> UnsafePickleError:
    """The restricted unpickler's own error for a refused global (same message, same fields)."""
    try:
        _sp._RestrictedUnpickler(io.BytesIO(b""), path).find_class(module, name)
    except UnsafePickleError as e:
        return e
    return UnsafePickleError(  # pragma: no cover - the scanner only refuses what find_class refuses
        f"refused to load global '{module}.{name}'", path=path, global_name=f"{module}.{name}"
    )


def fast_parse(file: IO[bytes] | bytes | bytearray | memoryview, path: str) -> CheckpointIndex | None:
    """Read a DCP ``.metadata`` with the C scanner.

    Parameters
    ----------
    file
        The pickle as bytes, or a seekable binary file positioned at its start.
    path
        Name of the file, for error messages.

    Returns
    -------
    CheckpointIndex or None
        Identical to ``parse_metadata(load_metadata_pickle(file, path), path)``; ``None``
        when the extension is unavailable, the file object is not seekable, or the pickle
        holds something the scanner does not model.  A file object is then back at the
        position it had on entry, ready for the reference reader.

    Raises
    ------
    UnsafePickleError
        The pickle references a global outside the allow-list.
    MetadataError
        The pickle is truncated or garbled.
    """
    if _dcpscan is None:
        return None
    gmap, dtmap, funcs = _config()
    if isinstance(file, (bytes, bytearray, memoryview)):
        src: Any = file
        start = total = -1
    else:
        src = file
        try:
            if hasattr(file, "seekable") and not file.seekable():
                return None
            start = file.tell()
            end = file.seek(0, io.SEEK_END)
            file.seek(start)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return None
        total = max(0, end - start)
    try:
        r = _dcpscan.scan(src, start, total, gmap, dtmap, funcs, _sp.DType)
    except _dcpscan.Unsupported:
        if start >= 0:
            file.seek(start)  # type: ignore[union-attr]
        return None
    except _dcpscan.Refused as e:
        module, name = e.args
        raise _refuse(module, name, path) from None
    except _dcpscan.Malformed as e:
        msg, truncated = e.args
        if truncated:
            raise MetadataError(
                "file ends in the middle of the pickle (truncated? was the save interrupted?)", path=path
            ) from None
        raise MetadataError(f"not a valid DCP metadata pickle ({msg})", path=path) from None
    index = _index(r)
    if index is None and start >= 0:
        file.seek(start)  # type: ignore[union-attr]
    return index


def _index(r: dict[str, Any]) -> CheckpointIndex | None:
    """Wrap the scanner's buffers as numpy columns (no copies) and finish like ``parse_metadata``."""
    from .dcp import rank_of_file  # here, so that dcp.py can import this module

    def col(name: str, dtype: Any) -> np.ndarray:
        return np.frombuffer(r[name], dtype=dtype)

    fqns: tuple[str, ...] = r["fqns"]
    kinds = col("kinds", np.int8)
    files = tuple(r["files"])
    file_col = col("file", np.int32)
    ranks_of_files = np.array([rank_of_file(f) for f in files] + [-1], dtype=np.int32)
    rank = ranks_of_files[file_col]  # -1 index -> the trailing -1
    chunks = ChunkColumns(
        col("entry", np.int32), col("coord_start", np.int64), col("offsets", np.int64),
        col("sizes", np.int64), file_col, col("byte_offset", np.int64), col("byte_length", np.int64),
        rank, col("transform", np.int16),
    )  # fmt: skip
    bytes_items: dict[int, tuple[int, int, int, int]] = r["bytes_items"]
    warnings: list[str] = []
    if r["has_storage"]:
        missing = r.get("missing_chunks")
        if missing is not None:
            count, e = missing
            warnings.append(f"{count} chunk(s) have no storage location, e.g. a chunk of {fqns[e]!r}")
        missing_bytes = [fqns[i] for i in np.flatnonzero(kinds == KIND_BYTES) if int(i) not in bytes_items]
        if missing_bytes:
            warnings.append(
                f"{len(missing_bytes)} bytes item(s) have no storage location, e.g. {missing_bytes[0]!r}"
            )
    smd: dict[str, Any] = r["storage_meta"]
    try:
        modules = list(smd.get("modules") or [])
    except TypeError:  # the reference raises this TypeError itself: let it
        return None
    attrs = {
        "version": r["version"],
        "checkpoint_id": None if smd.get("checkpoint_id") is None else str(smd.get("checkpoint_id")),
        "save_id": smd.get("save_id"),
        "modules": modules,
    }
    return CheckpointIndex(
        format="dcp",
        fqns=fqns,
        kinds=kinds,
        dtypes=r["dtypes"],
        shapes=r["shapes"],
        chunk_start=col("chunk_start", np.int64),
        chunks=chunks,
        files=files,
        transforms=tuple(r["transforms"]),
        bytes_items=bytes_items,
        planner_data=r["planner_data"],
        attrs=attrs,
        warnings=tuple(warnings),
    )
