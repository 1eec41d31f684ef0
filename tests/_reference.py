"""Torch-side truth for the foundation tests: what torch itself reports about a checkpoint.

Helpers only (no tests).  Everything here asks torch (or safetensors) rather than
re-implementing the format, so a test comparing dcp_explorer against these can fail
only when dcp_explorer and torch disagree.
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from typing import Any

#: Samples read through torch's ``QuantizedHuggingFaceStorageReader``.
QUANTIZED = frozenset({"fp8_block", "mxfp4"})

_PER_RANK = re.compile(r"^__(\d+)\.metadata$")


def sample_names() -> tuple[str, ...]:
    """The sample names, for parametrizing at collection time (no torch import)."""
    try:
        from dcp_explorer.samples import SAMPLE_NAMES

        return tuple(SAMPLE_NAMES)
    except ImportError:  # samples.py not there yet
        return (
            "llama_fsdp_ws1", "llama_fsdp_ws2", "llama_fsdp_ws4", "llama_fsdp_tp_2x2", "mixed",
            "mixed_per_rank", "mixed_zstd", "hf_rank0", "hf_distributed", "hf_consolidated",
            "fp8_block", "mxfp4",
        )  # fmt: skip


def per_rank_ranks(path: os.PathLike[str] | str) -> list[int]:
    """Ranks of the ``__{rank}.metadata`` files in ``path``."""
    return sorted(int(m.group(1)) for n in os.listdir(path) if (m := _PER_RANK.match(n)))


def sample_kind(name: str, path: os.PathLike[str] | str) -> str:
    """``"dcp"``, ``"dcp_per_rank"``, ``"hf_quantized"`` or ``"hf"`` (from the files torch wrote)."""
    names = os.listdir(path)
    if ".metadata" in names:
        return "dcp"
    if per_rank_ranks(path):
        return "dcp_per_rank"
    if name in QUANTIZED:
        return "hf_quantized"
    assert any(n.endswith(".safetensors") for n in names), f"{path} holds no checkpoint: {names}"
    return "hf"


def torch_reader(kind: str, path: os.PathLike[str] | str) -> Any:
    """torch's own storage reader for a sample of ``kind``."""
    from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
    from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

    path = str(path)
    if kind in ("dcp", "dcp_per_rank"):
        return FileSystemReader(path)
    if kind == "hf_quantized":
        return QuantizedHuggingFaceStorageReader(path)
    return HuggingFaceStorageReader(path)


def torch_metadata(kind: str, path: os.PathLike[str] | str, rank: int | None = None) -> Any:
    """``read_metadata()`` of torch's reader (``rank=`` for per-rank metadata)."""
    reader = torch_reader(kind, path)
    return reader.read_metadata(rank=rank) if rank is not None else reader.read_metadata()


def dtype_name(dt: Any) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dt).removeprefix("torch.")


def element_size(dtype: str) -> int:
    """Bytes per element of the torch dtype called ``dtype``, asked from torch."""
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def torch_load_flat(path: os.PathLike[str] | str, storage_reader: Any = None) -> dict[str, Any]:
    """Every entry of a checkpoint loaded by torch (no process group), flattened to fqn -> value."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if storage_reader is not None:
            sd = _load_state_dict_from_keys(storage_reader=storage_reader)
        else:
            sd = _load_state_dict_from_keys(checkpoint_id=str(path))
    flat, _mapping = flatten_state_dict(sd)
    return flat


def snapshot(root: os.PathLike[str] | str) -> dict[str, tuple[str, int, int]]:
    """Every path under ``root`` (itself included) -> (type, size, mtime_ns)."""
    root = pathlib.Path(root)
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (
            "d" if p.is_dir() else "f",
            st.st_size if p.is_file() else 0,
            st.st_mtime_ns,
        )
    return out


def tensor_bytes(t: Any) -> bytes:
    """The raw little-endian bytes of a CPU tensor (any dtype, 0-d and empty included)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
