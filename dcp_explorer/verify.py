"""Check the load-plan simulator against a real ``dcp.load``, rank by rank.

Every rank of a real process group builds the state dict a user would load the checkpoint
into (its entries in ``dcp.load``'s order, nested back with ``Metadata.planner_data``,
DTensors on :func:`~torch.distributed.device_mesh.init_device_mesh` with the placements
:func:`~dcp_explorer.plan.resolve_placements` gives), runs a real ``dcp.load`` through a
recording storage reader, and compares the ReadItems torch planned -- all fields, in order --
with :meth:`LoadPlan.reads_for(rank) <dcp_explorer.plan.LoadPlan.reads_for>` of
:func:`~dcp_explorer.plan.simulate_load`. Rank 0 gathers the results.

Run it under ``torchrun`` (one process per mesh rank)::

    torchrun --nproc-per-node 4 -m dcp_explorer.verify CKPT --mesh dp=2,tp=2 --preset fsdp_tp

or without ``torchrun``: it then starts the worker processes itself (``gloo`` on 127.0.0.1)::

    python -m dcp_explorer.verify CKPT --mesh dp=2,tp=2 --preset fsdp_tp

The exit code is 0 when every rank's ReadItems equal the simulated ones, 1 otherwise.
:func:`verify_load` and :func:`verify_many` are the Python entry points; ``verify_many`` runs
several scenarios in one set of worker processes (each scenario in its own process group of
its mesh's size), which saves the ~2 s torch import per process.

This module imports torch only inside its functions: ``import dcp_explorer`` stays torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _procs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .checkpoint import Checkpoint
    from .layout import Mesh

__all__ = ["FIELDS", "Scenario", "VerifyReport", "VerifyError", "verify_load", "verify_many", "main"]

#: The ReadItem fields compared, as columns of :meth:`LoadPlan.reads_for`.
FIELDS: tuple[str, ...] = (
    "fqn",
    "type",
    "dest_offset",
    "dest_offsets",
    "storage_offset",
    "storage_chunk",
    "storage_offsets",
    "lengths",
)

#: Differences listed per rank (the count is always exact).
MAX_DIFFERENCES = 20

Row = tuple[Any, ...]


class VerifyError(RuntimeError):
    """The worker processes could not run (crash, timeout); the message has their logs."""


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One verification: a checkpoint loaded on a target mesh with some placements."""

    ckpt: str
    """Checkpoint directory."""
    mesh: str
    """Target mesh, as :func:`~dcp_explorer.layout.parse_mesh` takes it (``"dp=2,tp=2"``)."""
    placements: Any = None
    """Placement rules (JSON-serialisable: a spec string, a list of specs, or a mapping glob -> spec)."""
    preset: str | None = None
    """Layout preset (:data:`dcp_explorer.plan.PRESETS`)."""

    def to_json(self) -> dict[str, Any]:
        """The scenario as a JSON-able dict (what the workers receive)."""
        return {"ckpt": self.ckpt, "mesh": self.mesh, "placements": self.placements, "preset": self.preset}


@dataclass(frozen=True)
class VerifyReport:
    """Real ``dcp.load`` ReadItems against simulated ones, per rank.

    Index ``r`` of every per-rank tuple is rank ``r`` of the target mesh.
    """

    scenario: Scenario
    """What was verified."""
    recorded: tuple[int, ...]
    """ReadItems torch planned on each rank (recorded in ``read_data``)."""
    simulated: tuple[int, ...]
    """ReadItems :func:`~dcp_explorer.plan.simulate_load` predicts for each rank."""
    differences: tuple[tuple[str, ...], ...]
    """The first :data:`MAX_DIFFERENCES` differences of each rank, as text (empty: identical)."""
    num_differences: tuple[int, ...]
    """Number of differing rows per rank (rows present on one side only count too)."""
    errors: tuple[str | None, ...] = ()
    """Per rank: an exception raised while building, loading or simulating (``None``: none)."""
    seconds: float = 0.0
    """Wall time of the run that produced the report."""
    problems: tuple[str, ...] = field(default=())
    """Problems the simulator reported (as ``kind: fqn: reason``), for context."""

    @property
    def world_size(self) -> int:
        """Number of ranks verified."""
        return len(self.recorded)

    @property
    def ok(self) -> bool:
        """Every rank ran, and its ReadItems equal the simulated ones (all fields, same order)."""
        return self.world_size > 0 and not any(self.num_differences) and not any(e for e in self.errors)

    def summary(self) -> str:
        """A per-rank ``OK`` / first-differences report, as printed by the command line."""
        sc = self.scenario
        head = f"{sc.ckpt} -> mesh {sc.mesh}"
        if sc.preset:
            head += f" preset={sc.preset}"
        if sc.placements is not None:
            head += f" placements={json.dumps(sc.placements)}"
        lines = [head]
        for r in range(self.world_size):
            err = self.errors[r] if r < len(self.errors) else None
            if err:
                lines.append(f"  rank {r}: ERROR {err.strip().splitlines()[-1] if err.strip() else err}")
                continue
            n = self.num_differences[r]
            status = "OK" if n == 0 else f"{n} difference(s)"
            counts = f"{self.recorded[r]} recorded, {self.simulated[r]} simulated read items"
            lines.append(f"  rank {r}: {status} ({counts})")
            for d in self.differences[r][:5]:
                lines.append(f"      {d}")
            if n > 5:
                lines.append(f"      ... {n - 5} more")
        lines.append("OK" if self.ok else "MISMATCH")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<VerifyReport {self.scenario.ckpt} on {self.scenario.mesh}: "
                f"{'OK' if self.ok else 'MISMATCH'}, {sum(self.recorded)} read items, "
                f"{sum(self.num_differences)} differences>")  # fmt: skip


# --------------------------------------------------------------------------------------------
# comparison (pure)
# --------------------------------------------------------------------------------------------
def _tup(x: Any) -> tuple[int, ...] | None:
    if x is None:
        return None
    return tuple(int(v) for v in x)


def rows_from_read_items(items: Sequence[Any]) -> list[Row]:
    """torch ``ReadItem`` objects -> rows of :data:`FIELDS`."""
    from torch.distributed.checkpoint.planner import LoadItemType

    out: list[Row] = []
    for it in items:
        out.append(
            (
                it.dest_index.fqn,
                "bytes" if it.type == LoadItemType.BYTE_IO else "tensor",
                _tup(it.dest_index.offset),
                _tup(it.dest_offsets),
                _tup(it.storage_index.offset),
                None if it.storage_index.index is None else int(it.storage_index.index),
                _tup(it.storage_offsets),
                _tup(it.lengths),
            )
        )
    return out


def rows_from_plan(reads: Any) -> list[Row]:
    """Rows of :data:`FIELDS` from a :meth:`LoadPlan.reads_for` table."""
    import math

    def norm(name: str, v: Any) -> Any:
        if name in ("fqn", "type"):
            return str(v)
        if name == "storage_chunk":
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return None
            return int(v)
        return _tup(v)

    cols = [list(reads[f]) for f in FIELDS]
    return [tuple(norm(f, c[i]) for f, c in zip(FIELDS, cols, strict=True)) for i in range(len(reads))]


def compare_rows(
    recorded: Sequence[Row], simulated: Sequence[Row], limit: int = MAX_DIFFERENCES
) -> tuple[list[str], int]:
    """Compare two row lists in order.

    Returns
    -------
    (differences, count)
        Text of the first ``limit`` differing rows and the number of differing rows.
    """
    diffs: list[str] = []
    count = 0
    for i in range(max(len(recorded), len(simulated))):
        a = recorded[i] if i < len(recorded) else None
        b = simulated[i] if i < len(simulated) else None
        if a == b:
            continue
        count += 1
        if len(diffs) >= limit:
            continue
        if a is None:
            diffs.append(f"row {i}: only simulated: {dict(zip(FIELDS, b, strict=True))}")  # type: ignore[arg-type]
        elif b is None:
            diffs.append(f"row {i}: only recorded: {dict(zip(FIELDS, a, strict=True))}")
        else:
            fields = ", ".join(
                f"{f} recorded {x!r} simulated {y!r}" for f, x, y in zip(FIELDS, a, b, strict=True) if x != y
            )
            diffs.append(f"row {i} ({a[0]}): {fields}")
    return diffs, count


# --------------------------------------------------------------------------------------------
# one rank (inside a process group)
# --------------------------------------------------------------------------------------------
def _torch_placements(pls: Sequence[Any]) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from .layout import Replicate as R
    from .layout import Shard as S

    out: list[Any] = []
    for p in pls:
        if isinstance(p, R):
            out.append(Replicate())
        elif isinstance(p, S):
            out.append(Shard(p.dim))
        else:
            out.append(_StridedShard(p.dim, split_factor=p.split_factor))
    return out


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def build_state_dict(index: Any, mesh: Mesh, placements: Any = None, preset: str | None = None,
                     device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """The state dict a rank would load ``index`` into (needs an initialised process group).

    Entries in :func:`dcp_explorer.plan._default_load_order`, nested with ``planner_data``
    (flat keys when there is none); tensors as DTensors on ``init_device_mesh`` with the
    resolved placements (empty local tensors of the right local shape), plain tensors when
    the rule gives ``None``, ``None`` for bytes entries.

    Parameters
    ----------
    index
        The checkpoint's :class:`~dcp_explorer.model.CheckpointIndex`.
    mesh
        Target :class:`~dcp_explorer.layout.Mesh`; its size must be the world size.
    placements, preset
        As :func:`dcp_explorer.plan.simulate_load`.
    device
        ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    dict
    """
    import torch
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from .model import KIND_BYTES
    from .plan import _default_load_order, resolve_placements

    rule = resolve_placements(mesh, placements, preset)
    dmesh = init_device_mesh(device, tuple(mesh.shape), mesh_dim_names=tuple(mesh.names))
    lookup = {f: i for i, f in enumerate(index.fqns)}
    sd: dict[str, Any] = {}
    for fqn in _default_load_order(index):
        e = lookup[fqn]
        value: Any
        if index.kinds[e] == KIND_BYTES:
            value = None
        else:
            shape = tuple(int(s) for s in index.shapes[e])
            dtype = getattr(torch, index.dtypes[e])
            pls = rule(fqn, shape)
            if pls is None:
                value = torch.empty(shape, dtype=dtype, device=device)
            else:
                tpls = _torch_placements(pls)
                local_shape, _ = compute_local_shape_and_global_offset(shape, dmesh, tpls)
                local = torch.empty(local_shape, dtype=dtype, device=device)
                value = DTensor.from_local(local, dmesh, tpls, run_check=False, shape=torch.Size(shape),
                                           stride=_contiguous_stride(shape))  # fmt: skip
        path = index.planner_data.get(fqn)
        if path:
            set_element(sd, tuple(path), value)
        else:
            sd[fqn] = value
    return sd


def _reader_class(fmt: str) -> type:
    if fmt == "dcp":
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader
    if fmt == "hf_quantized":
        from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

        return QuantizedHuggingFaceStorageReader
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader


def recording_reader(path: str, fmt: str = "dcp") -> Any:
    """A storage reader for ``path`` that records the ``ReadItem``s of every ``read_data`` call.

    Subclasses ``FileSystemReader`` (``fmt="dcp"``), ``HuggingFaceStorageReader`` or
    ``QuantizedHuggingFaceStorageReader``; the items are in its ``items`` list, in plan order.
    """
    base = _reader_class(fmt)

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.items: list[Any] = []

        def read_data(self, plan: Any, planner: Any) -> Any:
            self.items.extend(plan.items)
            return super().read_data(plan, planner)

    Recording.__name__ = Recording.__qualname__ = f"Recording{base.__name__}"
    return Recording(path)


def _verify_rank(
    sc: Mapping[str, Any], rank: int, device: str, opened: dict[str, Checkpoint]
) -> dict[str, Any]:
    """Build, load, record and compare on this rank; collective with the other ranks of the group."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from . import open as open_ckpt
    from .layout import parse_mesh
    from .plan import simulate_load

    res: dict[str, Any] = {"rank": rank, "recorded": 0, "simulated": 0, "differences": [], "num_differences": 0,
                           "error": None, "problems": []}  # fmt: skip
    sd = reader = ckpt = None
    try:
        path = str(sc["ckpt"])
        ckpt = opened.get(path)
        if ckpt is None:
            ckpt = opened[path] = open_ckpt(path)
        mesh = parse_mesh(sc["mesh"])
        if mesh.size != dist.get_world_size():
            raise ValueError(
                f"mesh {mesh} has {mesh.size} ranks but the process group has {dist.get_world_size()}"
            )
        sd = build_state_dict(ckpt.index, mesh, sc.get("placements"), sc.get("preset"), device)
        reader = recording_reader(path, ckpt.index.format)
    except Exception:
        res["error"] = traceback.format_exc()
    # every rank must agree before the collective load (a lone failure would hang the others)
    ready: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ready, res["error"] is None)
    if not all(ready):
        if res["error"] is None:
            failed = [r for r, ok in enumerate(ready) if not ok]
            res["error"] = f"skipped: rank(s) {failed} failed to build the state dict"
        return res
    assert reader is not None  # this rank built everything: its own error is None
    try:
        dcp.load(sd, storage_reader=reader)
    except Exception:
        res["error"] = traceback.format_exc()
        return res
    try:
        recorded = rows_from_read_items(reader.items)
        plan = simulate_load(ckpt, parse_mesh(sc["mesh"]), sc.get("placements"), preset=sc.get("preset"))
        simulated = rows_from_plan(plan.reads_for(rank))
        diffs, n = compare_rows(recorded, simulated)
        problems = [f"{p.kind}: {p.fqn}: {p.reason}" for p in plan.problems if p.severity != "info"]
        res.update(recorded=len(recorded), simulated=len(simulated), differences=diffs, num_differences=n,
                   problems=problems)  # fmt: skip
    except Exception:
        res["error"] = traceback.format_exc()
    return res


def _gather(res: dict[str, Any]) -> list[dict[str, Any]] | None:
    import torch.distributed as dist

    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(res, out, dst=0)
    return out


def _report(sc: Scenario, results: Sequence[Mapping[str, Any]], seconds: float) -> VerifyReport:
    results = sorted(results, key=lambda r: r["rank"])
    problems: list[str] = []
    for r in results:
        for p in r.get("problems", []):
            if p not in problems:
                problems.append(p)
    return VerifyReport(
        scenario=sc,
        recorded=tuple(int(r["recorded"]) for r in results),
        simulated=tuple(int(r["simulated"]) for r in results),
        differences=tuple(tuple(r["differences"]) for r in results),
        num_differences=tuple(int(r["num_differences"]) for r in results),
        errors=tuple(r["error"] for r in results),
        seconds=seconds,
        problems=tuple(problems),
    )


def _device_and_backend() -> tuple[str, str]:
    """``("cuda", "nccl")`` when CUDA is available, else ``("cpu", "gloo")`` (torchrun mode)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "nccl"
    return "cpu", "gloo"


# --------------------------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------------------------
def _worker_main(spec_path: str) -> int:
    """A worker started by :func:`verify_many`: run every scenario whose mesh includes this rank.

    All workers share one ``TCPStore``; each scenario gets its own process group of its
    mesh's size (ranks ``0..size-1``) under a store prefix, so ``init_device_mesh`` sees a
    world of exactly the mesh's size. Rank 0 of each scenario writes ``result_{i}.json``.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from .layout import parse_mesh

    torch.set_num_threads(1)
    spec = json.loads(pathlib.Path(spec_path).read_text())
    rank, _ = _procs.rank_and_world()
    out_dir = pathlib.Path(spec["out_dir"])
    pg_timeout = float(spec.get("pg_timeout", 120))
    timeout = timedelta(seconds=pg_timeout)
    store = _procs.connect_store(pg_timeout)
    device, backend = "cpu", "gloo"  # local workers: CPU meshes, as the samples are written
    opened: dict[str, Any] = {}
    for i, sc in enumerate(spec["scenarios"]):
        size = parse_mesh(sc["mesh"]).size
        if rank >= size:
            continue
        t0 = time.perf_counter()
        dist.init_process_group(backend, store=dist.PrefixStore(f"scenario{i}/", store), rank=rank,
                                world_size=size, timeout=timeout)  # fmt: skip
        try:
            res = _verify_rank(sc, rank, device, opened)
            gathered = _gather(res)
            if rank == 0 and gathered is not None:
                payload = {"results": gathered, "seconds": time.perf_counter() - t0}
                tmp = out_dir / f".result_{i}.json.tmp"
                tmp.write_text(json.dumps(payload))
                tmp.replace(out_dir / f"result_{i}.json")
        finally:
            dist.destroy_process_group()
    _procs.release(store, pg_timeout)  # rank 0 serves the store: it waits for every worker
    return 0


def verify_many(scenarios: Sequence[Scenario | Mapping[str, Any]], *, nproc: int | None = None,
                timeout: float = 300.0) -> list[VerifyReport]:  # fmt: skip
    """Verify several scenarios in one set of worker processes, in sequence.

    Parameters
    ----------
    scenarios
        :class:`Scenario` objects or dicts with ``ckpt``, ``mesh`` and optionally
        ``placements`` (JSON-serialisable) and ``preset``.
    nproc
        Worker processes to start (default: the largest mesh); each scenario runs on ranks
        ``0..mesh.size-1``.
    timeout
        Seconds for the whole run; the workers are killed after it.

    Returns
    -------
    list of VerifyReport
        One per scenario, in order.

    Raises
    ------
    VerifyError
        A worker crashed, the run timed out, or a scenario produced no result; the message
        holds the workers' log tails.
    ValueError
        A mesh larger than ``nproc``, or placements that are not JSON-serialisable.

    Examples
    --------
    Not run as doctests: each call starts gloo worker processes and takes ~25 s
    (``tests/test_plan_real.py`` runs them on the samples).

    >>> reports = verify_many([Scenario("ckpt", "2", preset="fsdp"), Scenario("ckpt", "3")])  # doctest: +SKIP
    >>> all(r.ok for r in reports)  # doctest: +SKIP
    True
    """
    from .layout import parse_mesh

    scs: list[Scenario] = []
    for s in scenarios:
        if not isinstance(s, Scenario):
            s = Scenario(str(s["ckpt"]), str(s["mesh"]), s.get("placements"), s.get("preset"))
        m = parse_mesh(s.mesh)
        try:
            json.dumps(s.placements)
        except TypeError:
            raise ValueError(f"placements {s.placements!r} must be JSON-serialisable (strings, lists, dicts) "
                             "to reach the worker processes") from None  # fmt: skip
        scs.append(Scenario(str(pathlib.Path(s.ckpt).resolve()), str(m), s.placements, s.preset))
    if not scs:
        return []
    need = max(parse_mesh(s.mesh).size for s in scs)
    nproc = need if nproc is None else int(nproc)
    if nproc < need:
        raise ValueError(f"nproc={nproc} is smaller than the largest mesh ({need} ranks)")
    # one attempt: the workers' store binds a port of the OS's choosing (dcp_explorer._procs), so
    # there is no port race to retry; any failure is a real one, reported with the workers' logs
    with tempfile.TemporaryDirectory(prefix="dcpx-verify-") as d:
        tmp = pathlib.Path(d)
        spec = {
            "out_dir": str(tmp),
            "scenarios": [s.to_json() for s in scs],
            # below the parent's deadline: a stuck collective raises in the worker, naming what it waited for
            "pg_timeout": max(30.0, 0.9 * timeout),
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        workers = _procs.start(["-m", "dcp_explorer.verify", "--worker", str(spec_path)], nproc, tmp)
        workers.wait(timeout, what=f"the {nproc} verify workers", error=VerifyError)
        reports = []
        for i, sc in enumerate(scs):
            f = tmp / f"result_{i}.json"
            if not f.exists():
                raise VerifyError(f"scenario {i} ({sc}) produced no result\n" + workers.tail(0))
            payload = json.loads(f.read_text())
            reports.append(_report(sc, payload["results"], float(payload["seconds"])))
        return reports


def verify_load(ckpt_path: str | os.PathLike[str], mesh: Any, placements: Any = None, preset: str | None = None,
                nproc: int | None = None, timeout: float = 300.0) -> VerifyReport:  # fmt: skip
    """Run a real ``dcp.load`` of ``ckpt_path`` on ``mesh`` in worker processes and compare with the simulator.

    Parameters
    ----------
    ckpt_path
        Checkpoint directory (DCP or Hugging Face safetensors).
    mesh
        Target mesh (``"dp=2,tp=2"``, ``(2, 2)``, ``4``...).
    placements, preset
        As :func:`dcp_explorer.plan.simulate_load`; ``placements`` must be JSON-serialisable.
    nproc
        Worker processes (default: the mesh size).
    timeout
        Seconds before the workers are killed.

    Returns
    -------
    VerifyReport

    Raises
    ------
    VerifyError
        The workers crashed or timed out.

    Examples
    --------
    Not run as a doctest: it starts a gloo worker process per rank and takes ~25 s
    (``tests/test_plan_real.py`` runs it on the samples).

    >>> rep = verify_load("ckpt", "dp=2,tp=2", preset="fsdp_tp")  # doctest: +SKIP
    >>> rep.ok, rep.recorded  # doctest: +SKIP
    (True, (172, 172, 172, 172))
    """
    from .layout import parse_mesh

    m = parse_mesh(mesh)
    return verify_many([Scenario(str(ckpt_path), str(m), placements, preset)], nproc=nproc, timeout=timeout)[
        0
    ]


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _torchrun_main(sc: Scenario) -> int:
    """One scenario under ``torchrun``: the launcher's process group is the mesh's."""
    import torch.distributed as dist

    device, backend = _device_and_backend()
    if device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        t0 = time.perf_counter()
        res = _verify_rank(sc.to_json(), dist.get_rank(), device, {})
        gathered = _gather(res)
        code = 0
        if dist.get_rank() == 0 and gathered is not None:
            rep = _report(sc, gathered, time.perf_counter() - t0)
            print(rep.summary(), flush=True)
            code = 0 if rep.ok else 1
        verdict = [code]
        dist.broadcast_object_list(verdict, src=0)
        return int(verdict[0])
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dcp_explorer.verify``; see the module docstring."""
    ap = argparse.ArgumentParser(
        prog="python -m dcp_explorer.verify",
        description="Compare simulate_load with the ReadItems of a real dcp.load, per rank.",
    )
    ap.add_argument("ckpt", nargs="?", help="checkpoint directory")
    ap.add_argument("--mesh", default=None, help="target mesh, e.g. dp=2,tp=2 (default: the world size)")
    ap.add_argument("--preset", default=None, help="layout preset: fsdp, hsdp, fsdp_tp, replicate")
    ap.add_argument("--placements", default=None,
                    help='placement rules as JSON, e.g. \'{"model.*": "S(0)"}\' or \'"S(0)"\'')  # fmt: skip
    ap.add_argument(
        "--nproc", type=int, default=None, help="worker processes without torchrun (default: mesh size)"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before workers are killed")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    if not args.ckpt:
        ap.error("the checkpoint directory is required")
    placements = json.loads(args.placements) if args.placements else None
    mesh = args.mesh or os.environ.get("WORLD_SIZE")
    if mesh is None:
        ap.error("--mesh is required without torchrun")
    from .layout import parse_mesh

    sc = Scenario(str(pathlib.Path(args.ckpt).resolve()), str(parse_mesh(mesh)), placements, args.preset)
    if "RANK" in os.environ:
        return _torchrun_main(sc)
    try:
        rep = verify_many([sc], nproc=args.nproc, timeout=args.timeout)[0]
    except (VerifyError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    print(rep.summary())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
