"""pandas views of a checkpoint; every column is documented and its name is stable.

Pure functions of a :class:`~dcp_explorer.model.CheckpointIndex` (and file sizes);
:class:`~dcp_explorer.checkpoint.Checkpoint` exposes them as properties.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .model import KIND_BYTES, KIND_NAMES, CheckpointIndex, itemsize

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["tensors_table", "chunks_table", "files_table", "modules_table", "chunk_nbytes"]


_I64_MAX = (1 << 63) - 1


def _entry_itemsize(index: CheckpointIndex) -> np.ndarray:
    return np.array([itemsize(d) for d in index.dtypes], dtype=np.float64)


def chunk_nbytes(index: CheckpointIndex) -> np.ndarray:
    """int64: raw element bytes of every chunk (numel x itemsize of the stored dtype)."""
    c = index.chunks
    if len(c) == 0:
        return np.zeros(0, np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        return _clip_i64(c.numels().astype(np.float64) * _entry_itemsize(index)[c.entry])


def _clip_i64(x: np.ndarray) -> np.ndarray:
    """float64 byte counts as int64, clipped: a damaged file's sizes can multiply past int64 (its
    chunk-layout warnings say so); tables show the clipped value, not a wrapped or undefined one."""
    big = float(np.nextafter(2.0**63, 0))
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=big, neginf=-big), -big, big).astype(np.int64)


def tensors_table(index: CheckpointIndex) -> pd.DataFrame:
    """One row per entry (tensor or bytes item), in the checkpoint's order.

    Columns
    -------
    fqn : str
        Flat fully-qualified name.
    kind : str
        ``"tensor"`` or ``"bytes"``.
    dtype : str or None
        torch dtype name (stored dtype; ``None`` for bytes items).
    shape : tuple of int
        Global logical shape (for MXFP4 ``_blocks``, the dequantized shape, as torch reports).
    numel : int
        Elements of the global tensor (0 for bytes).
    nbytes : int
        Raw bytes of the stored chunks (for bytes items, the stored item's length).
    num_chunks : int
        Stored chunks.
    quant : str or None
        ``None``, ``"fp8_block"`` or ``"mxfp4"``.
    """
    import pandas as pd

    n = len(index.fqns)
    numel = np.array(
        [
            min(max(int(np.prod(s, dtype=np.float64)), -_I64_MAX), _I64_MAX) if k != KIND_BYTES else 0
            for s, k in zip(index.shapes, index.kinds, strict=True)
        ],
        dtype=np.int64,
    )  # fmt: skip (absurd shapes clip)
    per_chunk = chunk_nbytes(index)
    nbytes = np.zeros(n, np.int64)
    if len(per_chunk):
        nbytes = np.add.reduceat(np.append(per_chunk, 0), np.minimum(index.chunk_start[:-1], len(per_chunk)))
        nbytes[np.diff(index.chunk_start) == 0] = 0
    for e, (_f, _o, ln, _t) in index.bytes_items.items():
        nbytes[e] = ln
    return pd.DataFrame(
        {
            "fqn": pd.Series(index.fqns, dtype=object),
            "kind": pd.Series([KIND_NAMES[int(k)] for k in index.kinds], dtype=object),
            "dtype": pd.Series(index.dtypes, dtype=object),
            "shape": pd.Series(index.shapes, dtype=object),
            "numel": numel,
            "nbytes": nbytes.astype(np.int64),
            "num_chunks": np.diff(index.chunk_start).astype(np.int64),
            "quant": pd.Series(
                [index.quant[i]["format"] if i in index.quant else None for i in range(n)], dtype=object
            ),
        }
    )


def _factorize_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and first-occurrence positions of the distinct rows of a 2-D int array (hash based, O(n*d))."""
    import pandas as pd

    codes = np.zeros(len(block), np.int64)
    for j in range(block.shape[1]):
        col_codes, uniq = pd.factorize(block[:, j])
        codes = codes * max(1, len(uniq)) + col_codes
        codes, _ = pd.factorize(codes)
        codes = codes.astype(np.int64)
    n_uniq = int(codes.max()) + 1 if len(codes) else 0
    first = np.full(n_uniq, len(codes), np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    return codes, first


def _ragged_tuples(flat: np.ndarray, coord_start: np.ndarray) -> np.ndarray:
    """Rows of a ragged int array as an object array of tuples.

    Equal rows share one tuple object (a 3.5 M-chunk checkpoint has only thousands of
    distinct offsets), so this is fast and small.
    """
    m = len(coord_start) - 1
    out = np.empty(m, dtype=object)
    nd = np.diff(coord_start)
    for d in np.unique(nd).tolist():
        rows = np.flatnonzero(nd == d)
        if d == 0:
            out[rows] = [()] * len(rows)
            continue
        block = flat[coord_start[rows][:, None] + np.arange(d)]
        codes, first = _factorize_rows(block)
        uniq = np.empty(len(first), dtype=object)
        uniq[:] = list(map(tuple, block[first].tolist()))
        out[rows] = uniq[codes]
    return out


def chunks_table(index: CheckpointIndex) -> pd.DataFrame:
    """One row per stored tensor chunk, grouped by tensor in checkpoint order.

    Columns
    -------
    fqn : category
        Tensor the chunk belongs to.
    chunk : int
        Position in the tensor's chunk list (DCP's ``MetadataIndex.index``).
    offsets : tuple of int
        Global offset of the chunk's first element.
    sizes : tuple of int
        Shape of the chunk.
    nbytes : int
        Raw element bytes (numel x itemsize).
    rank : int
        Saving rank from the file name (``__{rank}_{n}.distcp``, ``shard-{rank+1}-...``); -1 unknown.
    file : category
        File holding the chunk, relative to the checkpoint root.
    byte_offset : int
        Offset of the stored item in the file (DCP: start of the item's ``torch.save`` zip;
        safetensors: start of the raw tensor bytes).
    byte_length : int
        Length of the stored item (DCP: the whole zip item, compressed length if transformed).
    transform : category
        Storage transform such as ``"stream.zstd/1"``; missing when stored as is.
    """
    import pandas as pd

    c = index.chunks
    m = len(c)
    pos = np.arange(m, dtype=np.int64) - index.chunk_start[c.entry] if m else np.zeros(0, np.int64)
    files = pd.Categorical.from_codes(c.file.astype(np.int64), categories=pd.Index(index.files, dtype=object)) \
        if index.files else pd.Categorical([None] * m)  # fmt: skip
    transforms = pd.Categorical.from_codes(c.transform.astype(np.int64), categories=pd.Index(index.transforms, dtype=object)) \
        if index.transforms else pd.Categorical([None] * m, categories=pd.Index([], dtype=object))  # fmt: skip
    return pd.DataFrame(
        {
            "fqn": pd.Categorical.from_codes(
                c.entry.astype(np.int64), categories=pd.Index(index.fqns, dtype=object)
            ),
            "chunk": pos,
            "offsets": pd.Series(_ragged_tuples(c.offsets, c.coord_start), dtype=object),
            "sizes": pd.Series(_ragged_tuples(c.sizes, c.coord_start), dtype=object),
            "nbytes": chunk_nbytes(index),
            "rank": c.rank.astype(np.int64),
            "file": files,
            "byte_offset": c.byte_offset,
            "byte_length": c.byte_length,
            "transform": transforms,
        }
    )


def files_table(index: CheckpointIndex, sizes: Mapping[str, int | None]) -> pd.DataFrame:
    """One row per data file referenced by the metadata.

    Columns
    -------
    file : str
        Path relative to the checkpoint root.
    size_on_disk : Int64
        Bytes on disk (``<NA>`` when the file is missing).
    num_items : int
        Stored items in the file (tensor chunks + bytes items).
    ranks : tuple of int
        Saving ranks whose chunks are in the file.
    tensor_bytes : int
        Raw element bytes of the tensor chunks in the file.
    stored_bytes : int
        Sum of the items' byte lengths (DCP: includes per-item zip overhead).
    """
    import pandas as pd

    nf = len(index.files)
    c = index.chunks
    valid = c.file >= 0
    fid = c.file[valid].astype(np.int64)
    num_items = np.bincount(fid, minlength=nf)
    tensor_bytes = np.bincount(fid, weights=chunk_nbytes(index)[valid], minlength=nf)
    stored = np.bincount(fid, weights=np.maximum(c.byte_length[valid], 0), minlength=nf)
    for f, _o, ln, _t in [*index.bytes_items.values(), *(c[1:] for c in index.bytes_copies)]:
        if f >= 0:
            num_items[f] += 1
            stored[f] += ln
    ranks: list[tuple[int, ...]] = [()] * nf
    if len(fid):
        import pandas as pd

        base = int(c.rank.max(initial=0)) + 2
        keys = np.sort(pd.unique(fid * base + (c.rank[valid].astype(np.int64) + 1)))
        groups: dict[int, list[int]] = {}
        for k in keys.tolist():
            f, r = divmod(k, base)
            if r > 0:
                groups.setdefault(f, []).append(r - 1)
        ranks = [tuple(groups.get(i, ())) for i in range(nf)]
    return pd.DataFrame(
        {
            "file": pd.Series(index.files, dtype=object),
            "size_on_disk": pd.array([sizes.get(f) for f in index.files], dtype="Int64"),
            "num_items": num_items.astype(np.int64),
            "ranks": pd.Series(ranks, dtype=object),
            "tensor_bytes": _clip_i64(tensor_bytes),
            "stored_bytes": stored.astype(np.int64),
        }
    )


def modules_table(index: CheckpointIndex, depth: int = 2) -> pd.DataFrame:
    """Bytes and element counts aggregated by the first ``depth`` components of each fqn.

    Columns
    -------
    module : str
        fqn prefix (``depth`` dot-separated components; numeric components such as layer
        indices count as components).
    num_tensors : int
        Tensor entries under the prefix.
    num_bytes_items : int
        Bytes items under the prefix.
    numel : int
        Elements (parameter count for model weights) under the prefix.
    nbytes : int
        Raw bytes under the prefix.
    num_chunks : int
        Stored chunks under the prefix.
    """
    t = tensors_table(index)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    mod = t["fqn"].map(lambda f: ".".join(f.split(".")[:depth]))
    is_t = t["kind"] == "tensor"
    g = t.assign(module=mod, is_tensor=is_t.astype(np.int64), is_bytes=(~is_t).astype(np.int64)).groupby(
        "module", sort=False
    )
    out = g.agg(
        num_tensors=("is_tensor", "sum"),
        num_bytes_items=("is_bytes", "sum"),
        numel=("numel", "sum"),
        nbytes=("nbytes", "sum"),
        num_chunks=("num_chunks", "sum"),
    ).reset_index()
    return out
