"""Load planning at 405B scale: dcp_explorer's all-ranks simulation vs torch's own planner.

Builds (once, cached) a synthetic Llama-405B-shaped ``.metadata`` saved FSDP over ``--ranks``
ranks (``synthetic.py``) and plans loading it on a ``--mesh`` (default ``dp_shard=96,tp=8``)
with the ``--preset`` placements (default ``fsdp_tp``: FSDP2 x torchtitan TP), each side in a
fresh process:

1. ours: ``dcp_explorer.open(dir)`` (timed on its own), then ``simulate_load(...)`` and the
   ``per_rank`` table for ALL ranks of the mesh (timed), ``plan.totals()``, peak RSS (VmHWM);
   then ``plan.reads_for(r)`` of the sampled ranks, saved for the comparison (not timed).
2. torch: ``FileSystemReader(dir).read_metadata()`` once (not part of the ratio); for each
   sampled rank, the ``fake`` process group at that rank, ``init_device_mesh("cpu", ...)``,
   a state dict of meta-device DTensors with the placements the simulator resolves
   (``resolve_placements``; local shapes from torch's ``compute_local_shape_and_global_offset``),
   nested as the checkpoint's ``planner_data`` says, top-level keys sorted and flattened with
   torch's ``flatten_state_dict`` as ``dcp.load`` does; then ``create_default_local_load_plan``
   is timed. Its mean per rank x world size is torch's time for all ranks.
3. equality: per sampled rank, torch's ReadItems (type, dest_index fqn/offset/index,
   dest_offsets, storage_index fqn/offset/index, storage_offsets, lengths) must equal
   ``plan.reads_for(rank)`` row for row, and the ``per_rank`` row (read_items, bytes_needed,
   bytes_read = sum of ``storage_data[...].length`` per ReadItem, as ``FileSystemReader``
   reads) must match torch's items. Exits 1 on any difference.

Targets (405B, 1024 -> 96x8): ours >= 500x faster than torch extrapolated, and <= 5 s.

    python benchmarks/bench_plan.py
    python benchmarks/bench_plan.py --size 8b --ranks 64 --mesh dp_shard=8,tp=4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import peak_rss, run_json

# --------------------------------------------------------------------------------------------
# ReadItems as numpy arrays: fqn (str) + one int64 row per item
# --------------------------------------------------------------------------------------------
# int columns: type (0 tensor, 1 bytes), dest_index.index, storage_index.index (-1: None), then
# five tuple fields (dest_index.offset, dest_offsets, storage_index.offset, storage_offsets,
# lengths), each as [length (-1: None), values padded with PAD to `width`]
PAD = -7
FIELDS = ("dest_offset", "dest_offsets", "storage_offset", "storage_offsets", "lengths")


def encode(
    fqns: list[str], types: list[int], dest_idx: list, stor_idx: list, tuples: dict[str, list], width: int
):
    """Pack ReadItem fields (one list per field, one entry per item) into (fqn array, int64 matrix)."""
    n = len(fqns)
    cols = [np.asarray(types, np.int64)[:, None],
            np.array([-1 if x is None else x for x in dest_idx], np.int64).reshape(n, 1),
            np.array([-1 if x is None else x for x in stor_idx], np.int64).reshape(n, 1)]  # fmt: skip
    for name in FIELDS:
        vals = tuples[name]
        m = np.full((n, width + 1), PAD, np.int64)
        for i, t in enumerate(vals):
            if t is None:
                m[i, 0] = -1
                continue
            k = len(t)
            if k > width:
                raise ValueError(f"{name} of item {i} has {k} dims > {width}")
            m[i, 0] = k
            m[i, 1 : k + 1] = t
        cols.append(m)
    return np.asarray(fqns, dtype=str), np.concatenate(cols, axis=1)


def column_names(width: int) -> list[str]:
    out = ["type", "dest_index.index", "storage_index.index"]
    for name in FIELDS:
        out += [f"len({name})"] + [f"{name}[{d}]" for d in range(width)]
    return out


def sample_ranks(spec: str, world: int) -> list[int]:
    """``"8"``: 8 ranks spread evenly over the mesh (first and last included); ``"0,5,767"``: those."""
    if "," in spec:
        rs = sorted({int(x) for x in spec.split(",") if x.strip()})
    else:
        n = max(1, min(int(spec), world))
        rs = sorted({int(round(x)) for x in np.linspace(0, world - 1, n)})
    bad = [r for r in rs if not 0 <= r < world]
    if bad:
        raise SystemExit(f"sampled ranks {bad} are not in a mesh of {world} ranks")
    return rs


# --------------------------------------------------------------------------------------------
# worker: ours (no torch)
# --------------------------------------------------------------------------------------------
def worker_ours(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    import dcp_explorer
    from dcp_explorer.plan import simulate_load

    ck = dcp_explorer.open(a.dir)
    t_open = time.perf_counter() - t0
    rss_open = peak_rss()
    t, c = time.perf_counter(), time.process_time()
    plan = simulate_load(ck, a.mesh, preset=a.preset)
    t_sim = time.perf_counter() - t
    per_rank = plan.per_rank
    t_all, c_all = time.perf_counter() - t, time.process_time() - c
    totals = plan.totals()
    rss = peak_rss()
    # not timed: the sampled ranks' rows for the comparison
    ranks = [int(r) for r in a.ranks.split(",")]
    width = max([1] + [len(s) for s in ck.index.shapes])
    arrays: dict[str, np.ndarray] = {}
    for r in ranks:
        df = plan.reads_for(r)
        is_t = (df["type"] == "tensor").to_numpy()
        fq, m = encode(df["fqn"].tolist(), (~is_t).astype(int).tolist(),
                       [0 if x else None for x in is_t],  # one local chunk per rank: dest index 0
                       [None if pd_isna(x) else int(x) for x in df["storage_chunk"]],
                       {k: df[k].tolist() for k in FIELDS}, width)  # fmt: skip
        arrays[f"fqn_{r}"], arrays[f"int_{r}"] = fq, m
        row = per_rank.iloc[r]
        arrays[f"per_rank_{r}"] = np.array(
            [row["read_items"], row["bytes_needed"], row["bytes_read"]], np.int64
        )
    np.savez(a.out, **arrays)
    print(json.dumps({"open_seconds": t_open, "from_cache": bool(getattr(ck, "from_cache", False)),
                      "simulate_seconds": t_sim, "seconds": t_all, "cpu_seconds": c_all, "peak_rss": rss, "peak_rss_open": rss_open,
                      "totals": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in totals.items()},
                      "torch_imported": "torch" in sys.modules, "width": width,
                      "chunks": int(ck.index.num_chunks), "entries": len(ck.index.fqns)}))  # fmt: skip


def pd_isna(x) -> bool:
    return x is None or (isinstance(x, float) and x != x)


# --------------------------------------------------------------------------------------------
# worker: torch's planner on the fake process group
# --------------------------------------------------------------------------------------------
def worker_torch(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dcp_explorer.layout import parse_mesh
    from dcp_explorer.plan import resolve_placements
    from dcp_explorer.verify import _torch_placements

    t = time.perf_counter()
    md = FileSystemReader(a.dir).read_metadata()
    t_read = time.perf_counter() - t
    rss_read = peak_rss()
    mesh_spec = parse_mesh(a.mesh)
    world = mesh_spec.size
    rule = resolve_placements(mesh_spec, None, a.preset)

    entries = list(md.state_dict_metadata.items())  # checkpoint order
    width = max([1] + [len(v.size) for _, v in entries if not isinstance(v, BytesStorageMetadata)])
    pls_of = {}
    for fqn, v in entries:
        if not isinstance(v, BytesStorageMetadata):
            shape = tuple(v.size)
            p = rule(fqn, shape)
            pls_of[fqn] = None if p is None else tuple(_torch_placements(p))
    mapping = {
        fqn: tuple(md.planner_data.get(fqn, (fqn,))) if md.planner_data else (fqn,) for fqn, _ in entries
    }

    ranks = [int(r) for r in a.ranks.split(",")]
    times, cpu, gc_times, arrays = [], [], [], {}
    gc_clock = [0.0, 0.0]  # total seconds in the cyclic GC, start of the current collection

    def on_gc(phase, info):
        if phase == "start":
            gc_clock[1] = time.perf_counter()
        else:
            gc_clock[0] += time.perf_counter() - gc_clock[1]

    gc.callbacks.append(on_gc)
    for r in ranks:
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=world)
        try:
            mesh = init_device_mesh("cpu", mesh_spec.shape, mesh_dim_names=mesh_spec.names)
            flat_in = {}
            for fqn, v in entries:
                if isinstance(v, BytesStorageMetadata):
                    flat_in[fqn] = 0  # any non-tensor value: one BYTE_IO read
                    continue
                shape = torch.Size(v.size)
                dtype = v.properties.dtype
                pls = pls_of[fqn]
                if pls is None:
                    flat_in[fqn] = torch.empty(shape, dtype=dtype, device="meta")
                    continue
                local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, pls)
                stride = torch.empty(shape, device="meta").stride()
                local = torch.empty(local_shape, dtype=dtype, device="meta")
                flat_in[fqn] = DTensor.from_local(
                    local, mesh, pls, run_check=False, shape=shape, stride=stride
                )
            nested = unflatten_state_dict(flat_in, mapping)
            sd = {k: nested[k] for k in sorted(nested)}  # dcp.load sorts the top-level keys
            flat, _ = flatten_state_dict(sd)  # DefaultLoadPlanner.set_up_planner
            g0, t, c = gc_clock[0], time.perf_counter(), time.process_time()
            plan = create_default_local_load_plan(flat, md)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            gc_times.append(gc_clock[0] - g0)
        finally:
            dist.destroy_process_group()
        items = plan.items
        fqns, types, di, si = [], [], [], []
        tup = {k: [] for k in FIELDS}
        needed = read = 0
        for it in items:
            fqns.append(it.dest_index.fqn)
            types.append(0 if it.type == LoadItemType.TENSOR else 1)
            di.append(it.dest_index.index)
            si.append(it.storage_index.index)
            for k, v in zip(FIELDS, (it.dest_index.offset, it.dest_offsets, it.storage_index.offset,
                                     it.storage_offsets, it.lengths), strict=True):  # fmt: skip
                tup[k].append(None if v is None else tuple(v))
            if it.storage_index.fqn != it.dest_index.fqn:
                raise SystemExit(f"storage fqn {it.storage_index.fqn} != dest fqn {it.dest_index.fqn}")
            info = md.storage_data[MetadataIndex(it.storage_index.fqn, it.storage_index.offset)]
            read += info.length
            if it.type == LoadItemType.BYTE_IO:
                needed += info.length
            else:
                n = 1
                for x in it.lengths:
                    n *= int(x)
                needed += n * md.state_dict_metadata[it.dest_index.fqn].properties.dtype.itemsize
        arrays[f"fqn_{r}"], arrays[f"int_{r}"] = encode(fqns, types, di, si, tup, width)
        arrays[f"per_rank_{r}"] = np.array([len(items), needed, read], np.int64)
        print(f"  torch rank {r}: {len(items):,} ReadItems in {times[-1]:.2f} s (CPU {cpu[-1]:.2f} s, "
              f"of which GC {gc_times[-1]:.2f} s)", file=sys.stderr, flush=True)  # fmt: skip
    np.savez(a.out, **arrays)
    print(json.dumps({"read_metadata_seconds": t_read, "rank_seconds": times, "rank_cpu_seconds": cpu, "gc_seconds": gc_times, "ranks": ranks,
                      "peak_rss": peak_rss(), "peak_rss_read": rss_read, "width": width}))  # fmt: skip


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def run(mode: str, a: argparse.Namespace, out: str, ranks: list[int], env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--_worker={mode}", f"--_dir={a.dir}", f"--_out={out}",
           f"--_ranks={','.join(map(str, ranks))}", f"--mesh={a.mesh}", f"--preset={a.preset}"]  # fmt: skip
    return run_json(cmd, env=env, what=f"benchmark step {mode!r}", stderr=True)


def compare(ranks: list[int], ours_npz: str, torch_npz: str, width: int) -> list[str]:
    """Differences between the two sides' ReadItems (empty when equal)."""
    o, t = np.load(ours_npz), np.load(torch_npz)
    names = column_names(width)
    problems: list[str] = []
    for r in ranks:
        of, oi, tf, ti = o[f"fqn_{r}"], o[f"int_{r}"], t[f"fqn_{r}"], t[f"int_{r}"]
        if len(of) != len(tf):
            problems.append(f"rank {r}: {len(of):,} ReadItems (ours) vs {len(tf):,} (torch)")
        n = min(len(of), len(tf))
        bad = (of[:n] != tf[:n]) | (oi[:n] != ti[:n]).any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            diff = ", ".join(
                f"{names[c]}: ours {oi[i, c]} torch {ti[i, c]}" for c in np.flatnonzero(oi[i] != ti[i])
            )
            problems.append(f"rank {r}: {int(bad.sum()):,} ReadItems differ; first at #{i}: fqn ours {str(of[i])!r} "
                            f"torch {str(tf[i])!r}; {diff or 'same int fields'}")  # fmt: skip
        op, tp = o[f"per_rank_{r}"], t[f"per_rank_{r}"]
        if not np.array_equal(op, tp):
            problems.append(f"rank {r}: per_rank (read_items, bytes_needed, bytes_read) ours {op.tolist()} "
                            f"vs torch's items {tp.tolist()}")  # fmt: skip
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="405b")
    ap.add_argument("--ranks", type=int, default=1024, help="ranks the synthetic checkpoint was saved on")
    ap.add_argument("--mesh", default="dp_shard=96,tp=8", help="target mesh")
    ap.add_argument("--preset", default="fsdp_tp")
    ap.add_argument("--sample-ranks", default="8", help="N ranks spread over the mesh, or a list '0,5,767'")
    ap.add_argument("--root", default=None, help="where the synthetic metadata is kept")
    ap.add_argument("--cold-cache", action="store_true", help="open with an empty dcp_explorer parse cache")
    ap.add_argument("--skip-torch", action="store_true", help="only time ours")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ranks", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if a._worker:
        a.dir, a.out, a.ranks = a._dir, a._out, a._ranks
        (worker_ours if a._worker == "ours" else worker_torch)(a)
        return

    from synthetic import synthetic_dir

    from dcp_explorer.layout import parse_mesh

    d = synthetic_dir(a.size, a.ranks, a.root)
    a.dir = str(d)
    mesh = parse_mesh(a.mesh)
    W = mesh.size
    ranks = sample_ranks(a.sample_ranks, W)
    meta = d / ".metadata"
    print(f"synthetic Llama-{a.size} FSDP x {a.ranks} ranks: {meta} ({meta.stat().st_size / 1e6:.0f} MB)")
    print(f"load on mesh {mesh} ({W} ranks), preset {a.preset!r}; torch sampled on ranks {ranks}")
    load = os.getloadavg()[0]
    print(
        f"load average {load:.2f} on {os.cpu_count()} CPUs"
        + ("  (busy machine: wall times are inflated)" if load > 1.5 else "")
    )
    gb = 1 << 30
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if a.cold_cache:
            env["DCP_EXPLORER_CACHE"] = str(Path(tmp) / "cache")
        ours = run("ours", a, str(Path(tmp) / "ours.npz"), ranks, env)
        t = ours["totals"]
        print(f"\nours  open {ours['open_seconds']:.2f} s ({'from cache' if ours['from_cache'] else 'parsed'}; "
              f"not in the ratio), peak RSS after open {ours['peak_rss_open'] / gb:.2f} GiB")  # fmt: skip
        print(f"ours  simulate_load {ours['simulate_seconds']:.2f} s + per_rank -> {ours['seconds']:.2f} s for all {W} ranks"
              f"  (target <= 5 s: {'OK' if ours['seconds'] <= 5 else 'MISSED'})")  # fmt: skip
        print(
            f"ours  peak RSS (VmHWM) {ours['peak_rss'] / gb:.2f} GiB; torch imported: {ours['torch_imported']}"
        )
        print(f"totals: {t['read_items']:,} read items, {t['bytes_needed'] / 1e12:.3f} TB needed, "
              f"{t['bytes_read'] / 1e12:.3f} TB read (amplification x{t['amplification']:.2f}); "
              f"{t['errors']} errors, {t['warnings']} warnings")  # fmt: skip
        if a.skip_torch:
            return
        print(
            f"\ntorch planning {len(ranks)} sampled ranks (fake process group, meta DTensors) ...", flush=True
        )
        ref = run("torch", a, str(Path(tmp) / "torch.npz"), ranks, env)
        per = float(np.mean(ref["rank_seconds"]))
        total = per * W
        print(f"torch read_metadata {ref['read_metadata_seconds']:.1f} s (once, not in the ratio), "
              f"peak RSS {ref['peak_rss'] / gb:.2f} GiB")  # fmt: skip
        print(f"torch create_default_local_load_plan: {per:.3f} s/rank (min {min(ref['rank_seconds']):.3f}, "
              f"max {max(ref['rank_seconds']):.3f}) x {W} ranks = {total:.0f} s ({total / 60:.1f} min) extrapolated")  # fmt: skip
        cpu_total = float(np.mean(ref["rank_cpu_seconds"])) * W
        print(
            f"      CPU time: {cpu_total / W:.3f} s/rank x {W} = {cpu_total:.0f} s; ours {ours['cpu_seconds']:.2f} s CPU"
        )
        ratio = total / ours["seconds"]
        verdict = ("OK" if ratio >= 500 else "MISSED") if a.size == "405b" else "applies to the 405B run"
        print(f"ratio torch/ours = {ratio:,.0f}x wall (target >= 500x: {verdict}), "
              f"{cpu_total / ours['cpu_seconds']:,.0f}x CPU")  # fmt: skip
        if ours["width"] != ref["width"]:
            raise SystemExit(f"tensor rank differs: ours {ours['width']} torch {ref['width']}")
        problems = compare(ranks, str(Path(tmp) / "ours.npz"), str(Path(tmp) / "torch.npz"), ours["width"])
    if problems:
        print("\nDIFFERENCES:")
        for p in problems[:20]:
            print("  " + p)
        sys.exit(1)
    print(
        f"\nReadItems equal on {len(ranks)} sampled ranks (and their per_rank read_items/bytes_needed/bytes_read)"
    )


if __name__ == "__main__":
    main()
