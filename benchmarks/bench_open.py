"""Opening a 405B-scale DCP checkpoint: dcp_explorer vs torch's own ``pickle.load``.

Builds (once, cached) a synthetic Llama-405B-shaped ``.metadata`` (126 layers, hidden 16384,
FFN 53248, vocab 128256, model + Adam state) saved FSDP over ``--ranks`` ranks with torch's
own Metadata classes (``synthetic.py``), then measures, each in a fresh process:

1. ``pickle.load`` of the file with torch imported (what ``FileSystemReader.read_metadata`` does);
2. ``dcp_explorer.open(...)`` with an empty parse cache, plus building the ``chunks`` table;
3. ``dcp_explorer.open(...)`` again (from the cache) plus the ``chunks`` table.

Prints wall time and peak RSS of each and the ratios against (1).
Targets at 1024 ranks: (2) <= 1/5 of (1)'s time and <= 1/4 of its peak RSS; reopen <= 1 s.

    python benchmarks/bench_open.py --ranks 1024
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import PRELUDE, run
from synthetic import synthetic_dir

PICKLE = (
    PRELUDE
    + """
import pickle
import torch.distributed.checkpoint  # the classes the pickle names
t = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    md = pickle.load(f)
dt = time.perf_counter() - t
n = sum(len(v.chunks) for v in md.state_dict_metadata.values() if hasattr(v, "chunks"))
print(json.dumps({"seconds": dt, "peak_rss": peak_rss(), "chunks": n}))
"""
)

OURS = (
    PRELUDE
    + """
t = time.perf_counter()
import dcp_explorer
ck = dcp_explorer.open(sys.argv[1])
t_open = time.perf_counter() - t
table = ck.chunks
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "open_seconds": t_open, "from_cache": ck.from_cache,
                  "peak_rss": peak_rss(),
                  "chunks": len(table), "torch_imported": "torch" in sys.modules}))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="405b")
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--root", default=None, help="where the synthetic metadata is kept")
    a = ap.parse_args()
    d = synthetic_dir(a.size, a.ranks, a.root)
    meta = d / ".metadata"
    print(f"synthetic Llama-{a.size} FSDP x {a.ranks} ranks: {meta} ({meta.stat().st_size / 1e6:.0f} MB)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, DCP_EXPLORER_CACHE=cache)
        ref = run(PICKLE, str(meta), env=env)
        cold = run(OURS, str(d), env=env)
        warm = run(OURS, str(d), env=env)
    assert cold["chunks"] == ref["chunks"] == warm["chunks"], (cold, ref, warm)
    assert not cold["from_cache"] and warm["from_cache"]
    gb = 1 << 30
    print(f"chunks: {ref['chunks']:,}")
    print(f"{'':28}{'time (s)':>10}{'peak RSS (GiB)':>16}")
    print(f"{'torch pickle.load':28}{ref['seconds']:>10.2f}{ref['peak_rss'] / gb:>16.2f}")
    print(
        f"{'dcp_explorer open+chunks':28}{cold['seconds']:>10.2f}{cold['peak_rss'] / gb:>16.2f}"
        f"   (open alone {cold['open_seconds']:.2f} s)"
    )
    print(
        f"{'reopen from cache+chunks':28}{warm['seconds']:>10.2f}{warm['peak_rss'] / gb:>16.2f}"
        f"   (open alone {warm['open_seconds']:.2f} s)"
    )
    tr = cold["seconds"] / ref["seconds"]
    mr = cold["peak_rss"] / ref["peak_rss"]
    print(f"time ratio  ours/pickle = {tr:.3f}  (target <= 0.200)  {'OK' if tr <= 0.2 else 'MISSED'}")
    print(f"RSS ratio   ours/pickle = {mr:.3f}  (target <= 0.250)  {'OK' if mr <= 0.25 else 'MISSED'}")
    print(
        f"reopen      {warm['open_seconds']:.2f} s (target <= 1 s)  {'OK' if warm['open_seconds'] <= 1 else 'MISSED'}"
    )
    print(f"torch imported by dcp_explorer: {cold['torch_imported']}")


if __name__ == "__main__":
    main()
