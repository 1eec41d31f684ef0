"""The corruption bank: one row per kind of damaged or hostile checkpoint, and what dcp_explorer must answer.

Every kind builds a damaged copy of a real sample (``samples`` fixture) in ``tmp_path`` -- the
samples themselves are never modified -- and runs ``open`` (and, when the damage is in the data,
the tables and ``load``) under a per-case timeout. For each kind the test asserts:

* the **exact error class** (``type(err) is ...``), a subclass of ``DcpExplorerError``, with a
  message holding the kind's fragment and **naming the file** (or the checkpoint directory, for
  problems of the whole layout);
* **no code ran**: payload pickles would create a marker file (each is shown live under plain
  ``pickle`` first), no process was started (audit hooks, ``tests/_guard.py``);
* **nothing outside was read**: no file inside the test's tmp dir but outside the checkpoint
  and the parse cache was opened (resolved through symlinks);
* **nothing inside was written**: no write/rename/remove/chmod inside the checkpoint, and its
  snapshot (names, sizes, mtimes, bytes) is unchanged;
* **no partial state**: no temporary file left in the parse cache, no file descriptor left open,
  the same error again with a warm cache, and (for load errors) an intact tensor still loads.

Kinds whose damage is not an error (overlapping chunks) assert the warning instead. Chunk lists
with holes warn at open and raise ``MetadataError`` when a hole is loaded.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import pickle
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _guard import paused, watching

import dcp_explorer as dx
from dcp_explorer import (
    ByteRangeError,
    ChunkFileMissing,
    DcpExplorerError,
    IndexFileError,
    MetadataError,
    NotACheckpointError,
    SafetensorsHeaderError,
    UnsafePickleError,
)

torch = pytest.importorskip("torch")

from dcp_explorer.quant import QuantizationError  # noqa: E402

#: seconds one case may take (open + tables + load, twice); a hang fails the run
CASE_TIMEOUT = 30


# ============================================================================================
# building damaged copies
# ============================================================================================
@dataclass
class Ctx:
    """Where a case builds its checkpoint: ``ck`` (the damaged copy), ``outside`` (a sibling directory
    holding files the checkpoint must not reach) and ``marker`` (what a payload would create)."""

    samples: dict[str, Path]
    tmp: Path
    expect: list[str] = field(default_factory=list)
    """Further fragments the error message must hold (set by builders that know them)."""

    @property
    def ck(self) -> Path:
        return self.tmp / "ck"

    @property
    def outside(self) -> Path:
        return self.tmp / "outside"

    @property
    def marker(self) -> Path:
        return self.outside / "PWNED"

    def copy(self, name: str) -> Path:
        shutil.copytree(self.samples[name], self.ck)
        return self.ck


def torch_md(ck: Path, name: str = ".metadata") -> Any:
    """torch's own Metadata of a (trusted) sample copy."""
    with open(ck / name, "rb") as f:
        import torch.distributed.checkpoint  # noqa: F401 - the classes the pickle names

        return pickle.load(f)


def write_md(ck: Path, md: Any, name: str = ".metadata") -> None:
    (ck / name).write_bytes(pickle.dumps(md, protocol=4))


def key_of(md: Any, fqn: str, index: int | None = 0) -> Any:
    """The storage_data key of chunk ``index`` of ``fqn`` (``None``: the bytes item)."""
    return next(k for k in md.storage_data if k.fqn == fqn and k.index == index)


def item_bytes(ck: Path, md: Any, key: Any) -> bytes:
    si = md.storage_data[key]
    with open(ck / si.relative_path, "rb") as f:
        f.seek(si.offset)
        return f.read(si.length)


def swap_item(ck: Path, md: Any, key: Any, data: bytes) -> Path:
    """Append ``data`` to the item's file and point the metadata at it (a writer that stored ``data``)."""
    si = md.storage_data[key]
    path = ck / si.relative_path
    si.offset = path.stat().st_size
    si.length = len(data)
    with open(path, "ab") as f:
        f.write(data)
    write_md(ck, md)
    return path


def saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def patch_zip_directory(item: bytes, member_suffix: str, field_name: str, value: int) -> bytes:
    """Rewrite one field of a member's central-directory record (the zip's member table)."""
    b = bytearray(item)
    at = {"file_size": 24, "header_offset": 42}[field_name]
    pos = 0
    while (pos := b.find(b"PK\x01\x02", pos)) >= 0:
        n = struct.unpack_from("<H", b, pos + 28)[0]
        if bytes(b[pos + 46 : pos + 46 + n]).endswith(member_suffix.encode()):
            struct.pack_into("<I", b, pos + at, value)
            return bytes(b)
        pos += 4
    raise AssertionError(f"no member {member_suffix} in the item")


def st_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def st_write(path: Path, header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def st_edit(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, body = st_parts(path)
    edit(header)
    st_write(path, header, body)


def first_st(ck: Path) -> Path:
    return sorted(ck.glob("*.safetensors"))[0]


# --- payloads: each would create ``marker`` if anything ran it ---------------------------------
PAYLOADS: dict[str, Callable[[Path], tuple[Any, tuple[Any, ...]]]] = {
    "os.system": lambda m: (os.system, (f"touch '{m}'",)),
    "builtins.eval": lambda m: (eval, (f"open({str(m)!r}, 'w').close()",)),
    "builtins.exec": lambda m: (exec, (f"open({str(m)!r}, 'w').close()",)),
    "subprocess.Popen": lambda m: (subprocess.Popen, (["touch", str(m)],)),
    "torch.save": lambda m: (torch.save, ({}, str(m))),
}


class Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def payload(name: str, marker: Path) -> Reduce:
    return Reduce(*PAYLOADS[name](marker))


def global_of(obj: Any) -> str:
    """The global a pickle of ``obj`` names (e.g. ``posix.system`` for ``os.system``)."""
    f = obj.func
    return f"{getattr(f, '__module__', None) or 'builtins'}.{f.__qualname__}"


# --- builders ------------------------------------------------------------------------------------
def b_empty_dir(c: Ctx) -> Path:
    c.ck.mkdir()
    return c.ck


def b_unrelated_files(c: Ctx) -> Path:
    c.ck.mkdir()
    (c.ck / "notes.txt").write_text("hello")
    (c.ck / "weights.bin").write_bytes(b"\0" * 64)
    return c.ck


def b_is_directory(name: str) -> Callable[[Ctx], Path]:
    """A copy of ``mixed`` where the file ``name`` is replaced by an empty directory of that name."""

    def build(c: Ctx) -> Path:
        c.copy("mixed")
        (c.ck / name).unlink()
        (c.ck / name).mkdir()
        return c.ck

    return build


def b_truncated(fraction: float) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        c.copy("mixed")
        data = (c.ck / ".metadata").read_bytes()
        (c.ck / ".metadata").write_bytes(data[: min(int(len(data) * fraction), len(data) - 1)])
        return c.ck

    return build


def b_garbage(c: Ctx) -> Path:
    c.copy("mixed")
    rnd = random.Random(8)
    (c.ck / ".metadata").write_bytes(bytes(rnd.randrange(256) for _ in range(3000)))
    return c.ck


def b_wrong_type(c: Ctx) -> Path:
    c.copy("mixed")
    (c.ck / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": [1, 2]}, protocol=4))
    c.expect.append("dict")
    return c.ck


def b_wrong_entry(c: Ctx) -> Path:
    c.copy("mixed")
    md = torch_md(c.ck)
    md.state_dict_metadata["model.bogus"] = 42
    write_md(c.ck, md)
    return c.ck


def b_refused_global(name: str) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        c.copy("mixed")
        obj = payload(name, c.marker)
        (c.ck / ".metadata").write_bytes(pickle.dumps(obj, protocol=4))
        c.expect.append(f"'{global_of(obj)}'")
        return c.ck

    return build


def b_torch_internal_global(c: Ctx) -> Path:
    """A torch name that is fine inside a tensor item, but not in .metadata."""
    c.copy("mixed")
    (c.ck / ".metadata").write_bytes(pickle.dumps(torch.zeros(2), protocol=4))
    c.expect.append("torch._utils._rebuild_tensor_v2")
    return c.ck


def b_payload_in_real_metadata(c: Ctx) -> Path:
    c.copy("mixed")
    md = torch_md(c.ck)
    obj = payload("os.system", c.marker)
    md.planner_data["model.row_sharded"] = obj
    write_md(c.ck, md)
    c.expect.append(global_of(obj))
    return c.ck


def b_unimported_module(c: Ctx) -> Path:
    """A global of a module that would run code (create the marker) when imported."""
    c.copy("mixed")
    mods = c.tmp / "mods"
    mods.mkdir()
    (mods / "dcpx_corruption_evil.py").write_text(f"open({str(c.marker)!r}, 'w').close()\nf = print\n")
    sys.path.insert(0, str(mods))  # removed by the test
    (c.ck / ".metadata").write_bytes(b"\x80\x04\x8c\x14dcpx_corruption_evil\x8c\x01f\x93\x8c\x01x\x85R.")
    c.expect.append("dcpx_corruption_evil.f")
    return c.ck


def b_persistent_id(c: Ctx) -> Path:
    c.copy("mixed")
    (c.ck / ".metadata").write_bytes(b"\x80\x04\x8c\x03pid\x94Q.")
    return c.ck


def b_huge_memo(c: Ctx) -> Path:
    c.copy("mixed")
    (c.ck / ".metadata").write_bytes(
        b"\x80\x04Nr\xf0\xff\xff\xff."
    )  # memo slot 4 G: CPython would allocate 64 GB
    return c.ck


def b_memo_bomb_after_unmodelled(c: Ctx) -> Path:
    """Something the C scanner hands to the reference unpickler, then a memo index that would make
    CPython's unpickler allocate and zero 1.6 GB: refused, not handed over."""
    c.copy("mixed")
    md = torch_md(c.ck)
    md.planner_data["model.row_sharded"] = {1.5: "a float key"}  # not modelled by the scanner
    data = pickle.dumps(md, protocol=4)
    assert data.endswith(b".")
    (c.ck / ".metadata").write_bytes(data[:-1] + b"r" + struct.pack("<I", 100_000_000) + b".")
    return c.ck


def b_relative_path(bad: Callable[[Ctx], str]) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        c.copy("mixed")
        md = torch_md(c.ck)
        name = bad(c)
        md.storage_data[key_of(md, "model.row_sharded")].relative_path = name
        write_md(c.ck, md)
        c.expect.append(repr(name))
        return c.ck

    return build


def b_data_symlink_outside(c: Ctx) -> Path:
    c.copy("mixed")
    shutil.move(str(c.ck / "__1_0.distcp"), str(c.outside / "__1_0.distcp"))
    (c.ck / "__1_0.distcp").symlink_to(c.outside / "__1_0.distcp")
    return c.ck


def b_metadata_symlink_outside(c: Ctx) -> Path:
    c.copy("mixed")
    shutil.move(str(c.ck / ".metadata"), str(c.outside / ".metadata"))
    (c.ck / ".metadata").symlink_to(c.outside / ".metadata")
    return c.ck


def b_safetensors_symlink_outside(c: Ctx) -> Path:
    c.copy("hf_rank0")
    victim = first_st(c.ck)
    shutil.move(str(victim), str(c.outside / victim.name))
    victim.symlink_to(c.outside / victim.name)
    return c.ck


def b_storage_names_unknown_fqn(c: Ctx) -> Path:
    c.copy("mixed")
    md = torch_md(c.ck)
    key = key_of(md, "model.plain")
    md.storage_data[type(key)("model.ghost", key.offset, key.index)] = md.storage_data.pop(key)
    write_md(c.ck, md)
    return c.ck


def b_chunk_wrong_ndim(c: Ctx) -> Path:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    c.copy("mixed")
    md = torch_md(c.ck)
    md.state_dict_metadata["model.plain"].chunks[0] = ChunkStorageMetadata(torch.Size([0]), torch.Size([12]))
    write_md(c.ck, md)
    return c.ck


def b_distcp_missing(c: Ctx) -> Path:
    c.copy("mixed")
    (c.ck / "__1_0.distcp").unlink()
    return c.ck


def b_distcp_truncated(c: Ctx) -> Path:
    c.copy("mixed")
    p = c.ck / "__3_0.distcp"
    p.write_bytes(p.read_bytes()[:5000])
    c.expect.append("5000 bytes")
    return c.ck


def b_range_past_eof(c: Ctx) -> Path:
    c.copy("mixed")
    md = torch_md(c.ck)
    md.storage_data[key_of(md, "model.row_sharded", 2)].length += 1 << 20
    write_md(c.ck, md)
    return c.ck


def b_negative_byte_offset(c: Ctx) -> Path:
    c.copy("mixed")
    md = torch_md(c.ck)
    md.storage_data[key_of(md, "model.grid", 1)].offset = -64
    write_md(c.ck, md)
    c.expect.append("[-64,")
    return c.ck


def b_per_rank_truncated(c: Ctx) -> Path:
    c.copy("mixed_per_rank")
    p = c.ck / "__2.metadata"
    p.write_bytes(p.read_bytes()[:1000])
    return c.ck


def b_item(transform: Callable[[Ctx, bytes], bytes], fqn: str = "model.row_sharded", index: int | None = 1,
           sample: str = "mixed") -> Callable[[Ctx], Path]:  # fmt: skip
    """A copy of ``sample`` where one stored item is replaced by ``transform(ctx, original item)``."""

    def build(c: Ctx) -> Path:
        c.copy(sample)
        md = torch_md(c.ck)
        key = key_of(md, fqn, index)
        swap_item(c.ck, md, key, transform(c, item_bytes(c.ck, md, key)))
        return c.ck

    return build


def t_not_a_zip(c: Ctx, item: bytes) -> bytes:
    return bytes(random.Random(3).randrange(256) for _ in range(len(item)))


def t_header_offset_lies(c: Ctx, item: bytes) -> bytes:
    return patch_zip_directory(item, "/data/0", "header_offset", 0)  # points at data.pkl's header


def t_size_lies(c: Ctx, item: bytes) -> bytes:
    return patch_zip_directory(item, "/data/0", "file_size", 1 << 30)


def t_shape_lies(c: Ctx, item: bytes) -> bytes:
    return saved(torch.zeros(2, 6))


def t_dtype_lies(c: Ctx, item: bytes) -> bytes:
    return saved(torch.zeros(3, 6, dtype=torch.float64))


def t_tensor_payload(c: Ctx, item: bytes) -> bytes:
    obj = payload("os.system", c.marker)
    c.expect.append(global_of(obj))
    return saved(obj)


def t_deflated_broken(c: Ctx, item: bytes) -> bytes:
    """The item re-zipped with data.pkl deflated, then a byte of its compressed stream changed."""
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(item))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            comp = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info), compress_type=comp)
    out = bytearray(buf.getvalue())
    out[30 + len("archive/data.pkl") + 3] ^= 0xFF  # inside data.pkl's deflate stream
    return bytes(out)


def t_not_zstd(c: Ctx, item: bytes) -> bytes:
    return b"\x28\xb5\x2f\xfd" + bytes(random.Random(5).randrange(256) for _ in range(len(item) - 4))


def zstd_bomb(size: int) -> bytes:
    """A valid zstd frame of RLE blocks that decompresses to ``size`` zero bytes (4 bytes per 128 KiB)."""
    block = 128 << 10
    out = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")  # magic; no content size, no checksum; window 128 KiB
    while size > 0:
        n = min(block, size)
        size -= n
        out += ((n << 3) | (1 << 1) | int(size == 0)).to_bytes(3, "little") + b"\0"  # RLE block of n zeros
    return bytes(out)


def t_zstd_bomb(c: Ctx, item: bytes) -> bytes:
    return zstd_bomb(300 << 20)  # 9.6 KB -> 300 MiB (more than even a bytes item may hold)


def b_chunks(edit: Callable[[Any], None]) -> Callable[[Ctx], Path]:
    """A copy of ``mixed`` whose chunk list of ``model.row_sharded`` (rows 0:3, 3:6, 6:9, 9:10) is edited."""

    def build(c: Ctx) -> Path:
        c.copy("mixed")
        md = torch_md(c.ck)
        edit(md)
        write_md(c.ck, md)
        return c.ck

    return build


def _rows(md: Any) -> tuple[list[Any], type, type]:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    return md.state_dict_metadata["model.row_sharded"].chunks, ChunkStorageMetadata, MetadataIndex


def e_hole(md: Any) -> None:
    chunks, _, _ = _rows(md)
    del chunks[1]
    del md.storage_data[key_of(md, "model.row_sharded", 1)]


def e_overlap(md: Any) -> None:
    chunks, CSM, MI = _rows(md)  # noqa: N806
    chunks.append(CSM(torch.Size([1, 0]), torch.Size([3, 6])))  # rows 1:4, a copy of chunk 0's item
    md.storage_data[MI("model.row_sharded", torch.Size([1, 0]), 4)] = md.storage_data[
        key_of(md, "model.row_sharded", 0)
    ]


def e_shift(md: Any) -> None:
    chunks, CSM, MI = _rows(md)  # noqa: N806
    chunks[1] = CSM(torch.Size([2, 0]), torch.Size([3, 6]))  # rows 2:5: overlaps 0:3, leaves row 5 empty
    md.storage_data[MI("model.row_sharded", torch.Size([2, 0]), 1)] = md.storage_data.pop(
        key_of(md, "model.row_sharded", 1)
    )


def e_outside(md: Any) -> None:
    chunks, CSM, MI = _rows(md)  # noqa: N806
    chunks[3] = CSM(torch.Size([10, 0]), torch.Size([1, 6]))  # row 10 of a 10-row tensor
    md.storage_data[MI("model.row_sharded", torch.Size([10, 0]), 3)] = md.storage_data.pop(
        key_of(md, "model.row_sharded", 3)
    )


def b_st(
    sample: str, damage: Callable[[Ctx, Path], None], pick: Callable[[Path], Path] = first_st
) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        c.copy(sample)
        damage(c, pick(c.ck))
        return c.ck

    return build


def d_header_len(n: Callable[[int], int]) -> Callable[[Ctx, Path], None]:
    def damage(c: Ctx, p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[:8] = n(len(data)).to_bytes(8, "little")
        p.write_bytes(bytes(data))

    return damage


def d_too_short(c: Ctx, p: Path) -> None:
    p.write_bytes(b"\x10\0\0")


def d_header_bytes(raw: bytes) -> Callable[[Ctx, Path], None]:
    def damage(c: Ctx, p: Path) -> None:
        data = bytearray(p.read_bytes())
        n = int.from_bytes(data[:8], "little")
        data[8 : 8 + n] = raw.ljust(n)
        p.write_bytes(bytes(data))

    return damage


def d_truncate_tail(c: Ctx, p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-16])


def d_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[Ctx, Path], None]:
    return lambda c, p: st_edit(p, edit)


def _tensors(h: dict[str, Any]) -> list[str]:
    return sorted(k for k in h if k != "__metadata__")


def h_overlap(h: dict[str, Any]) -> None:
    by_len: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for k in _tensors(h):
        by_len.setdefault((h[k]["dtype"], tuple(h[k]["shape"])), []).append(k)
    a, b = next(v for v in by_len.values() if len(v) >= 2)[:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def h_unknown_dtype(h: dict[str, Any]) -> None:
    h[_tensors(h)[0]]["dtype"] = "F12"


def h_shape(h: dict[str, Any]) -> None:
    k = _tensors(h)[0]
    h[k]["shape"] = [h[k]["shape"][0] + 1, *h[k]["shape"][1:]]


def h_negative_shape(h: dict[str, Any]) -> None:
    h[_tensors(h)[0]]["shape"][0] = -1


def h_metadata_not_str(h: dict[str, Any]) -> None:
    h["__metadata__"] = {"format": 1}


def h_sharding(value: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        h["__metadata__"]["DCP_SHARDING_INFO"] = value(json.loads(h["__metadata__"]["DCP_SHARDING_INFO"]))

    return edit


def _negative_offsets(info: dict[str, Any]) -> str:
    k = sorted(info)[0]
    info[k]["saved_offsets"][0] = -3
    return json.dumps(info)


def b_header_over_cap(c: Ctx) -> Path:
    """A (sparse) 200 MB file announcing a 150 MB header: above safetensors' 100 MB cap, never read."""
    c.ck.mkdir()
    with open(c.ck / "model.safetensors", "wb") as f:
        f.write((150_000_000).to_bytes(8, "little"))
        f.truncate(200_000_000)
    return c.ck


def b_index(edit: Callable[[Ctx, dict[str, Any]], Any]) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        c.copy("hf_rank0")
        p = c.ck / "model.safetensors.index.json"
        data = json.loads(p.read_text())
        out = edit(c, data)
        p.write_text(out if isinstance(out, str) else json.dumps(data))
        return c.ck

    return build


def i_escape(name: Callable[[Ctx], str]) -> Callable[[Ctx, dict[str, Any]], None]:
    def edit(c: Ctx, data: dict[str, Any]) -> None:
        shutil.copy(first_st(c.ck), c.outside / first_st(c.ck).name)
        bad = name(c)
        data["weight_map"][next(iter(data["weight_map"]))] = bad
        c.expect.append(repr(bad))

    return edit


def i_missing_file(c: Ctx, data: dict[str, Any]) -> None:
    gone = sorted(c.ck.glob("*.safetensors"))[-1]
    gone.unlink()
    c.expect.append(gone.name)


def b_quant_scale_shape(c: Ctx) -> Path:
    from safetensors.torch import load_file, save_file

    c.copy("fp8_block")
    wm = json.loads((c.ck / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"  # [3, 2] for a [300, 200] weight
    p = c.ck / wm[name]
    tensors = load_file(str(p))
    tensors[name] = torch.ones(5, 1)  # fits no block size
    save_file(tensors, str(p), metadata={"format": "pt"})
    return c.ck


def b_hf_shard_missing(c: Ctx) -> Path:
    c.copy("hf_distributed")
    (c.ck / "shard-00003-model-00001-of-00001.safetensors").unlink()  # rows 20:30 of lm_head, embed_tokens...
    return c.ck


def a_delete(name: str) -> Callable[[Ctx], None]:
    return lambda c: (c.ck / name).unlink()


def a_truncate(name: str, size: int) -> Callable[[Ctx], None]:
    def act(c: Ctx) -> None:
        with open(c.ck / name, "r+b") as f:
            f.truncate(size)

    return act


# ============================================================================================
# the bank
# ============================================================================================
@dataclass(frozen=True)
class Kind:
    """One kind of damage and the answer it must get."""

    name: str
    build: Callable[[Ctx], Path]
    error: type[BaseException] | None
    """Exact class of the error (``None``: no error; ``warning`` must then be set)."""
    fragment: str
    """Text the error message (or the warning) must contain."""
    names: str = ""
    """File the message must name, relative to the checkpoint ("": the checkpoint directory)."""
    stage: str = "open"
    """Where the error is raised: ``"open"`` or ``"load"`` (open, tables, then ``load(select)``)."""
    select: str = "*"
    warning: str | None = None
    """A fragment one of ``ckpt.warnings`` must contain after the (successful) open."""
    after_open: Callable[[Ctx], None] | None = None
    """Damage done between open and load (a file deleted or cut while the notebook is open)."""
    intact: str | None = None
    """A tensor that must still load after the failed load (no partial state in the loader)."""


ROW_HOLE = "model.row_sharded"
KINDS: list[Kind] = [
    # ---------------------------------------------------------------- not a checkpoint
    Kind("empty_directory", b_empty_dir, NotACheckpointError, "no files"),
    Kind("unrelated_files", b_unrelated_files, NotACheckpointError, "notes.txt"),
    Kind("metadata_is_a_directory", b_is_directory(".metadata"), NotACheckpointError, "sub-directories .metadata"),
    # ---------------------------------------------------------------- DCP .metadata
    Kind("metadata_truncated_empty", b_truncated(0.0), MetadataError, "truncated", ".metadata"),
    Kind("metadata_truncated_early", b_truncated(0.05), MetadataError, "truncated", ".metadata"),
    Kind("metadata_truncated_half", b_truncated(0.5), MetadataError, "truncated", ".metadata"),
    Kind("metadata_truncated_last_byte", b_truncated(0.9999), MetadataError, "truncated", ".metadata"),
    Kind("metadata_garbage", b_garbage, MetadataError, "not a valid DCP metadata pickle", ".metadata"),
    Kind("metadata_wrong_type", b_wrong_type, MetadataError, "expected torch.distributed.checkpoint Metadata",
         ".metadata"),
    Kind("metadata_wrong_entry", b_wrong_entry, MetadataError, "'model.bogus'", ".metadata"),
    Kind("metadata_huge_memo_index", b_huge_memo, MetadataError, "memo", ".metadata"),
    Kind("global_os_system", b_refused_global("os.system"), UnsafePickleError, "Nothing from the file was executed",
         ".metadata"),
    Kind("global_builtins_eval", b_refused_global("builtins.eval"), UnsafePickleError, "refused", ".metadata"),
    Kind("global_builtins_exec", b_refused_global("builtins.exec"), UnsafePickleError, "refused", ".metadata"),
    Kind("global_subprocess", b_refused_global("subprocess.Popen"), UnsafePickleError, "refused", ".metadata"),
    Kind("global_torch_function", b_refused_global("torch.save"), UnsafePickleError, "refused", ".metadata"),
    Kind("global_torch_internal", b_torch_internal_global, UnsafePickleError, "refused", ".metadata"),
    Kind("global_inside_real_metadata", b_payload_in_real_metadata, UnsafePickleError, "refused", ".metadata"),
    Kind("global_of_unimported_module", b_unimported_module, UnsafePickleError, "refused", ".metadata"),
    Kind("metadata_memo_bomb_after_unmodelled", b_memo_bomb_after_unmodelled, MetadataError,
         "beyond the size of the pickle", ".metadata"),
    Kind("persistent_id", b_persistent_id, UnsafePickleError, "persistent id", ".metadata"),
    Kind("chunk_with_wrong_ndim", b_chunk_wrong_ndim, MetadataError, "different number of dims", ".metadata"),
    Kind("storage_names_unknown_tensor", b_storage_names_unknown_fqn, MetadataError, "'model.ghost'", ".metadata"),
    Kind("per_rank_metadata_truncated", b_per_rank_truncated, MetadataError, "truncated", "__2.metadata"),
    # ---------------------------------------------------------------- reading outside the directory
    Kind("relative_path_parent", b_relative_path(lambda c: "../outside/__0_0.distcp"), MetadataError,
         "refusing to read outside"),
    Kind("relative_path_absolute", b_relative_path(lambda c: str(c.outside / "__0_0.distcp")), MetadataError,
         "refusing to read outside"),
    Kind("relative_path_nested_parent", b_relative_path(lambda c: "sub/../../outside/__0_0.distcp"), MetadataError,
         "refusing to read outside"),
    Kind("data_file_symlink_outside", b_data_symlink_outside, MetadataError, "outside the checkpoint directory",
         "__1_0.distcp"),
    Kind("metadata_symlink_outside", b_metadata_symlink_outside, MetadataError, "outside the checkpoint directory",
         ".metadata"),
    Kind("safetensors_symlink_outside", b_safetensors_symlink_outside, MetadataError,
         "outside the checkpoint directory", "model-00001-of-00003.safetensors"),
    Kind("index_weight_map_parent", b_index(i_escape(lambda c: "../outside/model-00001-of-00003.safetensors")),
         IndexFileError, "not a file name inside", "model.safetensors.index.json"),
    Kind("index_weight_map_absolute", b_index(i_escape(lambda c: str(c.outside / "model-00001-of-00003.safetensors"))),
         IndexFileError, "not a file name inside", "model.safetensors.index.json"),
    # ---------------------------------------------------------------- DCP data files
    Kind("distcp_missing", b_distcp_missing, ChunkFileMissing, "does not exist", "__1_0.distcp"),
    Kind("distcp_is_a_directory", b_is_directory("__1_0.distcp"), ChunkFileMissing, "is a directory", "__1_0.distcp"),
    Kind("distcp_truncated", b_distcp_truncated, ByteRangeError, "past the end of the file", "__3_0.distcp"),
    Kind("byte_range_past_eof", b_range_past_eof, ByteRangeError, "past the end of the file", "__2_0.distcp"),
    Kind("byte_range_negative", b_negative_byte_offset, ByteRangeError, "model.grid", "__1_0.distcp"),
    Kind("distcp_deleted_after_open", lambda c: c.copy("mixed"), ChunkFileMissing,
         "deleted or replaced", "__0_0.distcp", stage="load", select="model.row_sharded",
         after_open=a_delete("__0_0.distcp"), intact="model.replicated"),
    Kind("distcp_truncated_after_open", lambda c: c.copy("mixed"), ByteRangeError, "file ended after",
         "__2_0.distcp", stage="load", select="model.row_sharded", after_open=a_truncate("__2_0.distcp", 100),
         intact="model.replicated"),
    Kind("item_not_a_zip", b_item(t_not_a_zip), MetadataError, "not a torch.save zip archive", "__1_0.distcp",
         stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("zip_directory_points_at_other_member", b_item(t_header_offset_lies), MetadataError, "disagree on the name",
         "__1_0.distcp", stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("zip_directory_size_lies", b_item(t_size_lies), MetadataError, "zip directory is wrong", "__1_0.distcp",
         stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("zip_member_deflated_and_broken", b_item(t_deflated_broken), MetadataError, "cannot read data.pkl",
         "__1_0.distcp", stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("item_shape_differs", b_item(t_shape_lies), MetadataError, "stored item holds shape [2, 6]",
         "__1_0.distcp", stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("item_dtype_differs", b_item(t_dtype_lies), MetadataError, "stored item holds float64", "__1_0.distcp",
         stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("tensor_item_payload", b_item(t_tensor_payload), UnsafePickleError, "refused global", "__1_0.distcp",
         stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("bytes_item_payload", b_item(t_tensor_payload, "extra.cfg.lr", None), UnsafePickleError,
         "trusted=True", "__3_0.distcp", stage="load", select="extra.cfg.lr", intact="extra.cfg.betas"),
    Kind("bytes_item_not_a_zip", b_item(t_not_a_zip, "extra.cfg.lr", None), MetadataError,
         "not a torch.save zip archive", "__3_0.distcp", stage="load", select="extra.cfg.lr", intact="model.plain"),
    Kind("zstd_item_not_zstd", b_item(t_not_zstd, sample="mixed_zstd"), MetadataError, "not a valid zstd frame",
         "__1_0.distcp", stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("zstd_decompression_bomb", b_item(t_zstd_bomb, sample="mixed_zstd"), MetadataError, "decompression bomb",
         "__1_0.distcp", stage="load", select=ROW_HOLE, intact="model.plain"),
    Kind("zstd_bytes_item_bomb", b_item(t_zstd_bomb, "extra.cfg.lr", None, sample="mixed_zstd"), MetadataError,
         "decompression bomb", "__3_0.distcp", stage="load", select="extra.cfg.lr", intact="model.plain"),
    # ---------------------------------------------------------------- chunk layouts
    Kind("chunks_leave_a_hole", b_chunks(e_hole), MetadataError, "the checkpoint has holes", stage="load",
         select=ROW_HOLE, warning="cover only 42 of its 60 elements", intact="model.plain"),
    Kind("chunks_overlap", b_chunks(e_overlap), None, "overlapping chunks", warning="'model.row_sharded', where 18"),
    Kind("chunks_overlap_and_hole", b_chunks(e_shift), MetadataError, "the checkpoint has holes", stage="load",
         select=ROW_HOLE, warning="overlapping chunks", intact="model.plain"),
    Kind("chunk_outside_shape", b_chunks(e_outside), MetadataError, "the checkpoint has holes", stage="load",
         select=ROW_HOLE, warning="chunks outside their shape", intact="model.plain"),
    Kind("hf_shard_file_missing", b_hf_shard_missing, MetadataError, "the checkpoint has holes", stage="load",
         select="model.embed_tokens.weight", warning="holes in their chunk lists", intact="model.norm.weight"),
    # ---------------------------------------------------------------- safetensors
    Kind("safetensors_header_length_2_63", b_st("hf_rank0", d_header_len(lambda n: 1 << 63)), SafetensorsHeaderError,
         "header length 9223372036854775808", "model-00001-of-00003.safetensors"),
    Kind("safetensors_header_length_past_eof", b_st("hf_rank0", d_header_len(lambda n: n + 1)),
         SafetensorsHeaderError, "runs past the end of the file", "model-00001-of-00003.safetensors"),
    Kind("safetensors_header_over_100MB", b_header_over_cap, SafetensorsHeaderError, "header length 150000000",
         "model.safetensors"),
    Kind("safetensors_too_short", b_st("hf_rank0", d_too_short), SafetensorsHeaderError, "too short",
         "model-00001-of-00003.safetensors"),
    Kind("safetensors_invalid_json", b_st("hf_rank0", d_header_bytes(b'{"a": ')), SafetensorsHeaderError,
         "not valid JSON", "model-00001-of-00003.safetensors"),
    Kind("safetensors_header_not_an_object", b_st("hf_rank0", d_header_bytes(b"[1, 2]")), SafetensorsHeaderError,
         "expected an object", "model-00001-of-00003.safetensors"),
    Kind("safetensors_offsets_overlap", b_st("hf_rank0", d_edit(h_overlap)), SafetensorsHeaderError, "overlap",
         "model-00001-of-00003.safetensors"),
    Kind("safetensors_offsets_past_eof", b_st("hf_rank0", d_truncate_tail), SafetensorsHeaderError,
         "end past the end of the file", "model-00001-of-00003.safetensors"),
    Kind("safetensors_unknown_dtype", b_st("hf_rank0", d_edit(h_unknown_dtype)), SafetensorsHeaderError,
         "unknown dtype 'F12'", "model-00001-of-00003.safetensors"),
    Kind("safetensors_shape_offsets_mismatch", b_st("hf_rank0", d_edit(h_shape)), SafetensorsHeaderError, "needs",
         "model-00001-of-00003.safetensors"),
    Kind("safetensors_negative_shape", b_st("hf_rank0", d_edit(h_negative_shape)), SafetensorsHeaderError,
         "invalid shape", "model-00001-of-00003.safetensors"),
    Kind("safetensors_metadata_not_strings", b_st("hf_rank0", d_edit(h_metadata_not_str)), SafetensorsHeaderError,
         "__metadata__ must map strings to strings", "model-00001-of-00003.safetensors"),
    Kind("sharding_info_not_json", b_st("hf_distributed", d_edit(h_sharding(lambda i: '{"w": [0,'))), MetadataError,
         "DCP_SHARDING_INFO", "shard-00001-model-00001-of-00001.safetensors"),
    Kind("sharding_info_negative_offsets", b_st("hf_distributed", d_edit(h_sharding(_negative_offsets))),
         MetadataError, "non-negative", "shard-00001-model-00001-of-00001.safetensors"),
    Kind("sharding_info_not_an_object", b_st("hf_distributed", d_edit(h_sharding(lambda i: "[1, 2]"))),
         MetadataError, "not a JSON object", "shard-00001-model-00001-of-00001.safetensors"),
    Kind("index_invalid_json", b_index(lambda c, d: '{"weight_map": {"a": '), IndexFileError, "not valid JSON",
         "model.safetensors.index.json"),
    Kind("index_without_weight_map", b_index(lambda c, d: "[1, 2, 3]"), IndexFileError, "weight_map",
         "model.safetensors.index.json"),
    Kind("index_names_missing_file", b_index(i_missing_file), IndexFileError, "does not exist",
         "model.safetensors.index.json"),
    # ---------------------------------------------------------------- quantized
    Kind("quant_scale_wrong_shape", b_quant_scale_shape, QuantizationError, "cannot be dequantized", stage="load",
         select="model.layers.0.self_attn.q_proj.weight", intact="model.layers.0.mlp.gate_proj.weight"),
]  # fmt: skip


# ============================================================================================
# running a kind
# ============================================================================================
def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ``root`` -> (type, size, mtime_ns, sha256 of small files, symlink target)."""
    out: dict[str, tuple[Any, ...]] = {}
    if not root.exists():
        return out
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("l", os.readlink(p), st.st_mtime_ns)
        elif p.is_dir():
            out[str(p.relative_to(root))] = ("d", st.st_mtime_ns)
        else:
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 16 << 20 else None
            out[str(p.relative_to(root))] = ("f", st.st_size, st.st_mtime_ns, digest)
    return out


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def warm(samples) -> None:
    """Import and exercise every code path once, so that no lazy import happens inside a watched block."""
    ck = dx.open(samples["mixed_zstd"], cache=False)
    ck.tensors, ck.chunks, ck.files, ck.summary(), repr(ck)
    ck.load("*")
    ck.loader.close()
    fp8 = dx.open(samples["fp8_block"], cache=False)
    fp8.load("model.layers.0.mlp.gate_proj.weight")
    fp8.loader.close()


@pytest.fixture()
def ctx(samples, tmp_path, monkeypatch) -> Ctx:
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "outside").mkdir()
    shutil.copy(samples["mixed"] / "__0_0.distcp", tmp_path / "outside" / "__0_0.distcp")
    return Ctx(samples, tmp_path)


def _attempt(kind: Kind, c: Ctx, target: Path) -> tuple[BaseException | None, list[str]]:
    """One open (+ tables + load); returns the error raised where the kind says, and the warnings."""
    if kind.stage == "open" and kind.error is not None:
        with pytest.raises(BaseException) as info:
            dx.open(target)
        return info.value, []
    ck = dx.open(target)
    try:
        ck.tensors, ck.chunks, ck.files, ck.summary(), repr(ck), ck._repr_html_()  # metadata only: never fail
        if kind.after_open is not None:
            with paused():  # the test's own damage, not the library's doing
                kind.after_open(c)
        if kind.error is None:
            ck.load(kind.select)
            return None, list(ck.warnings)
        with pytest.raises(BaseException) as info:
            ck.load(kind.select)
        if kind.intact is not None:  # a failed load leaves nothing half-done behind
            ck.load(kind.intact)
        return info.value, list(ck.warnings)
    finally:
        ck.loader.close()


@pytest.mark.timeout(CASE_TIMEOUT, method="thread")
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_corruption(kind: Kind, ctx: Ctx, warm: None) -> None:
    path_before = list(sys.path)
    try:
        target = kind.build(ctx)
        # the damage happens once, mid-session; else cold, then with whatever the first attempt cached
        attempts = 1 if kind.after_open is not None else 2
        fds = open_fds()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cache = ctx.tmp / "cache"
        for attempt in range(attempts):
            before = snapshot(ctx.ck)
            t0 = time.perf_counter()
            with watching() as w:
                err, warnings = _attempt(kind, ctx, target)
            elapsed = time.perf_counter() - t0
            if kind.after_open is not None:
                before = snapshot(ctx.ck)  # after the test's own damage, done mid-attempt
            where = f"{kind.name} (attempt {attempt + 1})"
            if kind.error is None:
                assert err is None, f"{where}: unexpected {err!r}"
            else:
                assert type(err) is kind.error, (
                    f"{where}: expected {kind.error.__name__}, got {type(err).__name__}: {err}"
                )
                assert isinstance(err, DcpExplorerError)
                msg = str(err)
                assert kind.fragment in msg, f"{where}: {kind.fragment!r} not in {msg!r}"
                named = str(ctx.ck / kind.names) if kind.names else str(ctx.ck)
                assert named in msg, f"{where}: the message does not name {named}: {msg!r}"
                for extra in ctx.expect:
                    assert extra in msg, f"{where}: {extra!r} not in {msg!r}"
            if kind.warning is not None:
                assert any(kind.warning in x for x in warnings), (
                    f"{where}: no warning with {kind.warning!r}: {warnings}"
                )
                assert all(str(ctx.ck) in x for x in warnings), (
                    f"{where}: a warning does not name the checkpoint"
                )
            if kind.error is None:
                assert any(kind.fragment in x for x in warnings), (
                    f"{where}: {kind.fragment!r} not in {warnings}"
                )
            # nothing ran, nothing outside was read, nothing inside was written
            assert not ctx.marker.exists(), f"{where}: a payload ran"
            assert w.spawned == [], f"{where}: started a process: {w.spawned}"
            assert w.reads_outside(ctx.tmp, ctx.ck, cache, ctx.tmp / "mods") == [], f"{where}: read outside"
            assert w.writes_under(ctx.ck) == [], f"{where}: wrote inside the checkpoint"
            assert snapshot(ctx.ck) == before, f"{where}: the checkpoint changed"
            # no partial state: no temporary cache file, no open file left
            assert not list(cache.glob("*.tmp")) if cache.exists() else True
            if not open_fds() <= fds:
                gc.collect()  # only objects nobody holds: collected, they close their files
            assert open_fds() <= fds, f"{where}: file descriptors left open: {open_fds() - fds}"
            assert elapsed < CASE_TIMEOUT / 2, f"{where}: took {elapsed:.1f} s"
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
            assert grown < 512 << 10, f"{where}: the peak RSS grew by {grown >> 10} MiB"
    finally:
        sys.path[:] = path_before
        sys.modules.pop("dcpx_corruption_evil", None)


def test_bank_size_and_distinct_names() -> None:
    names = [k.name for k in KINDS]
    assert len(set(names)) == len(names)
    assert len(KINDS) >= 25
    classes = {k.error for k in KINDS}
    assert {MetadataError, UnsafePickleError, SafetensorsHeaderError, IndexFileError, ChunkFileMissing,
            ByteRangeError, NotACheckpointError, QuantizationError, None} <= classes  # fmt: skip


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payloads_are_live(name: str, tmp_path: Path) -> None:
    """The payloads do run under plain ``pickle`` (what torch uses), so the bank's cases are meaningful."""
    marker = tmp_path / "control"
    out = pickle.loads(pickle.dumps(payload(name, marker), protocol=4))
    if isinstance(out, subprocess.Popen):
        out.wait(timeout=10)
    assert marker.exists()


def test_hole_regions_that_are_covered_still_load(ctx: Ctx) -> None:
    """With a hole, the rows that the remaining chunks cover load; only the hole raises."""
    b_chunks(e_hole)(ctx)
    ref = dx.open(ctx.samples["mixed"]).load(ROW_HOLE)
    ck = dx.open(ctx.ck)
    assert torch.equal(ck.load(ROW_HOLE, slices="0:3"), ref[0:3])
    assert torch.equal(ck.load(ROW_HOLE, slices="6:10"), ref[6:10])
    with pytest.raises(MetadataError, match="cover 10 of the 15 requested"):
        ck.load(ROW_HOLE, slices="5:8, 1:6")


def test_zstd_bomb_is_a_valid_frame() -> None:
    import zstandard

    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(zstd_bomb(3 << 20))).read(
        5 << 20
    ) == b"\0" * (3 << 20)


def test_the_guard_sees_reads_writes_and_processes(tmp_path: Path) -> None:
    """The audit-hook guard the bank relies on does notice each kind of misbehaviour."""
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    (inside / "link").symlink_to(outside / "secret")
    (inside / "f").write_bytes(b"y")
    with watching() as w:
        (inside / "link").read_bytes()  # a read through a symlink, resolved
        with open(inside / "f", "r+b"):
            pass
        os.utime(inside / "f")
        subprocess.run(["true"], check=True)
    assert w.reads_outside(tmp_path, inside) == [str((outside / "secret").resolve())]
    assert str((inside / "f").resolve()) in w.writes_under(inside)
    assert any(e.startswith("os.utime") for e in w.writes_under(inside))
    assert [e for e, _ in w.spawned] == ["subprocess.Popen"]
