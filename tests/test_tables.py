"""The pandas tables: columns and dtypes exactly as documented, numbers as torch reports them.

Column names and types are read from the ``Columns`` section of each table function's
docstring, so documentation and behaviour cannot drift apart.  Numbers are compared with
what torch reports (``read_metadata``) or loads (``_load_state_dict_from_keys``,
``torch.load`` of each stored item), never with numbers written down here.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from _reference import (
    dtype_name,
    element_size,
    per_rank_ranks,
    sample_kind,
    sample_names,
    tensor_bytes,
    torch_load_flat,
    torch_metadata,
    torch_reader,
)

import dcp_explorer
from dcp_explorer import tables

torch = pytest.importorskip("torch")
from torch.distributed.checkpoint.metadata import BytesStorageMetadata  # noqa: E402

SAMPLES = sample_names()

pytestmark = pytest.mark.usefixtures("private_cache")


# ----------------------------------------------------------------------------- torch's view


class TorchView:
    """What torch's reader(s) say about one checkpoint (per-rank metadata: every rank, in rank order)."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.kind = sample_kind(name, path)
        if self.kind == "dcp_per_rank":
            self.mds = [torch_metadata(self.kind, path, rank=r) for r in per_rank_ranks(path)]
        else:
            self.mds = [torch_metadata(self.kind, path)]

    def file_of(self, storage_info):
        return (
            os.path.basename(storage_info.relative_path)
            if self.kind.startswith("hf")
            else storage_info.relative_path
        )

    def entries(self):
        """fqn -> (metadata, chunk list over all metadata files), in first-seen order."""
        out = {}
        for md in self.mds:
            for fqn, m in md.state_dict_metadata.items():
                prev = out.get(fqn)
                chunks = [] if isinstance(m, BytesStorageMetadata) else list(m.chunks)
                out[fqn] = (m, (prev[1] if prev else []) + chunks)
        return out

    def storage(self):
        """(file, offset, length, is_bytes, chunk nbytes) of every stored item torch lists."""
        items = []
        for md in self.mds:
            for key, s in md.storage_data.items():
                m = md.state_dict_metadata[key.fqn]
                is_bytes = isinstance(m, BytesStorageMetadata)
                if is_bytes:
                    nb = 0
                else:
                    (c,) = [c for c in m.chunks if tuple(c.offsets) == tuple(key.offset)]
                    nb = math.prod(c.sizes) * element_size(dtype_name(m.properties.dtype))
                length = getattr(s, "length", None)
                if length is None:  # safetensors: the raw tensor bytes
                    length = nb
                items.append((self.file_of(s), getattr(s, "offset", None), length, is_bytes, nb))
        return items

    @functools.cached_property
    def loaded(self):
        """Every entry loaded by torch, flat (not for per-rank metadata)."""
        if self.kind == "dcp":
            return torch_load_flat(self.path)
        return torch_load_flat(None, storage_reader=torch_reader(self.kind, self.path))


@pytest.fixture(scope="session")
def torch_view(samples):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = TorchView(name, samples[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def opened(samples):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = dcp_explorer.open(samples[name], cache=False)
        return cache[name]

    return get


# ----------------------------------------------------------------------------- documented columns


def documented_columns(func):
    """[(name, type)] from the ``Columns`` section of ``func``'s numpy-style docstring."""
    doc = func.__doc__
    section = doc.split("Columns\n    -------\n", 1)[1]
    return re.findall(r"^    (\w+) : (.+)$", section, flags=re.M)


def _all(values, pred):
    return all(pred(v) for v in values)


def _is_str_col(col):
    return col.dtype == object or isinstance(col.dtype, pd.StringDtype)


CHECKERS = {
    "str": lambda c: _is_str_col(c) and _all(c, lambda v: isinstance(v, str)),
    "str or None": lambda c: c.dtype == object and _all(c, lambda v: v is None or isinstance(v, str)),
    "int": lambda c: c.dtype == np.int64,
    "Int64": lambda c: c.dtype == pd.Int64Dtype(),
    "float": lambda c: c.dtype == np.float64,
    "category": lambda c: isinstance(c.dtype, pd.CategoricalDtype),
    "tuple of int": lambda c: (
        c.dtype == object and _all(c, lambda v: isinstance(v, tuple) and all(type(x) is int for x in v))
    ),
}


def assert_documented(df, func):
    cols = documented_columns(func)
    assert cols, f"{func.__name__} documents no columns"
    assert list(df.columns) == [n for n, _ in cols], f"{func.__name__}: columns differ from its docstring"
    for name, typ in cols:
        assert typ in CHECKERS, f"{func.__name__} documents {name} as {typ!r}: teach this test that type"
        assert CHECKERS[typ](df[name]), (
            f"{func.__name__}: column {name} is {df[name].dtype}, documented {typ}"
        )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Small DCP checkpoints written by torch itself (no process group)."""
    import torch.distributed.checkpoint as dcp

    out = {}
    state_dicts = {
        "empty": {},
        "bytes_only": {"step": 3, "cfg": {"name": "x", "betas": (0.9, 0.99)}},
        "evil": {
            "<script>alert(1)</script>": torch.ones(2),
            "m": {"<img src=x onerror=alert(1)>": 3, "w&\"'<b>": torch.zeros(2, 3, dtype=torch.bfloat16)},
        },
    }
    for name, sd in state_dicts.items():
        d = tmp_path_factory.mktemp(name) / f"ck<u id=evil>{name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(d), no_dist=True)
        out[name] = d
    return out


TABLES = [
    ("tensors", tables.tensors_table),
    ("chunks", tables.chunks_table),
    ("files", tables.files_table),
    ("modules", tables.modules_table),
]


def _table(ckpt, which):
    return ckpt.modules() if which == "modules" else getattr(ckpt, which)


@pytest.mark.parametrize("which,func", TABLES, ids=[t for t, _ in TABLES])
@pytest.mark.parametrize("name", SAMPLES)
def test_columns_as_documented(opened, name, which, func):
    assert_documented(_table(opened(name), which), func)


@pytest.mark.parametrize("which,func", TABLES, ids=[t for t, _ in TABLES])
@pytest.mark.parametrize("name", ["empty", "bytes_only", "evil"])
def test_columns_as_documented_tiny(tiny, name, which, func):
    ckpt = dcp_explorer.open(tiny[name])
    df = _table(ckpt, which)
    assert_documented(df, func)
    if name == "empty":
        assert len(df) == 0
    if name == "bytes_only" and which == "chunks":
        assert len(df) == 0


def test_column_checkers_can_fail():
    assert not CHECKERS["int"](pd.Series([1.0]))
    assert not CHECKERS["tuple of int"](pd.Series([(1, np.int64(2))], dtype=object))
    assert not CHECKERS["str or None"](pd.Series([1], dtype=object))
    assert not CHECKERS["category"](pd.Series(["a"]))


# ----------------------------------------------------------------------------- tensors


def _loadable(name):
    return name != "mixed_per_rank"  # torch cannot load per-rank metadata without ranks


@pytest.mark.parametrize("name", [n for n in SAMPLES if _loadable(n)])
def test_tensors_match_what_torch_loads(opened, torch_view, name):
    ckpt, view = opened(name), torch_view(name)
    loaded = view.loaded
    t = ckpt.tensors.set_index("fqn")
    assert set(t.index) == set(loaded)
    total = 0
    for fqn, row in t.iterrows():
        value = loaded[fqn]
        if row["kind"] == "bytes":
            assert not isinstance(value, torch.Tensor), fqn
            assert row["numel"] == 0 and row["dtype"] is None and row["num_chunks"] == 0
            continue
        assert isinstance(value, torch.Tensor), fqn
        assert row["shape"] == tuple(value.shape), fqn
        assert row["dtype"] == dtype_name(value.dtype), fqn
        assert row["numel"] == value.numel(), fqn
        if row["quant"] == "mxfp4":
            continue  # stored packed: checked against safetensors below
        assert row["nbytes"] == value.numel() * value.element_size(), fqn
        total += row["nbytes"]
    if view.kind == "dcp":
        tens = t[t["kind"] == "tensor"]
        want = sum(v.numel() * v.element_size() for v in loaded.values() if isinstance(v, torch.Tensor))
        assert int(tens["nbytes"].sum()) == want


@pytest.mark.parametrize("name", [n for n in SAMPLES if n in ("mxfp4", "fp8_block", "hf_rank0")])
def test_tensors_nbytes_is_stored_bytes_for_safetensors(opened, samples, name):
    from safetensors import safe_open

    ckpt = opened(name)
    stored = collections.Counter()
    for f in ckpt.index.files:
        with safe_open(str(samples[name] / f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - not a dict
                stored[k] += len(tensor_bytes(h.get_tensor(k)))
    t = ckpt.tensors.set_index("fqn")
    assert t["nbytes"].to_dict() == dict(stored)


@pytest.mark.parametrize("name", SAMPLES)
def test_tensors_bytes_items_and_chunk_counts(opened, torch_view, name):
    ckpt, view = opened(name), torch_view(name)
    entries = view.entries()
    t = ckpt.tensors.set_index("fqn")
    for fqn, (m, chunks) in entries.items():
        if isinstance(m, BytesStorageMetadata):
            assert t.loc[fqn, "kind"] == "bytes"
            (length,) = {
                md.storage_data[k].length for md in view.mds for k in md.storage_data if k.fqn == fqn
            }
            assert t.loc[fqn, "nbytes"] == length
        else:
            assert t.loc[fqn, "num_chunks"] == len(chunks)
            assert t.loc[fqn, "numel"] == math.prod(m.size)


# ----------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("name", SAMPLES)
def test_chunks_nbytes_and_rows(opened, torch_view, name):
    ckpt, view = opened(name), torch_view(name)
    c = ckpt.chunks
    want = []
    for fqn, (m, chunks) in view.entries().items():
        if isinstance(m, BytesStorageMetadata):
            continue
        es = element_size(dtype_name(m.properties.dtype))
        want += [
            (fqn, i, tuple(k.offsets), tuple(k.sizes), math.prod(k.sizes) * es) for i, k in enumerate(chunks)
        ]
    got = list(zip(c["fqn"].astype(object), c["chunk"], c["offsets"], c["sizes"], c["nbytes"], strict=True))
    assert got == want
    # rows agree with the row objects of the model
    for r in range(0, len(c), max(1, len(c) // 50)):
        info = ckpt.index.chunk_info(r)
        row = c.iloc[r]
        assert (info.fqn, info.offsets, info.sizes, info.nbytes, info.rank, info.file, info.byte_offset,
                info.byte_length) == (row["fqn"], row["offsets"], row["sizes"], row["nbytes"], row["rank"],
                                      row["file"], row["byte_offset"], row["byte_length"])  # fmt: skip
        assert (info.transform is None) == pd.isna(row["transform"])


@pytest.mark.parametrize("name", [n for n in SAMPLES if n.startswith(("mixed", "llama_fsdp_tp"))])
def test_chunk_items_hold_what_the_row_says(opened, samples, name):
    """``torch.load`` of each stored item gives a tensor of the row's sizes, dtype and nbytes."""
    ckpt = opened(name)
    c = ckpt.chunks
    datas = {f: (samples[name] / f).read_bytes() for f in ckpt.index.files}
    dtypes = ckpt.tensors.set_index("fqn")["dtype"]
    for row in c.itertuples(index=False):
        raw = datas[row.file][row.byte_offset : row.byte_offset + row.byte_length]
        assert len(raw) == row.byte_length
        if not pd.isna(row.transform):
            import zstandard

            assert row.transform == "stream.zstd/1"
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        value = torch.load(io.BytesIO(raw), weights_only=True)
        assert tuple(value.shape) == row.sizes, row.fqn
        assert dtype_name(value.dtype) == dtypes[row.fqn]
        assert value.numel() * value.element_size() == row.nbytes
        if row.rank >= 0:
            assert row.file.startswith(f"__{row.rank}_")


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", SAMPLES)
def test_files_match_disk_and_torch(opened, torch_view, samples, name):
    ckpt, view = opened(name), torch_view(name)
    f = ckpt.files.set_index("file")
    items = view.storage()
    assert set(f.index) == {i[0] for i in items}
    for file, row in f.iterrows():
        assert row["size_on_disk"] == os.path.getsize(samples[name] / file)
        mine = [i for i in items if i[0] == file]
        assert row["num_items"] == len(mine), file
        assert row["stored_bytes"] == sum(i[2] for i in mine), file
        assert row["tensor_bytes"] == sum(i[4] for i in mine), file
        m = re.match(r"^(?:__(\d+)_\d+\.distcp|shard-(\d+)-model-.*\.safetensors)$", file)
        want_ranks = () if m is None else ((int(m.group(1)),) if m.group(1) else (int(m.group(2)) - 1,))
        assert row["ranks"] == want_ranks, file
    if view.kind in ("dcp", "dcp_per_rank") and not any(ckpt.chunks["transform"].notna()):
        # DCP files are the items back to back: nothing else is stored
        assert (f["stored_bytes"] == f["size_on_disk"]).all()


# ----------------------------------------------------------------------------- modules


def _prefix(fqn, depth):
    return ".".join(fqn.split(".")[:depth])


@pytest.mark.parametrize("depth", [1, 2, 4, 100])
@pytest.mark.parametrize("name", SAMPLES)
def test_modules_aggregate_torchs_entries(opened, torch_view, name, depth):
    ckpt, view = opened(name), torch_view(name)
    want = {}
    for fqn, (m, chunks) in view.entries().items():
        w = want.setdefault(_prefix(fqn, depth), collections.Counter())
        if isinstance(m, BytesStorageMetadata):
            w["num_bytes_items"] += 1
            (length,) = {
                md.storage_data[k].length for md in view.mds for k in md.storage_data if k.fqn == fqn
            }
            w["nbytes"] += length
        else:
            w["num_tensors"] += 1
            w["numel"] += math.prod(m.size)
            w["num_chunks"] += len(chunks)
            w["nbytes"] += sum(math.prod(c.sizes) for c in chunks) * element_size(
                dtype_name(m.properties.dtype)
            )
    mods = ckpt.modules(depth=depth)
    assert list(mods["module"]) == list(want), "modules are not in first-seen order"
    for row in mods.itertuples(index=False):
        w = want[row.module]
        for col in ("num_tensors", "num_bytes_items", "numel", "nbytes", "num_chunks"):
            assert getattr(row, col) == w[col], (row.module, col)
    t = ckpt.tensors
    for col in ("numel", "nbytes", "num_chunks"):
        assert mods[col].sum() == t[col].sum()
    assert mods["num_tensors"].sum() == (t["kind"] == "tensor").sum()
    assert mods["num_bytes_items"].sum() == (t["kind"] == "bytes").sum()


def test_modules_depth_must_be_positive(opened):
    with pytest.raises(ValueError):
        opened("mixed").modules(depth=0)


# ----------------------------------------------------------------------------- summary and HTML


@pytest.mark.parametrize("name", SAMPLES)
def test_summary_consistent_with_torch(opened, torch_view, samples, name):
    ckpt, view = opened(name), torch_view(name)
    s = ckpt.summary()
    entries = view.entries()
    tens = {f: (m, ch) for f, (m, ch) in entries.items() if not isinstance(m, BytesStorageMetadata)}
    assert s["format"] == ckpt.format
    assert s["path"] == str(samples[name])
    assert s["num_tensors"] == len(tens)
    assert s["num_bytes_items"] == len(entries) - len(tens)
    assert s["num_chunks"] == sum(len(ch) for _m, ch in tens.values())
    assert s["numel"] == sum(math.prod(m.size) for m, _ch in tens.values())
    t = ckpt.tensors
    assert s["tensor_bytes"] == t.loc[t["kind"] == "tensor", "nbytes"].sum()
    by_dtype = collections.Counter()
    for m, ch in tens.values():
        d = dtype_name(m.properties.dtype)
        by_dtype[d] += sum(math.prod(c.sizes) for c in ch) * element_size(d)
    assert s["dtypes"] == dict(by_dtype)
    assert sum(s["dtypes"].values()) == s["tensor_bytes"]
    assert s["num_files"] == len({i[0] for i in view.storage()})
    ranks = set(ckpt.chunks["rank"]) - {-1}
    assert s["saving_ranks"] == len(ranks)
    if view.kind.startswith("dcp"):
        assert ranks == {int(f[2:].split("_")[0]) for f in ckpt.index.files}
    if view.kind == "hf_quantized":
        reader = torch_reader(view.kind, samples[name])
        reader.read_metadata()
        assert s["quantized"] == len(reader._weight_scale_mapping)
    else:
        assert s["quantized"] == 0
    assert s["warnings"] == []
    assert isinstance(repr(ckpt), str) and ckpt.format in repr(ckpt)


def test_repr_html_escapes_names(tiny):
    ckpt = dcp_explorer.open(tiny["evil"])
    html = ckpt._repr_html_()
    fqns = list(ckpt.tensors["fqn"])
    assert "<script>alert(1)</script>" in fqns and "m.<img src=x onerror=alert(1)>" in fqns
    for raw in ("<script>", "<img", "<u id=evil>", "<b>'"):
        assert raw not in html, f"{raw!r} reached the HTML unescaped"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;u id=evil&gt;" in html  # the path is shown, escaped
    # and the modules table, where names are cut at dots, too
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_repr_html_escapes_warnings(tiny, tmp_path):
    import shutil

    ck = tmp_path / "<u id=evil>copy"
    shutil.copytree(tiny["evil"], ck)
    (ck / "__0_0.distcp").unlink()
    ckpt = dcp_explorer.open(ck, strict=False)
    assert ckpt.warnings and "<u id=evil>" in ckpt.warnings[0]
    html = ckpt._repr_html_()
    assert "<u id=evil>" not in html
    assert html.count("&lt;u id=evil&gt;") >= 2  # the path and the warning


@pytest.mark.parametrize("name", SAMPLES)
def test_repr_html_of_samples(opened, name):
    ckpt = opened(name)
    html = ckpt._repr_html_()
    assert html.count("<table") >= 3 and "<script" not in html
    assert ckpt.format in html


def test_byte_counts_past_int64_are_clipped_without_warnings():
    """A damaged file's chunk sizes can multiply past int64 (found by fuzzing): the tables clip, they do
    not wrap, and numpy's invalid-cast warning does not reach the user."""
    import warnings

    from dcp_explorer.tables import _clip_i64

    big = np.iinfo(np.int64).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _clip_i64(np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 5.0, 2.0**62]))
    assert got.dtype == np.int64
    assert got[0] == 0 and got[5] == 5 and got[6] == 2**62
    assert big - 1024 <= got[1] <= big and got[3] == got[1] and got[2] == got[4] == -got[1]
