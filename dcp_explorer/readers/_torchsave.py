"""Locate a tensor's raw bytes inside a ``torch.save`` zip item, without torch and without executing it.

Each DCP item is a complete ``torch.save`` archive whose members are *stored* (not
compressed), with tensor storage 64-byte aligned.  We read the zip's central directory,
parse ``data.pkl`` with an allow-list unpickler (``_rebuild_tensor_v2/v3``, typed storage
classes, ``OrderedDict``) and return where the elements are: the item can then be read
partially (a sub-rectangle) straight from the file.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any

from ..errors import DcpExplorerError, MetadataError, UnsafePickleError

__all__ = ["TensorLayout", "WindowFile", "tensor_layout", "load_plain_object", "STORAGE_DTYPES"]

#: what :mod:`zipfile` raises on a damaged archive (bad headers, unknown versions or compression,
#: encryption flags, undecodable names, offsets out of range)
_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError, OverflowError, KeyError,
    IndexError, struct.error, zlib.error,  # a member stored compressed, with a broken stream
)  # fmt: skip
try:
    import lzma

    _ZIP_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover - Python built without lzma
    pass

#: legacy typed storage class -> dtype name
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
}  # fmt: skip


class WindowFile(io.RawIOBase):
    """A read-only, seekable view of ``[start, start+length)`` of another binary file."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, start, length, 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        self.bytes_read += len(data)
        return len(data)


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """Where a ``torch.save``-d tensor's elements are, relative to the start of the item."""

    data_offset: int
    """Offset of the storage's first byte from the start of the item."""
    storage_nbytes: int
    """Size of the storage member in bytes."""
    dtype: str
    """torch dtype name."""
    shape: tuple[int, ...]
    """Tensor shape."""
    stride: tuple[int, ...]
    """Tensor strides, in elements."""
    storage_offset: int
    """Offset of the tensor's first element in the storage, in elements."""


class _Storage:
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: str | None, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel


class _Rebuilt:
    __slots__ = ("storage", "storage_offset", "size", "stride", "dtype")

    def __init__(self, storage: _Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                 dtype: str | None) -> None:  # fmt: skip
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, size, stride
        self.dtype = dtype


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype


def _rebuild_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _Rebuilt:
    return _Rebuilt(storage, int(storage_offset), tuple(size), tuple(stride), None)


def _rebuild_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                dtype: Any, *rest: Any) -> _Rebuilt:  # fmt: skip
    return _Rebuilt(storage, int(storage_offset), tuple(size), tuple(stride), str(dtype))


class _ItemPickle(pickle.Unpickler):
    """An allow-list unpickler of one stored item's ``data.pkl`` (``raw``), read from ``where``."""

    def __init__(self, raw: bytes, where: str) -> None:
        super().__init__(io.BytesIO(raw))
        self._where = where

    def load_checked(self, what: str) -> Any:
        """``load()``, with a malformed pickle raised as :class:`MetadataError` ``"{what} (its error)"``
        (a refused global stays an :class:`UnsafePickleError`)."""
        try:
            return self.load()
        except UnsafePickleError:
            raise
        except Exception as e:  # noqa: BLE001 - any malformed pickle
            raise MetadataError(f"{what} ({type(e).__name__}: {e})", path=self._where) from e


class _TensorPickle(_ItemPickle):
    def find_class(self, module: str, name: str) -> Any:
        from ._safe_pickle import _TORCH_DTYPES, _dtype

        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch" and name in _TORCH_DTYPES:
            return _dtype(name)
        if module == "collections" and name == "OrderedDict":
            return dict
        raise UnsafePickleError(
            f"refused global '{module}.{name}' in a saved tensor item: only plain tensors are read",
            path=self._where, global_name=f"{module}.{name}",
        )  # fmt: skip

    def persistent_load(self, pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
        ):
            raise MetadataError(f"unexpected persistent id {pid!r} in a saved tensor item", path=self._where)
        return _Storage(pid[1].dtype, str(pid[2]), int(pid[4]))


def _members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    out = {}
    for info in zf.infolist():
        name = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
        out[name] = info
    return out


def _data_start(f: IO[bytes] | io.RawIOBase, info: zipfile.ZipInfo, where: str) -> int:
    f.seek(info.header_offset)
    name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
    head = f.read(30 + len(name))
    if len(head) != 30 + len(name) or head[:4] != b"PK\x03\x04":
        raise MetadataError("zip local header not found where the central directory says", path=where)
    name_len: int
    extra_len: int
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if head[30:] != name or name_len != len(name):
        # the directory points at another member's header: reading there would return its bytes
        raise MetadataError(f"zip central directory and local header disagree on the name of {info.orig_filename!r} "
                            "(corrupt item?)", path=where)  # fmt: skip
    return info.header_offset + 30 + name_len + extra_len


def _read_data_pkl(
    item: IO[bytes] | io.RawIOBase, where: str, what: str, limit: int
) -> tuple[dict[str, zipfile.ZipInfo], bytes]:
    """The members of the ``torch.save`` archive ``item`` and the bytes of its ``data.pkl`` (at most
    ``limit`` bytes); ``what`` names the item in the errors (``"stored item"``).

    Raises
    ------
    MetadataError
        Not a zip, no ``data.pkl``, ``data.pkl`` too large or unreadable.
    """
    try:
        zf = zipfile.ZipFile(item)
    except DcpExplorerError:  # a read that failed (timeout, file cut): not the zip's fault
        raise
    except _ZIP_ERRORS as e:
        raise MetadataError(f"{what} is not a torch.save zip archive ({e})", path=where) from e
    with zf:
        mem = _members(zf)
        pk = mem.get("data.pkl")
        if pk is None:
            raise MetadataError(f"{what} has no data.pkl member", path=where)
        if pk.file_size > limit:
            raise MetadataError(f"data.pkl of the {what} is {pk.file_size} bytes; refusing", path=where)
        try:
            return mem, zf.read(pk)
        except DcpExplorerError:  # a read that failed (timeout, file cut): not the zip's fault
            raise
        except _ZIP_ERRORS as e:
            raise MetadataError(f"cannot read data.pkl from the {what} ({e})", path=where) from e


def tensor_layout(item: IO[bytes] | io.RawIOBase, where: str) -> TensorLayout:
    """Parse a ``torch.save`` archive (a seekable binary file object over exactly the item, such as
    a :class:`WindowFile`).

    Raises
    ------
    MetadataError
        Not a zip, members compressed, no tensor inside.
    UnsafePickleError
        ``data.pkl`` names a global outside the allow-list.
    """
    mem, raw = _read_data_pkl(item, where, "stored item", 1 << 20)
    obj = _TensorPickle(raw, where).load_checked("data.pkl of the stored item is not a saved tensor")
    if not isinstance(obj, _Rebuilt) or not isinstance(obj.storage, _Storage):
        raise MetadataError(f"stored item holds a {type(obj).__name__}, expected a tensor", path=where)
    dtype = obj.dtype or obj.storage.dtype
    if dtype is None:
        raise MetadataError("stored tensor has no dtype", path=where)
    sm = mem.get(f"data/{obj.storage.key}")
    if sm is None:
        raise MetadataError(f"stored item has no storage member data/{obj.storage.key}", path=where)
    if sm.compress_type != zipfile.ZIP_STORED:
        raise MetadataError("tensor storage inside the item is compressed; expected stored", path=where)
    start = _data_start(item, sm, where)
    return TensorLayout(start, sm.file_size, dtype, tuple(int(s) for s in obj.size),
                        tuple(int(s) for s in obj.stride), obj.storage_offset)  # fmt: skip


# --- plain objects (bytes entries) ---------------------------------------------------------
# what protocol-2 pickles of plain containers reference (sets, complex numbers, slices, and
# bytes via _codecs.encode); nothing that can allocate from a length or touch the system
_SAFE_BUILTINS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("collections", "OrderedDict"): dict,
}  # fmt: skip


def _codecs_encode(s: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
    return s.encode("latin-1")


class _PlainPickle(_ItemPickle):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode
        obj = _SAFE_BUILTINS.get((module, name))
        if obj is not None:
            return obj
        raise UnsafePickleError(
            f"refused global '{module}.{name}' in a bytes entry: only plain Python containers, numbers, "
            "strings and bytes are decoded. Pass trusted=True to unpickle it with torch (this can run code "
            "from the file).",
            path=self._where, global_name=f"{module}.{name}",
        )  # fmt: skip

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"bytes entry holds a tensor or storage (persistent id {pid!r}); pass trusted=True to load it",
            path=self._where,
        )


def load_plain_object(item: IO[bytes], where: str) -> Any:
    """Decode a bytes entry (a ``torch.save`` archive of a plain object) with the allow-list."""
    _, raw = _read_data_pkl(item, where, "stored bytes item", 256 << 20)
    return _PlainPickle(raw, where).load_checked("bytes item does not unpickle")
