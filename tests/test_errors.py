"""One test per error kind: the right class, the builtin it also inherits, and a message naming the file.

Every damaged checkpoint is a copy in ``tmp_path``; samples are never modified.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import pytest

import dcp_explorer
from dcp_explorer import (
    ByteRangeError,
    ChunkFileMissing,
    DcpExplorerError,
    IndexFileError,
    MetadataError,
    NotACheckpointError,
    SafetensorsHeaderError,
    UnsafePickleError,
    UnsupportedError,
)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("private_cache")


def _copy(samples, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(samples[name], dst)
    return dst


def _raises(exc_type, builtin, path, *, open_path=None, **kwargs):
    """Open ``open_path`` (default ``path``'s directory); the error is ``exc_type`` and ``builtin`` and names ``path``."""
    target = open_path if open_path is not None else (path if os.path.isdir(path) else os.path.dirname(path))
    with pytest.raises(exc_type) as info:
        dcp_explorer.open(target, **kwargs)
    err = info.value
    assert isinstance(err, DcpExplorerError)
    assert isinstance(err, builtin)
    assert str(path) in str(err), f"the message does not name {path}: {err}"
    return err


# ----------------------------------------------------------------------------- not a checkpoint


def test_empty_directory_is_not_a_checkpoint(tmp_path):
    err = _raises(NotACheckpointError, FileNotFoundError, tmp_path)
    msg = str(err)
    assert ".metadata" in msg and ".safetensors" in msg, "the message should say what was looked for"
    assert "no files" in msg


def test_directory_of_unrelated_files_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "sub").mkdir()
    err = _raises(NotACheckpointError, FileNotFoundError, tmp_path)
    msg = str(err)
    assert ".metadata" in msg and ".safetensors" in msg
    assert "notes.txt" in msg and "weights.bin" in msg, "the message should say what was found"


def test_missing_path_is_not_a_checkpoint(tmp_path):
    missing = tmp_path / "nowhere"
    _raises(NotACheckpointError, FileNotFoundError, missing, open_path=missing)


def test_unknown_format_is_unsupported(samples):
    with pytest.raises(UnsupportedError) as info:
        dcp_explorer.open(samples["mixed"], format="orbax")
    assert isinstance(info.value, NotImplementedError)
    assert "orbax" in str(info.value) and "dcp" in str(info.value)


def test_missing_rank_metadata(samples):
    path = samples["mixed_per_rank"]
    err = _raises(MetadataError, ValueError, path / "__97.metadata", open_path=path, rank=97, cache=False)
    assert "__0.metadata" in str(err), "the message should list the per-rank files found"


# ----------------------------------------------------------------------------- DCP .metadata


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.25, 0.5, 0.75, 0.999])
def test_truncated_metadata(samples, tmp_path, fraction):
    ck = _copy(samples, "mixed", tmp_path)
    data = (ck / ".metadata").read_bytes()
    cut = min(int(len(data) * fraction), len(data) - 1)
    (ck / ".metadata").write_bytes(data[:cut])
    err = _raises(MetadataError, ValueError, ck / ".metadata")
    assert not isinstance(err, UnsafePickleError)
    assert "truncated" in str(err)


@pytest.mark.parametrize("seed", range(8))
def test_garbled_metadata_random_bytes(tmp_path, seed):
    rnd = random.Random(seed)
    (tmp_path / ".metadata").write_bytes(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 2000))))
    _raises(MetadataError, ValueError, tmp_path / ".metadata")


@pytest.mark.parametrize("obj", [[1, 2, 3], {"state_dict_metadata": {}}, None, "Metadata"], ids=repr)
def test_garbled_metadata_pickle_of_wrong_type(tmp_path, obj):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(obj, protocol=4))
    err = _raises(MetadataError, ValueError, tmp_path / ".metadata")
    assert not isinstance(err, UnsafePickleError)
    assert type(obj).__name__ in str(err), "the message should say what the pickle holds"


def test_metadata_with_a_wrong_entry(samples, tmp_path):
    """A real torch ``Metadata`` whose state_dict_metadata holds something that is not storage metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    ck = _copy(samples, "mixed", tmp_path)
    md = FileSystemReader(str(ck)).read_metadata()
    md.state_dict_metadata["model.bogus"] = 42
    md.storage_meta = None
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f, protocol=4)
    err = _raises(MetadataError, ValueError, ck / ".metadata")
    assert "model.bogus" in str(err)


def test_refused_pickle_global(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    err = _raises(UnsafePickleError, ValueError, tmp_path / ".metadata")
    assert isinstance(err, MetadataError)
    assert err.global_name == "builtins.eval"
    assert "builtins.eval" in str(err)


# ----------------------------------------------------------------------------- DCP data files


def test_distcp_file_missing(samples, tmp_path):
    ck = _copy(samples, "mixed", tmp_path)
    victim = sorted(ck.glob("*.distcp"))[1]
    victim.unlink()
    _raises(ChunkFileMissing, FileNotFoundError, victim)
    lenient = dcp_explorer.open(ck, strict=False)
    assert len(lenient.warnings) == 1 and victim.name in lenient.warnings[0]
    files = lenient.files.set_index("file")
    assert files["size_on_disk"].isna().sum() == 1 and files["size_on_disk"].isna()[victim.name]


def test_distcp_truncated(samples, tmp_path):
    ck = _copy(samples, "mixed", tmp_path)
    victim = sorted(ck.glob("*.distcp"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    err = _raises(ByteRangeError, ValueError, victim)
    assert str(len(data) // 2) in str(err), "the message should give the file's actual size"
    lenient = dcp_explorer.open(ck, strict=False)
    assert lenient.warnings, "strict=False should collect the problem as a warning"
    assert all(victim.name in w and "past the end" in w for w in lenient.warnings)
    assert lenient.files.set_index("file").loc[victim.name, "size_on_disk"] == len(data) // 2


def test_distcp_truncated_only_bytes_item(samples, tmp_path):
    """A file cut inside its leading bytes items (they come first in a ``.distcp``) is caught too."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    ck = _copy(samples, "mixed", tmp_path)
    md = FileSystemReader(str(ck)).read_metadata()
    items = [
        md.storage_data[MetadataIndex(f)]
        for f, m in md.state_dict_metadata.items()
        if isinstance(m, BytesStorageMetadata)
    ]
    first = min(items, key=lambda s: (s.relative_path, s.offset))
    victim = ck / first.relative_path
    victim.write_bytes(victim.read_bytes()[: first.offset + first.length - 1])
    _raises(ByteRangeError, ValueError, victim)


# ----------------------------------------------------------------------------- safetensors


def _first_safetensors(ck):
    return sorted(ck.glob("*.safetensors"))[0]


def test_safetensors_header_length_past_eof(samples, tmp_path):
    ck = _copy(samples, "hf_rank0", tmp_path)
    victim = _first_safetensors(ck)
    data = bytearray(victim.read_bytes())
    data[:8] = (len(data) + 1).to_bytes(8, "little")
    victim.write_bytes(bytes(data))
    err = _raises(SafetensorsHeaderError, ValueError, victim)
    assert isinstance(err, MetadataError)
    assert "header length" in str(err)


def test_safetensors_too_short(samples, tmp_path):
    ck = _copy(samples, "hf_rank0", tmp_path)
    victim = _first_safetensors(ck)
    victim.write_bytes(b"\x10\0\0")
    _raises(SafetensorsHeaderError, ValueError, victim)


def test_safetensors_header_invalid_json(samples, tmp_path):
    ck = _copy(samples, "hf_rank0", tmp_path)
    victim = _first_safetensors(ck)
    data = bytearray(victim.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 : 8 + n] = b"{" + b"#" * (n - 1)
    victim.write_bytes(bytes(data))
    err = _raises(SafetensorsHeaderError, ValueError, victim)
    assert "JSON" in str(err)


def test_safetensors_data_offsets_past_eof(samples, tmp_path):
    ck = _copy(samples, "hf_rank0", tmp_path)
    victim = _first_safetensors(ck)
    data = victim.read_bytes()
    victim.write_bytes(data[:-16])
    err = _raises(SafetensorsHeaderError, ValueError, victim)
    assert "data_offsets" in str(err)


def test_safetensors_data_offsets_inconsistent_with_shape(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 2)}, str(tmp_path / "m.safetensors"))
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["w"]["shape"] = [2, 2]
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    raw = raw.ljust(n)
    data[8 : 8 + n] = raw
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    err = _raises(SafetensorsHeaderError, ValueError, tmp_path / "m.safetensors")
    assert "'w'" in str(err)


def test_index_json_names_missing_file(samples, tmp_path):
    ck = _copy(samples, "hf_rank0", tmp_path)
    index = ck / "model.safetensors.index.json"
    gone = sorted(ck.glob("*.safetensors"))[-1]
    gone.unlink()
    err = _raises(IndexFileError, ValueError, index)
    assert gone.name in str(err)


def test_index_json_invalid_json(samples, tmp_path):
    ck = _copy(samples, "hf_rank0", tmp_path)
    index = ck / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": ')
    err = _raises(IndexFileError, ValueError, index)
    assert "JSON" in str(err)


def test_index_json_without_weight_map(samples, tmp_path):
    ck = _copy(samples, "hf_rank0", tmp_path)
    index = ck / "model.safetensors.index.json"
    index.write_text(json.dumps([1, 2, 3]))
    err = _raises(IndexFileError, ValueError, index)
    assert "weight_map" in str(err)


def _dcp_shard_file(path, sharding_info):
    from safetensors.torch import save_file

    save_file(
        {"w": torch.zeros(2, 3)},
        str(path),
        metadata={"format": "pt", "DCP_VERSION": "1.0", "DCP_SHARDING_INFO": sharding_info},
    )


def test_dcp_sharding_info_not_json(tmp_path):
    victim = tmp_path / "shard-00001-model-00001-of-00001.safetensors"
    _dcp_shard_file(victim, '{"w": {"saved_offsets": [0, 0]')
    err = _raises(MetadataError, ValueError, victim)
    assert "DCP_SHARDING_INFO" in str(err) and "JSON" in str(err)


@pytest.mark.parametrize(
    "info",
    [
        json.dumps([0, 0]),
        json.dumps({"w": {"saved_offsets": [0]}}),
        json.dumps({"other": {"saved_offsets": [0, 0]}}),
    ],
    ids=["not-an-object", "wrong-ndim", "key-missing"],
)
def test_dcp_sharding_info_wrong_shape(tmp_path, info):
    victim = tmp_path / "shard-00001-model-00001-of-00001.safetensors"
    _dcp_shard_file(victim, info)
    err = _raises(MetadataError, ValueError, victim)
    assert "DCP_SHARDING_INFO" in str(err)
