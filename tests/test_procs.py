"""``dcp_explorer._procs``: local workers meet on a port the OS picks; failures and hangs end the run."""

from __future__ import annotations

import pathlib
import socket
import textwrap
import time

import pytest

from dcp_explorer import _procs

#: A worker that joins the run's process group and all-reduces its rank + 1.
ALL_REDUCE = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from dcp_explorer import _procs
    with _procs.process_group("gloo", timeout=60):
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t)
        print(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum {int(t.item())}", flush=True)
    """
)


def _all_dead(workers: _procs.Workers) -> bool:
    return all(c is not None for c in workers.codes)


def test_workers_meet_on_a_port_of_the_os_choosing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        # a MASTER_PORT inherited from the parent (here: a port in use) plays no part
        monkeypatch.setenv("MASTER_PORT", str(busy_port))
        workers = _procs.start(["-c", ALL_REDUCE], 3, tmp_path)
        assert workers.wait(120, what="the test workers", error=RuntimeError) == [0, 0, 0]
    for r in range(3):
        assert f"rank {r} of 3: sum 6" in workers.logs[r].read_text()
    port = int((tmp_path / "store_port").read_text())
    assert port > 0 and port != busy_port


def test_worker_environment(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", "1")
    code = (
        "import os; e = os.environ; print(e.get('MASTER_PORT'), e['MASTER_ADDR'], e['RANK'], e['LOCAL_RANK'], "
        "e['WORLD_SIZE'], e['OMP_NUM_THREADS'], e['EXTRA'])"
    )
    workers = _procs.start(["-c", code], 2, tmp_path, prefix="w2_", env={"EXTRA": "x"})
    workers.wait(60, what="the test workers", error=RuntimeError)
    assert [lg.name for lg in workers.logs] == ["w2_rank0.log", "w2_rank1.log"]
    for r, log in enumerate(workers.logs):
        assert log.read_text().split() == ["None", "127.0.0.1", str(r), str(r), "2", "1", "x"]


def test_a_failed_worker_stops_the_run_with_its_log(tmp_path: pathlib.Path) -> None:
    code = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit('boom on rank 1')\ntime.sleep(300)"
    workers = _procs.start(["-c", code], 3, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(
        ValueError, match=r"rank\(s\) \[1\] of the test run exited with code\(s\) \[1\]; fix it"
    ) as info:
        workers.wait(120, what="the test run", error=ValueError, hint="fix it")
    assert time.monotonic() - t0 < 30
    assert "--- rank1.log ---\nboom on rank 1" in str(info.value)
    assert _all_dead(workers)


def test_accepted_exit_codes(tmp_path: pathlib.Path) -> None:
    code = "import os, sys; sys.exit(int(os.environ['RANK']))"
    workers = _procs.start(["-c", code], 2, tmp_path)
    assert workers.wait(60, what="the test run", error=RuntimeError, ok=(0, 1)) == [0, 1]


def test_check_does_not_block(tmp_path: pathlib.Path) -> None:
    workers = _procs.start(["-c", "import time; time.sleep(300)"], 2, tmp_path)
    try:
        t0 = time.monotonic()
        assert workers.check(what="the test run", error=RuntimeError) is False
        assert time.monotonic() - t0 < 1
    finally:
        workers.kill()
    assert _all_dead(workers)


def test_a_hang_times_out_and_is_killed(tmp_path: pathlib.Path) -> None:
    code = "import time; print('waiting', flush=True); time.sleep(300)"
    workers = _procs.start(["-c", code], 2, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within timeout=2 s") as info:
        workers.wait(2, what="the test run", error=TimeoutError)
    assert time.monotonic() - t0 < 20
    assert "--- rank0.log ---\nwaiting" in str(info.value) and "--- rank1.log ---" in str(info.value)
    assert _all_dead(workers)
