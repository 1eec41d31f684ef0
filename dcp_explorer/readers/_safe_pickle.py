"""A restricted unpickler for DCP's ``.metadata``: known globals only, no torch.

``.metadata`` is a plain pickle that torch reads with an unrestricted ``pickle.load``:
opening an untrusted checkpoint with torch can execute code.  Here ``find_class`` maps
exactly the globals a real file references (DCP_FORMAT.md §1) to small torch-free
stand-ins and refuses every other global, naming it.  Nothing from the file is ever
called except these stand-ins.
"""

from __future__ import annotations

import io
import pickle
from pathlib import PurePosixPath, PureWindowsPath
from typing import IO, Any

from ..errors import MetadataError, UnsafePickleError

__all__ = ["DType", "load_metadata_pickle", "ALLOWED_GLOBALS"]

# torch dtypes a checkpoint may name (STACK_GLOBAL 'torch' '<name>')
_TORCH_DTYPES = frozenset(
    [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "complex128",
        "complex64",
        "complex32",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "qint8",
        "quint8",
        "qint32",
        "quint4x2",
        "quint2x4",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bits16",
        "double",
        "float",
        "half",
        "cfloat",
        "cdouble",
        "long",
        "int",
        "short",
        "uint1",
        "uint2",
        "uint3",
        "uint4",
        "uint5",
        "uint6",
        "uint7",
        "int1",
        "int2",
        "int3",
        "int4",
        "int5",
        "int6",
        "int7",
    ]
)
_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "cfloat": "complex64",
            "cdouble": "complex128", "long": "int64", "int": "int32", "short": "int16"}  # fmt: skip


class DType(str):
    """A torch dtype named in a pickle, kept as its name (``"float32"``)."""

    __slots__ = ()


def _dtype(name: str) -> DType:
    return DType(_ALIASES.get(name, name))


class _Obj:
    """Stand-in for a pickled dataclass: its state becomes the instance ``__dict__``."""


class Metadata(_Obj):
    """Stand-in for ``torch.distributed.checkpoint.metadata.Metadata``."""


class TensorStorageMetadata(_Obj):
    """Stand-in for ``TensorStorageMetadata(properties, size, chunks)``."""


class BytesStorageMetadata(_Obj):
    """Stand-in for ``BytesStorageMetadata()``."""


class ChunkStorageMetadata(_Obj):
    """Stand-in for ``ChunkStorageMetadata(offsets, sizes)``."""


class MetadataIndex(_Obj):
    """Stand-in for ``MetadataIndex(fqn, offset, index)`` (hashed by identity)."""


class StorageMeta(_Obj):
    """Stand-in for ``StorageMeta(checkpoint_id, save_id, load_id, modules)``."""


class StorageInfo(_Obj):
    """Stand-in for ``filesystem._StorageInfo(relative_path, offset, length, transform_descriptors)``."""


class TensorProperties:
    """Stand-in for ``TensorProperties``; pickled as a 5-tuple state."""

    __slots__ = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state
        elif isinstance(state, dict):  # older torch pickled the dataclass dict
            self.dtype = state.get("dtype")
            self.layout = state.get("layout")
            self.requires_grad = state.get("requires_grad", False)
            self.memory_format = state.get("memory_format", 0)
            self.pin_memory = state.get("pin_memory", False)
        else:
            raise pickle.UnpicklingError(
                f"TensorProperties state is {type(state).__name__}, expected a 5-tuple"
            )


def _layout(name: Any) -> str:
    return str(name).removeprefix("torch.")


def _mem_format(value: Any) -> int:
    if not isinstance(value, int):
        raise pickle.UnpicklingError(f"_MEM_FORMAT_ENCODING({value!r}) is not an int")
    return value


def _posix_path(*parts: Any) -> str:
    return str(PurePosixPath(*(str(p) for p in parts)))


def _windows_path(*parts: Any) -> str:
    return str(PureWindowsPath(*(str(p) for p in parts)))


_M = "torch.distributed.checkpoint.metadata"
#: (module, name) -> stand-in; everything else is refused.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    (_M, "Metadata"): Metadata,
    (_M, "TensorStorageMetadata"): TensorStorageMetadata,
    (_M, "BytesStorageMetadata"): BytesStorageMetadata,
    (_M, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_M, "TensorProperties"): TensorProperties,
    (_M, "MetadataIndex"): MetadataIndex,
    (_M, "StorageMeta"): StorageMeta,
    (_M, "_MEM_FORMAT_ENCODING"): _mem_format,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): StorageInfo,
    ("torch", "Size"): tuple,
    ("torch.serialization", "_get_layout"): _layout,
    ("pathlib", "PosixPath"): _posix_path,
    ("pathlib", "PurePosixPath"): _posix_path,
    ("pathlib", "WindowsPath"): _windows_path,
    ("pathlib", "PureWindowsPath"): _windows_path,
    ("collections", "OrderedDict"): dict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and name in _TORCH_DTYPES:
            return _dtype(name)
        raise UnsafePickleError(
            f"refused to load global '{module}.{name}': a DCP .metadata file only references "
            "torch's checkpoint metadata classes, torch.Size, dtypes and pathlib paths. Nothing "
            "from the file was executed. If you trust this file and it comes from a custom "
            "planner, load it with torch instead.",
            path=self._path,
            global_name=f"{module}.{name}",
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refused persistent id {pid!r}: DCP metadata has none", path=self._path)


def _guard(data: bytes, scanner: bool = True) -> tuple[str, str] | None:
    """What in ``data`` would make CPython's unpickler allocate memory the input does not justify.

    ``("memo", message)``: a memo index out of sequence and >= 4 Mi (it would grow its memo array to
    twice the index and zero it: GBs from a few bytes); ``("truncated", message)``: a length field
    past the end of the input (it would fail there). The C scanner's linear walk when it is built,
    else (or with ``scanner=False``) :mod:`pickletools`, 100 times slower.
    """
    if scanner:
        try:
            from . import _dcpscan
        except ImportError:  # pragma: no cover - depends on the build
            pass
        else:
            return _dcpscan.memo_guard(data)
    import pickletools

    puts = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name == "MEMOIZE":
                puts += 1
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                # (their argument is the memo index, always an int)
                if isinstance(arg, int) and arg >= 1 << 22 and arg > puts:
                    return "memo", f"memo index {arg} is out of sequence after {puts} entries"
                puts += 1
    except ValueError:  # truncated or not an opcode: the unpickler fails there too
        return None
    return None


def load_metadata_pickle(file: IO[bytes] | bytes, path: str) -> Any:
    """Unpickle a DCP ``.metadata`` with the allow-list; returns the stand-in objects.

    Parameters
    ----------
    file
        A binary file object positioned at the start of the pickle, or the bytes.
    path
        Name of the file, for error messages.

    Raises
    ------
    UnsafePickleError
        The pickle references a global outside the allow-list.
    MetadataError
        The pickle is truncated or garbled.
    """
    import gc

    data = bytes(file) if isinstance(file, (bytes, bytearray, memoryview)) else file.read()
    problem = _guard(data)  # before CPython's unpickler sees it: it would allocate first
    if problem is not None:
        kind, msg = problem
        if kind == "truncated":
            raise MetadataError(f"file ends in the middle of the pickle (truncated? was the save interrupted?): {msg}",
                                path=path)  # fmt: skip
        raise MetadataError(f"not a valid DCP metadata pickle ({msg}); refused before unpickling", path=path)
    up = _RestrictedUnpickler(io.BytesIO(data), path)
    # millions of small objects: the cyclic GC would rescan them again and again
    enabled = gc.isenabled()
    gc.disable()
    try:
        return up.load()
    except UnsafePickleError:
        raise
    except EOFError as e:
        raise MetadataError(
            "file ends in the middle of the pickle (truncated? was the save interrupted?)", path=path
        ) from e
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError, RecursionError, UnicodeDecodeError) as e:  # fmt: skip
        raise MetadataError(f"not a valid DCP metadata pickle ({type(e).__name__}: {e})", path=path) from e
    finally:
        if enabled:
            gc.enable()
