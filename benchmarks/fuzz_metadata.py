"""Fuzz dcp_explorer's parsers of untrusted bytes: DCP ``.metadata``, safetensors files, stored DCP items.

Targets (each takes the bytes of one file):

* ``metadata`` -- a DCP ``.metadata`` through the production path
  (``readers.dcp.read_metadata_file``: the C scanner, else the restricted unpickler), then what
  ``dcp_explorer.open`` does with the result (chunk-layout checks, validation against the data
  files, the per-rank merge) and, every few successes, the ``tensors``/``chunks``/``files`` tables;
* ``safetensors`` -- a whole ``.safetensors`` file through ``SafetensorsReader`` (header length,
  JSON, dtypes, shapes, offsets, ``DCP_SHARDING_INFO``), then the same checks and tables;
* ``item`` -- one stored DCP item (a ``torch.save`` zip): ``tensor_layout`` (zip directory +
  restricted ``data.pkl`` unpickler) and ``load_plain_object`` (the bytes-entry unpickler).

The contract: every input parses or raises a ``DcpExplorerError`` subclass. Anything else -- another
exception, a hang (``--exec-timeout``), memory exhaustion (``--max-memory``), a crash of the process --
is a finding: the input is saved as ``tests/fuzz_regressions/<target>-<sha1>.bin`` (``--findings``),
which ``tests/test_fuzz.py`` replays on every run from then on. Inputs are fed through an
in-memory fsspec filesystem, so nothing is written to disk per execution.

Engines:

* built in (default, no dependencies): seeds from the sample checkpoints; byte-level mutations
  (bit flips, interesting integers, pickle opcodes, insertions, deletions, duplications, splices
  between seeds) and structure-aware ones (a safetensors header edited as JSON, then re-encoded);
* ``--atheris``: coverage-guided libFuzzer (``pip install atheris``) over one target; arguments
  after ``--`` go to libFuzzer.

Examples::

    python benchmarks/fuzz_metadata.py --seconds 60               # what CI runs (tests/test_fuzz.py)
    python benchmarks/fuzz_metadata.py --seconds 3600 --target metadata
    python benchmarks/fuzz_metadata.py --atheris --target safetensors -- -max_total_time=600

Prints one JSON line: executions, executions per second, per-target counts and the findings.
Exit status 1 when there are findings.
"""

from __future__ import annotations

import argparse
import copyreg
import hashlib
import io
import json
import os
import pickle
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcp_explorer.errors import DcpExplorerError  # noqa: E402

TARGETS = ("metadata", "safetensors", "item")
DEFAULT_FINDINGS = ROOT / "tests" / "fuzz_regressions"


class Hang(Exception):
    """One execution took longer than ``--exec-timeout``."""


# ============================================================================================
# targets
# ============================================================================================
class Targets:
    """The targets, over a private in-memory filesystem."""

    def __init__(self, tables_every: int = 8) -> None:
        import fsspec

        self.fs = fsspec.filesystem("memory", skip_instance_cache=True)
        self.root = f"/dcpx-fuzz-{os.getpid()}"
        self.tables_every = tables_every
        self._successes = 0

    def _store(self, name: str, data: bytes) -> Any:
        from dcp_explorer.store import Store

        path = f"{self.root}/{name}"
        self.fs.store.clear()
        self.fs.pipe_file(path, data)
        info = {"name": path, "size": len(data), "type": "file", "created": 1.0}
        return Store(fs=self.fs, root=self.root, url=f"memory://{self.root}", listing={name: len(data)},
                     info={name: info})  # fmt: skip

    def _after_open(self, index: Any, store: Any) -> None:
        """What ``open`` does after a reader returned an index; the tables now and then."""
        from dcp_explorer.checkpoint import _layout_problems, _validate

        _layout_problems(index, store.url)
        _validate(index, store, strict=False)
        self._successes += 1
        if self._successes % self.tables_every == 0:
            from dcp_explorer.tables import chunks_table, files_table, modules_table, tensors_table

            tensors_table(index)
            chunks_table(index)
            files_table(index, {f: None for f in index.files})
            modules_table(index, 2)

    def metadata(self, data: bytes) -> None:
        from dcp_explorer.readers.dcp import merge_indexes, read_metadata_file

        store = self._store(".metadata", data)
        index = read_metadata_file(store, ".metadata")
        self._after_open(index, store)
        if self._successes % self.tables_every == 1:
            merge_indexes([index, index])  # the per-rank path (use_collectives=False)

    def safetensors(self, data: bytes) -> None:
        from dcp_explorer.readers.safetensors import SafetensorsReader

        store = self._store("model.safetensors", data)
        index = SafetensorsReader().open_index(store)
        self._after_open(index, store)

    def item(self, data: bytes) -> None:
        from dcp_explorer.readers._torchsave import load_plain_object, tensor_layout

        errors = []
        for fn in (tensor_layout, load_plain_object):  # a tensor item, or a bytes item
            try:
                fn(io.BytesIO(data), "item")
            except DcpExplorerError as e:
                errors.append(e)
        if len(errors) == 2:
            raise errors[0]

    def get(self, name: str) -> Callable[[bytes], None]:
        return getattr(self, name)


def run_one(fn: Callable[[bytes], None], data: bytes) -> str:
    """``"ok"`` or ``"error"`` (a DcpExplorerError); anything else propagates (a finding)."""
    try:
        fn(data)
    except DcpExplorerError:
        return "error"
    return "ok"


# ============================================================================================
# seeds
# ============================================================================================
def load_seeds(samples: dict[str, Path], findings: Path | None) -> dict[str, list[bytes]]:
    """Seed inputs per target, from the sample checkpoints (and earlier findings)."""
    seeds: dict[str, list[bytes]] = {t: [] for t in TARGETS}
    for name in ("mixed", "mixed_zstd", "llama_fsdp_tp_2x2", "llama_fsdp_ws1"):
        if name in samples:
            seeds["metadata"].append((Path(samples[name]) / ".metadata").read_bytes())
    if "mixed_per_rank" in samples:
        seeds["metadata"].append((Path(samples["mixed_per_rank"]) / "__0.metadata").read_bytes())
    for name in ("hf_distributed", "hf_consolidated", "mxfp4", "fp8_block", "hf_rank0"):
        if name in samples:
            files = sorted(Path(samples[name]).glob("*.safetensors"), key=lambda p: p.stat().st_size)
            seeds["safetensors"] += [p.read_bytes() for p in files[:2]]
    if "mixed" in samples:
        seeds["item"] += _items(Path(samples["mixed"]), zstd=False)
    if "mixed_zstd" in samples:
        seeds["item"] += _items(Path(samples["mixed_zstd"]), zstd=True)[:4]
    if findings is not None and findings.is_dir():
        for p in sorted(findings.glob("*.bin")):
            t = p.name.split("-", 1)[0]
            if t in seeds:
                seeds[t].append(p.read_bytes())
    return {t: s for t, s in seeds.items() if s}


def _items(ck: Path, zstd: bool) -> list[bytes]:
    """Stored items (torch.save zips; zstd ones decompressed) of a DCP sample, from our own reader."""
    from dcp_explorer import open as dx_open

    ckpt = dx_open(ck, cache=False)
    idx = ckpt.index
    c = idx.chunks
    locs = [(int(c.file[r]), int(c.byte_offset[r]), int(c.byte_length[r])) for r in range(0, len(c), 5)]
    locs += [(f, o, n) for f, o, n, _ in list(idx.bytes_items.values())[:4]]
    out = []
    for f, o, n in locs:
        with open(ck / idx.files[f], "rb") as fh:
            fh.seek(o)
            raw = fh.read(n)
        if zstd:
            import zstandard

            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read(16 << 20)
        out.append(raw)
    return out


# ============================================================================================
# mutations
# ============================================================================================
_OPCODES = (
    b"(.012NK\x88\x89)\x85\x86\x87t]}\x8fld\x91aesu\x90bR\x81\x92\x93hjq\x94\x95\x8c\x8d\x8eBCXTUVJMLIr"
)
_INTS = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
         1 << 32, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]  # fmt: skip
_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F4",
           "C64", "U64", "F8_E8M0", "F12", "", "f32", None, 3]  # fmt: skip


def _int_field(rnd: random.Random, b: bytearray) -> None:
    if len(b) < 8:
        return
    width = rnd.choice((1, 2, 4, 8))
    at = rnd.randrange(len(b) - width + 1)
    v = rnd.choice(_INTS) + rnd.choice((0, 0, -1, 1))
    b[at : at + width] = (v % (1 << (8 * width))).to_bytes(width, "little")


def mutate_bytes(rnd: random.Random, data: bytes, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.choice((1, 1, 1, 2, 3, 4, 8))):
        op = rnd.randrange(10)
        n = len(b)
        if n == 0:
            b += bytes([rnd.randrange(256)])
            continue
        i = rnd.randrange(n)
        if op == 0:
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            b[i] = rnd.randrange(256)
        elif op == 2:
            b[i] = rnd.choice(_OPCODES)
        elif op == 3:
            _int_field(rnd, b)
        elif op == 4:
            del b[i : i + rnd.choice((1, 1, 2, 4, 16, 256))]
        elif op == 5:
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.choice((1, 2, 4, 8))))
        elif op == 6:
            j = rnd.randrange(n)
            k = rnd.choice((1, 4, 16, 64, 512))
            b[i:i] = b[j : j + k]
        elif op == 7:
            del b[rnd.randrange(n + 1) :]  # truncation
        elif op == 8 and others:
            o = rnd.choice(others)
            if o:
                j = rnd.randrange(len(o))
                b[i:] = o[j : j + rnd.choice((16, 256, 4096, len(o)))]
        else:
            b[i:i] = bytes([rnd.choice(_OPCODES)])
    return bytes(b)


def _rand_value(rnd: random.Random) -> Any:
    return rnd.choice([
        rnd.choice(_INTS), -rnd.choice(_INTS), rnd.randrange(-3, 300), 1.5, True, None, "", "x", [], {},
        [rnd.randrange(-2, 40) for _ in range(rnd.randrange(4))], {"a": 1}, "F32", [0, 1 << 70],
    ])  # fmt: skip


def mutate_safetensors(rnd: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Edit the header as JSON (entries, dtypes, shapes, offsets, __metadata__), then re-encode."""
    try:
        return _edit_header(rnd, data, others)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError):
        return mutate_bytes(rnd, data, others)  # the seed's header is too odd to edit as JSON


def _edit_header(rnd: random.Random, data: bytes, others: list[bytes]) -> bytes:
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        body = data[8 + n :]
        assert isinstance(header, dict)
    except Exception:  # noqa: BLE001 - not a parsable seed: mutate as bytes
        return mutate_bytes(rnd, data, others)
    for _ in range(rnd.choice((1, 1, 2, 3))):
        keys = [k for k in header if k != "__metadata__"]
        op = rnd.randrange(9)
        k = rnd.choice(keys) if keys else None
        ent = header.get(k) if k is not None else None
        if op == 0 and isinstance(ent, dict):
            ent["dtype"] = rnd.choice(_DTYPES)
        elif op == 1 and isinstance(ent, dict) and isinstance(ent.get("shape"), list):
            s = ent["shape"]
            if s and rnd.random() < 0.7:
                s[rnd.randrange(len(s))] = _rand_value(rnd) if rnd.random() < 0.3 else rnd.randrange(0, 64)
            else:
                ent["shape"] = [rnd.randrange(0, 9) for _ in range(rnd.randrange(5))]
        elif op == 2 and isinstance(ent, dict) and isinstance(ent.get("data_offsets"), list):
            o = ent["data_offsets"]
            if len(o) == 2 and rnd.random() < 0.6:
                o[rnd.randrange(2)] += rnd.choice((-1, 1, -8, 8, 1 << 20))
            else:
                ent["data_offsets"] = _rand_value(rnd)
        elif op == 3 and k is not None:
            if rnd.random() < 0.5 or not isinstance(ent, dict):
                header[k] = _rand_value(rnd)
            else:
                header[k] = {f: v for f, v in ent.items() if rnd.random() < 0.7}
        elif op == 4 and k is not None:
            other = rnd.choice(keys)
            header[other] = json.loads(json.dumps(header[k]))  # two tensors on the same bytes
        elif op == 5:
            meta = header.setdefault("__metadata__", {})
            if isinstance(meta, dict):
                info = meta.get("DCP_SHARDING_INFO")
                if info and rnd.random() < 0.7:
                    try:
                        d = json.loads(info)
                        kk = rnd.choice(list(d)) if d else "w"
                        d[kk] = rnd.choice(
                            [
                                {"saved_offsets": _rand_value(rnd)},
                                _rand_value(rnd),
                                {"saved_offsets": [rnd.randrange(-2, 50) for _ in range(3)]},
                            ]
                        )
                        meta["DCP_SHARDING_INFO"] = json.dumps(d)
                    except ValueError:
                        meta["DCP_SHARDING_INFO"] = info[: rnd.randrange(len(info) + 1)]
                else:
                    meta[rnd.choice(["format", "DCP_SHARDING_INFO", "x"])] = (
                        _rand_value(rnd) if rnd.random() < 0.5 else json.dumps(_rand_value(rnd))
                    )
            else:
                header["__metadata__"] = _rand_value(rnd)
        elif op == 6:
            body = body[: rnd.randrange(len(body) + 1)]
        elif op == 7 and k is not None:
            header.pop(k, None)
        else:
            header[f"t{rnd.randrange(100)}"] = {"dtype": rnd.choice(_DTYPES), "shape": [rnd.randrange(5)],
                                                "data_offsets": [rnd.randrange(64), rnd.randrange(64)]}  # fmt: skip
    raw = json.dumps(header).encode()
    length = len(raw)
    if rnd.random() < 0.05:
        length = rnd.choice(_INTS)
    out = length.to_bytes(8, "little", signed=False) if length < 1 << 64 else b"\xff" * 8
    out += raw + body
    return mutate_bytes(rnd, out, others) if rnd.random() < 0.1 else out


# --- DCP metadata edited as objects ---------------------------------------------------------
class _Size(tuple):
    """A tuple that pickles as ``torch.Size(...)``."""


class _Spoofs:
    """Classes and objects named like torch's, in fake modules, so that the C pickler writes torch's globals.

    The fake modules are in ``sys.modules`` only while :meth:`dump` runs (this process never imports
    torch); the stand-ins of a parsed seed are mapped to them by ``reducer_override``.
    """

    def __init__(self) -> None:
        import types

        from dcp_explorer.readers import _safe_pickle as sp

        self.sp = sp
        self.modules: dict[str, types.ModuleType] = {}
        self.cls: dict[type, type] = {}
        for (mod, name), obj in sp.ALLOWED_GLOBALS.items():
            if isinstance(obj, type) and obj not in (tuple, dict) and obj not in self.cls:
                self.cls[obj] = self._fake(mod, name, obj)  # a subclass: instances can be re-classed
        self.size = self._fake("torch", "Size")
        self.dtypes: dict[str, Any] = {}

    def _module(self, mod: str) -> Any:
        import types

        m = self.modules.get(mod)
        if m is None:
            m = self.modules[mod] = types.ModuleType(mod)
        return m

    def _fake(self, mod: str, name: str, base: type = object) -> type:
        ns: dict[str, Any] = {"__module__": mod, "__qualname__": name}
        if "__slots__" in base.__dict__:
            ns["__slots__"] = ()  # same layout as the base
        t = type(name, (base,), ns)
        setattr(self._module(mod), name, t)
        return t

    def dtype(self, name: str) -> Any:
        d = self.dtypes.get(name)
        if d is None:
            t = type("dtype", (), {"__module__": "torch", "__reduce__": lambda self, n=name: n})
            d = self.dtypes[name] = t()
            setattr(self._module("torch"), name, d)
        return d

    def dump(self, obj: Any, protocol: int) -> bytes:
        sp, spoofs = self.sp, self

        fakes = set(spoofs.cls.values())

        class P(pickle.Pickler):
            def reducer_override(self, o: Any) -> Any:
                t = type(o)
                if t in fakes:
                    if isinstance(o, sp.TensorProperties):
                        state: Any = tuple(getattr(o, a, None) for a in sp.TensorProperties.__slots__)
                    else:
                        state = dict(o.__dict__)
                    return copyreg.__newobj__, (t,), state
                if t is _Size:
                    return spoofs.size, (tuple(o),)
                return NotImplemented

        for o in _standins(
            obj
        ):  # stand-ins become torch-named twins, dtype names objects named torch.<dtype>
            if type(o) in self.cls:
                if isinstance(o, sp.TensorProperties) and type(getattr(o, "dtype", None)) is sp.DType:
                    o.dtype = self.dtype(str(o.dtype))
                o.__class__ = self.cls[type(o)]
        saved = {k: sys.modules.get(k) for k in self.modules}
        sys.modules.update(self.modules)
        try:
            buf = io.BytesIO()
            P(buf, protocol).dump(obj)
            return buf.getvalue()
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v


_SPOOFS: _Spoofs | None = None


def _standins(obj: Any) -> list[Any]:
    """Every object with a ``__dict__`` or slots (the stand-ins) reachable from ``obj``, once each."""
    out, seen, stack = [], set(), [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(x for x in o if not isinstance(x, (int, str, float, bytes)))
        elif hasattr(o, "__dict__") or hasattr(type(o), "__slots__") and not isinstance(o, (int, str)):
            out.append(o)
            d = getattr(o, "__dict__", None)
            if isinstance(d, dict):
                stack.extend(d.values())
    return out


def _sizes(obj: Any) -> None:
    """Mark the tuples torch pickles as torch.Size (sizes, chunk offsets/sizes, index offsets)."""
    for o in _standins(obj):
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            for f in ("size", "offsets", "sizes", "offset"):
                if type(d.get(f)) is tuple:
                    d[f] = _Size(d[f])


def _unpickle_standins(data: bytes) -> Any:
    from dcp_explorer.readers._safe_pickle import load_metadata_pickle

    return load_metadata_pickle(data, "seed")  # guarded: a pool input may hold a memo bomb


def mutate_metadata_objects(rnd: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Unpickle a (parsable) seed into stand-ins, edit the objects, pickle them back as torch would.

    Only for inputs up to 20 KB (about 0.25 ms per KB); larger ones are mutated as bytes.
    """
    if len(data) > 20_000:
        return mutate_bytes(rnd, data, others)
    try:
        md = _unpickle_standins(data)
        _edit_metadata(rnd, md)
        _sizes(md)
        global _SPOOFS
        if _SPOOFS is None:
            _SPOOFS = _Spoofs()
        return _SPOOFS.dump(md, rnd.choice((4, 4, 4, 2, 5)))
    except Exception:  # noqa: BLE001 - the seed is not a parsable Metadata: mutate bytes
        return mutate_bytes(rnd, data, others)


def _edit_metadata(rnd: random.Random, md: Any) -> None:
    from dcp_explorer.readers import _safe_pickle as sp

    sdm = md.__dict__["state_dict_metadata"]
    storage = md.__dict__.get("storage_data") or {}
    for _ in range(rnd.choice((1, 1, 2, 3))):
        op = rnd.randrange(12)
        fqn = rnd.choice(list(sdm)) if sdm else None
        ent = sdm.get(fqn)
        tsm = ent if isinstance(ent, sp.TensorStorageMetadata) else None
        key = rnd.choice(list(storage)) if storage else None
        info = storage.get(key) if key is not None else None
        if op == 0 and tsm is not None:  # tensor size
            size = list(tsm.__dict__.get("size") or ())
            if size and rnd.random() < 0.7:
                size[rnd.randrange(len(size))] = rnd.choice([0, 1, rnd.randrange(100), -1, 1 << 40, 1 << 63])
            else:
                size = size[:-1] if size and rnd.random() < 0.5 else [*size, rnd.randrange(4)]
            tsm.__dict__["size"] = tuple(size)
        elif op == 1 and tsm is not None:  # one chunk's offsets or sizes
            chunks = tsm.__dict__.get("chunks") or []
            if chunks:
                ch = rnd.choice(chunks).__dict__
                f = rnd.choice(("offsets", "sizes"))
                v = list(ch.get(f) or ())
                if v:
                    v[rnd.randrange(len(v))] += rnd.choice((-1, 1, -100, 5, 1 << 31, 1 << 62))
                ch[f] = tuple(v)
        elif op == 2 and tsm is not None:  # drop, duplicate or reorder chunks
            chunks = tsm.__dict__.get("chunks") or []
            if chunks:
                r = rnd.random()
                if r < 0.4:
                    chunks.pop(rnd.randrange(len(chunks)))
                elif r < 0.7:
                    chunks.append(rnd.choice(chunks))
                else:
                    rnd.shuffle(chunks)
        elif op == 3 and tsm is not None:
            props = tsm.__dict__.get("properties")
            if props is not None:
                props.dtype = (
                    sp.DType(rnd.choice(sorted(sp._TORCH_DTYPES))) if rnd.random() < 0.8 else "float99"
                )
        elif op == 4 and info is not None:  # where the bytes are
            f = rnd.choice(("offset", "length"))
            info.__dict__[f] = rnd.choice((0, -1, 1 << 40, 1 << 63, rnd.randrange(100000), None, "7"))
        elif op == 5 and info is not None:
            info.__dict__["relative_path"] = rnd.choice(("../x.distcp", "/etc/passwd", "", "a/b.distcp",
                                                         "__9_0.distcp", "C:\\x", 5, None))  # fmt: skip
        elif op == 6 and info is not None:
            info.__dict__["transform_descriptors"] = rnd.choice(
                (["stream.zstd/1"], ["x"], "stream.zstd/1", [3], [])
            )
        elif op == 7 and key is not None:  # the index pointing at a chunk
            f = rnd.choice(("fqn", "offset", "index"))
            key.__dict__[f] = rnd.choice((None, 0, 3, -1, 1 << 40, "model.x", (0,), (0, 0), fqn))
        elif op == 8 and key is not None:
            storage.pop(key)
        elif op == 9 and fqn is not None:  # entries of another kind
            sdm[fqn] = rnd.choice((sp.BytesStorageMetadata(), 42, None, "x", sp.TensorStorageMetadata()))
        elif op == 10 and fqn is not None:
            new = rnd.choice((f"{fqn}.x", "", 7, fqn + "\udcff"))
            sdm[new] = sdm.pop(fqn)
        else:
            target = rnd.choice(("planner_data", "storage_meta", "version", "storage_data"))
            md.__dict__[target] = rnd.choice((None, {}, [], 3, "1.0.0", {"a": ("b", 1)}))


MUTATORS: dict[str, Callable[[random.Random, bytes, list[bytes]], bytes]] = {
    "metadata": lambda r, d, o: (
        mutate_metadata_objects(r, d, o) if r.random() < 0.5 else mutate_bytes(r, d, o)
    ),
    "safetensors": lambda r, d, o: mutate_safetensors(r, d, o) if r.random() < 0.8 else mutate_bytes(r, d, o),
    "item": mutate_bytes,
}


# ============================================================================================
# the loop
# ============================================================================================
class Fuzzer:
    """Mutate seeds, run the targets, keep findings."""

    def __init__(self, seeds: dict[str, list[bytes]], findings: Path | None, *, seed: int = 0,
                 exec_timeout: float = 5.0, last_input: Path | None = None, max_growth: float = 1.0) -> None:  # fmt: skip
        self.seeds = seeds
        self.targets = Targets()
        self.findings_dir = findings
        self.rnd = random.Random(seed)
        self.exec_timeout = exec_timeout
        self.stats: dict[str, dict[str, int]] = {
            t: {"execs": 0, "ok": 0, "error": 0, "findings": 0} for t in seeds
        }
        self.findings: list[dict[str, Any]] = []
        self._signatures: set[tuple[str, str, str]] = set()
        self._last = open(last_input, "wb") if last_input else None  # noqa: SIM115 - closed in close()
        # inputs that parsed: mutating them reaches deeper than mutating random failures
        self.pool: dict[str, list[bytes]] = {t: list(s) for t, s in seeds.items()}
        # memory: an input that makes the peak RSS grow by more than max_growth GiB is a finding
        # (a high-water mark: the first such input is caught, later ones only if they go higher)
        self._max_growth_kib = int(max_growth * (1 << 20))
        self._rss_peak = _peak_rss_kib()

    def close(self) -> None:
        if self._last is not None:
            self._last.close()

    def _remember(self, target: str, data: bytes) -> None:
        if self._last is not None:  # for a crash that kills the process: the parent saves it
            self._last.seek(0)
            self._last.write(target.encode() + b"\n" + data)
            self._last.truncate()
            self._last.flush()

    def execute(self, target: str, data: bytes) -> str:
        fn = self.targets.get(target)
        self._remember(target, data)
        self._rss_peak = max(self._rss_peak, _peak_rss_kib())  # growth before this point is not the target's
        self.stats[target]["execs"] += 1
        if self.exec_timeout:
            signal.setitimer(signal.ITIMER_REAL, self.exec_timeout)
        try:
            outcome = run_one(fn, data)
        except Hang:
            outcome = self._finding(target, data, "hang", f"took more than {self.exec_timeout} s")
        except BaseException as e:  # noqa: BLE001 - every other exception is a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
            outcome = self._finding(target, data, type(e).__name__, f"{where}: {str(e)[:300]}")
        finally:
            if self.exec_timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
        peak = _peak_rss_kib()
        if peak - self._rss_peak > self._max_growth_kib:
            outcome = self._finding(
                target, data, "memory", f"peak RSS grew by {(peak - self._rss_peak) >> 10} MiB"
            )
            self._rss_peak = peak
        self.stats[target][outcome if outcome in ("ok", "error") else "findings"] += 1
        return outcome

    def _finding(self, target: str, data: bytes, kind: str, detail: str) -> str:
        sig = (
            target,
            kind,
            detail.split(":", 2)[0] + detail.split(":", 2)[1] if detail.count(":") >= 2 else detail,
        )
        if sig in self._signatures:
            return "finding"
        self._signatures.add(sig)
        digest = hashlib.sha1(data).hexdigest()[:12]
        path = None
        if self.findings_dir is not None:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            path = self.findings_dir / f"{target}-{digest}.bin"
            path.write_bytes(data)
        self.findings.append(
            {"target": target, "kind": kind, "detail": detail, "file": str(path) if path else None}
        )
        return "finding"

    def run(self, seconds: float, targets: list[str]) -> dict[str, Any]:
        targets = [t for t in targets if t in self.seeds]
        t0 = time.perf_counter()
        for t in targets:  # every seed once, as is
            for s in self.seeds[t]:
                self.execute(t, s)
        i = 0
        while time.perf_counter() - t0 < seconds:
            t = targets[i % len(targets)]
            i += 1
            pool = self.pool[t]
            base = self.rnd.choice(pool)
            data = MUTATORS[t](self.rnd, base, self.seeds[t])
            if len(data) > 1 << 22:
                data = data[: 1 << 22]
            if self.execute(t, data) == "ok" and len(pool) < 256 and self.rnd.random() < 0.05:
                pool.append(data)
        elapsed = time.perf_counter() - t0
        execs = sum(s["execs"] for s in self.stats.values())
        return {"seconds": round(elapsed, 2), "execs": execs, "execs_per_sec": round(execs / elapsed, 1),
                "targets": self.stats, "findings": self.findings}  # fmt: skip


def _peak_rss_kib() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _samples(arg: str | None) -> dict[str, Path]:
    if arg:
        return {k: Path(v) for k, v in json.loads(arg).items()}
    from dcp_explorer.samples import make_samples

    return make_samples(progress=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("DCP_EXPLORER_FUZZ_SECONDS", 60)))
    ap.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--samples", default=None, help="JSON {name: directory}; default: dcp_explorer.samples")
    ap.add_argument(
        "--findings", default=str(DEFAULT_FINDINGS), help="where to save inputs that break the contract"
    )
    ap.add_argument(
        "--exec-timeout", type=float, default=5.0, help="seconds one input may take (0: no limit)"
    )
    ap.add_argument("--max-memory", type=float, default=4.0, help="GiB of address space (0: no limit)")
    ap.add_argument("--last-input", default=None, help="file holding the input being run (for crashes)")
    ap.add_argument(
        "--atheris", action="store_true", help="coverage-guided fuzzing with atheris (one target)"
    )
    args, rest = ap.parse_known_args(argv)
    if args.max_memory:
        import resource

        lim = int(args.max_memory * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import faulthandler

    faulthandler.enable()
    signal.signal(signal.SIGALRM, _on_alarm)
    findings = Path(args.findings) if args.findings else None
    seeds = load_seeds(_samples(args.samples), findings)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    if args.atheris:
        return _atheris(targets[0], seeds, findings, rest)
    fz = Fuzzer(seeds, findings, seed=args.seed, exec_timeout=args.exec_timeout,
                last_input=Path(args.last_input) if args.last_input else None)  # fmt: skip
    try:
        report = fz.run(args.seconds, targets)
    finally:
        fz.close()
    report["seed"] = args.seed
    print(json.dumps(report))
    return 1 if report["findings"] else 0


def _atheris(target: str, seeds: dict[str, list[bytes]], findings: Path | None, rest: list[str]) -> int:
    import tempfile

    import atheris

    corpus = Path(tempfile.mkdtemp(prefix=f"dcpx-fuzz-{target}-"))
    for i, s in enumerate(seeds[target]):
        (corpus / f"seed{i}").write_bytes(s)
    fn = Targets().get(target)

    def one(data: bytes) -> None:
        try:
            fn(data)
        except DcpExplorerError:
            pass
        except Exception:
            if findings is not None:
                findings.mkdir(parents=True, exist_ok=True)
                (findings / f"{target}-{hashlib.sha1(data).hexdigest()[:12]}.bin").write_bytes(data)
            raise

    import dcp_explorer.checkpoint  # noqa: F401 - loaded before instrumenting
    import dcp_explorer.readers._torchsave  # noqa: F401
    import dcp_explorer.readers.dcp  # noqa: F401
    import dcp_explorer.readers.safetensors  # noqa: F401
    import dcp_explorer.tables  # noqa: F401

    atheris.instrument_all()  # the Python code already loaded (dcp_explorer was imported above)
    flags = [a for a in rest if a != "--"]
    if findings is not None and not any(a.startswith("-artifact_prefix=") for a in flags):
        findings.mkdir(parents=True, exist_ok=True)  # crash-/oom-/timeout- inputs land with the regressions
        flags.append(f"-artifact_prefix={findings}/{target}-atheris-")
    atheris.Setup([sys.argv[0], *flags, str(corpus)], one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
