"""dcp_explorer: look inside PyTorch distributed checkpoints and safetensors checkpoints.

>>> import dcp_explorer as dx
>>> ckpt = dx.open("path/to/checkpoint")          # doctest: +SKIP
>>> ckpt.tensors, ckpt.chunks, ckpt.files          # doctest: +SKIP

Importing this package imports neither torch nor any plotting or widget library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import (
    ByteRangeError,
    ChunkFileMissing,
    DcpExplorerError,
    IndexFileError,
    MetadataError,
    NotACheckpointError,
    SafetensorsHeaderError,
    UnsafePickleError,
    UnsupportedError,
)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "open",
    "Checkpoint",
    "DcpExplorerError",
    "NotACheckpointError",
    "MetadataError",
    "UnsafePickleError",
    "ChunkFileMissing",
    "ByteRangeError",
    "SafetensorsHeaderError",
    "IndexFileError",
    "UnsupportedError",
]


def open(  # noqa: A001 - the public verb, like xarray.open_dataset
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    rank: int | None = None,
    strict: bool = True,
    cache: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Open a checkpoint's metadata for inspection; no tensor data is read, nothing is written.

    Parameters
    ----------
    path
        A checkpoint directory, a single ``.safetensors`` file, or an fsspec URL
        (``s3://bucket/ckpt``).
    format
        Force a reader (``"dcp"`` or ``"safetensors"``) instead of guessing.
    rank
        DCP saved with ``use_collectives=False``: read only ``__{rank}.metadata``
        (default: all per-rank metadata files, merged).
    strict
        Raise when a referenced data file is missing or a byte range passes the end of
        its file; with ``False`` those problems are collected in ``ckpt.warnings``.
    cache
        Reuse (and store) the parsed DCP metadata in the user cache directory
        (``$DCP_EXPLORER_CACHE``), keyed by location, size and mtime.
    storage_options
        Passed to fsspec for remote locations.

    Returns
    -------
    Checkpoint

    Raises
    ------
    NotACheckpointError
        No reader recognises the location (the message lists what was looked for).
    MetadataError
        Metadata is truncated or garbled (:class:`UnsafePickleError` when a pickle
        references a global that is not allowed: nothing is executed).
    ChunkFileMissing, ByteRangeError
        With ``strict=True``, when data files are missing or too short.

    Examples
    --------
    >>> ckpt = dcp_explorer.open("/checkpoints/step-1000")      # doctest: +SKIP
    >>> ckpt.tensors.sort_values("nbytes").tail()               # doctest: +SKIP
    """
    from .checkpoint import open_checkpoint

    return open_checkpoint(
        path, format=format, rank=rank, strict=strict, cache=cache, storage_options=storage_options
    )


def __getattr__(name: str) -> Any:
    if name == "Checkpoint":
        from .checkpoint import Checkpoint

        return Checkpoint
    raise AttributeError(f"module 'dcp_explorer' has no attribute {name!r}")
