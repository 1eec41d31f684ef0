"""dcp_explorer: look inside PyTorch distributed checkpoints and safetensors checkpoints.

>>> import dcp_explorer as dx
>>> from dcp_explorer.samples import sample_path
>>> ckpt = dx.open(sample_path("llama_fsdp_tp_2x2"))  # a DCP directory, safetensors file/dir or URL
>>> len(ckpt.tensors), len(ckpt.chunks), len(ckpt.files)  # pandas tables
(96, 243, 4)

Importing this package imports neither torch nor any plotting or widget library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import *  # noqa: F403 - every error class is public; errors.__all__ lists them

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .diff import CheckpointDiff
    from .plan import LoadPlan

__version__ = "0.1.0"

__all__ = ["__version__", "open", "simulate_load", "diff", "Checkpoint", "LoadPlan"]
__all__ += errors.__all__


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
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> ckpt = dcp_explorer.open(sample_path("llama_fsdp_ws4"))
    >>> ckpt.format, ckpt.summary()["saving_ranks"]
    ('dcp', 4)
    >>> int(ckpt.tensors.query("kind == 'tensor'").nbytes.max())
    72288
    """
    from .checkpoint import open_checkpoint

    return open_checkpoint(
        path, format=format, rank=rank, strict=strict, cache=cache, storage_options=storage_options
    )


def simulate_load(ckpt: Any, mesh: Any = 1, placements: Any = None, **kwargs: Any) -> LoadPlan:
    """Simulate ``dcp.load`` of a checkpoint on every rank of a target mesh; see :func:`dcp_explorer.plan.simulate_load`.

    ``ckpt`` may be a :class:`Checkpoint` or a path (opened with :func:`open`).

    Examples
    --------
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> plan = dcp_explorer.simulate_load(sample_path("llama_fsdp_ws4"), "dp_shard=2,tp=2", preset="fsdp_tp")
    >>> plan.ok, plan.world_size, plan.problems
    (True, 4, ())
    """
    from .plan import simulate_load as _simulate

    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = open(ckpt)
    return _simulate(ckpt, mesh, placements, **kwargs)


def diff(a: Any, b: Any, **kwargs: Any) -> CheckpointDiff:
    """Compare two checkpoints (structure, then values, streaming); see :func:`dcp_explorer.diff.diff`.

    ``a`` and ``b`` may be paths (DCP, safetensors/HF, ``torch.save`` files), opened
    :class:`Checkpoint` objects or state dicts. Importing the submodule ``dcp_explorer.diff``
    makes this attribute the module, which is callable the same way.

    Examples
    --------
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> d = dcp_explorer.diff(sample_path("llama_fsdp_ws4"), sample_path("llama_fsdp_ws2"), progress=False)
    >>> d.equal, d.summary()["changes"]  # the same values, saved on 4 and on 2 ranks
    (True, {'layout': 77})
    """
    from .diff import diff as _diff

    return _diff(a, b, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Checkpoint":
        from .checkpoint import Checkpoint

        return Checkpoint
    if name == "LoadPlan":
        from .plan import LoadPlan

        return LoadPlan
    raise AttributeError(f"module 'dcp_explorer' has no attribute {name!r}")
