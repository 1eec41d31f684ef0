"""Opening an untrusted checkpoint executes nothing, reads nothing outside it, and writes nothing inside it.

torch reads ``.metadata`` with an unrestricted ``pickle.load``; dcp_explorer must refuse
every global outside its allow-list (naming it) without running or importing anything.
Each payload below is first shown to be live (plain ``pickle`` does run it), so the tests
cannot pass merely because the payload is harmless.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import pytest
from _reference import sample_names, snapshot

import dcp_explorer
from dcp_explorer import IndexFileError, MetadataError, UnsafePickleError
from dcp_explorer.readers._safe_pickle import ALLOWED_GLOBALS

torch = pytest.importorskip("torch")

SAMPLES = sample_names()

pytestmark = pytest.mark.usefixtures("private_cache")


class _Stub:
    """Accepts any construction; used to list a pickle's globals without running them."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *a, **k):
        return _Stub()


class _GlobalLister(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.seen: list[str] = []

    def find_class(self, module, name):
        self.seen.append(f"{module}.{name}")
        return type("Stub", (_Stub,), {})

    def persistent_load(self, pid):
        return _Stub()


def pickle_globals(data: bytes) -> list[str]:
    """Every global a pickle references, in order, without importing or calling any of them."""
    import io

    up = _GlobalLister(io.BytesIO(data))
    up.load()
    return up.seen


def _is_allowed(qualname: str) -> bool:
    """In the allow-list: the named classes, or a ``torch.<dtype>`` (asked from torch)."""
    module, _, name = qualname.rpartition(".")
    is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in ALLOWED_GLOBALS or is_dtype


def stack_global(module: str, name: str, *args: str) -> bytes:
    """A protocol-4 pickle calling ``module.name(*args)`` (STACK_GLOBAL + REDUCE)."""

    def s(x: str) -> bytes:
        b = x.encode()
        return b"\x8c" + bytes([len(b)]) + b

    return b"\x80\x04" + s(module) + s(name) + b"\x93(" + b"".join(s(a) for a in args) + b"tR."


def protocol0_global(module: str, name: str, *args: str) -> bytes:
    """A protocol-0 pickle calling ``module.name(*args)`` (GLOBAL + REDUCE)."""
    return f"c{module}\n{name}\n(".encode() + b"".join(f"S{a!r}\n".encode() for a in args) + b"tR."


def _write_metadata_with(samples, tmp_path, payload_obj):
    """A copy of the ``mixed`` sample whose real torch ``Metadata`` carries ``payload_obj`` in planner_data."""
    from torch.distributed.checkpoint import FileSystemReader

    ck = tmp_path / "ck"
    shutil.copytree(samples["mixed"], ck)
    md = FileSystemReader(str(ck)).read_metadata()
    md.storage_meta.load_id = None
    md.planner_data["model.row_sharded"] = payload_obj
    data = pickle.dumps(md, protocol=4)
    (ck / ".metadata").write_bytes(data)
    return ck, data


# ----------------------------------------------------------------------------- code execution


class OpenForWrite:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class ShellTouch:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


@pytest.mark.parametrize("payload", [OpenForWrite, ShellTouch], ids=["open", "os.system"])
@pytest.mark.parametrize("where", ["top-level", "inside-real-metadata"])
def test_reduce_payload_is_refused_and_not_run(samples, tmp_path, payload, where):
    # the payload is live: plain pickle (what torch's FileSystemReader uses) runs it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(control), protocol=4))
    assert control.exists(), "the payload should be live under plain pickle"
    (expected,) = pickle_globals(pickle.dumps(payload(control), protocol=4))

    pwned = tmp_path / "pwned"
    if where == "top-level":
        ck = tmp_path / "ck"
        ck.mkdir()
        (ck / ".metadata").write_bytes(pickle.dumps(payload(pwned), protocol=4))
    else:
        ck, data = _write_metadata_with(samples, tmp_path, payload(pwned))
        refused = [g for g in pickle_globals(data) if not _is_allowed(g)]
        assert refused == [expected], "only the payload's global should be outside the allow-list"
    for _ in range(2):  # also when a cache is warm
        with pytest.raises(UnsafePickleError) as info:
            dcp_explorer.open(ck)
        err = info.value
        assert err.global_name == expected
        assert expected in str(err) and str(ck / ".metadata") in str(err)
        assert not pwned.exists(), "the payload ran"


UNKNOWN_GLOBALS = [
    ("collections", "Counter"),
    ("torch.nn", "Module"),
    ("torch.nn.modules.module", "Module"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("subprocess", "Popen"),
    ("os", "system"),
    ("torch", "load"),
    ("torch.serialization", "load"),
    ("torch", "zeros"),  # torch names other than dtypes are not allowed
    ("torch._utils", "_rebuild_tensor_v2"),
    ("pathlib", "Path"),
]


@pytest.mark.parametrize("encode", [stack_global, protocol0_global], ids=["protocol4", "protocol0"])
@pytest.mark.parametrize("module,name", UNKNOWN_GLOBALS, ids=[f"{m}.{n}" for m, n in UNKNOWN_GLOBALS])
def test_unknown_global_is_refused(tmp_path, module, name, encode):
    data = encode(module, name, "x")
    assert pickle_globals(data) == [f"{module}.{name}"]
    (tmp_path / ".metadata").write_bytes(data)
    with pytest.raises(UnsafePickleError) as info:
        dcp_explorer.open(tmp_path, cache=False)
    assert info.value.global_name == f"{module}.{name}"
    assert f"'{module}.{name}'" in str(info.value)
    assert isinstance(info.value, MetadataError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(lambda: __import__("collections").Counter(a=1), id="Counter"),
        pytest.param(lambda: torch.nn.Linear(2, 2), id="nn.Linear"),
        pytest.param(lambda: torch.zeros(3), id="Tensor"),
    ],
)
def test_unknown_object_inside_real_metadata_is_refused(samples, tmp_path, obj):
    ck, data = _write_metadata_with(samples, tmp_path, obj())
    refused = [g for g in pickle_globals(data) if not _is_allowed(g)]
    with pytest.raises(UnsafePickleError) as info:
        dcp_explorer.open(ck, cache=False)
    assert info.value.global_name in refused
    assert info.value.global_name in str(info.value)


def test_refused_module_is_not_imported(tmp_path, monkeypatch):
    """Plain pickle imports the module named by a global (running its code); the allow-list must not."""
    marker = tmp_path / "imported"
    mod = "dcpx_evil_module_for_test"
    (tmp_path / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').close()\nf = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / ".metadata").write_bytes(stack_global(mod, "f", "x"))
    with pytest.raises(UnsafePickleError):
        dcp_explorer.open(ck, cache=False)
    assert mod not in sys.modules and not marker.exists()


def test_persistent_id_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"\x80\x04\x8c\x03pid\x94Q.")  # BINPERSID
    with pytest.raises(UnsafePickleError) as info:
        dcp_explorer.open(tmp_path, cache=False)
    assert "persistent" in str(info.value)


def test_real_metadata_uses_only_allowed_globals(samples):
    """The allow-list is not wider than needed: a real file's non-dtype globals are all in it."""
    seen = set()
    for name in SAMPLES:
        p = samples[name]
        for f in os.listdir(p):
            if f.endswith(".metadata"):
                seen.update(pickle_globals((p / f).read_bytes()))
    assert seen
    assert all(map(_is_allowed, seen)), seen


# ----------------------------------------------------------------------------- reading outside


@pytest.mark.parametrize("bad", ["../secret.distcp", "/etc/passwd", "a/../../secret.distcp"])
@pytest.mark.parametrize("strict", [True, False])
def test_metadata_naming_a_file_outside_is_refused(samples, tmp_path, bad, strict):
    from torch.distributed.checkpoint import FileSystemReader

    ck = tmp_path / "ck"
    shutil.copytree(samples["mixed"], ck)
    (tmp_path / "secret.distcp").write_bytes(b"\0" * 100_000)
    md = FileSystemReader(str(ck)).read_metadata()
    key = next(iter(md.storage_data))
    md.storage_data[key].relative_path = bad
    md.storage_meta.load_id = None
    (ck / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    with pytest.raises(MetadataError) as info:
        dcp_explorer.open(ck, strict=strict, cache=False)
    assert bad in str(info.value) and "outside" in str(info.value)


@pytest.mark.parametrize("bad", ["../model-00001-of-00003.safetensors", "/etc/passwd"])
def test_index_json_naming_a_file_outside_is_refused(samples, tmp_path, bad):
    ck = tmp_path / "ck"
    shutil.copytree(samples["hf_rank0"], ck)
    shutil.copy(ck / "model-00001-of-00003.safetensors", tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(IndexFileError) as info:
        dcp_explorer.open(ck, cache=False)
    assert bad in str(info.value)


# ----------------------------------------------------------------------------- writing inside


@pytest.mark.parametrize("name", SAMPLES)
def test_nothing_is_written_inside_the_checkpoint(samples, name, tmp_path):
    path = samples[name]
    before = snapshot(path)
    for _ in range(2):  # cold and warm cache
        for strict in (True, False):
            ckpt = dcp_explorer.open(path, strict=strict)
            _ = ckpt.tensors, ckpt.chunks, ckpt.files
            _ = ckpt.modules(1), ckpt.modules(3), ckpt.summary(), repr(ckpt), ckpt._repr_html_()
            for fqn in ckpt.fqns:
                ckpt.chunks_of(fqn)
            ckpt.file_sizes()
    assert snapshot(path) == before, "files or mtimes changed inside the checkpoint"
    cache = tmp_path / "dcpx-cache"
    if ckpt.format == "dcp":
        assert ckpt.from_cache and list(cache.glob("*.npz")), "the parse cache belongs in $DCP_EXPLORER_CACHE"


def test_symlinked_data_file_escaping_the_directory_is_refused(samples, tmp_path):
    """A data file that is a symlink to a file outside the checkpoint is not read."""
    import shutil

    dst = tmp_path / "ck"
    shutil.copytree(samples["mixed"], dst)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(str(dst / "__1_0.distcp"), str(outside / "x"))
    (dst / "__1_0.distcp").symlink_to(outside / "x")
    with pytest.raises(dcp_explorer.MetadataError, match="outside the checkpoint directory") as ei:
        dcp_explorer.open(dst, cache=False)
    assert "__1_0.distcp" in str(ei.value)
    # a symlink to the whole checkpoint directory is fine
    (tmp_path / "link").symlink_to(samples["mixed"])
    assert len(dcp_explorer.open(tmp_path / "link", cache=False).fqns) == len(
        dcp_explorer.open(samples["mixed"]).fqns
    )


def _hub_cache_snapshot(src, hub, repo="models--org--tiny", rev="0123abcd"):
    """A Hugging Face hub cache layout as huggingface_hub writes it: each file of ``src`` stored once under
    ``<repo>/blobs/<sha256>``, and ``<repo>/snapshots/<rev>/<name>`` a relative symlink to it."""
    import hashlib

    blobs = hub / repo / "blobs"
    snap = hub / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (hub / repo / "refs").mkdir()
    (hub / repo / "refs" / "main").write_text(rev)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", sha))
    return snap


def test_hugging_face_hub_cache_snapshot_is_read(samples, tmp_path):
    """A hub cache snapshot (files symlinked into the repository's ``blobs``) opens and loads like the
    real files; nothing is written into the cache."""
    from safetensors.torch import load_file

    snap = _hub_cache_snapshot(samples["hf_rank0"], tmp_path / "hub")
    before = snapshot(tmp_path / "hub")
    ck = dcp_explorer.open(snap)
    assert list(ck.fqns) == list(dcp_explorer.open(samples["hf_rank0"]).fqns)
    want = {}
    for f in sorted(samples["hf_rank0"].glob("*.safetensors")):
        want.update(load_file(f))
    got = ck.load(list(want))
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert snapshot(tmp_path / "hub") == before


def test_hub_cache_snapshot_symlink_out_of_its_blobs_is_refused(samples, tmp_path):
    """The allowance covers the snapshot's own repository's ``blobs`` only: a link to another repository's
    blobs, or anywhere else, is refused before anything is read."""
    hub = tmp_path / "hub"
    snap = _hub_cache_snapshot(samples["hf_rank0"], hub)
    other = _hub_cache_snapshot(samples["fp8_block"], hub, repo="models--org--other")
    victim = next(p for p in sorted(snap.iterdir()) if p.suffix == ".safetensors")
    foreign = next(p for p in sorted(other.iterdir()) if p.suffix == ".safetensors")
    victim.unlink()
    victim.symlink_to(os.path.realpath(foreign))
    with pytest.raises(MetadataError, match="outside the checkpoint directory or its hub cache blobs") as ei:
        dcp_explorer.open(snap, cache=False)
    assert victim.name in str(ei.value)
    # a directory laid out like a snapshot but outside a hub repository gets no allowance
    fake = tmp_path / "snapshots" / "rev"
    shutil.copytree(snap, fake, symlinks=True)
    (tmp_path / "blobs").symlink_to(hub / "models--org--tiny" / "blobs")
    with pytest.raises(MetadataError, match="outside the checkpoint directory"):
        dcp_explorer.open(fake, cache=False)
