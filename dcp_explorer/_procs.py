"""Local worker processes for the multi-process modes: start, rendezvous, watch, kill.

:mod:`~dcp_explorer.verify`, :mod:`~dcp_explorer.samples` and :func:`dcp_explorer.diff.run_distributed`
run real ``gloo`` process groups on 127.0.0.1 in worker processes they start themselves. This
module is the one way they do it.

Parent side (imports no torch): :func:`start` launches ``nproc`` Python workers, rank ``r``
with ``RANK=r``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` set as
``torchrun`` would, one log file each (stdout and stderr); :meth:`Workers.check` and
:meth:`Workers.wait` watch them and, as soon as one fails or time runs out, kill the rest and
raise the caller's error with the log tails.

Worker side (imports ``torch.distributed`` inside the functions): :func:`connect_store` and
:func:`process_group`. Rank 0 starts the workers' ``TCPStore`` on port 0 -- the OS picks a free
port while binding it -- and publishes the port in a file of the run's folder (written
atomically); the other ranks wait for that file, connect, and check the run's token in the
store. No port is chosen before it is bound, so there is no race to retry: a port picked by
the parent and bound only after rank 0's torch import could be taken in between (by a Jupyter
kernel, a test server, another run), which made loaded machines fail now and then, or let a
rank join another run's store.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch.distributed import TCPStore

#: Environment of a worker started by :func:`start`: where rank 0 publishes the store's port.
ENV_PORT_FILE = "_DCP_EXPLORER_STORE_PORT_FILE"
#: Environment of a worker started by :func:`start`: the run's token, set in the store by rank 0.
ENV_TOKEN = "_DCP_EXPLORER_STORE_TOKEN"
#: Seconds the peers of a failed worker get to write their logs before they are killed.
GRACE = 0.5


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workers:
    """Worker processes started by :func:`start`; index ``r`` is rank ``r``."""

    procs: tuple[subprocess.Popen[bytes], ...]
    """The processes."""
    logs: tuple[pathlib.Path, ...]
    """Each rank's output (stdout and stderr)."""

    @property
    def codes(self) -> list[int | None]:
        """Each rank's exit code (``None``: still running)."""
        return [p.poll() for p in self.procs]

    def failed(self, ok: Collection[int] = (0,)) -> list[int]:
        """Ranks that exited with a code not in ``ok``, the earliest-written log first.

        The first rank to fail usually holds the cause; its peers then fail on broken
        connections.
        """
        codes = self.codes
        bad = [r for r, c in enumerate(codes) if c is not None and c not in ok]
        return sorted(bad, key=lambda r: _mtime(self.logs[r]))

    def tail(self, rank: int = 0, lines: int = 30) -> str:
        """The last ``lines`` lines of one rank's log, under a header naming the log file."""
        log = self.logs[rank]
        try:
            text = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = ["<no log>"]
        return f"--- {log.name} ---\n" + "\n".join(text)

    def kill(self) -> None:
        """Kill the workers that are still running, and reap them all."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    def check(self, *, what: str, error: Callable[[str], BaseException], ok: Collection[int] = (0,),
              hint: str = "") -> bool:  # fmt: skip
        """``True`` once every worker exited with a code in ``ok``; never blocks.

        Parameters
        ----------
        what
            The run, for the message (``"the 4-rank run writing ['mixed']"``).
        error
            The exception class (or factory) to raise, called with the message.
        ok
            Exit codes that count as success.
        hint
            What the caller should do, appended to the message's first line.

        Raises
        ------
        BaseException
            ``error(message)`` as soon as a worker exited with another code; the other workers
            are killed first (after :data:`GRACE` seconds to write their logs). The message
            names the ranks and codes and ends with the first two failed ranks' log tails.
        """
        codes = self.codes
        if all(c is None or c in ok for c in codes):
            return None not in codes
        time.sleep(GRACE)
        failed, codes = self.failed(ok), self.codes
        self.kill()
        head = f"rank(s) {failed} of {what} exited with code(s) {[codes[r] for r in failed]}"
        raise error(f"{head}{'; ' + hint if hint else ''}\n" + "\n".join(self.tail(r) for r in failed[:2]))

    def wait(self, timeout: float, *, what: str, error: Callable[[str], BaseException],
             ok: Collection[int] = (0,), hint: str = "") -> list[int]:  # fmt: skip
        """Block until every worker exited with a code in ``ok``; return the codes.

        Parameters are those of :meth:`check`, and ``timeout``: seconds before the workers are
        killed and ``error`` is raised with every rank's log tail. The workers are always
        killed on the way out.
        """
        deadline = time.monotonic() + timeout
        try:
            while not self.check(what=what, error=error, ok=ok, hint=hint):
                if time.monotonic() > deadline:
                    self.kill()
                    raise error(f"{what} did not finish within timeout={timeout:.0f} s; the workers were "
                                f"killed{'; ' + hint if hint else ''}\n"
                                + "\n".join(self.tail(r) for r in range(len(self.procs))))  # fmt: skip
                time.sleep(0.05)
        finally:
            self.kill()
        return [p.returncode for p in self.procs]


def start(args: Sequence[str], nproc: int, folder: str | os.PathLike[str], *, prefix: str = "",
          env: Mapping[str, str] | None = None) -> Workers:  # fmt: skip
    """Start ``nproc`` Python workers running ``python ARGS...``, one per rank.

    Parameters
    ----------
    args
        Arguments after the interpreter (``["-m", "dcp_explorer.verify", "--worker", spec]``).
    nproc
        Number of workers (the world size).
    folder
        The run's private folder (a temporary directory): it receives the logs
        ``{prefix}rank{r}.log`` and the store's port file ``{prefix}store_port``.
    prefix
        Distinguishes several runs sharing one folder.
    env
        Extra environment for every worker.

    Returns
    -------
    Workers

    Notes
    -----
    Each worker gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` and
    ``MASTER_ADDR=127.0.0.1`` (no ``MASTER_PORT``: the port comes from rank 0, see
    :func:`connect_store`), one thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``), ``gloo``
    on the loopback interface (Linux), ``PYTHONWARNINGS=ignore`` unless set, and this package
    first on ``PYTHONPATH``.
    """
    folder = pathlib.Path(folder)
    base = dict(os.environ)
    base.pop("MASTER_PORT", None)
    base.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # fmt: skip
    base.setdefault("PYTHONWARNINGS", "ignore")
    if sys.platform.startswith("linux"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    pkg_parent = str(pathlib.Path(__file__).resolve().parents[1])
    base["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, base.get("PYTHONPATH", "")) if p)
    base[ENV_PORT_FILE] = str(folder / f"{prefix}store_port")
    base[ENV_TOKEN] = uuid.uuid4().hex
    base.update(env or {})
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[pathlib.Path] = []
    try:
        for rank in range(nproc):
            log = folder / f"{prefix}rank{rank}.log"
            logs.append(log)
            with open(log, "wb") as fh:
                procs.append(subprocess.Popen(
                    [sys.executable, *args], stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                    env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                ))  # fmt: skip
    except BaseException:
        Workers(tuple(procs), tuple(logs)).kill()
        raise
    return Workers(tuple(procs), tuple(logs))


def _mtime(path: pathlib.Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
def spawned() -> bool:
    """Whether this process is a worker :func:`start` launched."""
    return ENV_PORT_FILE in os.environ


def rank_and_world() -> tuple[int, int]:
    """This worker's ``(RANK, WORLD_SIZE)``."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def connect_store(timeout: float) -> TCPStore:
    """The workers' shared ``TCPStore``, on a port no other process can take first.

    Rank 0 starts the server on port 0 and publishes the port it got (atomically) in the
    run's port file; the other ranks wait for the file, connect, and check the run's token.

    Parameters
    ----------
    timeout
        Seconds to wait for the port file, and the store's timeout.

    Raises
    ------
    TimeoutError
        Rank 0 did not publish the port in time.
    RuntimeError
        The store on the published port belongs to another run.
    """
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = rank_and_world()
    port_file = pathlib.Path(os.environ[ENV_PORT_FILE])
    token = os.environ[ENV_TOKEN]
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    td = timedelta(seconds=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, world, True, timeout=td, wait_for_workers=False)
        store.set("token", token)
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(store.port))
        tmp.replace(port_file)
        return store
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank 0 did not publish the store's port in {port_file} within {timeout:.0f} s"
            )
        time.sleep(0.05)
    port = int(port_file.read_text())
    store = dist.TCPStore(host, port, world, False, timeout=td, wait_for_workers=False)
    theirs = store.get("token").decode()
    if theirs != token:  # pragma: no cover - only if the port changed hands after publication
        raise RuntimeError(f"the store on port {port} belongs to another run ({theirs!r}, not {token!r})")
    return store


def release(store: TCPStore, timeout: float) -> None:
    """This rank is done with ``store``; rank 0 (its server) waits until every rank is, or ``timeout``."""
    rank, world = rank_and_world()
    if rank != 0:
        with contextlib.suppress(Exception):  # rank 0 gone already: nobody to tell
            store.add("done", 1)
        return
    store.add("done", 1)
    deadline = time.monotonic() + timeout
    while int(store.add("done", 0)) < world and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def process_group(backend: str = "gloo", *, timeout: float = 120.0) -> Iterator[None]:
    """Join the default process group of this worker's run, for the ``with`` block.

    In a worker :func:`start` launched, through :func:`connect_store`; otherwise through
    ``env://`` as ``torchrun`` sets it up. ``timeout`` is the seconds a collective may block.
    An exception leaves a :func:`start` worker's block without teardown: its peers may be stuck
    in a collective, the process is about to exit, and the parent kills the rest.
    """
    from datetime import timedelta

    import torch.distributed as dist

    td = timedelta(seconds=timeout)
    if not spawned():
        dist.init_process_group(backend, timeout=td)
        try:
            yield
        finally:
            dist.destroy_process_group()
        return
    rank, world = rank_and_world()
    store = connect_store(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=td)
    yield
    dist.destroy_process_group()
    release(store, timeout)
