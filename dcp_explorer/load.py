"""The only code that reads tensor bytes: selected tensors (or slices of them) into the notebook.

For every chunk a selection touches, only the byte ranges it needs are read: safetensors
tensors are raw row-major bytes; a DCP item is a ``torch.save`` zip whose storage member is
stored uncompressed, so it is located (:mod:`dcp_explorer.readers._torchsave`) and read
partially.  zstd items are decompressed whole (their size capped by the metadata).  Local
files are read with ``readinto`` straight into the output where the layout allows; remote
files with ranged requests through fsspec.  Bytes read are counted in :attr:`Loader.stats`.
"""

from __future__ import annotations

import fnmatch
import io
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ByteRangeError, ChunkFileMissing, MemoryBudgetError, MetadataError, UnsupportedError
from .model import KIND_BYTES, CheckpointIndex, itemsize
from .readers._torchsave import TensorLayout, WindowFile, load_plain_object, tensor_layout

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint

__all__ = [
    "Loader",
    "IOStats",
    "select",
    "parse_slices",
    "RAW_NUMPY",
    "DEFAULT_MAX_LOAD_BYTES",
    "max_load_bytes",
    "tensor_stats",
]

#: Largest decompressed bytes entry (a ``torch.save`` of plain containers) decoded without ``trusted=True``.
BYTES_ITEM_CAP = 64 << 20

#: Default memory budget of one ``load`` call (bytes of the results); ``$DCP_EXPLORER_MAX_LOAD_BYTES``
#: overrides it, ``max_bytes=`` overrides both (``max_bytes=None``: no limit).
DEFAULT_MAX_LOAD_BYTES = 8 << 30


def max_load_bytes() -> int:
    """The default memory budget of a load: ``$DCP_EXPLORER_MAX_LOAD_BYTES``, else :data:`DEFAULT_MAX_LOAD_BYTES`."""
    env = os.environ.get("DCP_EXPLORER_MAX_LOAD_BYTES")
    try:
        return int(float(env)) if env else DEFAULT_MAX_LOAD_BYTES
    except ValueError:
        return DEFAULT_MAX_LOAD_BYTES


#: numpy dtype holding the raw bits of each torch dtype (bf16/fp8 are reinterpreted by torch)
RAW_NUMPY: dict[str, str] = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2",
    "complex128": "<c16", "complex64": "<c8", "int64": "<i8", "int32": "<i4", "int16": "<i2",
    "int8": "i1", "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "?",
    "float8_e4m3fn": "u1", "float8_e5m2": "u1", "float8_e4m3fnuz": "u1", "float8_e5m2fnuz": "u1",
    "float8_e8m0fnu": "u1", "float4_e2m1fn_x2": "u1",
}  # fmt: skip

_GLOB = re.compile(r"[*?\[]")


def select(index: CheckpointIndex, selection: Any) -> list[str]:
    """fqns matching ``selection``: an fqn, a glob, ``"re:<regex>"``, a compiled regex, or a list of these.

    Raises
    ------
    KeyError
        An exact name is absent, or a pattern matches nothing.
    """
    items = [selection] if isinstance(selection, (str, re.Pattern)) else list(selection)
    out: dict[str, None] = {}
    names = index.fqns
    for s in items:
        if isinstance(s, re.Pattern) or (isinstance(s, str) and s.startswith("re:")):
            rx = s if isinstance(s, re.Pattern) else re.compile(s[3:])
            hits = [f for f in names if rx.search(f)]
        elif isinstance(s, str) and _GLOB.search(s) and not _is_name(index, s):
            hits = [f for f in names if fnmatch.fnmatchcase(f, s)]
        else:
            try:
                index.entry_index(str(s))
            except KeyError:
                import difflib

                close = difflib.get_close_matches(str(s), names, n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise KeyError(f"{s!r} is not in the checkpoint{hint}") from None
            hits = [str(s)]
        if not hits:
            raise KeyError(f"{s!r} matches no entry of the checkpoint")
        out.update(dict.fromkeys(hits))
    return list(out)


def _is_name(index: CheckpointIndex, s: str) -> bool:
    """Whether ``s`` is an entry's exact name (names may contain ``*?[``: then they are not patterns)."""
    try:
        index.entry_index(s)
    except KeyError:
        return False
    return True


def parse_slices(spec: Any, shape: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Normalise a slice spec to ``(starts, stops, steps, squeeze_dims)`` over ``shape``.

    ``spec``: a tuple of ints/slices/``Ellipsis``, a single int or slice, or a string like
    ``"0:10, :, 3"``.
    """
    if spec is None:
        spec = ()
    if isinstance(spec, str):
        parts: list[object] = []  # ints, slices and Ellipsis
        for p in spec.split(","):
            p = p.strip()
            if p in ("...", "…"):
                parts.append(Ellipsis)
            elif ":" in p:
                bits = [int(x) if x.strip() else None for x in p.split(":")]
                if len(bits) > 3:
                    raise ValueError(f"bad slice {p!r}")
                parts.append(slice(*bits))
            elif p:
                parts.append(int(p))
        spec = tuple(parts)
    if not isinstance(spec, tuple):
        spec = (spec,)
    nd = len(shape)
    if sum(s is Ellipsis for s in spec) > 1:
        raise ValueError("at most one ... in a slice")
    if Ellipsis in spec:
        i = spec.index(Ellipsis)
        fill = nd - (len(spec) - 1)
        spec = spec[:i] + (slice(None),) * fill + spec[i + 1 :]
    if len(spec) > nd:
        raise IndexError(f"{len(spec)} indices for a {nd}-d tensor of shape {tuple(shape)}")
    spec = spec + (slice(None),) * (nd - len(spec))
    starts: list[int] = []
    stops: list[int] = []
    steps: list[int] = []
    squeeze: list[int] = []
    for d, (s, n) in enumerate(zip(spec, shape, strict=True)):
        if isinstance(s, (int, np.integer)):
            i = int(s) + (n if s < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {s} is out of bounds for dim {d} of size {n}")
            starts.append(i)
            stops.append(i + 1)
            steps.append(1)
            squeeze.append(d)
        elif isinstance(s, slice):
            a, b, st = s.indices(n)
            if st <= 0:
                raise ValueError("negative slice steps are not supported")
            b = max(a, b)
            starts.append(a)
            stops.append(b)
            steps.append(st)
        else:
            raise TypeError(f"cannot index with {s!r}")
    return starts, stops, steps, squeeze


@dataclass
class IOStats:
    """Bytes and requests the loader issued (all files together)."""

    bytes_read: int = 0
    requests: int = 0
    items_opened: int = 0
    by_file: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int) -> None:
        self.bytes_read += n
        self.requests += 1
        self.by_file[name] = self.by_file.get(name, 0) + n


class _Source:
    """Reads byte ranges of one checkpoint file, counting them."""

    TAIL = 4096

    def __init__(self, loader: Loader, name: str) -> None:
        self.loader, self.name = loader, name
        store = loader.ckpt.store
        self.local = store.local_path(name)
        self.where = store.display(name)
        self._fh: Any = None

    def _file(self) -> Any:
        if self._fh is None:
            if self.local is not None:
                self._fh = open(self.local, "rb", buffering=0)  # noqa: SIM115 - closed by Loader.close
            else:
                self._fh = self.loader.ckpt.store.open(self.name, block_size=0, cache_type="none")
        return self._fh

    def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        if n == 0:
            return
        from .store import _timeouts

        with self.loader._lock, _timeouts(self.where):
            try:
                f = self._file()
                f.seek(offset)
                got = 0
                while got < n:
                    if hasattr(f, "readinto"):
                        k = f.readinto(buf[got:])
                    else:
                        data = f.read(n - got)
                        k = len(data)
                        buf[got : got + k] = data
                    if not k:
                        break
                    got += k
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
                raise ChunkFileMissing(f"cannot read the data file ({e.strerror or e}): deleted or replaced since "
                                       "the checkpoint was opened?", path=self.where) from e  # fmt: skip
        self.loader.stats.add(self.name, got)
        if got != n:
            raise ByteRangeError(f"file ended after {offset + got} bytes, expected data up to {offset + n}",
                                 path=self.where)  # fmt: skip

    def read(self, offset: int, n: int) -> bytes:
        b = bytearray(n)
        self.readinto(offset, memoryview(b))
        return bytes(b)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _TailWindow(WindowFile):
    """A window over an item that serves its last bytes (zip directory) from one prefetched read."""

    def __init__(self, src: _Source, start: int, length: int) -> None:
        super().__init__(io.BytesIO(), start, length)
        self._src = src
        t = min(length, _Source.TAIL)
        self._tail_at = length - t
        self._tail = src.read(start + self._tail_at, t)

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        if self._pos >= self._tail_at:
            a = self._pos - self._tail_at
            b[:n] = self._tail[a : a + n]
        else:
            n = min(n, self._tail_at - self._pos)  # never straddle: zipfile reads small headers
            b[:n] = self._src.read(self._start + self._pos, n)
        self._pos += n
        return n


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Where one chunk's elements are: a file region (``src``) or decompressed memory (``mem``)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    file_offset: int  # absolute offset of element 0 (file) or offset in ``mem``
    mem: bytes | None = None


class Loader:
    """Reads tensors of one checkpoint; keeps open files and parsed item layouts.

    Parameters
    ----------
    ckpt
        An opened :class:`~dcp_explorer.checkpoint.Checkpoint`.
    """

    SMALL_ITEM = 64 << 10
    """DCP items up to this size are read whole (one request) instead of located and read partially."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.index = ckpt.index
        self.stats = IOStats()
        self._sources: dict[str, _Source] = {}
        self._layouts: dict[int, _Chunk] = {}
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close every open file."""
        for s in self._sources.values():
            s.close()
        self._sources.clear()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _src(self, name: str) -> _Source:
        s = self._sources.get(name)
        if s is None:
            s = self._sources[name] = _Source(self, name)
        return s

    # -- items ------------------------------------------------------------------------------
    def _decompressed(self, src: _Source, offset: int, length: int, transform: str, cap: int) -> bytes:
        raw = src.read(offset, length)
        if transform.startswith("stream.zstd"):
            import zstandard

            try:
                with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as r:
                    out = r.read(cap + 1)
            except zstandard.ZstdError as e:
                raise MetadataError(
                    f"item at byte {offset} is not a valid zstd frame ({e})", path=src.where
                ) from e
            if len(out) > cap:
                raise MetadataError(f"zstd item at byte {offset} decompresses to more than {cap} bytes, which its "
                                    "metadata allows: refusing (decompression bomb?)", path=src.where)  # fmt: skip
            return out
        raise UnsupportedError(f"storage transform {transform!r} is not supported", path=src.where)

    def chunk_source(self, row: int) -> _Chunk:
        """Locate the elements of chunk row ``row`` (cached)."""
        ch = self._layouts.get(row)
        if ch is not None:
            return ch
        idx = self.index
        c = idx.chunks
        e = int(c.entry[row])
        dtype = idx.dtypes[e] or "uint8"
        a, b = int(c.coord_start[row]), int(c.coord_start[row + 1])
        sizes = tuple(int(x) for x in c.sizes[a:b])
        f = int(c.file[row])
        if f < 0:
            raise MetadataError(f"chunk {row - int(idx.chunk_start[e])} of {idx.fqns[e]!r} has no storage location",
                                path=self.ckpt.path)  # fmt: skip
        src = self._src(idx.files[f])
        off, length = int(c.byte_offset[row]), int(c.byte_length[row])
        t = int(c.transform[row])
        if idx.format != "dcp":
            # safetensors: raw row-major bytes at byte_offset
            ch = _Chunk(_stored_shape(idx, e, sizes), _cstride(_stored_shape(idx, e, sizes)), dtype, off)
        elif t >= 0:
            isz = np.dtype(RAW_NUMPY.get(dtype, "u1")).itemsize
            cap = math.prod(sizes) * isz + (1 << 20)
            mem = self._decompressed(src, off, length, idx.transforms[t], cap)
            lay = tensor_layout(io.BytesIO(mem), f"{src.where} (item at byte {off})")
            ch = self._from_layout(lay, sizes, dtype, 0, src, mem)
        elif length <= self.SMALL_ITEM:
            # small item: one read of the whole item beats a directory read plus a data read
            mem = src.read(off, length)
            lay = tensor_layout(io.BytesIO(mem), f"{src.where} (item at byte {off})")
            ch = self._from_layout(lay, sizes, dtype, 0, src, mem)
        else:
            lay = tensor_layout(_TailWindow(src, off, length), f"{src.where} (item at byte {off})")
            ch = self._from_layout(lay, sizes, dtype, off, src, None, length)
        self.stats.items_opened += 1
        self._layouts[row] = ch
        return ch

    def _from_layout(self, lay: TensorLayout, sizes: tuple[int, ...], dtype: str, base: int, src: _Source,
                     mem: bytes | None, item_length: int | None = None) -> _Chunk:  # fmt: skip
        end = len(mem) if mem is not None else item_length
        if end is not None and lay.data_offset + lay.storage_nbytes > end:
            raise MetadataError(f"the item's zip directory puts its tensor storage at bytes [{lay.data_offset}, "
                                f"{lay.data_offset + lay.storage_nbytes}) of an item of {end} bytes: the zip "
                                "directory is wrong (corrupt item?)", path=src.where)  # fmt: skip
        if lay.shape != sizes:
            raise MetadataError(f"stored item holds shape {list(lay.shape)}, the metadata says {list(sizes)}",
                                path=src.where)  # fmt: skip
        if lay.dtype != dtype:
            raise MetadataError(f"stored item holds {lay.dtype}, the metadata says {dtype}", path=src.where)
        isz = np.dtype(RAW_NUMPY[dtype]).itemsize
        span = (
            0
            if not sizes or 0 in sizes
            else sum((s - 1) * st for s, st in zip(sizes, lay.stride, strict=True)) + 1
        )
        if (lay.storage_offset + span) * isz > lay.storage_nbytes and span:
            raise MetadataError("stored tensor's view runs past its storage", path=src.where)
        return _Chunk(sizes, lay.stride, dtype, base + lay.data_offset + lay.storage_offset * isz, mem)

    # -- regions ----------------------------------------------------------------------------
    def read_region(
        self, fqn: str, starts: Sequence[int], stops: Sequence[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw elements of ``fqn[starts:stops]`` (stored dtype's bits) assembled from its chunks.

        Only the chunks that overlap the region are opened, and of each only the bytes the
        region needs are read.
        """
        idx = self.index
        e = idx.entry_index(fqn)
        if idx.kinds[e] == KIND_BYTES:
            raise TypeError(f"{fqn!r} is a bytes entry, not a tensor")
        dtype = idx.dtypes[e] or "uint8"
        if dtype not in RAW_NUMPY:
            raise UnsupportedError(f"dtype {dtype} of {fqn!r} cannot be read")
        shape_out = tuple(int(b) - int(a) for a, b in zip(starts, stops, strict=True))
        if out is None:
            out = np.empty(shape_out, dtype=RAW_NUMPY[dtype])
        a_req = np.asarray(starts, np.int64)
        b_req = np.asarray(stops, np.int64)
        c = idx.chunks
        nd = len(shape_out)
        filled = 0
        first, last = int(idx.chunk_start[e]), int(idx.chunk_start[e + 1])
        # boxes already copied: a chunk inside one of them (a replicated copy, e.g. every rank's own
        # copy in per-rank metadata) is not read again; a partial overlap makes ``filled`` overcount
        seen_lo = np.empty((last - first, nd), np.int64)
        seen_hi = np.empty((last - first, nd), np.int64)
        nseen, overlap = 0, False
        for row in range(first, last):
            ca = int(c.coord_start[row])
            co = c.offsets[ca : ca + nd]
            cs = c.sizes[ca : ca + nd]
            lo = np.maximum(a_req, co)
            hi = np.minimum(b_req, co + cs)
            if nd and (hi <= lo).any():
                continue
            if nseen:
                sl, sh = seen_lo[:nseen], seen_hi[:nseen]
                if ((sl <= lo).all(axis=1) & (hi <= sh).all(axis=1)).any():
                    continue
                overlap = overlap or bool((np.maximum(sl, lo) < np.minimum(sh, hi)).all(axis=1).any())
            ch = self.chunk_source(row)
            src_sl = tuple(slice(int(x), int(y)) for x, y in zip(lo - co, hi - co, strict=True))
            dst_sl = tuple(slice(int(x), int(y)) for x, y in zip(lo - a_req, hi - a_req, strict=True))
            self._copy(ch, idx.files[int(c.file[row])], src_sl, out[dst_sl] if nd else out)
            filled += int(np.prod(hi - lo)) if nd else 1
            seen_lo[nseen], seen_hi[nseen] = lo, hi
            nseen += 1
        if overlap:  # count covered elements exactly
            mask = np.zeros(shape_out, bool)
            for x, y in zip(seen_lo[:nseen] - a_req, seen_hi[:nseen] - a_req, strict=True):
                mask[tuple(slice(int(i), int(j)) for i, j in zip(x, y, strict=True))] = True
            filled = int(mask.sum())
        if filled < int(np.prod(shape_out)):
            raise MetadataError(f"the chunks of {fqn!r} cover {filled} of the {int(np.prod(shape_out))} requested "
                                "elements: the checkpoint has holes", path=self.ckpt.path)  # fmt: skip
        return out

    def _copy(self, ch: _Chunk, fname: str, src_sl: tuple[slice, ...], dst: np.ndarray) -> None:
        """Copy ``chunk[src_sl]`` into ``dst`` reading as few bytes as possible."""
        raw = np.dtype(RAW_NUMPY[ch.dtype])
        isz = raw.itemsize
        sub = tuple(s.stop - s.start for s in src_sl)
        if 0 in sub:
            return
        if ch.mem is not None:
            arr = np.lib.stride_tricks.as_strided(
                np.frombuffer(ch.mem, dtype=raw, offset=ch.file_offset, count=_span(ch.shape, ch.stride) or 1),
                shape=ch.shape, strides=tuple(s * isz for s in ch.stride), writeable=False)  # fmt: skip
            np.copyto(dst, arr[src_sl])
            return
        src = self._src(fname)
        nd = len(ch.shape)
        if ch.stride != _cstride(ch.shape) and nd:
            # unusual layout: read the whole storage span once
            n = _span(ch.shape, ch.stride)
            buf = np.empty(n, raw)
            # (ndarray.data: the array's memoryview; numpy's stubs declare ndarray a Buffer only for 3.12+)
            src.readinto(ch.file_offset, buf.data.cast("B"))
            arr = np.lib.stride_tricks.as_strided(buf, ch.shape, tuple(s * isz for s in ch.stride))
            np.copyto(dst, arr[src_sl])
            return
        # C-contiguous: the region is runs of the innermost partially covered dims
        k = nd  # first dim from which the region covers whole trailing dims
        while k > 0 and sub[k - 1] == ch.shape[k - 1]:
            k -= 1
        # runs are contiguous over dims [k-1, nd) (dim k-1 partially); leading dims [0, k-1) enumerate runs
        inner = max(k - 1, 0)
        run_elems = int(math.prod(sub[inner:]))
        lead = sub[:inner]
        nruns = int(math.prod(lead)) if lead else 1
        strides = _cstride(ch.shape)
        base = ch.file_offset + sum(s.start * st for s, st in zip(src_sl, strides, strict=True)) * isz
        if nruns == 1:
            if dst.flags.c_contiguous:
                src.readinto(base, dst.reshape(-1).view(np.uint8).data)
            else:
                tmp = np.empty(sub, raw)
                src.readinto(base, tmp.reshape(-1).view(np.uint8).data)
                np.copyto(dst, tmp)
            return
        run_starts = (
            base + (np.indices(lead).reshape(inner, -1).T @ np.asarray(strides[:inner], np.int64)) * isz
        )
        span = int(run_starts[-1] - run_starts[0]) + run_elems * isz
        needed = nruns * run_elems * isz
        if nruns > 64 and span <= 4 * needed:
            # many small runs close together: one read of the whole span, then a strided view
            buf = np.empty(span // isz, raw)
            src.readinto(int(run_starts[0]), buf.data.cast("B"))
            view = np.lib.stride_tricks.as_strided(buf, shape=sub, strides=tuple(st * isz for st in strides),
                                                   writeable=False)  # fmt: skip
            np.copyto(dst, view)
            return
        tmp = np.empty((nruns, run_elems), raw)
        for i, r in enumerate(run_starts.tolist()):
            src.readinto(int(r), tmp[i].data.cast("B"))
        np.copyto(dst, tmp.reshape(sub))

    # -- public -----------------------------------------------------------------------------
    def load_object(self, fqn: str, *, trusted: bool = False) -> Any:
        """Decode a bytes entry (restricted unpickler unless ``trusted``)."""
        idx = self.index
        e = idx.entry_index(fqn)
        loc = idx.bytes_items.get(e)
        if loc is None:
            raise MetadataError(f"bytes entry {fqn!r} has no storage location", path=self.ckpt.path)
        f, off, length, t = loc
        src = self._src(idx.files[f])
        where = f"{src.where} (bytes item {fqn!r})"
        if t >= 0:  # no size in the metadata: plain objects are small; trusted ones get the load budget
            cap = max(max_load_bytes(), 64 << 20) if trusted else BYTES_ITEM_CAP
            data = self._decompressed(src, off, length, idx.transforms[t], cap)
        else:
            data = src.read(off, length)
        if trusted:
            import torch

            return torch.load(io.BytesIO(data), weights_only=False)
        return load_plain_object(io.BytesIO(data), where)

    def load_tensor(
        self, fqn: str, slices: Any = None, *, dtype: Any = None, dequantize: bool = True
    ) -> torch.Tensor:
        """One tensor (or a slice of it) as a ``torch.Tensor``."""
        import torch

        idx = self.index
        e = idx.entry_index(fqn)
        if idx.kinds[e] == KIND_BYTES:
            raise TypeError(f"{fqn!r} is a bytes entry; use load_object (or ckpt.load) instead")
        q = idx.quant.get(e)
        if q is not None and dequantize:
            from .quant import dequantize_region

            shape = tuple(q["logical_shape"])
            starts, stops, steps, squeeze = parse_slices(slices, shape)
            t = dequantize_region(self, e, starts, stops, dtype=dtype)
        else:
            shape = _stored_shape(idx, e, None) if q is not None else tuple(idx.shapes[e])
            starts, stops, steps, squeeze = parse_slices(slices, shape)
            arr = self.read_region(fqn, starts, stops)
            t = _to_torch(arr, idx.dtypes[e] or "uint8")
        if any(s != 1 for s in steps):
            t = t[tuple(slice(None, None, s) for s in steps)]
        if squeeze:
            t = t[tuple(0 if d in squeeze else slice(None) for d in range(t.dim()))]
        if dtype is not None:
            t = t.to(getattr(torch, str(dtype).removeprefix("torch.")) if isinstance(dtype, str) else dtype)
        return t


def _stored_shape(idx: CheckpointIndex, e: int, sizes: tuple[int, ...] | None) -> tuple[int, ...]:
    """The stored (not logical) shape: MXFP4 ``_blocks`` report the dequantized size as their shape."""
    q = idx.quant.get(e)
    if sizes is not None and (q is None or q.get("format") != "mxfp4"):
        return sizes
    if q is not None and q.get("format") == "mxfp4":
        return tuple(q["stored_shape"]) if sizes is None or len(sizes) != len(q["stored_shape"]) else sizes
    return tuple(idx.shapes[e])


def _cstride(shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    acc = 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(out))


def _span(shape: Sequence[int], stride: Sequence[int]) -> int:
    if not shape:
        return 1
    if 0 in shape:
        return 0
    return sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1


def _to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    import torch

    target = getattr(torch, dtype)
    if arr.size == 0:  # torch.from_numpy gives empty tensors stride 0, which .view(<other itemsize>) rejects
        return torch.empty(arr.shape, dtype=target)
    t = torch.from_numpy(np.ascontiguousarray(arr)) if arr.ndim else torch.from_numpy(np.array(arr))
    if t.dtype != target:
        t = t.view(target)
    return t


def _result_bytes(
    idx: CheckpointIndex, names: Sequence[str], slices: Any, dtype: Any, dequantize: bool
) -> int:
    """Bytes the results of a load take (sliced, cast, dequantized), bytes entries by their stored length."""
    total = 0.0
    for n in names:
        e = idx.entry_index(n)
        if idx.kinds[e] == KIND_BYTES:
            loc = idx.bytes_items.get(e)
            total += loc[2] if loc is not None else 0
            continue
        q = idx.quant.get(e)
        if q is not None and dequantize:
            shape, isz = tuple(q["logical_shape"]), 4.0
        else:
            shape = _stored_shape(idx, e, None) if q is not None else tuple(idx.shapes[e])
            isz = itemsize(idx.dtypes[e])
        if dtype is not None:
            isz = itemsize(str(dtype).removeprefix("torch."))
        sl = slices.get(n) if isinstance(slices, Mapping) else slices
        if sl is None:
            numel = math.prod(shape)
        else:
            starts, stops, steps, _ = parse_slices(sl, shape)
            numel = math.prod(len(range(a, b, s)) for a, b, s in zip(starts, stops, steps, strict=True))
        total += numel * isz
    return int(math.ceil(total))


def load(
    ckpt: Checkpoint,
    selection: Any,
    *,
    slices: Any = None,
    dtype: Any = None,
    dequantize: bool = True,
    trusted: bool = False,
    progress: bool | None = None,
    max_bytes: int | str | None = "default",
) -> Any:
    """See :meth:`dcp_explorer.checkpoint.Checkpoint.load`."""
    single = (
        isinstance(selection, str)
        and not selection.startswith("re:")
        and (not _GLOB.search(selection) or _is_name(ckpt.index, selection))
    )
    names = select(ckpt.index, selection)
    idx = ckpt.index
    if isinstance(max_bytes, str):
        if max_bytes != "default":
            raise ValueError(f"max_bytes must be an int, None or 'default', got {max_bytes!r}")
        max_bytes = max_load_bytes()
    if max_bytes is not None:
        total = _result_bytes(idx, names, slices, dtype, dequantize)
        if total > max_bytes:
            raise MemoryBudgetError(f"selection is {total:,} bytes, more than max_bytes={max_bytes:,}: select fewer "
                                    "tensors, pass slices=, or raise max_bytes (max_bytes=None: no limit; default "
                                    "$DCP_EXPLORER_MAX_LOAD_BYTES or 8 GiB)", path=ckpt.path)  # fmt: skip
    loader = ckpt.loader
    results: dict[str, Any] = {}
    it: Iterable[str] = names
    if progress or (progress is None and len(names) > 8):
        from tqdm.auto import tqdm

        it = tqdm(names, desc="loading", unit="tensor")
    for n in it:
        e = idx.entry_index(n)
        if idx.kinds[e] == KIND_BYTES:
            results[n] = loader.load_object(n, trusted=trusted)
        else:
            sl = slices.get(n) if isinstance(slices, Mapping) else slices
            results[n] = loader.load_tensor(n, sl, dtype=dtype, dequantize=dequantize)
    return results[names[0]] if single else results


def tensor_stats(t: Any) -> dict[str, Any]:
    """shape, dtype, min/max/mean/std and NaN/Inf counts of a loaded tensor (computed in float64).

    Used by ``dcp-explorer load`` and the :class:`~dcp_explorer.widgets.CheckpointBrowser` preview.
    """
    import torch

    out: dict[str, Any] = {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "numel": t.numel(),
    }
    if t.numel() == 0:
        return out
    x = t.to(torch.float64) if not t.is_complex() else t.abs().to(torch.float64)
    finite = torch.isfinite(x)
    out["nan"] = int(torch.isnan(x).sum())
    out["inf"] = int(torch.isinf(x).sum())
    f = x[finite]
    if f.numel():
        out.update(min=float(f.min()), max=float(f.max()), mean=float(f.mean()),
                   std=float(f.std()) if f.numel() > 1 else 0.0)  # fmt: skip
    return out
