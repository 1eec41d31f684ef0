"""Readers agree with torch's own readers on every sample checkpoint.

The truth is torch: ``FileSystemReader.read_metadata`` (DCP, per rank for
``use_collectives=False``), ``HuggingFaceStorageReader.read_metadata`` (safetensors) and
``QuantizedHuggingFaceStorageReader.read_metadata`` (FP8 / MXFP4), compared entry by
entry: names and their order, kind, size, dtype, chunk offsets/sizes in order, and where
each chunk is stored.  For safetensors, the byte ranges must hold exactly the bytes that
``safetensors.safe_open(...).get_tensor`` returns.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil

import numpy as np
import pytest
from _reference import (
    dtype_name,
    per_rank_ranks,
    sample_kind,
    sample_names,
    tensor_bytes,
    torch_metadata,
    torch_reader,
)

import dcp_explorer

torch = pytest.importorskip("torch")
from torch.distributed.checkpoint.metadata import (  # noqa: E402
    BytesStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)

SAMPLES = sample_names()

pytestmark = pytest.mark.usefixtures("private_cache")


# ----------------------------------------------------------------------------- comparison


def _ours_entries(ckpt):
    return [(t.fqn, t.kind, t.dtype, t.shape) for t in ckpt.index.iter_tensors()]


def assert_matches_torch_entries(ckpt, md):
    """Same fqns in the same order; same kind, size, dtype; same chunks in the same order."""
    sdm = md.state_dict_metadata
    assert list(ckpt.fqns) == list(sdm), "entry names or their order differ from torch"
    for fqn, meta in sdm.items():
        info = ckpt[fqn]
        if isinstance(meta, BytesStorageMetadata):
            assert info.kind == "bytes", fqn
            assert info.dtype is None and info.num_chunks == 0, fqn
            continue
        assert isinstance(meta, TensorStorageMetadata), (fqn, type(meta))
        assert info.kind == "tensor", fqn
        assert info.shape == tuple(meta.size), fqn
        assert info.dtype == dtype_name(meta.properties.dtype), fqn
        ours = [(c.offsets, c.sizes) for c in ckpt.chunks_of(fqn)]
        theirs = [(tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks]
        assert ours == theirs, f"chunks of {fqn!r}"
        assert [c.chunk for c in ckpt.chunks_of(fqn)] == list(range(len(theirs)))


def assert_matches_torch_dcp_storage(ckpt, md):
    """Every chunk and bytes item is where torch's ``storage_data`` says, and nothing else is."""
    storage = md.storage_data
    used = set()
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            key = MetadataIndex(fqn)
            info = storage[key]
            fi, off, ln, tr = ckpt.index.bytes_items[ckpt.index.entry_index(fqn)]
            got = (ckpt.index.files[fi], off, ln, ckpt.index.transforms[tr].split("+") if tr >= 0 else [])
            want = (info.relative_path, info.offset, info.length, list(info.transform_descriptors or []))
            assert got == want, f"bytes item {fqn!r}"
            used.add(key)
            continue
        for i, c in enumerate(ckpt.chunks_of(fqn)):
            key = MetadataIndex(fqn, torch.Size(c.offsets), i)
            info = storage[key]
            got = (c.file, c.byte_offset, c.byte_length, c.transform.split("+") if c.transform else [])
            want = (info.relative_path, info.offset, info.length, list(info.transform_descriptors or []))
            assert got == want, f"chunk {i} of {fqn!r}"
            used.add(key)
    assert used == set(storage), "torch lists storage entries that dcp_explorer does not place"
    assert set(ckpt.index.files) == {v.relative_path for v in storage.values()}


def assert_matches_torch_hf_storage(ckpt, md):
    """Each chunk names torch's file, and its byte range holds exactly safetensors' bytes."""
    from safetensors import safe_open

    storage = md.storage_data
    assert len(storage) == ckpt.index.num_chunks
    handles = {}
    raw_files = {}
    try:
        for fqn in md.state_dict_metadata:
            for c in ckpt.chunks_of(fqn):
                info = storage[MetadataIndex(fqn, torch.Size(c.offsets))]
                assert c.file == os.path.basename(info.relative_path), fqn
                assert c.sizes == tuple(info.shape), fqn
                assert c.transform is None
                if info.relative_path not in handles:
                    handles[info.relative_path] = safe_open(info.relative_path, framework="pt")
                    with open(info.relative_path, "rb") as f:
                        raw_files[info.relative_path] = f.read()
                want = tensor_bytes(handles[info.relative_path].get_tensor(fqn))
                got = raw_files[info.relative_path][c.byte_offset : c.byte_offset + c.byte_length]
                assert c.byte_length == len(want), fqn
                assert got == want, f"bytes of {fqn!r} in {c.file}"
                assert c.nbytes == len(want), fqn
    finally:
        handles.clear()
    assert set(ckpt.index.files) == {os.path.basename(v.relative_path) for v in storage.values()}


# ----------------------------------------------------------------------------- every sample


@pytest.mark.parametrize("name", SAMPLES)
def test_open_agrees_with_torch(samples, name):
    path = samples[name]
    kind = sample_kind(name, path)
    if kind == "dcp_per_rank":
        ranks = per_rank_ranks(path)
        assert len(ranks) > 1
        for r in ranks:
            ckpt = dcp_explorer.open(path, rank=r, cache=False)
            md = torch_metadata(kind, path, rank=r)
            assert_matches_torch_entries(ckpt, md)
            assert_matches_torch_dcp_storage(ckpt, md)
            assert ckpt.format == "dcp"
            assert ckpt.warnings == []
        return
    ckpt = dcp_explorer.open(path, cache=False)
    md = torch_metadata(kind, path)
    assert_matches_torch_entries(ckpt, md)
    if kind == "dcp":
        assert ckpt.format == "dcp"
        assert_matches_torch_dcp_storage(ckpt, md)
        assert ckpt.index.attrs["version"] == md.version
    else:
        assert_matches_torch_hf_storage(ckpt, md)
    assert ckpt.warnings == []


def test_sub_directory_of_distributed_shards(samples):
    """``hf_consolidated/sharded`` holds the per-rank shard files (consolidation's input): a checkpoint too."""
    if "hf_consolidated" not in samples:
        pytest.skip("no hf_consolidated sample")
    path = samples["hf_consolidated"] / "sharded"
    ckpt = dcp_explorer.open(path, cache=False)
    md = torch_metadata("hf", path)
    assert_matches_torch_entries(ckpt, md)
    assert_matches_torch_hf_storage(ckpt, md)
    assert ckpt.format == "hf_dcp_shards"
    assert sorted(ckpt.chunks["rank"].unique().tolist()) == list(
        range(len({f[:11] for f in ckpt.index.files}))
    )


@pytest.mark.parametrize("name", sorted(n for n in SAMPLES if n in ("fp8_block", "mxfp4")))
def test_quantized_pairs_are_torchs(samples, name):
    """The tensors marked quantized are exactly the pairs torch's quantized reader dequantizes."""
    path = samples[name]
    reader = torch_reader("hf_quantized", path)
    reader.read_metadata()
    pairs = dict(reader._weight_scale_mapping)
    assert pairs, "the sample has no quantized pairs"
    ckpt = dcp_explorer.open(path, cache=False)
    assert ckpt.format == "hf_quantized"
    marked = {t.fqn: t.quant for t in ckpt.index.iter_tensors() if t.quant}
    assert set(marked) == set(pairs)
    for fqn, q in marked.items():
        assert q == ("mxfp4" if fqn.endswith("_blocks") else "fp8_block"), fqn
        assert ckpt.index.quant[ckpt.index.entry_index(fqn)]["partner"] == pairs[fqn]
        # torch reports the dequantized size; the stored shape is the file's
        assert ckpt[fqn].shape == tuple(reader._tensor_full_shapes[fqn])


def test_per_rank_merged_view_holds_every_ranks_chunks(samples):
    path = samples["mixed_per_rank"]
    merged = dcp_explorer.open(path, cache=False)
    assert merged.format == "dcp"
    ranks = per_rank_ranks(path)
    want = collections.defaultdict(collections.Counter)
    bytes_fqns = set()
    order = {}
    for r in ranks:
        md = torch_metadata("dcp_per_rank", path, rank=r)
        for fqn, meta in md.state_dict_metadata.items():
            order.setdefault(fqn, len(order))
            if isinstance(meta, BytesStorageMetadata):
                bytes_fqns.add(fqn)
                assert merged[fqn].kind == "bytes"
                continue
            assert merged[fqn].shape == tuple(meta.size)
            assert merged[fqn].dtype == dtype_name(meta.properties.dtype)
            for i, c in enumerate(meta.chunks):
                s = md.storage_data[MetadataIndex(fqn, c.offsets, i)]
                want[fqn][(tuple(c.offsets), tuple(c.sizes), s.relative_path, s.offset, s.length)] += 1
    assert list(merged.fqns) == list(order), "merged entries are not in first-seen order"
    for fqn in merged.fqns:
        if fqn in bytes_fqns:
            continue
        got = collections.Counter(
            (c.offsets, c.sizes, c.file, c.byte_offset, c.byte_length) for c in merged.chunks_of(fqn)
        )
        assert got == want[fqn], fqn
        # every chunk of a per-rank file belongs to the rank in its name
        assert all(c.rank == int(c.file[2:].split("_")[0]) for c in merged.chunks_of(fqn))
    assert sorted(merged.chunks["rank"].unique().tolist()) == ranks


def test_per_rank_metadata_file_path_is_that_rank(samples):
    path = samples["mixed_per_rank"]
    r = per_rank_ranks(path)[-1]
    one = dcp_explorer.open(path / f"__{r}.metadata", cache=False)
    assert_matches_torch_entries(one, torch_metadata("dcp_per_rank", path, rank=r))
    assert_matches_torch_dcp_storage(one, torch_metadata("dcp_per_rank", path, rank=r))


def test_metadata_file_path_opens_the_checkpoint(samples):
    path = samples["mixed"]
    ckpt = dcp_explorer.open(path / ".metadata", cache=False)
    md = torch_metadata("dcp", path)
    assert_matches_torch_entries(ckpt, md)
    assert_matches_torch_dcp_storage(ckpt, md)


@pytest.mark.parametrize("name", [n for n in ("hf_rank0", "hf_consolidated", "fp8_block") if n in SAMPLES])
def test_single_safetensors_file_opens(samples, name, tmp_path):
    """A path to one ``.safetensors`` file reads that file alone, as torch reads a directory holding only it."""
    path = samples[name]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    target = files[-1]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path / target, alone / target)
    md = torch_metadata("hf", alone)
    ckpt = dcp_explorer.open(path / target, cache=False)
    assert ckpt.index.files == (target,)
    assert ckpt.format in ("safetensors", "hf_dcp_shards")
    assert not ckpt.index.quant, "a single file has no index.json, so no quantization pairs"
    assert_matches_torch_entries(ckpt, md)
    assert_matches_torch_hf_storage(ckpt, md)


# ----------------------------------------------------------------------------- cache


def assert_same_index(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "chunks":
            for g in dataclasses.fields(x):
                u, v = getattr(x, g.name), getattr(y, g.name)
                assert u.dtype == v.dtype and np.array_equal(u, v), f"chunks.{g.name}"
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


@pytest.mark.parametrize("name", SAMPLES)
def test_cache_gives_the_same_index(samples, name, tmp_path):
    path = samples[name]
    kind = sample_kind(name, path)
    views = [{}, {"rank": per_rank_ranks(path)[1]}] if kind == "dcp_per_rank" else [{}]
    for kwargs in views:
        fresh = dcp_explorer.open(path, cache=False, **kwargs)
        first = dcp_explorer.open(path, **kwargs)
        second = dcp_explorer.open(path, **kwargs)
        assert not fresh.from_cache and not first.from_cache
        assert_same_index(fresh.index, first.index)
        assert_same_index(first.index, second.index)
        if kind.startswith("dcp"):
            assert second.from_cache, "the second open of a DCP checkpoint should come from the cache"
            assert second.tensors.equals(fresh.tensors)
            assert second.chunks.equals(fresh.chunks)
            assert second.files.equals(fresh.files)
            if kwargs or kind == "dcp":  # and the cached index still agrees with torch
                md = torch_metadata(kind, path, **kwargs)
                assert_matches_torch_entries(second, md)
                assert_matches_torch_dcp_storage(second, md)
        else:
            assert not second.from_cache  # safetensors headers are re-read, never cached
    cached = list((tmp_path / "dcpx-cache").glob("*.npz"))
    assert len(cached) == (len(views) if kind.startswith("dcp") else 0)


def test_cache_is_keyed_per_rank(samples):
    path = samples["mixed_per_rank"]
    r0, r1 = per_rank_ranks(path)[:2]
    dcp_explorer.open(path, rank=r0)
    other = dcp_explorer.open(path, rank=r1)
    assert not other.from_cache
    assert set(other.index.files) == {f"__{r1}_0.distcp"}
    merged = dcp_explorer.open(path)
    assert not merged.from_cache
    assert len(merged.index.files) == len(per_rank_ranks(path))


def test_cache_notices_a_changed_metadata_file(samples, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(samples["mixed"], ck)
    first = dcp_explorer.open(ck)
    assert dcp_explorer.open(ck).from_cache
    # same bytes, new mtime: re-parsed
    st = os.stat(ck / ".metadata")
    os.utime(ck / ".metadata", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    again = dcp_explorer.open(ck)
    assert not again.from_cache
    assert_same_index(first.index, again.index)
    # truncated: must fail, not serve the stale parse
    data = (ck / ".metadata").read_bytes()
    (ck / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(dcp_explorer.MetadataError):
        dcp_explorer.open(ck)


def test_damaged_cache_file_is_rebuilt(samples):
    path = samples["mixed"]
    first = dcp_explorer.open(path)
    cache_dir = os.environ["DCP_EXPLORER_CACHE"]
    (entry,) = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir) if f.endswith(".npz")]
    with open(entry, "wb") as f:
        f.write(b"PK\x03\x04 this is not an npz")
    again = dcp_explorer.open(path)
    assert not again.from_cache
    assert_same_index(first.index, again.index)
    assert dcp_explorer.open(path).from_cache


# ----------------------------------------------------------------------------- small torch-written checkpoints

ALL_DTYPES = [
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32", "int16", "int8",
    "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu",
]  # fmt: skip


def _odd_state_dict():
    sd = {f"t.{d}": torch.arange(6).reshape(3, 2).to(getattr(torch, d)) for d in ALL_DTYPES}
    sd.update({"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "ünï.cødé": torch.ones(2)})
    sd["nested"] = {"list": [torch.ones(1), 3], "tuple": (1, 2), "none": None}
    return sd


@pytest.mark.parametrize(
    "writer_kwargs",
    [{}, {"single_file_per_rank": False}, {"thread_count": 3}],
    ids=["default", "file-per-item", "threads"],
)
def test_dcp_every_dtype_and_layout(tmp_path, writer_kwargs):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            _odd_state_dict(),
            storage_writer=FileSystemWriter(str(tmp_path / "ck"), **writer_kwargs),
            no_dist=True,
        )
    ckpt = dcp_explorer.open(tmp_path / "ck")
    md = torch_metadata("dcp", tmp_path / "ck")
    assert_matches_torch_entries(ckpt, md)
    assert_matches_torch_dcp_storage(ckpt, md)
    assert ckpt.warnings == []
    assert dcp_explorer.open(tmp_path / "ck").from_cache


def _st_tensor(dtype):
    if dtype == "float4_e2m1fn_x2":
        return torch.arange(6, dtype=torch.uint8).reshape(3, 2).view(torch.float4_e2m1fn_x2)
    return torch.arange(6).reshape(3, 2).to(getattr(torch, dtype))


@pytest.mark.parametrize("dtype", [d for d in ALL_DTYPES if d != "complex128"] + ["float4_e2m1fn_x2"])
def test_safetensors_every_dtype(tmp_path, dtype):
    """Whatever safetensors writes, we read as safetensors' torch loader returns it (and as torch's HF reader, when it can)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": _st_tensor(dtype), "s": torch.tensor(2.0), "e": torch.zeros(0, 3, dtype=getattr(torch, dtype))
               if dtype != "float4_e2m1fn_x2" else torch.zeros(0, 2, dtype=torch.uint8)}, str(path))  # fmt: skip
    ckpt = dcp_explorer.open(tmp_path)
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        assert list(ckpt.fqns) == sorted(f.keys())
        for key in f.keys():  # noqa: SIM118 - not a dict
            t = f.get_tensor(key)
            info = ckpt[key]
            assert (info.dtype, info.shape) == (dtype_name(t.dtype), tuple(t.shape)), key
            (c,) = ckpt.chunks_of(key)
            assert raw[c.byte_offset : c.byte_offset + c.byte_length] == tensor_bytes(t), key
            assert c.nbytes == info.nbytes == t.numel() * t.element_size(), key
    try:
        md = torch_metadata("hf", tmp_path)
    except KeyError:  # torch 2.13's HF reader does not know F8_E8M0 / F4
        assert dtype in ("float8_e8m0fnu", "float4_e2m1fn_x2")
        return
    assert_matches_torch_entries(ckpt, md)
    assert_matches_torch_hf_storage(ckpt, md)


def test_cache_is_not_stale_on_a_filesystem_without_mtime(samples):
    """fsspec's memory filesystem has no mtime: a same-size rewrite must not be served from the cache."""
    import uuid

    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    root = f"/dcpx-{uuid.uuid4().hex}"
    try:
        for f in os.listdir(samples["mixed"]):
            mem.pipe(f"{root}/{f}", (samples["mixed"] / f).read_bytes())
        url = f"memory://{root}"
        first = dcp_explorer.open(url)
        assert "model.row_sharded" in first
        data = mem.cat(f"{root}/.metadata")
        assert data.count(b"model.row_sharded") >= 1
        mem.pipe(f"{root}/.metadata", data.replace(b"model.row_sharded", b"model.row_shardeX"))
        again = dcp_explorer.open(url)
        assert not again.from_cache
        assert "model.row_shardeX" in again and "model.row_sharded" not in again
    finally:
        mem.rm(root, recursive=True)
