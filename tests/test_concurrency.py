"""Concurrency: several threads (and processes) opening and loading one checkpoint, and the parse cache.

* opening the same checkpoint from 8 threads at once (cold cache) gives 8 identical indexes;
* loading from 8 threads -- through one shared ``Checkpoint`` (one loader, shared open files) and
  through separate ones -- gives exactly what a single thread loads;
* the parse cache tolerates concurrent writers: processes opening the same checkpoint at once
  with one cold cache, and threads storing the same key while others read it, never see a partial
  file (writes are a temporary file + ``os.replace``) and leave no temporary file behind;
* a damaged cache file (truncated, garbage, a valid ``.npz`` of the wrong shape, a directory) is
  ignored: the metadata is parsed again and the cache entry rewritten.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import dcp_explorer as dx
from dcp_explorer import cache as dcache

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
THREADS = 8


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(tmp_path / "dcpx-cache"))
    monkeypatch.delenv("DCP_EXPLORER_MAX_LOAD_BYTES", raising=False)


def signature(ck: dx.Checkpoint) -> tuple:
    """Everything an index says, as comparable Python values."""
    idx = ck.index
    c = idx.chunks
    cols = tuple(getattr(c, f).tobytes() for f in ("entry", "coord_start", "offsets", "sizes", "file", "byte_offset",
                                                    "byte_length", "rank", "transform"))  # fmt: skip
    return (idx.format, idx.fqns, idx.dtypes, idx.shapes, idx.files, idx.kinds.tobytes(), idx.chunk_start.tobytes(),
            cols, tuple(sorted(idx.bytes_items.items())), tuple(ck.warnings))  # fmt: skip


def _together(fn, n: int = THREADS) -> list:
    """Run ``fn(i)`` in ``n`` threads released at the same moment; re-raise the first error."""
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(run, range(n)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["llama_fsdp_tp_2x2", "mixed_per_rank", "hf_distributed", "fp8_block"])
def test_open_from_threads(samples, name):
    ref = signature(dx.open(samples[name], cache=False))
    got = _together(lambda i: signature(dx.open(samples[name])))  # one cold cache, 8 writers
    assert all(g == ref for g in got)
    again = dx.open(samples[name])
    assert signature(again) == ref
    assert again.from_cache or again.format != "dcp"
    cache = Path(os.environ["DCP_EXPLORER_CACHE"])
    assert not list(cache.glob("*.tmp")) if cache.exists() else True


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(
                a.view(-1).view(torch.uint8) if a.numel() else a,
                b.view(-1).view(torch.uint8) if b.numel() else b,
            )
        )
    return a == b


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["llama_fsdp_tp_2x2", "mixed", "mixed_zstd", "hf_rank0", "mxfp4"])
def test_load_from_threads(samples, name):
    ref = dx.open(samples[name]).load("*")
    shared = dx.open(samples[name])
    names = list(ref)

    def shared_load(i: int):  # one loader, its open files shared; each thread a different order
        order = names[i:] + names[:i]
        return {n: shared.load(n) for n in order}

    def own_load(i: int):
        ck = dx.open(samples[name])
        try:
            return ck.load("*")
        finally:
            ck.loader.close()

    for fn in (shared_load, own_load):
        for got in _together(fn):
            assert set(got) == set(ref)
            assert all(_equal(got[n], ref[n]) for n in ref), fn.__name__
    # slices of one tensor from many threads through the shared loader
    big = max(
        (n for n in names if isinstance(ref[n], torch.Tensor) and ref[n].dim() == 2),
        key=lambda n: ref[n].numel(),
    )
    rows = ref[big].shape[0]

    def rows_of(i: int):
        a, b = i * rows // THREADS, (i + 1) * rows // THREADS
        return shared.load(big, slices=f"{a}:{b}")

    assert torch.equal(torch.cat(_together(rows_of)).view(torch.uint8), ref[big].view(torch.uint8))
    shared.loader.close()


WRITER = """
import json, sys
import dcp_explorer
ck = dcp_explorer.open(sys.argv[1])
print(json.dumps({"from_cache": ck.from_cache, "chunks": len(ck.index.chunks), "fqns": list(ck.fqns)}))
"""


@pytest.mark.timeout(180)
def test_processes_open_with_one_cold_cache(samples, tmp_path, monkeypatch):
    """Processes racing to fill one cache entry all succeed, agree, and leave one complete file."""
    cache = tmp_path / "shared-cache"
    env = dict(os.environ, DCP_EXPLORER_CACHE=str(cache), PYTHONPATH=str(ROOT))
    path = str(samples["llama_fsdp_ws4"])
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]  # fmt: skip
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(o["fqns"] == outs[0]["fqns"] and o["chunks"] == outs[0]["chunks"] for o in outs)
    files = list(cache.iterdir())
    assert [f.suffix for f in files] == [".npz"], files  # one entry, no temporary file left
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(cache))
    again = dx.open(samples["llama_fsdp_ws4"])
    assert again.from_cache and list(again.fqns) == outs[0]["fqns"]


@pytest.mark.timeout(120)
def test_cache_readers_never_see_a_partial_write(samples, monkeypatch, tmp_path):
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(tmp_path / "race"))
    ck = dx.open(samples["llama_fsdp_tp_2x2"], cache=False)
    key = dcache.cache_key("race-test")
    ref = signature(ck)
    stop = threading.Event()
    seen = {"hits": 0, "misses": 0}
    assert dcache.store_cached(key, ck.index) is not None  # readers race with replacements, not creation

    def writer(i: int) -> None:
        while not stop.is_set():
            assert dcache.store_cached(key, ck.index) is not None

    def reader(i: int) -> None:
        for _ in range(150):
            got = dcache.load_cached(key)
            if got is None:
                seen["misses"] += 1
            else:
                seen["hits"] += 1
                assert signature(dx.checkpoint.Checkpoint(got, ck.store)) == ref

    with ThreadPoolExecutor(6) as ex:
        writers = [ex.submit(writer, i) for i in range(3)]
        readers = [ex.submit(reader, i) for i in range(3)]
        for r in readers:
            r.result()
        stop.set()
        for w in writers:
            w.result()
    assert seen["hits"] == 450 and seen["misses"] == 0  # a complete file, old or new, every time
    assert [p.suffix for p in (tmp_path / "race").iterdir()] == [".npz"]


def _cache_file(tmp_path: Path) -> Path:
    (f,) = list((tmp_path / "dcpx-cache").glob("*.npz"))
    return f


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "empty", "wrong_arrays", "inconsistent", "directory"]
)
def test_damaged_cache_file_is_ignored_and_rebuilt(samples, tmp_path, damage):
    path = samples["llama_fsdp_tp_2x2"]
    first = dx.open(path)
    ref = signature(first)
    assert not first.from_cache and dx.open(path).from_cache
    f = _cache_file(tmp_path)
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "wrong_arrays":
        np.savez(f, meta=np.frombuffer(b"{}", np.uint8))
    elif damage == "inconsistent":  # a valid cache file whose chunk columns disagree
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["c_entry"] = arrays["c_entry"][:-1]
        with open(f, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        f.unlink()
        f.mkdir()
    ck = dx.open(path)
    assert not ck.from_cache and signature(ck) == ref
    if damage == "directory":
        assert f.is_dir()  # could not be replaced: still ignored on every open
        assert not dx.open(path).from_cache
    else:
        again = dx.open(path)
        assert again.from_cache and signature(again) == ref  # rewritten


def test_unwritable_cache_directory_still_opens(samples, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(blocker / "cache"))
    ck = dx.open(samples["mixed"])
    assert len(ck.fqns) == 22 and not ck.from_cache
