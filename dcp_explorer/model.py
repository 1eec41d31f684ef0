"""The checkpoint as data: a small frozen, columnar model shared by every reader.

A checkpoint is a list of *entries* (tensors or bytes items, addressed by their flat
fully-qualified name, ``fqn``), each tensor cut into *chunks* stored at a byte range
of a file.  A 405B model saved on 1024 ranks has 3.5 million chunks, so chunks are
kept as numpy columns (:class:`ChunkColumns`), never as millions of Python objects;
row objects (:class:`TensorInfo`, :class:`ChunkInfo`) are made on demand.

This module is pure: it imports neither torch nor any plotting or widget library.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DTYPE_ITEMSIZE",
    "KIND_TENSOR",
    "KIND_BYTES",
    "TensorInfo",
    "ChunkInfo",
    "ChunkColumns",
    "CheckpointIndex",
    "itemsize",
]

KIND_TENSOR = 0
KIND_BYTES = 1
KIND_NAMES = ("tensor", "bytes")

#: Bytes per element of every dtype dcp_explorer knows, by torch name (no ``torch.`` prefix).
DTYPE_ITEMSIZE: dict[str, float] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
    "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 0.5, "quint2x4": 0.25,
}  # fmt: skip


def itemsize(dtype: str | None) -> float:
    """Bytes per element of ``dtype`` (a torch dtype name); 0 when unknown or ``None``."""
    if dtype is None:
        return 0
    return DTYPE_ITEMSIZE.get(dtype, 0)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One entry of a checkpoint (a row of :attr:`Checkpoint.tensors`)."""

    fqn: str
    """Flat fully-qualified name, e.g. ``model.layers.0.attention.wq.weight``."""
    kind: str
    """``"tensor"`` or ``"bytes"`` (a pickled non-tensor object)."""
    dtype: str | None
    """torch dtype name without the ``torch.`` prefix (``None`` for bytes items)."""
    shape: tuple[int, ...]
    """Global (logical) shape; ``()`` for 0-d tensors and bytes items."""
    num_chunks: int
    """How many stored chunks make up the tensor (0 for bytes items)."""
    quant: str | None = None
    """``None``, ``"fp8_block"`` or ``"mxfp4"`` for quantized weights."""

    @property
    def numel(self) -> int:
        """Number of elements of the global tensor (0 for bytes items)."""
        return math.prod(self.shape) if self.kind == "tensor" else 0

    @property
    def nbytes(self) -> int:
        """Raw bytes of the global tensor (``numel * itemsize``)."""
        return int(self.numel * itemsize(self.dtype))


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One stored chunk of a tensor (a row of :attr:`Checkpoint.chunks`)."""

    fqn: str
    """The tensor the chunk belongs to."""
    chunk: int
    """Position in the tensor's chunk list (DCP's ``MetadataIndex.index``)."""
    offsets: tuple[int, ...]
    """Global offset of the chunk's first element, per dim."""
    sizes: tuple[int, ...]
    """Shape of the chunk."""
    nbytes: int
    """Raw bytes of the chunk's elements."""
    rank: int
    """Saving rank (from the file name), -1 when the format does not record it."""
    file: str | None
    """File holding the chunk, relative to the checkpoint root."""
    byte_offset: int
    """Offset of the stored item in ``file`` (-1 when unknown)."""
    byte_length: int
    """Length of the stored item in ``file`` (for DCP, the whole ``torch.save`` item)."""
    transform: str | None
    """Storage transform, e.g. ``"stream.zstd/1"`` (``None`` when stored as is)."""


def _empty_i64(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


@dataclass(frozen=True)
class ChunkColumns:
    """All chunks of a checkpoint as numpy columns (one row per chunk).

    Rows are grouped by tensor (in entry order) and, within a tensor, ordered as the
    format lists them (DCP: saving-rank order, the order of ``TensorStorageMetadata.chunks``).
    Offsets and sizes are ragged: chunk ``i`` has ``coord_start[i+1] - coord_start[i]``
    dims, at ``offsets[coord_start[i]:coord_start[i+1]]``.
    """

    entry: np.ndarray
    """int32: index of the chunk's entry in :class:`CheckpointIndex`."""
    coord_start: np.ndarray
    """int64, length ``n + 1``: start of each chunk's coordinates in ``offsets``/``sizes``."""
    offsets: np.ndarray
    """int64: flat global offsets."""
    sizes: np.ndarray
    """int64: flat chunk sizes."""
    file: np.ndarray
    """int32: index into :attr:`CheckpointIndex.files` (-1 unknown)."""
    byte_offset: np.ndarray
    """int64: offset of the stored item in its file (-1 unknown)."""
    byte_length: np.ndarray
    """int64: length of the stored item in its file (-1 unknown)."""
    rank: np.ndarray
    """int32: saving rank (-1 unknown)."""
    transform: np.ndarray
    """int16: index into :attr:`CheckpointIndex.transforms` (-1 none)."""

    def __len__(self) -> int:
        return len(self.entry)

    @classmethod
    def empty(cls) -> ChunkColumns:
        """No chunks."""
        z = _empty_i64
        return cls(
            np.zeros(0, np.int32), z(1), z(), z(), np.zeros(0, np.int32), z(), z(),
            np.zeros(0, np.int32), np.zeros(0, np.int16),
        )  # fmt: skip

    def numels(self) -> np.ndarray:
        """int64: elements per chunk (a 0-d chunk has 1)."""
        if len(self.entry) == 0:
            return _empty_i64()
        sizes = self.sizes
        starts = self.coord_start[:-1]
        ndim = np.diff(self.coord_start)
        out = np.ones(len(self.entry), dtype=np.int64)
        # product over the ragged rows: log of zeros is a problem, so loop over max ndim
        for d in range(int(ndim.max(initial=0))):
            has = ndim > d
            out[has] *= sizes[starts[has] + d]
        return out

    def validate(self) -> None:
        """Check the columns are consistent; raises ``ValueError`` when not."""
        n = len(self.entry)
        for name in ("file", "byte_offset", "byte_length", "rank", "transform"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name} has {len(getattr(self, name))} rows, expected {n}")
        if len(self.coord_start) != n + 1 or self.coord_start[-1] != len(self.offsets):
            raise ValueError("coord_start does not match offsets")
        if len(self.offsets) != len(self.sizes):
            raise ValueError("offsets and sizes differ in length")


@dataclass(frozen=True)
class CheckpointIndex:
    """A whole checkpoint's metadata, columnar; what every reader returns.

    Entries (tensors and bytes items) are in the format's own order (for DCP, the key
    order of ``Metadata.state_dict_metadata``).
    """

    format: str
    """Reader that produced it, e.g. ``"dcp"``, ``"safetensors"``, ``"hf_quantized"``."""
    fqns: tuple[str, ...]
    """Flat names of all entries."""
    kinds: np.ndarray
    """int8 per entry: :data:`KIND_TENSOR` or :data:`KIND_BYTES`."""
    dtypes: tuple[str | None, ...]
    """torch dtype name per entry (``None`` for bytes)."""
    shapes: tuple[tuple[int, ...], ...]
    """Global shape per entry."""
    chunk_start: np.ndarray
    """int64, length ``entries + 1``: entry ``e``'s chunks are rows ``chunk_start[e]:chunk_start[e+1]``."""
    chunks: ChunkColumns
    """All tensor chunks."""
    files: tuple[str, ...]
    """Data files, relative to the checkpoint root (with ``/`` separators)."""
    transforms: tuple[str, ...] = ()
    """Distinct storage transforms (``"stream.zstd/1"``...), indexed by ``ChunkColumns.transform``."""
    bytes_items: Mapping[int, tuple[int, int, int, int]] = field(default_factory=dict)
    """Entry index of each bytes item -> (file index, byte offset, byte length, transform index)."""
    bytes_copies: tuple[tuple[int, int, int, int, int], ...] = ()
    """Further stored copies of bytes items, as (entry, file index, byte offset, byte length, transform
    index): with per-rank metadata (``use_collectives=False``) every rank stores its own copy, and
    :attr:`bytes_items` holds only the first."""
    quant: Mapping[int, dict[str, Any]] = field(default_factory=dict)
    """Entry index of each quantized tensor -> its description (format, partner, block size, stored shape...)."""
    planner_data: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    """DCP: flat fqn -> path into the original nested state dict."""
    attrs: Mapping[str, Any] = field(default_factory=dict)
    """Format-level facts: DCP version, save id, metadata files, safetensors ``__metadata__``..."""
    warnings: tuple[str, ...] = ()
    """Problems found while reading that did not stop it."""

    def __len__(self) -> int:
        return len(self.fqns)

    @property
    def num_chunks(self) -> int:
        """Total number of tensor chunks."""
        return len(self.chunks)

    def entry_index(self, fqn: str) -> int:
        """Index of ``fqn`` among the entries; ``KeyError`` when absent."""
        lookup: dict[str, int] | None = self.__dict__.get("_lookup")
        if lookup is None:
            lookup = {f: i for i, f in enumerate(self.fqns)}
            object.__setattr__(self, "_lookup", lookup)
        return lookup[fqn]

    def tensor_info(self, i: int) -> TensorInfo:
        """Row object of entry ``i``."""
        q = self.quant.get(i)
        return TensorInfo(
            fqn=self.fqns[i],
            kind=KIND_NAMES[int(self.kinds[i])],
            dtype=self.dtypes[i],
            shape=self.shapes[i],
            num_chunks=int(self.chunk_start[i + 1] - self.chunk_start[i]),
            quant=None if q is None else q["format"],
        )

    def iter_tensors(self) -> Iterator[TensorInfo]:
        """Every entry as a :class:`TensorInfo`."""
        for i in range(len(self.fqns)):
            yield self.tensor_info(i)

    def chunk_info(self, row: int) -> ChunkInfo:
        """Row object of chunk row ``row``."""
        c = self.chunks
        e = int(c.entry[row])
        a, b = int(c.coord_start[row]), int(c.coord_start[row + 1])
        sizes = tuple(int(x) for x in c.sizes[a:b])
        f = int(c.file[row])
        t = int(c.transform[row])
        return ChunkInfo(
            fqn=self.fqns[e],
            chunk=row - int(self.chunk_start[e]),
            offsets=tuple(int(x) for x in c.offsets[a:b]),
            sizes=sizes,
            nbytes=int(math.prod(sizes) * itemsize(self.dtypes[e])),
            rank=int(c.rank[row]),
            file=self.files[f] if f >= 0 else None,
            byte_offset=int(c.byte_offset[row]),
            byte_length=int(c.byte_length[row]),
            transform=self.transforms[t] if t >= 0 else None,
        )

    def chunks_of(self, fqn: str) -> list[ChunkInfo]:
        """The chunks of one tensor, in stored order."""
        e = self.entry_index(fqn)
        return [self.chunk_info(r) for r in range(int(self.chunk_start[e]), int(self.chunk_start[e + 1]))]
