"""One base error, with subclasses that also inherit the builtin a caller would catch.

Every message says what was found, what was expected, and names the file.
"""

from __future__ import annotations

__all__ = [
    "DcpExplorerError",
    "NotACheckpointError",
    "MetadataError",
    "UnsafePickleError",
    "ChunkFileMissing",
    "ByteRangeError",
    "SafetensorsHeaderError",
    "IndexFileError",
    "UnsupportedError",
    "ReadTimeoutError",
    "MemoryBudgetError",
]


class DcpExplorerError(Exception):
    """Base class of every error raised by dcp_explorer.

    Parameters
    ----------
    message
        What was found, what was expected, what to do.
    path
        The file (or directory) the error is about, when there is one.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)


class NotACheckpointError(DcpExplorerError, FileNotFoundError):
    """The path is not a checkpoint any reader recognises (the message lists what was looked for)."""


class MetadataError(DcpExplorerError, ValueError):
    """A metadata file (``.metadata``, ``index.json``, ``DCP_SHARDING_INFO``) is truncated or garbled."""


class UnsafePickleError(MetadataError):
    """A pickle references a global outside the allow-list; nothing from it was executed."""

    def __init__(self, message: str, *, path: str | None = None, global_name: str | None = None) -> None:
        self.global_name = global_name
        super().__init__(message, path=path)


class ChunkFileMissing(DcpExplorerError, FileNotFoundError):
    """A data file referenced by the metadata does not exist."""


class ByteRangeError(DcpExplorerError, ValueError):
    """A byte range recorded in the metadata lies past the end of its file."""


class SafetensorsHeaderError(MetadataError):
    """A safetensors header is invalid: length past the end of file, bad JSON, bad entries."""


class IndexFileError(MetadataError):
    """``model.safetensors.index.json`` is invalid or names a file that does not exist."""


class UnsupportedError(DcpExplorerError, NotImplementedError):
    """The checkpoint uses a feature this version of dcp_explorer does not handle."""


class ReadTimeoutError(DcpExplorerError, TimeoutError):
    """A remote read got no answer in time (``$DCP_EXPLORER_TIMEOUT`` seconds, default 60)."""


class MemoryBudgetError(DcpExplorerError, MemoryError):
    """A load would allocate more than the memory budget (``max_bytes=``, ``$DCP_EXPLORER_MAX_LOAD_BYTES``)."""
