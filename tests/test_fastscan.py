"""The C scanner for DCP ``.metadata`` (``readers/_fast.py`` + ``readers/_dcpscan.c``).

The scanner must give exactly what the reference path gives
(``parse_metadata(load_metadata_pickle(f, path), path)``), or ``None`` (the caller then
uses that reference path); refuse the same globals with the same error; and on broken
input raise only ``DcpExplorerError`` subclasses, and only when the reference fails too.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import pickletools
import struct
import sys

import numpy as np
import pytest

from dcp_explorer.errors import DcpExplorerError, MetadataError, UnsafePickleError
from dcp_explorer.model import ChunkColumns
from dcp_explorer.readers import _fast
from dcp_explorer.readers._fast import fast_parse
from dcp_explorer.readers._safe_pickle import load_metadata_pickle
from dcp_explorer.readers.dcp import parse_metadata

pytestmark = pytest.mark.skipif(not _fast.available(), reason="the _dcpscan extension is not built")

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def reference(src: bytes | pathlib.Path, path: str = "x/.metadata"):
    """The reference reader, on bytes (through BytesIO, no peek) or on a real file (peek)."""
    if isinstance(src, (bytes, bytearray)):
        return parse_metadata(load_metadata_pickle(bytes(src), path), path)
    with open(src, "rb") as f:
        return parse_metadata(load_metadata_pickle(f, path), path)


def fast(src: bytes | pathlib.Path, path: str = "x/.metadata"):
    if isinstance(src, (bytes, bytearray, memoryview)):
        return fast_parse(src, path)
    with open(src, "rb") as f:
        return fast_parse(f, path)


def _same_value(x, y, where: str) -> None:
    assert type(x) is type(y), f"{where}: {type(x).__name__} != {type(y).__name__}"
    if isinstance(x, np.ndarray):
        assert x.dtype == y.dtype, f"{where}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{where}: shape {x.shape} != {y.shape}"
        assert np.array_equal(x, y), f"{where}: values differ"
    elif isinstance(x, dict):
        assert list(x) == list(y), f"{where}: keys differ"
        for k in x:
            _same_value(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (tuple, list)):
        assert len(x) == len(y), f"{where}: length {len(x)} != {len(y)}"
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _same_value(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def assert_same_index(a, b) -> None:
    """Every field and column identical, dtypes and element types included."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, ChunkColumns):
            for g in dataclasses.fields(x):
                _same_value(getattr(x, g.name), getattr(y, g.name), f"chunks.{g.name}")
        else:
            _same_value(x, y, f.name)


def check_same(src, path: str = "x/.metadata"):
    """fast_parse == reference (and it did not fall back)."""
    got = fast(src, path)
    assert got is not None, "the scanner fell back on a file it models"
    assert_same_index(got, reference(src, path))
    return got


_HUGE_MEMO = "beyond the size of the pickle"


def check_consistent(data: bytes, tmp_file: pathlib.Path | None = None) -> str:
    """The contract on arbitrary input, for bytes and (optionally) a real file.

    fast_parse raises only DcpExplorerError, and only when the reference fails too;
    a result is equal to the reference's; None means "use the reference".

    One deliberate exception: a memo index larger than the whole pickle is refused, where
    CPython's unpickler (the reference) would allocate and zero 16 bytes per index (GBs);
    the reference is not run on such input.
    """
    outcome = "none"
    for mode in ("bytes", "file") if tmp_file is not None else ("bytes",):
        if mode == "file":
            tmp_file.write_bytes(data)
            src: bytes | pathlib.Path = tmp_file
        else:
            src = data
        try:
            fast(src)
        except MetadataError as e:
            if _HUGE_MEMO in str(e):
                return "raised"
        except DcpExplorerError:
            pass
        try:
            ref, ref_exc = reference(src), None
        except Exception as e:  # the reference may raise anything; the scanner may not
            ref, ref_exc = None, e
        try:
            got = fast(src)
        except DcpExplorerError as e:
            assert ref_exc is not None, f"scanner raised {e!r} but the reference succeeded"
            outcome = "raised"
            continue
        if got is None:
            continue
        assert ref_exc is None, f"scanner returned a result but the reference raised {ref_exc!r}"
        assert_same_index(got, ref)
        outcome = "equal"
    return outcome


# --------------------------------------------------------------------------- real checkpoints

torch = pytest.importorskip("torch")


def _state_dicts():
    t = torch
    g = t.Generator().manual_seed(0)
    yield (
        "mixed",
        {
            "model": {
                "w": t.randn(4, 3, generator=g),
                "b": t.zeros(3, dtype=t.bfloat16),
                "empty": t.empty(0, 5),
                "empty2": t.zeros(3, 0, dtype=t.int32),
                "i": t.arange(7, dtype=t.int64),
                "h": t.ones(2, 2, 2, dtype=t.float16),
                "bool": t.tensor([True, False]),
                "u8": t.tensor([1, 2], dtype=t.uint8),
                "c": t.randn(2, dtype=t.complex64, generator=g),
                "d": t.randn(3, dtype=t.float64, generator=g),
                "i8": t.tensor([-1], dtype=t.int8),
            },
            "step": t.tensor(5.0),
            "count": t.tensor(3, dtype=t.int32),
            "lr": 0.01,
            "betas": (0.9, 0.999),
            "name": "héllo wörld ✓",
            "raw": b"\x00\x01",
            "lst": [t.ones(2), {"x": t.zeros(1)}, 3],
            "nested": {"a": {"b": {"c": t.tensor(1)}}},
            "none": None,
            "ilist": [1, 2, 3],
            "weird key.with dots": t.zeros(2),
        },
    )
    model = t.nn.Sequential(t.nn.Linear(4, 3), t.nn.ReLU(), t.nn.Linear(3, 2))
    opt = t.optim.Adam(model.parameters())
    model(t.randn(5, 4, generator=g)).sum().backward()
    opt.step()
    yield "adam", {"model": model.state_dict(), "optim": opt.state_dict()}
    yield "only_bytes", {"a": 1, "b": "two", "c": [1, 2], "d": {"e": (3,)}}
    yield "scalars", {f"s{i}": t.tensor(float(i)) for i in range(20)}
    yield "many", {f"layer.{i}.weight": t.randn(3, 2, generator=g) for i in range(300)}


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    root = tmp_path_factory.mktemp("dcp_real")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, sd in _state_dicts():
            d = root / name
            dcp.save(sd, checkpoint_id=str(d), no_dist=True)
            out[name] = d / ".metadata"
        sd = dict(_state_dicts())["mixed"]
        d = root / "per_item"
        dcp.save(sd, storage_writer=FileSystemWriter(str(d), single_file_per_rank=False), no_dist=True)
        out["per_item"] = d / ".metadata"
        d = root / "threads"
        dcp.save(sd, storage_writer=FileSystemWriter(str(d), thread_count=3), no_dist=True)
        out["threads"] = d / ".metadata"
        try:
            from torch.distributed.checkpoint._extension import ZStandard

            d = root / "zstd"
            dcp.save(sd, storage_writer=FileSystemWriter(str(d), _extensions=[ZStandard()]), no_dist=True)
            out["zstd"] = d / ".metadata"
        except Exception:  # zstandard missing
            pass
    return out


def test_real_checkpoints_identical(real_checkpoints):
    for name, path in real_checkpoints.items():
        got = check_same(path)
        assert got.num_chunks > 0 or name == "only_bytes", name
        # bytes input too
        assert_same_index(fast(path.read_bytes()), got)


def test_real_checkpoint_features_covered(real_checkpoints):
    idx = fast(real_checkpoints["mixed"])
    fq = list(idx.fqns)
    assert idx.dtypes[fq.index("model.b")] == "bfloat16"
    assert idx.shapes[fq.index("step")] == ()
    assert idx.shapes[fq.index("model.empty")] == (0, 5)
    assert idx.bytes_items and idx.planner_data and idx.attrs["save_id"]
    assert len(fast(real_checkpoints["per_item"]).files) > 1
    if "zstd" in real_checkpoints:
        assert fast(real_checkpoints["zstd"]).transforms == ("stream.zstd/1",)


def test_sample_checkpoints_identical():
    """The shared multi-rank samples, when they have been built already (never builds them here)."""
    try:
        from dcp_explorer.samples import default_root
    except ImportError:
        pytest.skip("dcp_explorer.samples is not there")
    files = sorted(pathlib.Path(default_root()).glob("*/*.metadata")) if default_root().exists() else []
    if not files:
        pytest.skip("samples not built")
    for p in files:
        check_same(p)


def test_file_object_and_position(real_checkpoints, tmp_path):
    p = real_checkpoints["mixed"]
    data = p.read_bytes()
    # a file whose pickle starts after a prefix: the scanner reads from the current position
    f = tmp_path / "prefixed"
    f.write_bytes(b"JUNK" + data + b"trailing bytes are ignored")
    with open(f, "rb") as fh:
        fh.seek(4)
        got = fast_parse(fh, "p")
    assert_same_index(got, reference(data, "p"))
    assert_same_index(fast_parse(bytearray(data), "p"), got)
    assert_same_index(fast_parse(memoryview(data), "p"), got)
    assert_same_index(fast_parse(io.BytesIO(data), "p"), got)


def test_other_pickle_protocols_and_memo_layouts(real_checkpoints):
    """The same Metadata pickled with protocols 2, 3, 5, and with PUT/BINPUT memo layouts."""
    for name in ("mixed", "adam"):
        path = real_checkpoints[name]
        import torch.distributed.checkpoint as dcp  # noqa: F401 - classes for unpickling

        with open(path, "rb") as f:
            md = pickle.load(f)
        for proto in (2, 3, 4, 5):
            data = pickle.dumps(md, protocol=proto)
            check_same(data)
            check_same(pickletools.optimize(data))  # memo renumbered, unused PUTs dropped


def _torch_md(**overrides):
    """A torch Metadata built by hand (for layouts dcp.save does not write); fresh objects each call."""
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

    S = torch.Size
    chunks = [
        ChunkStorageMetadata(offsets=S([0, 0]), sizes=S([2, 3])),
        ChunkStorageMetadata(offsets=S([2, 0]), sizes=S([2, 3])),
        ChunkStorageMetadata(offsets=S([4, 0]), sizes=S([0, 3])),
    ]
    sdm = {
        "w": TensorStorageMetadata(TensorProperties(dtype=torch.float16), S([4, 3]), chunks),
        "b": BytesStorageMetadata(),
        "s": TensorStorageMetadata(
            TensorProperties(dtype=torch.int64), S([]), [ChunkStorageMetadata(S([]), S([]))]
        ),
        "z": TensorStorageMetadata(TensorProperties(dtype=torch.bool), S([0]), []),
    }
    storage = [
        (MetadataIndex("b"), _StorageInfo("__0_0.distcp", 0, 10)),
        (MetadataIndex("w", S([0, 0]), 0), _StorageInfo("__0_0.distcp", 10, 100)),
        (MetadataIndex("w", S([2, 0]), 1), _StorageInfo("__1_0.distcp", 0, 100, ["stream.zstd/1"])),
        (MetadataIndex("w", S([4, 0]), 2), _StorageInfo("__1_0.distcp", 100, 50, ("a", "b"))),
        (MetadataIndex("s", S([]), 0), _StorageInfo("sub/__3_7.distcp", 5, 6)),
    ]
    fields = dict(
        state_dict_metadata=sdm,
        planner_data={"w": ("w",), "b": ("b", 0, "x")},
        storage_data=dict(storage),
        storage_meta=StorageMeta(checkpoint_id=pathlib.Path("/a//b/./c"), save_id="sid", modules=["m1"]),
        version="1.0.0",
    )
    edit = overrides.pop("edit_storage", None)
    if edit is not None:
        fields["storage_data"] = dict(edit(storage, MetadataIndex, _StorageInfo))
    fields.update(overrides)
    return Metadata(**fields)


def _bad_hints(storage, MetadataIndex, _StorageInfo):
    S = torch.Size
    out = [(k, v) for k, v in storage if k.fqn not in ("w", "s")]
    out += [
        (MetadataIndex("s", S([]), 7), _StorageInfo("__5_0.distcp", 0, 1)),  # a second tensor to search
        (MetadataIndex("w", S([0, 0]), 2), _StorageInfo("__0_0.distcp", 10, 100)),  # hint points elsewhere
        (MetadataIndex("w", S([2, 0]), None), _StorageInfo("__2_0.distcp", 1, 2)),  # no hint
        (MetadataIndex("w", S([4, 0]), 99), _StorageInfo("__2_0.distcp", 3, 4)),  # hint out of range
    ]
    return out


def _duplicate_rows(storage, MetadataIndex, _StorageInfo):
    S = torch.Size
    # two keys for the same chunk (different hints, so distinct dict keys only by identity in the stand-ins)
    return storage + [(MetadataIndex("w", S([0, 0]), 5), _StorageInfo("__9_0.distcp", 7, 8))]


def _missing(storage, MetadataIndex, _StorageInfo):
    S = torch.Size
    return [(k, v) for k, v in storage if k.fqn != "b" and k.offset != S([2, 0])]


def _shared_offsets():
    """Chunks of one tensor with equal offsets (replicated 0-d chunks): one storage key for all."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    m = _torch_md()
    S = torch.Size
    m.state_dict_metadata["s"].chunks.extend(ChunkStorageMetadata(S([]), S([])) for _ in range(3))
    m.state_dict_metadata["w"].chunks.append(ChunkStorageMetadata(S([4, 0]), S([0, 3])))
    return m


@pytest.mark.parametrize("proto", [2, 4, 5])
def test_hand_built_metadata_variants(proto):
    variants = {
        "base": _torch_md(),
        "bad_hints": _torch_md(edit_storage=_bad_hints),
        "missing": _torch_md(edit_storage=_missing),
        "no_storage": _torch_md(storage_data=None),
        "planner_none": _torch_md(planner_data=None),
        "storage_meta_none": _torch_md(storage_meta=None),
        "no_version": _torch_md(version=None),
        "empty": _torch_md(state_dict_metadata={}, storage_data={}, planner_data={}),
        "shared_offsets": _shared_offsets(),
    }
    for name, m in variants.items():
        data = pickle.dumps(m, protocol=proto)
        got = check_same(data)
        if name == "base":
            assert got.transforms == ("stream.zstd/1", "a+b")
            assert got.chunks.rank.tolist() == [0, 1, 1, 3]
            assert got.attrs["checkpoint_id"] == "/a/b/c"
        if name == "missing":
            assert len(got.warnings) == 2
        if name == "shared_offsets":
            assert not got.warnings and (got.chunks.file >= 0).all()
        if name == "bad_hints":
            assert got.chunks.file.tolist()[:3] == [0, 2, 2]


def test_row_search_over_many_tensors():
    """Storage keys whose hints do not point at their chunk, for many tensors: the scanner's table of
    rows by offsets grows and indexes again the tensors searched before; chunks with no key of their
    own share the item of a chunk with equal offsets, or are missing."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    S = torch.Size
    sdm, storage = {}, {}
    for t in range(40):
        # rows 6 and 7 repeat the offsets of rows 0 and 1; offsets [5, 0] get no key
        chunks = [ChunkStorageMetadata(S([i % 6, 0]), S([1, 3])) for i in range(8)]
        sdm[f"t{t}"] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), S([6, 3]), chunks)
        for i in (4, 0, 3, 1, 2):
            key = MetadataIndex(f"t{t}", S([i, 0]), None if t % 2 else 7 - i)
            storage[key] = _StorageInfo(f"__{t % 4}_0.distcp", 100 * i, 10)
    got = check_same(pickle.dumps(Metadata(sdm, planner_data={}, storage_data=storage), protocol=4))
    assert got.chunks.byte_offset.tolist() == [0, 100, 200, 300, 400, -1, 0, 100] * 40


def test_duplicate_storage_rows_last_wins(monkeypatch):
    """Two storage keys for one chunk: the later one wins, like numpy's fancy assignment.

    torch's MetadataIndex compares by (fqn, offset), so such a dict is built with identity
    hashing patched in (what the stand-in does) and pickled as usual.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    monkeypatch.setattr(MetadataIndex, "__hash__", object.__hash__)
    monkeypatch.setattr(MetadataIndex, "__eq__", lambda a, b: a is b)
    S = torch.Size

    def dup(storage, MI, _SI):
        return storage + [
            (MI("w", S([0, 0]), 0), _StorageInfo("__9_0.distcp", 7, 8)),
            (MI("w", S([0, 0]), None), _StorageInfo("__8_0.distcp", 9, 10)),
            (MI("b"), _StorageInfo("__7_0.distcp", 1, 1)),
        ]

    m = _torch_md(edit_storage=dup)
    assert len(m.storage_data) == 8
    for proto in (2, 4):
        data = pickle.dumps(m, protocol=proto)
        got = check_same(data)
        assert got.files[got.chunks.file[0]] == "__8_0.distcp"
        assert got.files[got.bytes_items[list(got.fqns).index("b")][0]] == "__7_0.distcp"


def test_shared_and_reordered_chunk_objects():
    """Chunk objects shared between tensors or repeated (memo references): rows are gathered."""
    m = _torch_md()
    sdm = m.state_dict_metadata
    c = sdm["w"].chunks
    from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

    sdm["w2"] = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([4, 3]), [c[1], c[0], c[1]]
    )
    sdm["w"].chunks.append(c[0])
    for proto in (2, 4):
        got = check_same(pickle.dumps(m, protocol=proto))
        assert got.num_chunks == 8


def test_unmodelled_structures_fall_back(tmp_path):
    """Allowed-but-unmodelled layouts: the scanner returns None, the reference decides."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    cases = {
        "planner_object": _torch_md(planner_data={"w": MetadataIndex("w")}),
        "storage_list": _torch_md(storage_data=list(_torch_md().storage_data.values())),
    }
    m = _torch_md()
    m.state_dict_metadata["w"].chunks[0] = ChunkStorageMetadata(
        offsets=[0, 0], sizes=[2, 3]
    )  # lists, not Size
    cases["list_offsets"] = m
    from torch.distributed.checkpoint.metadata import StorageMeta

    cases["modules_not_iterable"] = _torch_md(storage_meta=StorageMeta(modules=True))
    for name, obj in cases.items():
        data = pickle.dumps(obj, protocol=4)
        assert fast_parse(data, "p") is None, name
        f = tmp_path / name
        f.write_bytes(b"xx" + data)
        with open(f, "rb") as fh:
            fh.seek(2)
            assert fast_parse(fh, "p") is None
            assert fh.tell() == 2  # back where it was, for the reference reader
        check_consistent(data, tmp_path / f"{name}.bin")


def test_unavailable_extension_returns_none(monkeypatch, real_checkpoints):
    monkeypatch.setattr(_fast, "_dcpscan", None)
    assert fast_parse(real_checkpoints["mixed"].read_bytes(), "p") is None


def test_unseekable_file_returns_none(real_checkpoints):
    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self._b = io.BytesIO(data)

        def readable(self):
            return True

        def seekable(self):
            return False

        def readinto(self, b):
            return self._b.readinto(b)

    assert fast_parse(Pipe(real_checkpoints["mixed"].read_bytes()), "p") is None


# --------------------------------------------------------------------------- synthetic

sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, pathlib.Path]:
    from synthetic import synthetic_dir

    root = tmp_path_factory.mktemp("synthetic")
    return {
        "tiny": synthetic_dir("tiny", 4, root) / ".metadata",
        "8b": synthetic_dir("8b", 64, root) / ".metadata",
    }


def test_synthetic_identical(synthetic):
    for name, path in synthetic.items():
        got = check_same(path)
        assert got.num_chunks > 0, name
    assert fast(synthetic["8b"]).num_chunks == 56163


# --------------------------------------------------------------------------- broken input

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEED_NAMES = ("mixed", "adam")


@pytest.fixture(scope="module")
def seeds(real_checkpoints, synthetic) -> list[bytes]:
    return [real_checkpoints[n].read_bytes() for n in _SEED_NAMES] + [synthetic["tiny"].read_bytes()]


_FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(data=st.data())
def test_truncations(seeds, tmp_path, data):
    seed = data.draw(st.sampled_from(seeds))
    cut = data.draw(st.integers(0, len(seed) - 1))
    assert check_consistent(seed[:cut], tmp_path / "t.bin") in ("raised", "none")


_OPCODES = b"(.012NK\x88\x89)\x85\x86\x87t]}\x8fld\x91aesu\x90bR\x81\x92\x93hjq\x94\x95"


@_FUZZ
@given(data=st.data())
def test_byte_flips(seeds, tmp_path, data):
    seed = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(seed) - 1))
        if data.draw(st.booleans()):
            seed[i] ^= data.draw(st.integers(1, 255))
        else:
            seed[i] = data.draw(st.sampled_from(_OPCODES))
    check_consistent(bytes(seed), tmp_path / "f.bin")


@_FUZZ
@given(data=st.data())
def test_insertions_and_deletions(seeds, tmp_path, data):
    seed = bytearray(data.draw(st.sampled_from(seeds)))
    i = data.draw(st.integers(0, len(seed) - 1))
    if data.draw(st.booleans()):
        seed[i:i] = data.draw(st.binary(min_size=1, max_size=3))
    else:
        del seed[i : i + data.draw(st.integers(1, 3))]
    check_consistent(bytes(seed), tmp_path / "i.bin")


_leaf = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.binary(max_size=8)
)  # fmt: skip
_values = st.recursive(
    _leaf,
    lambda c: st.lists(c, max_size=4) | st.tuples(c, c) | st.dictionaries(st.text(max_size=4), c, max_size=3)
    | st.frozensets(st.integers(-5, 5), max_size=3) | st.sets(st.text(max_size=3), max_size=3),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(
    planner=st.dictionaries(st.text(max_size=6), _values, max_size=4) | _values,
    version=_values,
    modules=_values,
    proto=st.sampled_from([2, 3, 4, 5]),
    optimize=st.booleans(),
    shuffle=st.randoms(use_true_random=False),
)
def test_structured_metadata(planner, version, modules, proto, optimize, shuffle):
    """Valid pickles of hand-built Metadata with arbitrary planner data, attrs and key orders."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    def reorder(storage, MI, SI):
        storage = list(storage)
        shuffle.shuffle(storage)
        return storage

    md = _torch_md(
        planner_data=planner,
        version=version,
        storage_meta=StorageMeta(checkpoint_id="c", save_id=version, modules=modules),
        edit_storage=reorder,
    )
    md.planner_data = planner  # shared values stay shared in the pickle (memo references)
    if isinstance(planner, dict) and planner:
        md.planner_data = {**planner, "again": next(iter(planner.values()))}
    try:
        data = pickle.dumps(md, protocol=proto)
    except Exception:
        return
    if optimize:
        data = pickletools.optimize(data)
    try:
        ref, ref_exc = reference(data), None
    except Exception as e:
        ref, ref_exc = None, e
    try:
        got = fast(data)
    except DcpExplorerError as e:
        assert ref_exc is not None and type(ref_exc) is type(e), (e, ref_exc)
        return
    if got is not None:
        assert ref_exc is None, ref_exc
        assert_same_index(got, ref)


def _unframed_ops(data: bytes) -> list[tuple[int, int, str]]:
    """(start, end, opcode name) of each opcode, FRAMEs dropped."""
    ops = list(pickletools.genops(data))
    out = []
    for i, (op, _arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name != "FRAME":
            out.append((pos, end, op.name))
    return out


_PUSHES = {
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE",
    "BINUNICODE", "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "EMPTY_LIST", "EMPTY_DICT", "BINGET",
    "LONG_BINGET", "STACK_GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "MEMOIZE",
}  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_noop_opcodes_do_not_change_the_result(seeds, data):
    """Insert DUP/POP, MARK/POP_MARK, NONE/POP and MARK..POP pairs: same index, still modelled."""
    seed = data.draw(st.sampled_from(seeds[:2]))
    ops = _unframed_ops(seed)
    picks = set(data.draw(st.lists(st.integers(1, len(ops) - 2), min_size=1, max_size=30)))
    out = bytearray(seed[: ops[0][0]])
    for k, (start, end, name) in enumerate(ops):
        out += seed[start:end]
        if k in picks:
            noop = [b"N0", b"(1", b"(0", b"(K\x01K\x021"]
            if name in _PUSHES:
                noop.append(b"20")  # DUP POP: the copy escapes
            out += data.draw(st.sampled_from(noop))
    unframed = bytes(seed[: ops[0][0]]) + b"".join(seed[a:b] for a, b, _ in ops)
    got = fast(bytes(out))
    assert got is not None
    assert_same_index(got, reference(unframed))
    assert_same_index(got, reference(bytes(out)))


def test_frame_edge_cases(tmp_path):
    """Frames that end inside an opcode: the C unpickler's result depends on its buffering."""
    inner = pickle.dumps({"a": 1}, protocol=4)
    body = inner[2:]
    for cut in range(1, 12):
        hdr = b"\x80\x04\x95" + struct.pack("<Q", cut)
        check_consistent(hdr + body, tmp_path / "fr.bin")
    # a frame inside a frame
    check_consistent(
        b"\x80\x04\x95" + struct.pack("<Q", 12) + b"\x95" + struct.pack("<Q", 2) + b"K\x01.",
        tmp_path / "n.bin",
    )


@settings(max_examples=300, deadline=None)
@given(b=st.binary(max_size=12))
def test_utf8_validator_matches_python(b):
    from dcp_explorer.readers import _dcpscan

    for handler, sur in (("surrogatepass", True), ("strict", False)):
        try:
            b.decode("utf-8", handler)
            ok = True
        except UnicodeDecodeError:
            ok = False
        assert _dcpscan._utf8_check(b, sur) == ok, (b, handler)


def test_huge_memo_index_is_refused_without_allocating():
    """LONG_BINPUT 2**31: CPython's unpickler would zero a 32 GB memo; the scanner refuses."""
    import resource

    data = b"\x80\x04K\x01r\x00\x00\x00\x80."
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MetadataError, match=_HUGE_MEMO):
        fast_parse(data, "p")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    # a small out-of-order index is left to the reference (it allocates 16 bytes per index)
    assert fast_parse(b"\x80\x04K\x01q\x05.", "p") is None


def test_malformed_errors_name_the_path():
    with pytest.raises(MetadataError, match="dir/.metadata"):
        fast_parse(b"\x80\x04\x95\x05", "dir/.metadata")
    with pytest.raises(MetadataError, match="truncated"):
        fast_parse(b"", "p")
    with pytest.raises(MetadataError, match="invalid load key"):
        fast_parse(b"\xff", "p")
    with pytest.raises(MetadataError):
        fast_parse(b"\x80\x09.", "p")  # protocol 9
    # a huge length field is checked against the input before anything is allocated
    with pytest.raises(MetadataError):
        fast_parse(b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"x", "p")
    with pytest.raises(MetadataError):
        fast_parse(b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"x", "p")


# --------------------------------------------------------------------------- security


def _s(x: str) -> bytes:
    b = x.encode()
    return b"\x8c" + bytes([len(b)]) + b


def stack_global(module: str, name: str, *args: str) -> bytes:
    """Protocol 4: STACK_GLOBAL module name, then REDUCE(args)."""
    return b"\x80\x04" + _s(module) + _s(name) + b"\x93(" + b"".join(_s(a) for a in args) + b"tR."


def protocol0_global(module: str, name: str, *args: str) -> bytes:
    return f"c{module}\n{name}\n(".encode() + b"".join(f"V{a}\n".encode() for a in args) + b"tR."


def protocol2_global(module: str, name: str, *args: str) -> bytes:
    return (
        b"\x80\x02"
        + f"c{module}\n{name}\n".encode()
        + b"q\x00("
        + b"".join(b"X" + struct.pack("<I", len(a.encode())) + a.encode() for a in args)
        + b"tq\x01R."
    )


DANGEROUS = [
    ("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
    ("subprocess", "Popen"), ("torch", "load"), ("torch.serialization", "load"), ("builtins", "open"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("shutil", "rmtree"), ("pathlib", "Path"),
    ("copyreg", "_reconstructor"), ("torch", "Tensor"), ("torch._utils", "_rebuild_tensor_v2"),
]  # fmt: skip


@pytest.mark.parametrize("encode", [stack_global, protocol0_global, protocol2_global])
@pytest.mark.parametrize(("module", "name"), DANGEROUS)
def test_dangerous_globals_are_refused(tmp_path, encode, module, name):
    target = tmp_path / "created"
    data = encode(module, name, str(target) if name != "eval" else f"open({str(target)!r}, 'w')")
    with pytest.raises(UnsafePickleError) as ei:
        fast_parse(data, "ckpt/.metadata")
    assert ei.value.global_name == f"{module}.{name}"
    assert f"{module}.{name}" in str(ei.value) and "ckpt/.metadata" in str(ei.value)
    assert not target.exists()
    # the same error as the reference
    with pytest.raises(UnsafePickleError) as ref:
        reference(data, "ckpt/.metadata")
    assert str(ref.value) == str(ei.value)


def test_reduce_that_would_create_a_file_creates_nothing(tmp_path):
    target = tmp_path / "pwned"
    for data in (
        stack_global("builtins", "open", str(target), "w"),
        stack_global("io", "open", str(target), "w"),
        protocol0_global("pathlib", "Path", str(target)),  # only PosixPath is allowed (as a pure function)
    ):
        with pytest.raises(UnsafePickleError):
            fast_parse(data, "p")
        assert not target.exists()
    # an allowed path global runs only the torch-free stand-in: a string, no file
    data = b"\x80\x04" + _s("pathlib") + _s("PosixPath") + b"\x93" + _s(str(target)) + b"\x85R."
    assert fast_parse(data, "p") is None  # not a Metadata: the reference decides
    assert not target.exists()


class _Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("where", ["planner_data", "storage_meta", "state_dict_metadata", "version"])
def test_payload_inside_real_metadata_is_refused(tmp_path, where):
    target = tmp_path / "touched"
    payload = _Payload(open, str(target), "w")
    expected = f"{open.__module__}.{open.__qualname__}"
    md = _torch_md()
    if where == "state_dict_metadata":
        md.state_dict_metadata["evil"] = payload
    else:
        setattr(md, where, payload)
    data = pickle.dumps(md, protocol=4)
    with pytest.raises(UnsafePickleError) as ei:
        fast_parse(data, "p")
    assert ei.value.global_name == expected
    assert not target.exists()
    # without frames (protocol 2), a file cut after the payload is refused first, like the reference
    data = pickle.dumps(md, protocol=2)
    cut = data[: data.index(open.__module__.encode() + b"\nopen\n") + 12]
    with pytest.raises(UnsafePickleError):
        fast_parse(cut, "p")
    with pytest.raises(UnsafePickleError):
        reference(cut)


def test_refused_module_is_not_imported(tmp_path, monkeypatch):
    mod = tmp_path / "dcpx_side_effect_mod.py"
    marker = tmp_path / "imported"
    mod.write_text(f"open({str(marker)!r}, 'w').close()\ndef f(*a): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnsafePickleError):
        fast_parse(stack_global("dcpx_side_effect_mod", "f"), "p")
    assert not marker.exists() and "dcpx_side_effect_mod" not in sys.modules


def test_scanner_never_imports_torch():
    import subprocess

    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from dcp_explorer.readers._fast import fast_parse\n"
        "import pickle\n"
        "try:\n    fast_parse(b'\\x80\\x04.', 'p')\nexcept Exception:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
