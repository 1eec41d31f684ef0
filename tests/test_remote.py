"""Checkpoints on an S3-compatible server: same tables, same tensors, and ranged reads only.

A real HTTP S3 endpoint (moto's server mode on 127.0.0.1, a free port) is read through s3fs,
as a user would read ``s3://`` (fake credentials in ``storage_options``).  Bytes fetched are
counted twice: by the loader (``ckpt.loader.stats``) and independently, by wrapping
``s3fs.S3FileSystem._call_s3`` — the coroutine every S3 API call of s3fs goes through — and
summing the ``ContentLength`` of each ``GetObject`` response (the body bytes the server sent).
"""

from __future__ import annotations

import logging
import socket
import warnings
from typing import Any

import pytest

pytest.importorskip(
    "moto.server", reason="moto[server] is not installed: no local S3-compatible server to run"
)
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed: fsspec cannot read s3:// URLs")
torch = pytest.importorskip("torch")

import pandas as pd  # noqa: E402

import dcp_explorer  # noqa: E402

BUCKET = "ckpts"
ROWS, COLS = 128, 4096
ROW_BYTES = COLS * 4
#: Fixed allowance for one DCP item opened partially (as in test_load.py): the prefetched last
#: 4096 bytes of the item (zip directory), data.pkl with its local header (~300 B) and the
#: storage member's local header (30 B + name + extra): ~4.4 KiB measured, bounded by 8 KiB.
ZIP_ALLOWANCE = 8 << 10
#: DCP samples: every item a whole-tensor load touches; HF: plain; both compared with the local copy
SAMPLES = ("mixed", "mixed_zstd", "llama_fsdp_tp_2x2", "hf_rank0", "hf_distributed")

pytestmark = pytest.mark.usefixtures("private_cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GetObjectLog:
    """Every S3 call s3fs makes while active: (method, Range, ContentLength)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, int | None]] = []

    @property
    def body_bytes(self) -> int:
        return sum(n or 0 for m, _, n in self.calls if m == "get_object")

    @property
    def gets(self) -> int:
        return sum(m == "get_object" for m, _, _ in self.calls)

    def clear(self) -> None:
        self.calls.clear()


@pytest.fixture(scope="module")
def s3(samples, tmp_path_factory):
    """A moto S3 server holding some samples and a 2 MiB tensor (one DCP chunk, and safetensors).

    Yields ``(storage_options, {name: s3 url}, {name: local path}, log)``.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    env = pytest.MonkeyPatch()  # fake credentials; no profile or config of the user's is read
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_CONFIG_FILE", "/nonexistent"),
                       ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")):  # fmt: skip
        env.setenv(var, value)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.delenv(var, raising=False)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}  # fmt: skip
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)  # fmt: skip
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
        local = {n: str(samples[n]) for n in SAMPLES}

        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        root = tmp_path_factory.mktemp("s3big")
        t = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"w": t}, checkpoint_id=str(root / "big_dcp"), no_dist=True)
        (root / "big_st").mkdir()
        save_file({"w": t}, str(root / "big_st" / "model.safetensors"))
        local["big_dcp"], local["big_st"] = str(root / "big_dcp"), str(root / "big_st")
        urls = {}
        for name, path in local.items():
            fs.put(path.rstrip("/") + "/", f"{BUCKET}/{name}/", recursive=True)
            urls[name] = f"s3://{BUCKET}/{name}"
        assert f"{BUCKET}/mixed/.metadata" in fs.ls(f"{BUCKET}/mixed")

        log = GetObjectLog()
        orig = s3fs.S3FileSystem._call_s3

        async def recording(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
            out = await orig(self, method, *args, **kwargs)
            n = out.get("ContentLength") if isinstance(out, dict) else None
            log.calls.append((method, kwargs.get("Range"), n))
            return out

        s3fs.S3FileSystem._call_s3 = recording
        try:
            yield opts, urls, local, log, t
        finally:
            s3fs.S3FileSystem._call_s3 = orig
    finally:
        server.stop()
        env.undo()


def _same_tensor(a: Any, b: Any, what: str) -> None:
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
    assert a.dtype == b.dtype and a.shape == b.shape, what
    flat = [x.detach().clone(memory_format=torch.contiguous_format).reshape(-1) for x in (a, b)]
    assert flat[0].view(torch.uint8).numpy().tobytes() == flat[1].view(torch.uint8).numpy().tobytes(), what


def _canonical(df: pd.DataFrame, attr: str) -> pd.DataFrame:
    """Rows in name order. Safetensors entries and chunks follow the directory listing (as torch's
    HuggingFaceStorageReader does): ``os.listdir`` order on disk, key order on S3. The chunk
    number within a tensor follows the same order, so it is left out of the comparison; categorical
    columns compare as values (their categories list files in listing order)."""
    keys = {"tensors": ["fqn"], "chunks": ["fqn", "offsets"], "files": ["file"], "modules": ["module"]}[attr]
    if attr == "chunks":
        df = df.drop(columns=["chunk"])
    df = df.astype({c: object for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)})
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("name", SAMPLES)
def test_remote_tables_equal_local(s3, name):
    opts, urls, local, _log, _t = s3
    remote = dcp_explorer.open(urls[name], storage_options=opts)
    here = dcp_explorer.open(local[name])
    assert remote.format == here.format
    for attr in ("tensors", "chunks", "files"):
        a, b = getattr(remote, attr), getattr(here, attr)
        if here.format != "dcp":  # DCP: same rows in the same order; HF: see _canonical
            a, b = _canonical(a, attr), _canonical(b, attr)
        pd.testing.assert_frame_equal(a, b, obj=f"{name}.{attr}")
    a, b = remote.modules(1), here.modules(1)
    if here.format != "dcp":  # ties in size keep entry order
        a, b = _canonical(a, "modules"), _canonical(b, "modules")
    pd.testing.assert_frame_equal(a, b, obj=f"{name}.modules")
    a, b = remote.summary(), here.summary()
    assert a.pop("path") == urls[name] and b.pop("path") == local[name]
    assert a == b


@pytest.mark.parametrize("name", SAMPLES)
def test_remote_whole_load_equals_local(s3, name):
    opts, urls, local, _log, _t = s3
    remote = dcp_explorer.open(urls[name], storage_options=opts).load("re:.", progress=False)
    here = dcp_explorer.open(local[name]).load("re:.", progress=False)
    assert sorted(remote) == sorted(here)
    for k, v in here.items():
        if isinstance(v, torch.Tensor):
            _same_tensor(remote[k], v, f"{name}: {k}")
        else:
            assert type(remote[k]) is type(v) and remote[k] == v, k


@pytest.mark.parametrize("name", ["big_dcp", "big_st"])
def test_remote_slice_fetches_about_the_slice(s3, name):
    """One row (16 KiB) of a 2 MiB tensor: < 2 rows (+ 8 KiB zip allowance for DCP) of GetObject bodies."""
    opts, urls, _local, log, t = s3
    log.clear()
    ck = dcp_explorer.open(urls[name], storage_options=opts)
    opened_with = log.body_bytes  # .metadata, or the safetensors header
    log.clear()
    row = ck.load("w", slices=(7, slice(None)))
    _same_tensor(row, t[7], "row 7")
    stats = ck.loader.stats
    bound = 2 * ROW_BYTES + (ZIP_ALLOWANCE if name == "big_dcp" else 0)
    assert ROW_BYTES <= stats.bytes_read < bound, stats
    assert ROW_BYTES <= log.body_bytes < bound, log.calls
    assert log.body_bytes == stats.bytes_read, (log.calls, stats)  # no read-ahead behind the loader's back
    assert log.gets == stats.requests
    assert all(m != "get_object" or r is not None for m, r, _ in log.calls), "a GetObject without a Range"
    print(f"{name}: open fetched {opened_with} B; one row ({ROW_BYTES} B) fetched {log.body_bytes} B in "
          f"{log.gets} GetObject requests (bound {bound} B)")  # fmt: skip
    # the whole tensor, for scale: the item once
    log.clear()
    _same_tensor(ck.load("w"), t, "whole")
    assert t.nbytes <= log.body_bytes <= t.nbytes + ZIP_ALLOWANCE


def test_remote_open_fetches_only_headers(s3):
    """Opening a safetensors checkpoint reads its headers, not its tensor data."""
    opts, urls, _local, log, t = s3
    log.clear()
    dcp_explorer.open(urls["big_st"], storage_options=opts, cache=False)
    assert log.body_bytes < 64 << 10, f"opening fetched {log.body_bytes:,} B of a {t.nbytes:,} B file"
