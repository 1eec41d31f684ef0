"""Synthetic Llama-shaped DCP checkpoints at the scale of the largest runs.

Built with torch's own ``Metadata`` classes, exactly as ``FileSystemWriter`` would
record an FSDP (Shard(0)) save of a Llama model and its Adam state over ``ranks``
ranks, then pickled the way ``FileSystemWriter.finish`` does.  No tensor data is
written: the ``.metadata`` file plus *sparse* ``.distcp`` files of the right sizes (they
take no disk space), which is all that metadata-level tools read.

Used by the benchmarks (``bench_open``, later ``bench_plan`` and ``bench_widgets``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import time
from pathlib import Path

LLAMA = {
    "405b": dict(layers=126, dim=16384, ffn=53248, vocab=128256, heads=128, kv_heads=8),
    "70b": dict(layers=80, dim=8192, ffn=28672, vocab=128256, heads=64, kv_heads=8),
    "8b": dict(layers=32, dim=4096, ffn=14336, vocab=128256, heads=32, kv_heads=8),
    "tiny": dict(layers=2, dim=256, ffn=688, vocab=1000, heads=8, kv_heads=2),
}

# bytes a torch.save zip adds around each item (measured: ~1.2-1.6 KB)
ITEM_OVERHEAD = 1344


def llama_params(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(fqn, shape) of a Llama model in torchtitan naming, in module order."""
    c = LLAMA[size]
    dim, ffn, vocab = c["dim"], c["ffn"], c["vocab"]
    head_dim = dim // c["heads"]
    kv = c["kv_heads"] * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (vocab, dim))]
    for i in range(c["layers"]):
        p = f"layers.{i}."
        out += [
            (p + "attention.wq.weight", (dim, dim)),
            (p + "attention.wk.weight", (kv, dim)),
            (p + "attention.wv.weight", (kv, dim)),
            (p + "attention.wo.weight", (dim, dim)),
            (p + "feed_forward.w1.weight", (ffn, dim)),
            (p + "feed_forward.w2.weight", (dim, ffn)),
            (p + "feed_forward.w3.weight", (ffn, dim)),
            (p + "attention_norm.weight", (dim,)),
            (p + "ffn_norm.weight", (dim,)),
        ]
    out += [("norm.weight", (dim,)), ("output.weight", (vocab, dim))]
    return out


def _shard0(n: int, k: int, i: int) -> tuple[int, int]:
    """torch.chunk sizing: (start, size) of piece i of n over k."""
    full = -(-n // k)
    start = min(full * i, n)
    return start, max(0, min(n, full * (i + 1)) - start)


def build_metadata(size: str = "405b", ranks: int = 1024, optimizer: bool = True):
    """A torch ``Metadata`` for an FSDP save of Llama-``size`` over ``ranks`` ranks."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    params = llama_params(size)
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    planner: dict[str, tuple] = {}
    for fqn, shape in params:
        entries.append((f"model.{fqn}", shape, torch.float32))
        planner[f"model.{fqn}"] = ("model", fqn)
    if optimizer:
        for fqn, shape in params:
            for st in ("exp_avg", "exp_avg_sq"):
                entries.append((f"optim.state.{fqn}.{st}", shape, torch.float32))
                planner[f"optim.state.{fqn}.{st}"] = ("optim", "state", fqn, st)
            entries.append((f"optim.state.{fqn}.step", (), torch.float32))
            planner[f"optim.state.{fqn}.step"] = ("optim", "state", fqn, "step")

    files = [f"__{r}_0.distcp" for r in range(ranks)]  # one str per file, as torch shares it
    file_pos = [0] * ranks  # running byte offset per rank file
    file_load = [0] * ranks  # dedup planner's running size
    sdm: dict = {}
    storage: dict = {}
    # bytes entries of the param group, written by rank 0 first (bytes come first in a file)
    for key in ("lr", "betas", "eps", "weight_decay", "params"):
        fqn = f"optim.param_groups.0.{key}"
        sdm[fqn] = BytesStorageMetadata()
        planner[fqn] = ("optim", "param_groups", 0, key)
        length = 1100 if key != "params" else 1100 + 40 * len(params)
        storage[MetadataIndex(fqn)] = _StorageInfo(files[0], file_pos[0], length)
        file_pos[0] += length
    for fqn, shape, dtype in entries:
        props = TensorProperties(dtype=dtype)
        chunks = []
        if shape == ():
            # replicated 0-d tensor: deduplicated to the least-loaded rank
            r = min(range(ranks), key=lambda q: (file_load[q], q))
            file_load[r] += 1
            ck = ChunkStorageMetadata(offsets=torch.Size([]), sizes=torch.Size([]))
            chunks.append(ck)
            length = 4 + ITEM_OVERHEAD
            storage[MetadataIndex(fqn, torch.Size([]), 0)] = _StorageInfo(files[r], file_pos[r], length)
            file_pos[r] += length
        else:
            rest = 1
            for d in shape[1:]:
                rest *= d
            for r in range(ranks):
                start, n = _shard0(shape[0], ranks, r)
                offs = torch.Size([start] + [0] * (len(shape) - 1))
                ck = ChunkStorageMetadata(offsets=offs, sizes=torch.Size([n, *shape[1:]]))
                chunks.append(ck)
                length = n * rest * 4 + ITEM_OVERHEAD
                storage[MetadataIndex(fqn, offs, r)] = _StorageInfo(files[r], file_pos[r], length)
                file_pos[r] += length
        sdm[fqn] = TensorStorageMetadata(props, torch.Size(shape), chunks)
    return Metadata(
        state_dict_metadata=sdm,
        planner_data=planner,
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=Path("/synthetic"), save_id="synthetic"),
        version="1.0.0",
    )


def synthetic_dir(size: str = "405b", ranks: int = 1024, root: str | os.PathLike | None = None) -> Path:
    """A directory holding only the synthetic ``.metadata`` (built once, cached)."""
    base = Path(
        root or os.environ.get("DCP_EXPLORER_BENCH_DIR", Path.home() / ".cache" / "dcp_explorer_bench")
    )
    import torch

    tag = hashlib.sha1(f"{size}-{ranks}-{torch.__version__}-v2".encode()).hexdigest()[:8]
    d = base / f"llama{size}_fsdp{ranks}_{tag}"
    path = d / ".metadata"
    if not path.exists():
        d.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        md = build_metadata(size, ranks)
        tmp = d / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(md, f)  # what FileSystemWriter.finish does
        # sparse data files of the right sizes: listings and range checks see a real layout
        ends: dict[str, int] = {}
        for info in md.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in ends.items():
            with open(d / name, "wb") as f:
                f.truncate(end)
        os.replace(tmp, path)
        print(f"built {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    return d


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="405b", choices=sorted(LLAMA))
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--root", default=None)
    a = ap.parse_args()
    print(synthetic_dir(a.size, a.ranks, a.root))
