"""Export selected tensors to safetensors (streaming, sharded with an index) or ``torch.save``.

safetensors output is written tensor by tensor: the header is computed from the metadata
first, then each tensor is loaded, converted and appended, so memory stays at about one
tensor.  Above ``max_shard_size`` the output is split into ``model-0000i-of-0000N.safetensors``
files plus ``model.safetensors.index.json``, the layout Hugging Face and torch's
``HuggingFaceStorageReader`` read.  Never writes inside the source checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DcpExplorerError
from .model import KIND_BYTES, itemsize
from .readers.safetensors import SAFETENSORS_DTYPES

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["export"]

_CODE = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX = "model.safetensors.index.json"


def _rename(fqn: str, rename: Any) -> str:
    if rename is None:
        return fqn
    if callable(rename):
        return str(rename(fqn))
    for old, new in rename.items() if isinstance(rename, Mapping) else rename:
        if fqn.startswith(old):
            return new + fqn[len(old) :]
    return fqn


def _inside(out: Path, root: str | None) -> bool:
    if root is None:
        return False
    try:
        out.resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def export(
    ckpt: Checkpoint,
    selection: Any,
    out: str | os.PathLike[str],
    *,
    format: str = "safetensors",
    dtype: Any = None,
    rename: Mapping[str, str] | Callable[[str], str] | None = None,
    dequantize: bool = True,
    max_shard_size: int = 5 << 30,
    progress: bool | None = None,
) -> list[Path]:
    """Write selected tensors to ``out``; returns the files written.

    Parameters
    ----------
    selection
        As for :meth:`Checkpoint.load` (bytes entries are skipped for safetensors).
    out
        A directory (created) for ``format="safetensors"``, a file path for ``"torch"``.
    dtype
        Cast every tensor (``"bfloat16"``, ``torch.float16``...).
    rename
        ``{"old_prefix": "new_prefix"}`` or a callable fqn -> new fqn.
    max_shard_size
        Bytes per safetensors file before starting a new one (one tensor never splits).
    """
    import torch

    from .load import select

    root = ckpt.store.root if ckpt.store.is_local else None
    out = Path(out)
    if _inside(out, root):
        raise DcpExplorerError(f"refusing to write inside the checkpoint directory ({out})", path=ckpt.path)
    names = select(ckpt.index, selection)
    idx = ckpt.index
    loader = ckpt.loader
    want = (
        None
        if dtype is None
        else (getattr(torch, str(dtype).removeprefix("torch.")) if isinstance(dtype, str) else dtype)
    )

    def bar(it: Any, total: int) -> Any:
        if progress or (progress is None and total > 8):
            from tqdm.auto import tqdm

            return tqdm(it, total=total, desc="exporting", unit="tensor")
        return it

    def counter(total: int) -> Any:
        if progress or (progress is None and total > 8):
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="exporting", unit="tensor")
        return None

    if format == "torch":
        result: dict[str, Any] = {}
        for n in bar(names, len(names)):
            e = idx.entry_index(n)
            if idx.kinds[e] == KIND_BYTES:
                result[_rename(n, rename)] = loader.load_object(n)
            else:
                result[_rename(n, rename)] = loader.load_tensor(n, dtype=want, dequantize=dequantize)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, out)
        return [out]
    if format != "safetensors":
        raise ValueError(f"format must be 'safetensors' or 'torch', got {format!r}")

    # plan the files from the metadata alone
    plan: list[tuple[str, str, str, tuple[int, ...]]] = []  # (fqn, new name, dtype, shape)
    for n in names:
        e = idx.entry_index(n)
        if idx.kinds[e] == KIND_BYTES:
            continue
        q = idx.quant.get(e)
        if q is not None and dequantize:
            dt, shape = "float32", tuple(q["logical_shape"])
        elif q is not None:
            dt, shape = idx.dtypes[e] or "uint8", tuple(q["stored_shape"])
        else:
            dt, shape = idx.dtypes[e] or "uint8", tuple(idx.shapes[e])
        if want is not None:
            dt = str(want).removeprefix("torch.")
        if dt not in _CODE:
            raise DcpExplorerError(f"{n!r} has dtype {dt}, which safetensors cannot store", path=ckpt.path)
        plan.append((n, _rename(n, rename), dt, shape))
    seen: dict[str, str] = {}
    for n, new, _, _ in plan:
        if new in seen:
            raise DcpExplorerError(f"rename maps both {seen[new]!r} and {n!r} to {new!r}", path=ckpt.path)
        seen[new] = n
    shards: list[list[tuple[str, str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for item in plan:
        nb = int(math.prod(item[3]) * itemsize(item[2]))
        if shards[-1] and size + nb > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nb
    out.mkdir(parents=True, exist_ok=True)
    nfiles = len(shards)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    pbar = counter(len(plan))
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if nfiles == 1 else f"model-{i + 1:05d}-of-{nfiles:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for _n, new, dt, shape in shard:
            nb = int(math.prod(shape) * itemsize(dt))
            header[new] = {"dtype": _CODE[dt], "shape": list(shape), "data_offsets": [pos, pos + nb]}
            pos += nb
            weight_map[new] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = out / fname
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for n, _new, dt, shape in shard:
                t = loader.load_tensor(n, dtype=want, dequantize=dequantize).contiguous()
                if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dt:
                    raise DcpExplorerError(f"{n!r} loaded as {t.dtype} {list(t.shape)}, planned {dt} {list(shape)}",
                                           path=ckpt.path)  # fmt: skip
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
                if pbar is not None:
                    pbar.update(1)
        os.replace(tmp, path)
        files.append(path)
        total += pos
    if pbar is not None:
        pbar.close()
    if nfiles > 1:
        with open(out / INDEX, "w") as fi:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fi, indent=2)
        files.append(out / INDEX)
    return files
