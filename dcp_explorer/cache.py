"""Cache of parsed metadata, outside the checkpoint (never inside it).

A parsed :class:`~dcp_explorer.model.CheckpointIndex` is stored as one uncompressed
``.npz`` (numpy columns + a JSON blob) under ``$DCP_EXPLORER_CACHE`` (default
``$XDG_CACHE_HOME/dcp_explorer/metadata`` or ``~/.cache/dcp_explorer/metadata``), keyed by
the location, the reader and the size + mtime (or etag) of the metadata files, so
reopening a 3.5 M-chunk checkpoint takes a fraction of a second.  Writes are atomic
(temporary file + rename); an unreadable cache file is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .model import CheckpointIndex, ChunkColumns

__all__ = ["cache_dir", "cache_key", "load_cached", "store_cached"]

CACHE_VERSION = 3  # 3: chunk-layout warnings (holes, overlaps) are part of the cached index
_COLS = (
    "entry",
    "coord_start",
    "offsets",
    "sizes",
    "file",
    "byte_offset",
    "byte_length",
    "rank",
    "transform",
)


def cache_dir() -> Path:
    """Where parsed metadata is cached."""
    env = os.environ.get("DCP_EXPLORER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dcp_explorer" / "metadata"


def cache_key(*parts: Any) -> str:
    """A file-name-safe hash of ``parts`` (plus the cache format version)."""
    blob = json.dumps([CACHE_VERSION, *parts], default=str, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def store_cached(key: str, index: CheckpointIndex) -> Path | None:
    """Write ``index`` to the cache (atomically); returns the file, or None if it could not."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": index.format,
            "fqns": list(index.fqns),
            "dtypes": list(index.dtypes),
            "shapes": [list(s) for s in index.shapes],
            "files": list(index.files),
            "transforms": list(index.transforms),
            "bytes_items": [[k, *v] for k, v in index.bytes_items.items()],
            "bytes_copies": [list(c) for c in index.bytes_copies],
            "quant": [[k, v] for k, v in index.quant.items()],
            "planner_data": list(index.planner_data.items()),
            "attrs": dict(index.attrs),
            "warnings": list(index.warnings),
        }
        arrays = {f"c_{c}": getattr(index.chunks, c) for c in _COLS}
        arrays["kinds"] = index.kinds
        arrays["chunk_start"] = index.chunk_start
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            final = d / f"{key}.npz"
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return final
    except (OSError, TypeError, ValueError):
        return None


def load_cached(key: str) -> CheckpointIndex | None:
    """The cached index for ``key``, or None when absent or unreadable."""
    path = cache_dir() / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            cols = {c: z[f"c_{c}"] for c in _COLS}
            kinds = z["kinds"]
            chunk_start = z["chunk_start"]
        chunks = ChunkColumns(**cols)
        chunks.validate()
        quant = {}
        for k, v in meta["quant"]:
            v = dict(v)
            for f in ("stored_shape", "logical_shape", "block_size"):
                if isinstance(v.get(f), list):
                    v[f] = tuple(v[f])
            quant[int(k)] = v
        index = CheckpointIndex(
            format=meta["format"],
            fqns=tuple(meta["fqns"]),
            kinds=kinds,
            dtypes=tuple(meta["dtypes"]),
            shapes=tuple(tuple(s) for s in meta["shapes"]),
            chunk_start=chunk_start,
            chunks=chunks,
            files=tuple(meta["files"]),
            transforms=tuple(meta["transforms"]),
            bytes_items={int(k): (int(a), int(b), int(c), int(t)) for k, a, b, c, t in meta["bytes_items"]},
            bytes_copies=tuple(
                (int(e), int(f), int(o), int(n), int(t)) for e, f, o, n, t in meta["bytes_copies"]
            ),
            quant=quant,
            planner_data={k: _tuplify(v) for k, v in meta["planner_data"]},
            attrs=meta["attrs"],
            warnings=tuple(meta["warnings"]),
        )
        if len(index.kinds) != len(index.fqns) or len(index.chunk_start) != len(index.fqns) + 1:
            return None
        return index
    except Exception:  # noqa: BLE001 - any damage means: rebuild
        return None
