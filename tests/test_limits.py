"""Limits: the memory budget of a load, remote reads that time out, and the memory bound of opening.

* ``load`` refuses (``MemoryBudgetError``, giving both numbers, before reading anything) a selection
  whose results would exceed ``max_bytes`` (default ``$DCP_EXPLORER_MAX_LOAD_BYTES`` or 8 GiB);
  ``max_bytes=None`` lifts the limit;
* a remote store that stops answering gives ``ReadTimeoutError`` (also a ``TimeoutError``) after
  ``$DCP_EXPLORER_TIMEOUT`` seconds instead of hanging the kernel: an HTTP server that accepts and
  never answers, and an S3 server (moto) behind a proxy that stalls only the data reads;
* opening a checkpoint costs a bounded amount of memory: measured in a fresh process on a synthetic
  Llama-8B x 64 ranks ``.metadata`` (always), and on the 405B x 1024 ranks one (3.5 M chunks) when it
  is already built (``benchmarks/synthetic.py``) or ``DCP_EXPLORER_BIG_TESTS=1`` asks to build it.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import dcp_explorer as dx
from dcp_explorer import MemoryBudgetError, ReadTimeoutError
from dcp_explorer.load import DEFAULT_MAX_LOAD_BYTES, max_load_bytes

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
#: Peak RSS of ``dcp_explorer.open`` + the ``chunks`` table of the 405B x 1024-rank synthetic metadata
#: (3,494,001 chunks, 458 MB .metadata): measured 0.64 GiB (torch's own pickle.load: 6.9 GiB).
BOUND_405B = 1 << 30
#: The bound as a rule for any size: a fixed part (interpreter, numpy, pandas) plus bytes per chunk.
BOUND_FIXED, BOUND_PER_CHUNK = 160 << 20, 200


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCP_EXPLORER_CACHE", str(tmp_path / "dcpx-cache"))
    monkeypatch.delenv("DCP_EXPLORER_MAX_LOAD_BYTES", raising=False)


# ============================================================================================
# memory budget of a load
# ============================================================================================
def test_default_budget(monkeypatch):
    assert max_load_bytes() == DEFAULT_MAX_LOAD_BYTES == 8 << 30
    monkeypatch.setenv("DCP_EXPLORER_MAX_LOAD_BYTES", "123456")
    assert max_load_bytes() == 123456
    monkeypatch.setenv("DCP_EXPLORER_MAX_LOAD_BYTES", "1e9")
    assert max_load_bytes() == 10**9


def test_budget_refuses_with_the_numbers_before_reading(samples, monkeypatch):
    ck = dx.open(samples["llama_fsdp_ws2"])
    total = int(ck.tensors["nbytes"].sum())
    monkeypatch.setenv("DCP_EXPLORER_MAX_LOAD_BYTES", str(total - 1))
    with pytest.raises(MemoryBudgetError) as info:
        ck.load("*")
    err = info.value
    assert isinstance(err, MemoryError) and isinstance(err, dx.DcpExplorerError)
    assert f"{total:,} bytes" in str(err) and f"max_bytes={total - 1:,}" in str(err)
    assert str(samples["llama_fsdp_ws2"]) in str(err) and "max_bytes=None" in str(err)
    assert ck.loader.stats.bytes_read == 0, "refused before reading anything"
    assert len(ck.load("*", max_bytes=None)) == len(ck.fqns)  # asked: no limit
    assert len(ck.load("*", max_bytes=total)) == len(ck.fqns)


def test_budget_counts_what_the_results_take(samples):
    ck = dx.open(samples["llama_fsdp_ws1"])
    fqn = "model.tok_embeddings.weight"  # 251 x 72 float32
    with pytest.raises(MemoryBudgetError, match=f"{251 * 72 * 8:,} bytes"):
        ck.load(fqn, dtype="float64", max_bytes=251 * 72 * 8 - 1)  # the cast result
    assert ck.load(fqn, slices="0:10", max_bytes=10 * 72 * 4).shape == (10, 72)  # only the slice
    with pytest.raises(MemoryBudgetError, match=f"{10 * 72 * 4:,} bytes"):
        ck.load(fqn, slices="0:10", max_bytes=10 * 72 * 4 - 1)
    fp8 = dx.open(samples["fp8_block"])
    w = "model.layers.0.self_attn.q_proj.weight"  # FP8 [300, 200] -> float32 when dequantized
    with pytest.raises(MemoryBudgetError, match=f"{300 * 200 * 4:,} bytes"):
        fp8.load(w, max_bytes=300 * 200 * 4 - 1)
    assert fp8.load(w, dequantize=False, max_bytes=300 * 200).shape == (300, 200)


# ============================================================================================
# remote reads time out
# ============================================================================================
class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.timeout(60)
def test_silent_http_server_times_out(monkeypatch):
    monkeypatch.setenv("DCP_EXPLORER_TIMEOUT", "1")
    srv = SilentServer()
    try:
        url = f"http://127.0.0.1:{srv.port}/ckpt/"
        t0 = time.perf_counter()
        with pytest.raises(ReadTimeoutError) as info:
            dx.open(url)
        assert time.perf_counter() - t0 < 20
        msg = str(info.value)
        assert isinstance(info.value, TimeoutError)
        assert url in msg and "within 1 s" in msg and "DCP_EXPLORER_TIMEOUT" in msg
    finally:
        srv.close()


class StallingProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy in front of an S3 server that, once ``stall`` is set, never answers ranged GETs of data files."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.stall = threading.Event()
        self.release = threading.Event()
        self.stalled = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: StallingProxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        if (
            self.server.stall.is_set()
            and self.command == "GET"
            and "Range" in self.headers
            and ".distcp" in self.path
        ):
            self.server.stalled += 1
            self.server.release.wait(60)  # no answer: the client must give up on its own
            self.close_connection = True
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = f"{self.server.upstream[0]}:{self.server.upstream[1]}"
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.close_connection = True
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward  # noqa: N815


@pytest.mark.timeout(120)
def test_s3_data_read_that_stalls_times_out(samples, monkeypatch):
    """Metadata comes through; then the data reads stall: ``load`` fails with ReadTimeoutError in bounded time."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_CONFIG_FILE", "/nonexistent"),
                       ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"), ("DCP_EXPLORER_TIMEOUT", "1")):  # fmt: skip
        monkeypatch.setenv(var, value)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    proxy = StallingProxy(("127.0.0.1", port))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        direct = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                                   client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})  # fmt: skip
        direct.mkdir("ckpts")
        direct.put(str(samples["mixed"]) + "/", "ckpts/mixed/", recursive=True)
        opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.server_address[1]}"},
                "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
        ck = dx.open("s3://ckpts/mixed", storage_options=opts)
        assert len(ck.fqns) == 22 and ck.tensors is not None
        ck.store.fs.retries = 1  # s3fs's own retries on timeouts (5 by default): one attempt here
        proxy.stall.set()
        t0 = time.perf_counter()
        with pytest.raises(ReadTimeoutError) as info:
            ck.load("model.row_sharded")
        elapsed = time.perf_counter() - t0
        assert proxy.stalled >= 1 and elapsed < 30, (proxy.stalled, elapsed)
        assert (
            "__" in str(info.value)
            and ".distcp" in str(info.value)
            and "DCP_EXPLORER_TIMEOUT" in str(info.value)
        )
    finally:
        proxy.release.set()
        proxy.shutdown()
        proxy.server_close()
        moto.stop()


# ============================================================================================
# memory bound of opening
# ============================================================================================
MEASURE = """
import json, sys, time
t = time.perf_counter()
import dcp_explorer
ck = dcp_explorer.open(sys.argv[1], strict=False)
n = len(ck.chunks)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"chunks": n, "peak_rss": peak, "seconds": time.perf_counter() - t,
                  "torch": "torch" in sys.modules}))
"""


def _measure(path: Path, tmp_path: Path) -> dict:
    env = dict(os.environ, DCP_EXPLORER_CACHE=str(tmp_path / "measure-cache"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env,
                         check=True, timeout=600)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_open_memory_8b_x64(tmp_path_factory, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic import synthetic_dir

    d = synthetic_dir("8b", 64, tmp_path_factory.mktemp("synthetic"))
    m = _measure(d, tmp_path)
    assert m["chunks"] == 56163 and not m["torch"]
    assert m["peak_rss"] < BOUND_FIXED + BOUND_PER_CHUNK * m["chunks"], m


def _big_dir() -> Path | None:
    base = Path(os.environ.get("DCP_EXPLORER_BENCH_DIR", Path.home() / ".cache" / "dcp_explorer_bench"))
    found = sorted(base.glob("llama405b_fsdp1024_*/.metadata")) if base.is_dir() else []
    if found:
        return found[0].parent
    if os.environ.get("DCP_EXPLORER_BIG_TESTS") == "1":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from synthetic import synthetic_dir

        return synthetic_dir("405b", 1024)
    return None


@pytest.mark.timeout(900)
def test_open_memory_405b_x1024(tmp_path):
    d = _big_dir()
    if d is None:
        pytest.skip(
            "no synthetic 405B x 1024 metadata (python benchmarks/synthetic.py, or DCP_EXPLORER_BIG_TESTS=1)"
        )
    m = _measure(d, tmp_path)
    assert m["chunks"] == 3_494_001 and not m["torch"]
    assert m["peak_rss"] < BOUND_405B, f"peak RSS {m['peak_rss'] / (1 << 30):.2f} GiB"
    assert m["peak_rss"] < BOUND_FIXED + BOUND_PER_CHUNK * m["chunks"]
    print(
        f"\n405B x 1024: {m['chunks']:,} chunks, open + chunks table peak RSS {m['peak_rss'] / (1 << 30):.2f} GiB "
        f"in {m['seconds']:.1f} s"
    )
