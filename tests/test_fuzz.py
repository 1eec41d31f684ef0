"""Fuzzing and property tests of the parsers of untrusted bytes.

* ``test_fuzz_run``: the fuzz target (``benchmarks/fuzz_metadata.py``: the ``.metadata`` unpickler,
  the safetensors header parser, the stored-item parser) runs for ``$DCP_EXPLORER_FUZZ_SECONDS``
  (default 60) in a child process, with a per-input time limit and an address-space limit;
  any input that raises something other than a ``DcpExplorerError``, hangs, or kills the process
  is saved under ``tests/fuzz_regressions/`` and fails the test;
* ``test_regression``: every input ever saved there is replayed (and must now give a
  ``DcpExplorerError`` or parse);
* hypothesis properties: safetensors headers against the ``safetensors`` library itself; random
  chunk tilings written as real DCP checkpoints (no warnings, exact loads; a missing chunk is a
  warned hole that raises ``MetadataError`` when loaded; an extra chunk is a warned overlap);
  DTensor placements on random meshes give exact tilings.

``DCP_EXPLORER_FUZZ_SECONDS=3600 pytest tests/test_fuzz.py -k fuzz_run -s`` fuzzes for an hour;
``DCP_EXPLORER_FUZZ_SEED`` replays a run; ``DCPX_HYPOTHESIS_EXAMPLES`` deepens the properties.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _strategies import Box, tiling
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcp_explorer as dx
from dcp_explorer import MetadataError

ROOT = Path(__file__).resolve().parents[1]
FUZZER = ROOT / "benchmarks" / "fuzz_metadata.py"
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
FUZZ_SECONDS = float(os.environ.get("DCP_EXPLORER_FUZZ_SECONDS", "60"))
SETTINGS = settings(
    max_examples=int(os.environ.get("DCPX_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.usefixtures("private_cache")


# ============================================================================================
# the fuzz target
# ============================================================================================
@pytest.mark.timeout(FUZZ_SECONDS + 180, method="thread")
def test_fuzz_run(samples, tmp_path):
    """Fuzz for FUZZ_SECONDS: no unexpected exception, no hang, no crash; findings become regressions."""
    seed = int(os.environ.get("DCP_EXPLORER_FUZZ_SEED", time.time_ns() % (1 << 31)))
    last = tmp_path / "last-input"
    cmd = [sys.executable, str(FUZZER), "--seconds", str(FUZZ_SECONDS), "--seed", str(seed),
           "--samples", json.dumps({k: str(v) for k, v in samples.items()}), "--findings", str(REGRESSIONS),
           "--last-input", str(last), "--exec-timeout", "10", "--max-memory", "4"]  # fmt: skip
    env = dict(os.environ, DCP_EXPLORER_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=FUZZ_SECONDS + 150, check=False
    )
    elapsed = time.perf_counter() - t0
    if (
        proc.returncode < 0 or not proc.stdout.strip()
    ):  # killed (a crash in C code?): keep what it was running
        if last.exists() and last.stat().st_size:
            target, _, data = last.read_bytes().partition(b"\n")
            import hashlib

            keep = REGRESSIONS / f"{target.decode()}-crash-{hashlib.sha1(data).hexdigest()[:12]}.bin"
            REGRESSIONS.mkdir(exist_ok=True)
            keep.write_bytes(data)
        pytest.fail(f"the fuzzer died (status {proc.returncode}, seed {seed}); input kept as a regression\n"
                    f"{proc.stderr[-3000:]}")  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nfuzz: {report['execs']:,} executions in {report['seconds']} s = {report['execs_per_sec']:,} exec/s "
          f"(seed {seed}); per target: " + ", ".join(f"{t}: {v['execs']:,} ({v['ok']:,} parsed)"
                                                     for t, v in report["targets"].items()))  # fmt: skip
    assert not report["findings"], (
        f"seed {seed}: inputs that broke the contract (saved): {report['findings']}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["seconds"] >= FUZZ_SECONDS * 0.95 and elapsed < FUZZ_SECONDS + 150
    for t, v in report["targets"].items():
        assert v["execs"] > 100 and v["ok"] > 0 and v["error"] > 0, (t, v)  # every target ran, both ways


def _regressions() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.bin")) if REGRESSIONS.is_dir() else []


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("path", _regressions(), ids=lambda p: p.name)
def test_regression(path: Path) -> None:
    """Every input the fuzzer (or a bug report) ever found now parses or gives a DcpExplorerError."""
    from fuzz_metadata import Targets, run_one

    target = path.name.split("-", 1)[0]
    outcome = run_one(Targets(tables_every=1).get(target), path.read_bytes())
    assert outcome in ("ok", "error")


REPLAY = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from fuzz_metadata import Targets, run_one
from pathlib import Path
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worst = (0, None)
for p in sorted(Path(sys.argv[2]).glob("*.bin")):
    run_one(Targets(tables_every=1).get(p.name.split("-", 1)[0]), p.read_bytes())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak - base > worst[0]:
        worst = (peak - base, p.name)
print(json.dumps({"growth_kib": worst[0], "file": worst[1]}))
"""


@pytest.mark.timeout(120)
def test_regressions_stay_small() -> None:
    """Replayed in a fresh process, no regression input makes the peak RSS grow by 512 MiB (memo bombs...)."""
    out = subprocess.run([sys.executable, "-c", REPLAY, str(ROOT / "benchmarks"), str(REGRESSIONS)],
                         capture_output=True, text=True, check=True, timeout=110,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["growth_kib"] < 512 << 10, r


def test_regressions_exist() -> None:
    assert len(_regressions()) >= 10, "the regression inputs of earlier findings are missing"


# ============================================================================================
# safetensors headers against the safetensors library
# ============================================================================================
_CODES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}  # fmt: skip
_PERTURB = ("none", "none", "none", "gap", "trailing", "overlap", "size", "past_eof", "dtype", "negative", "meta",
            "offsets_type", "not_object")  # fmt: skip


@st.composite
def safetensors_files(draw: st.DrawFn) -> tuple[bytes, str]:
    """A safetensors file (bytes), mostly valid, with at most one perturbation (named)."""
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.text("abcxyz._", min_size=1, max_size=6), min_size=n, max_size=n, unique=True))
    header: dict[str, Any] = {}
    pos = 0
    for name in names:
        code = draw(st.sampled_from(sorted(_CODES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nb = math.prod(shape) * _CODES[code]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + nb]}
        pos += nb
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    body_len = pos
    what = draw(st.sampled_from(_PERTURB))
    keys = [k for k in header if k != "__metadata__"]
    k = draw(st.sampled_from(keys)) if keys else None
    if what == "gap" and k is not None:
        for other in keys[keys.index(k) :]:
            header[other]["data_offsets"] = [o + 4 for o in header[other]["data_offsets"]]
        body_len += 4
    elif what == "trailing":
        body_len += draw(st.integers(1, 9))
    elif what == "overlap" and len(keys) >= 2:
        a, b = keys[:2]
        if header[a]["data_offsets"][1] > header[a]["data_offsets"][0]:
            header[b]["data_offsets"] = list(header[a]["data_offsets"])
            header[b]["shape"], header[b]["dtype"] = list(header[a]["shape"]), header[a]["dtype"]
    elif what == "size" and k is not None:
        header[k]["shape"] = [*header[k]["shape"], 2]
    elif what == "past_eof":
        body_len = max(0, body_len - draw(st.integers(1, 8)))
    elif what == "dtype" and k is not None:
        header[k]["dtype"] = draw(st.sampled_from(["F12", "", "f32", "Q4"]))
    elif what == "negative" and k is not None and header[k]["shape"]:
        header[k]["shape"][0] = -1
    elif what == "meta":
        header["__metadata__"] = {"format": draw(st.sampled_from([1, None, ["pt"]]))}
    elif what == "offsets_type" and k is not None:
        header[k]["data_offsets"] = draw(st.sampled_from([[0], "0,4", [0.0, 4.0], None]))
    elif what == "not_object":
        header = draw(st.sampled_from([[1], "x", 3]))  # type: ignore[assignment]
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 7))
    body = bytes(draw(st.binary(min_size=body_len, max_size=body_len))) if body_len < 64 else b"\0" * body_len
    return len(raw).to_bytes(8, "little") + raw + body, what


def _covers_exactly(data: bytes) -> bool:
    """The tensors' byte ranges tile the data section from 0 to its end (what the library requires)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    end = 0
    for a, b in spans:
        if a != end:
            return False
        end = b
    return end == len(data) - 8 - n


@SETTINGS
@given(case=safetensors_files())
def test_safetensors_headers_agree_with_the_library(case, tmp_path_factory):
    """What safetensors accepts, we accept with the same names, dtypes and shapes; what we refuse, it refuses
    (or it is only stricter about unreferenced bytes: gaps and trailing data); we only ever raise
    SafetensorsHeaderError."""
    from safetensors import safe_open

    from dcp_explorer.readers.safetensors import SAFETENSORS_DTYPES

    data, what = case
    d = tmp_path_factory.mktemp("st")
    p = d / "model.safetensors"
    p.write_bytes(data)
    try:
        with safe_open(str(p), "pt") as f:
            lib = {k: (SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()], tuple(f.get_slice(k).get_shape()))
                   for k in f.keys()}  # noqa: SIM118  # fmt: skip
    except Exception:  # noqa: BLE001 - the library's refusal, any form
        lib = None
    try:
        ck = dx.open(p, cache=False)
        ours = {f: (ck.index.dtypes[i], ck.index.shapes[i]) for i, f in enumerate(ck.fqns)}
    except dx.SafetensorsHeaderError:
        ours = None
    if lib is not None:
        assert ours == lib, what
    elif ours is not None:
        assert not _covers_exactly(data), f"{what}: accepted a file the library refuses"


# ============================================================================================
# chunk layouts written as real DCP checkpoints
# ============================================================================================
def write_dcp(path: Path, tensors: dict[str, tuple[Any, list[Box]]], ranks: int = 3) -> None:
    """A DCP checkpoint as FileSystemWriter lays it out: each box a ``torch.save`` item, ``.metadata`` pickled."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    path.mkdir(parents=True)
    files = [bytearray() for _ in range(ranks)]
    sdm, storage = {}, {}
    n = 0
    for fqn, (t, boxes) in tensors.items():
        chunks = []
        for i, (offs, sizes) in enumerate(boxes):
            view = t[tuple(slice(o, o + s) for o, s in zip(offs, sizes, strict=True))].clone()
            buf = io.BytesIO()
            torch.save(view, buf)
            r = n % ranks
            n += 1
            storage[MetadataIndex(fqn, torch.Size(offs), i)] = _StorageInfo(f"__{r}_0.distcp", len(files[r]),
                                                                           len(buf.getvalue()))  # fmt: skip
            files[r] += buf.getvalue()
            chunks.append(ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)))
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.size(), chunks)
    for r, data in enumerate(files):
        (path / f"__{r}_0.distcp").write_bytes(bytes(data))
    (path / ".metadata").write_bytes(
        pickle.dumps(Metadata(sdm, planner_data={}, storage_data=storage), protocol=4)
    )


@st.composite
def tilings(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    """A shape (1-3 dims of 1-7) and a random guillotine tiling of it, shuffled."""
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    return shape, draw(tiling(shape))


@SETTINGS
@given(layout=tilings(), data=st.data())
def test_tilings_open_clean_and_load_exactly(layout, data, tmp_path_factory):
    import torch

    shape, boxes = layout
    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    root = tmp_path_factory.mktemp("tiling")
    write_dcp(root / "ok", {"w": (t, boxes), "b": (t.double(), [((0,) * len(shape), shape)])})
    ck = dx.open(root / "ok", cache=False)
    assert ck.warnings == []
    assert torch.equal(ck.load("w"), t)
    if len(boxes) < 2:
        return
    # a chunk missing: a warned hole; loading it raises, loading around it works
    gone = data.draw(st.integers(0, len(boxes) - 1))
    write_dcp(root / "hole", {"w": (t, [b for i, b in enumerate(boxes) if i != gone])})
    ck = dx.open(root / "hole", cache=False)
    missing = math.prod(boxes[gone][1])
    assert any(f"cover only {t.numel() - missing:,} of its {t.numel():,}" in w for w in ck.warnings), (
        ck.warnings
    )
    offs, sizes = boxes[gone]
    with pytest.raises(MetadataError, match="holes"):
        ck.load("w", slices=tuple(slice(o, o + s) for o, s in zip(offs, sizes, strict=True)))
    keep = data.draw(st.sampled_from([b for i, b in enumerate(boxes) if i != gone]))
    region = tuple(slice(o, o + s) for o, s in zip(*keep, strict=True))
    assert torch.equal(ck.load("w", slices=region), t[region])
    # an extra chunk overlapping others: a warned overlap (values where they overlap: reading order)
    (o, s) = boxes[0]
    big = max(range(len(shape)), key=lambda d: shape[d])
    if shape[big] < 2:
        return
    shifted = list(o)
    shifted[big] = (o[big] + 1) % shape[big]
    s2 = list(s)
    s2[big] = min(s[big], shape[big] - shifted[big])
    extra = (tuple(shifted), tuple(s2))
    if extra[0] in {b[0] for b in boxes}:
        return  # DCP keys stored items by (fqn, offsets): two chunks at one offset share one item
    write_dcp(root / "overlap", {"w": (t, [*boxes, extra])})
    ck = dx.open(root / "overlap", cache=False)
    assert any("overlapping chunks" in w for w in ck.warnings), ck.warnings
    assert torch.equal(ck.load("w"), t)  # the overlapping copy holds the same values


# ============================================================================================
# DTensor placements
# ============================================================================================
@st.composite
def placements(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple[Any, ...]]:
    from dcp_explorer.layout import Replicate, Shard

    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 11), min_size=ndim, max_size=ndim)))
    mesh = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    pls = tuple(draw(st.lists(st.one_of(st.just(Replicate()), st.integers(0, ndim - 1).map(Shard)),
                              min_size=len(mesh), max_size=len(mesh))))  # fmt: skip
    return shape, mesh, pls


def _index(shape: tuple[int, ...], boxes: list[Box]) -> Any:
    from dcp_explorer.model import CheckpointIndex, ChunkColumns

    m = len(boxes)
    nd = len(shape)
    z = lambda k: np.zeros(k, np.int64)  # noqa: E731
    chunks = ChunkColumns(
        np.zeros(m, np.int32), np.arange(m + 1, dtype=np.int64) * nd,
        np.array([x for b in boxes for x in b[0]], np.int64).reshape(-1), np.array([x for b in boxes for x in b[1]],
        np.int64).reshape(-1), np.zeros(m, np.int32), z(m), z(m), np.full(m, -1, np.int32), np.full(m, -1, np.int16),
    )  # fmt: skip
    return CheckpointIndex(format="dcp", fqns=("w",), kinds=np.zeros(1, np.int8), dtypes=("float32",), shapes=(shape,),
                           chunk_start=np.array([0, m], np.int64), chunks=chunks, files=("__0_0.distcp",))  # fmt: skip


@settings(max_examples=int(os.environ.get("DCPX_HYPOTHESIS_EXAMPLES", "300")), deadline=None)
@given(case=placements(), data=st.data())
def test_placements_tile_exactly(case, data):
    """Every rank's DTensor chunk (replicas saved once, as DCP dedups them) tiles the tensor: no warning;
    without one rank's distinct non-empty chunk, the hole is found (by element count or exactly)."""
    from dcp_explorer.checkpoint import _layout_problems
    from dcp_explorer.layout import all_local_chunks

    shape, mesh, pls = case
    sizes, offsets = all_local_chunks(shape, "x".join(map(str, mesh)) if len(mesh) > 1 else mesh[0], pls)
    boxes = list(
        dict.fromkeys((tuple(map(int, o)), tuple(map(int, s))) for o, s in zip(offsets, sizes, strict=True))
    )
    assert _layout_problems(_index(shape, boxes), "ck") == []
    real = [b for b in boxes if math.prod(b[1]) > 0]
    if len(real) > 1:
        gone = data.draw(st.sampled_from(real))
        problems = _layout_problems(_index(shape, [b for b in boxes if b != gone]), "ck")
        assert any("holes" in p for p in problems), problems
    # every rank's own copy (per-rank metadata, no dedup) is no overlap either
    copies = [(tuple(map(int, o)), tuple(map(int, s))) for o, s in zip(offsets, sizes, strict=True)]
    assert _layout_problems(_index(shape, copies), "ck") == []


def test_write_dcp_matches_torch(tmp_path):
    """The test writer makes checkpoints torch itself reads (so the properties above are about real files)."""
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    t = torch.arange(24.0).reshape(4, 6)
    write_dcp(tmp_path / "ck", {"w": (t, [((0, 0), (4, 2)), ((0, 2), (1, 4)), ((1, 2), (3, 4))])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _load_state_dict_from_keys(checkpoint_id=str(tmp_path / "ck"))
    assert torch.equal(got["w"], t)
    assert torch.equal(dx.open(tmp_path / "ck").load("w"), t)


# ============================================================================================
# the guard in front of CPython's unpickler
# ============================================================================================
_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.tuples(c, c) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(obj=_plain, proto=st.integers(0, 5), data=st.data())
def test_memo_guard(obj, proto, data):
    """The guard passes every real pickle, and catches a memo index that would make CPython allocate GBs."""
    import struct

    from dcp_explorer.readers import _safe_pickle

    raw = pickle.dumps([obj, bytearray(b"xy"), obj], protocol=proto)
    idx = data.draw(st.integers(1 << 22, (1 << 32) - 1))
    bomb = raw[:-1] + b"r" + struct.pack("<I", idx) + b"."
    for scanner in (True, False):  # the C walk and the pickletools one agree
        assert _safe_pickle._guard(raw, scanner) is None
        kind, msg = _safe_pickle._guard(bomb, scanner)
        assert kind == "memo" and str(idx) in msg
    with pytest.raises(MetadataError, match="refused before unpickling"):
        _safe_pickle.load_metadata_pickle(bomb, "x")
    cut = raw[: data.draw(st.integers(1, len(raw) - 1))]
    found = _safe_pickle._guard(cut)
    assert found is None or found[0] == "truncated"
