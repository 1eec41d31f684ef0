"""Diffing two >= 1 GiB checkpoints: throughput against reading both raw, and peak RSS.

Builds (once, cached under ``~/.cache/dcp_explorer_bench``) three checkpoints of ``--tensors``
float32 tensors of ``--mib`` MiB each (default 8 x 128 MiB = 1 GiB each), with torch's own writers:

* ``A``: ``dcp.save(no_dist=True)`` (one ``__0_0.distcp``);
* ``same``: the same values written as safetensors (``safetensors.torch.save_file``), so the
  comparison crosses formats (DCP zip items vs raw safetensors bytes) and every value is equal;
* ``step``: ``A + 1e-3 * randn`` written by ``dcp.save``: every element differs (a training step,
  the worst case: every statistic computed for every element -- in float32 with float64
  accumulation, as ``diff`` does for float32/bf16/fp16/fp8 data).

Reads every file once so the page cache is warm, then measures, each in a fresh process,
``--repeat`` rounds interleaved (best time kept, highest peak RSS kept):

* ``raw``: ``np.fromfile`` of every file of both checkpoints (new memory, as in
  ``bench_load.py``): the reference throughput;
* ``raw, one 32 MiB buffer``: ``readinto`` of both checkpoints into one reused buffer (what a
  bounded-memory reader can do at best);
* ``dcp_explorer.diff(A, same)`` and ``dcp_explorer.diff(A, step)`` with the default
  ``block_bytes`` (32 MiB).

Throughput = bytes of both checkpoints / seconds. Target: diff / raw >= 0.5x; peak RSS of the diff
process (``VmHWM``, from process start, imports included) <= 512 MiB. With ``--nproc 2`` the ``step``
diff is also run split over two local gloo processes (``run_distributed``): the time inside the job
(after the workers started and joined the process group) and the wall time, torch imports included.

    python benchmarks/bench_diff.py [--tensors 8 --mib 128 --repeat 3 --nproc 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from _common import PRELUDE, build_once, fmt_runs, measure, run, torch_version, warm

RAW = (
    PRELUDE
    + """
import numpy as np
mode, dirs = sys.argv[1], sys.argv[2:]
files = [os.path.join(d, n) for d in dirs for n in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, n))]
r0 = rchar(); t = time.perf_counter()
at = 0
if mode == "fromfile":
    bufs = [np.fromfile(f, np.uint8) for f in files]
    at = sum(b.size for b in bufs)
else:  # one reused 32 MiB buffer
    buf = np.empty(32 << 20, np.uint8)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(memoryview(buf)):
                at += k
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "bytes": at, "rchar": rchar() - r0, "peak_rss": peak_rss()}))
"""
)

OURS = (
    PRELUDE
    + """
import dcp_explorer
a, b = sys.argv[1], sys.argv[2]
r0 = rchar(); t = time.perf_counter()
d = dcp_explorer.diff(a, b, progress=False)
dt = time.perf_counter() - t
s = d.summary()
print(json.dumps({"seconds": dt, "bytes_read": d.bytes_read, "rchar": rchar() - r0, "peak_rss": peak_rss(),
                  "status": s["status"], "equal": d.equal, "torch": "torch" in sys.modules,
                  "max_abs_diff": max(r.max_abs_diff for r in d.rows)}))
"""
)

DIST = (
    PRELUDE
    + """
from dcp_explorer.diff import run_distributed
a, b, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
d = run_distributed(a, b, n)
dt = time.perf_counter() - t
print(json.dumps({"seconds": d.seconds, "wall": dt, "bytes_read": d.bytes_read, "peak_rss": peak_rss(),
                  "status": d.summary()["status"], "world_size": d.world_size}))
"""
)

BUILD = """
import os, sys, json, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
root, n, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
names = [f"layers.{i}.weight" for i in range(n)]
sd = {k: torch.randn(rows, cols, generator=g) for k in names}
dcp.save(sd, checkpoint_id=os.path.join(root, "A"), no_dist=True)
os.makedirs(os.path.join(root, "same"))
save_file(sd, os.path.join(root, "same", "model.safetensors"))
for k in names:
    sd[k].add_(torch.randn(rows, cols, generator=g), alpha=1e-3)
dcp.save(sd, checkpoint_id=os.path.join(root, "step"), no_dist=True)
print(json.dumps(names))
"""


def build(root: Path, n: int, mib: int) -> Path:
    """The cached trio of checkpoints (built if missing)."""
    cols = 8192
    rows = (mib << 20) // (cols * 4)
    key = hashlib.sha256(f"bench_diff|1|{torch_version()}|{n}|{rows}|{cols}".encode()).hexdigest()[:8]
    return build_once(
        root / f"diff_{n}x{mib}MiB_{key}", BUILD, n, rows, cols, what="building the checkpoints"
    )


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--mib", type=int, default=128, help="size of each float32 tensor")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--nproc", type=int, default=0, help="also run the 'step' diff on this many local processes"
    )
    ap.add_argument("--root", default=str(Path.home() / ".cache" / "dcp_explorer_bench"))
    a = ap.parse_args()

    d = build(Path(a.root), a.tensors, a.mib)
    env = dict(os.environ)  # diff's parse cache: a benchmark one unless the caller names one
    env.setdefault("DCP_EXPLORER_CACHE", str(Path.home() / ".cache" / "dcp_explorer_bench" / "parse-cache"))
    A, same, step = d / "A", d / "same", d / "step"
    warm(A, same, step)
    sizes = {n: dir_bytes(p) for n, p in (("A", A), ("same", same), ("step", step))}
    print(
        f"checkpoints in {d} (page cache warmed): "
        + ", ".join(f"{n} {v / 2**30:.3f} GiB" for n, v in sizes.items())
    )
    steps = {
        "raw same": (RAW, "fromfile", str(A), str(same)),
        "raw same 32MiB": (RAW, "buffer", str(A), str(same)),
        "diff same": (OURS, str(A), str(same)),
        "raw step": (RAW, "fromfile", str(A), str(step)),
        "raw step 32MiB": (RAW, "buffer", str(A), str(step)),
        "diff step": (OURS, str(A), str(step)),
    }
    m = measure(steps, a.repeat, env)
    gib, mib = 1 << 30, 1 << 20
    print(f"\n{'':40}{'time (s)':>10}{'GB/s':>8}{'read (MiB)':>12}{'peak RSS (MiB)':>16}")
    for name, r in m.items():
        total = sizes["A"] + sizes[name.split()[1]]
        read = r.get("bytes_read", r.get("bytes"))
        print(f"{name:40}{r['seconds']:>10.3f}{total / r['seconds'] / 1e9:>8.2f}{read / mib:>12.1f}"
              f"{r['peak_rss'] / mib:>16.1f}")  # fmt: skip
    print("runs (s): " + "; ".join(f"{n} {fmt_runs(r)}" for n, r in m.items()))
    ok_all = True
    for case in ("same", "step"):
        ours, raw, raw_b = m[f"diff {case}"], m[f"raw {case}"], m[f"raw {case} 32MiB"]
        ratio = raw["seconds"] / ours["seconds"]
        ratio_b = raw_b["seconds"] / ours["seconds"]
        rss_ok = ours["peak_rss"] <= 512 * mib
        ok_all &= ratio >= 0.5 and rss_ok
        print(f"\ndiff A vs {case}: {ours['status']}, equal={ours['equal']}, max|d|={ours['max_abs_diff']:.3g}, "
              f"torch imported: {ours['torch']}")  # fmt: skip
        print(f"  throughput diff/raw np.fromfile = {ratio:.2f}x (target >= 0.5x) {'OK' if ratio >= 0.5 else 'MISSED'}"
              f"   [vs readinto one 32 MiB buffer: {ratio_b:.2f}x]")  # fmt: skip
        print(f"  peak RSS {ours['peak_rss'] / mib:.0f} MiB (target <= 512 MiB) {'OK' if rss_ok else 'MISSED'};"
              f" raw np.fromfile of both: {raw['peak_rss'] / gib:.2f} GiB")  # fmt: skip
    if a.nproc > 1:
        r = run(DIST, str(A), str(step), str(a.nproc), env=env)
        total = sizes["A"] + sizes["step"]
        print(f"\ndiff A vs step on {r['world_size']} local gloo processes: {r['seconds']:.3f} s in the job "
              f"({total / r['seconds'] / 1e9:.2f} GB/s, {m['raw step']['seconds'] / r['seconds']:.2f}x raw), "
              f"{r['wall']:.2f} s wall with process start and torch import; {r['status']}")  # fmt: skip
    print("\nall targets met" if ok_all else "\nsome target MISSED")


if __name__ == "__main__":
    main()
