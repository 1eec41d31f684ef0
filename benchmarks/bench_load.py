"""Loading tensor data: dcp_explorer's ``ckpt.load`` vs torch, and vs raw reads of the same file.

Builds (once, cached under ``~/.cache/dcp_explorer_bench``) a DCP checkpoint of ``--tensors``
float32 tensors of ``--mib`` MiB each (default 8 x 128 MiB = 1 GiB), written by torch's own
``dcp.save(no_dist=True)`` (one ``__0_0.distcp``), reads its files once so the page cache is
warm, then measures, each in a fresh process, ``--repeat`` rounds interleaved (best time kept):

a. full load of every tensor: ``ckpt.load(keys)`` vs torch's single-process
   ``_load_state_dict_from_keys(keys, checkpoint_id=...)``            target ours/torch >= 1.0x
b. raw sequential read of the ``.distcp`` file(s) with ``np.fromfile`` (new memory, whose pages
   are faulted in during the read, as any load that returns new tensors must) vs our full load (a)
                                                                      target ours/raw >= 0.8x
   Also shown: ``readinto`` into new arrays of one tensor's size, and ``readinto`` into one buffer
   whose pages were faulted in before timing (page-cache copy bandwidth alone).
c. one row of each tensor: ``ckpt.load(keys, slices=(0, slice(None)))`` vs torch, which has no
   partial read (it loads whole items; the row is then indexed): time and bytes read.

Bytes read are counted by the loader (``ckpt.loader.stats``) and, for every step, by the kernel
(``rchar`` of ``/proc/self/io``: bytes returned by read syscalls, page cache hits included).
Peak RSS is ``VmHWM`` of the measuring process. torch is imported before timing in every step.

    python benchmarks/bench_load.py [--tensors 8 --mib 128 --repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from _common import PRELUDE, build_once, fmt_runs, measure, torch_version, warm

COMMON = (
    PRELUDE
    + """
path = sys.argv[1]
keys = json.loads(sys.argv[2])
"""
)

RAW = (
    COMMON
    + """
import numpy as np
mode, piece = sys.argv[3], int(sys.argv[4])
files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".distcp"))
total = sum(os.path.getsize(f) for f in files)
if mode == "prefaulted":  # page-cache copy bandwidth alone: the buffer's pages are faulted in untimed
    buf = np.empty(total, np.uint8)
    buf[::4096] = 0
r0 = rchar(); t = time.perf_counter()
at = 0
if mode == "fromfile":  # one new array per file
    bufs = [np.fromfile(f, np.uint8) for f in files]
    at = sum(b.size for b in bufs)
elif mode == "fresh":  # new arrays of one tensor's size, as a load returning new tensors allocates
    bufs = []
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                b = np.empty(piece, np.uint8)
                k = fh.readinto(memoryview(b))
                if not k:
                    break
                bufs.append(b)
                at += k
else:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                k = fh.readinto(memoryview(buf)[at:])
                if not k:
                    break
                at += k
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "bytes": at, "rchar": rchar() - r0, "peak_rss": peak_rss()}))
"""
)

OURS = (
    COMMON
    + """
import torch, dcp_explorer
mode = sys.argv[3]
ck = dcp_explorer.open(path, cache=False)
slices = (0, slice(None)) if mode == "slice" else None
r0 = rchar(); t = time.perf_counter()
out = ck.load(keys, slices=slices, progress=False)
dt = time.perf_counter() - t
rc = rchar() - r0
nbytes = sum(v.numel() * v.element_size() for v in out.values())
s = ck.loader.stats
print(json.dumps({"seconds": dt, "bytes": nbytes, "bytes_read": s.bytes_read, "requests": s.requests,
                  "rchar": rc, "peak_rss": peak_rss()}))
"""
)

TORCH = (
    COMMON
    + """
import torch
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
mode = sys.argv[3]
r0 = rchar(); t = time.perf_counter()
sd = _load_state_dict_from_keys(set(keys), checkpoint_id=path)
if mode == "slice":
    sd = {k: sd[k][0].clone() for k in keys}  # torch reads whole items; the row is indexed afterwards
dt = time.perf_counter() - t
rc = rchar() - r0
nbytes = sum(v.numel() * v.element_size() for v in sd.values())
print(json.dumps({"seconds": dt, "bytes": nbytes, "rchar": rc, "peak_rss": peak_rss()}))
"""
)

BUILD = """
import os, sys, json, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed.checkpoint as dcp
path, n, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
sd = {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(n)}
dcp.save(sd, checkpoint_id=path, no_dist=True)
print(json.dumps(sorted(sd)))
"""


def build(root: Path, n: int, mib: int) -> tuple[Path, list[str]]:
    """The cached checkpoint (built if missing) and its tensor names."""
    cols = 8192
    rows = (mib << 20) // (cols * 4)
    key = hashlib.sha256(f"bench_load|1|{torch_version()}|{n}|{rows}|{cols}".encode()).hexdigest()[:8]
    d = build_once(root / f"load_{n}x{mib}MiB_{key}", BUILD, n, rows, cols, what="building the sample")
    return d, json.loads((d / "keys.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--mib", type=int, default=128, help="size of each float32 tensor")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--root", default=str(Path.home() / ".cache" / "dcp_explorer_bench"))
    a = ap.parse_args()

    d, keys = build(Path(a.root), a.tensors, a.mib)
    total = warm(d)
    print(f"checkpoint {d}: {len(keys)} tensors, {total / 2**30:.2f} GiB on disk (page cache warmed)")
    k = json.dumps(keys)
    p = str(d)
    m = measure({
        "raw": (RAW, p, k, "fresh", str(a.mib << 20)), "raw_ff": (RAW, p, k, "fromfile", "0"),
        "raw_pf": (RAW, p, k, "prefaulted", "0"),
        "ours": (OURS, p, k, "full"), "torch": (TORCH, p, k, "full"),
        "ours_s": (OURS, p, k, "slice"), "torch_s": (TORCH, p, k, "slice"),
    }, a.repeat)  # fmt: skip
    raw, raw_ff, raw_pf, ours, ref, ours_s, ref_s = (
        m[n] for n in ("raw", "raw_ff", "raw_pf", "ours", "torch", "ours_s", "torch_s")
    )
    assert ours["bytes"] == ref["bytes"] and ours_s["bytes"] == ref_s["bytes"], (ours, ref, ours_s, ref_s)

    gib, mib = 1 << 30, 1 << 20

    def gbs(r: dict, n: str = "bytes") -> float:
        return r[n] / r["seconds"] / 1e9

    print(f"\n{'':34}{'time (s)':>10}{'GB/s':>8}{'read (MiB)':>12}{'rchar (MiB)':>13}{'peak RSS (GiB)':>16}")
    rows = [
        ("raw readinto, new tensor-size bufs", raw, gbs(raw), raw["bytes"]),
        ("raw np.fromfile", raw_ff, gbs(raw_ff), raw_ff["bytes"]),
        ("raw readinto, prefaulted buffer", raw_pf, gbs(raw_pf), raw_pf["bytes"]),
        ("(a) dcp_explorer ckpt.load(all)", ours, gbs(ours), ours["bytes_read"]),
        ("(a) torch _load_state_dict_from_keys", ref, gbs(ref), None),
        ("(c) dcp_explorer one row of each", ours_s, None, ours_s["bytes_read"]),
        ("(c) torch one row of each", ref_s, None, None),
    ]
    for name, r, rate, read in rows:
        rate_s = f"{rate:>8.2f}" if rate is not None else f"{'':>8}"
        read_s = f"{read / mib:>12.2f}" if read is not None else f"{'':>12}"
        print(
            f"{name:34}{r['seconds']:>10.3f}{rate_s}{read_s}{r['rchar'] / mib:>13.2f}{r['peak_rss'] / gib:>16.2f}"
        )
    print("runs (s): " + "; ".join(f"{n} {fmt_runs(m[n])}" for n in m))

    ra = ref["seconds"] / ours["seconds"]
    rb = gbs(ours) / gbs(raw_ff)
    rb_new = gbs(ours) / gbs(raw)
    rb_pf = gbs(ours) / gbs(raw_pf)
    print(f"\n(a) throughput ours/torch = {ra:.2f}x  (target >= 1.0x)  {'OK' if ra >= 1.0 else 'MISSED'}")
    print(f"(b) throughput ours/raw np.fromfile = {rb:.2f}x  (target >= 0.8x)  {'OK' if rb >= 0.8 else 'MISSED'}"
          f"   [vs readinto into new tensor-size arrays: {rb_new:.2f}x; vs a prefaulted buffer: {rb_pf:.2f}x: "
          "that gap is faulting in (and zeroing) 1 GiB of new memory, which a load returning new tensors "
          "cannot avoid]")  # fmt: skip
    row_bytes = ours_s["bytes"]
    print(f"(c) one row of each tensor ({row_bytes:,} B needed): ours read {ours_s['bytes_read']:,} B "
          f"in {ours_s['requests']} requests ({ours_s['bytes_read'] / row_bytes:.2f}x the rows; kernel rchar "
          f"{ours_s['rchar']:,} B), torch {ref_s['rchar']:,} B (rchar, {ref_s['rchar'] / row_bytes:.0f}x); "
          f"time ours/torch = {ours_s['seconds'] / ref_s['seconds']:.4f}, "
          f"torch/ours = {ref_s['seconds'] / ours_s['seconds']:.0f}x")  # fmt: skip
    print(f"    peak RSS: full ours {ours['peak_rss'] / gib:.2f} GiB vs torch {ref['peak_rss'] / gib:.2f} GiB; "
          f"slice ours {ours_s['peak_rss'] / gib:.2f} GiB vs torch {ref_s['peak_rss'] / gib:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
