"""ReshardExplorer update latency at 405B scale: how long one change of a control takes.

Opens (once, cached) the synthetic Llama-405B-shaped ``.metadata`` saved FSDP over ``--ranks``
ranks (``synthetic.py``), builds a ``ReshardExplorer`` on ``--mesh`` (default
``dp_shard=96,tp=8``, 768 ranks) with ``--preset`` (default ``fsdp_tp``) and then, as a user
would, moves the world-size slider ``--updates`` times to values it has not shown before
(95, 94, 97, 98, ...: every update is a new simulation, never the widget's plan cache).

An update is what the kernel does for one change: the ``simulate_load`` of the new mesh, its
totals line, and the visible tab (the per-rank-bytes figure rendered to PNG). Timed as the
wall time of the trait assignment; the explorer's own ``last_update_seconds`` is printed too.
Also timed, not part of the target: editing the mesh text, and switching the preset.

Prints the first update (the explorer's construction: includes matplotlib's first use) and
the median of the updates after it.  Target: median <= 0.5 s.  Exits 1 when it is missed
with ``--strict``.

    python benchmarks/bench_widgets.py
    python benchmarks/bench_widgets.py --size 8b --ranks 64 --mesh dp_shard=8,tp=4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 0.5


def slider_values(start: int, n: int) -> list[int]:
    """``n`` distinct values around ``start`` (start-1, start-2, start+1, start+2, start-3, ...), all >= 1."""
    out: list[int] = []
    step = 1
    while len(out) < n:
        for v in (start - step, start + step):
            if v >= 1 and v != start and v not in out and len(out) < n:
                out.append(v)
        step += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="405b")
    ap.add_argument("--ranks", type=int, default=1024, help="ranks the synthetic checkpoint was saved on")
    ap.add_argument("--mesh", default="dp_shard=96,tp=8")
    ap.add_argument("--preset", default="fsdp_tp")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--root", default=None, help="where the synthetic metadata is kept")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    ap.add_argument("--strict", action="store_true", help=f"exit 1 when the median exceeds {TARGET} s")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    sys.path.insert(0, str(HERE))
    from synthetic import synthetic_dir

    import dcp_explorer
    from dcp_explorer.layout import parse_mesh
    from dcp_explorer.widgets import ReshardExplorer

    d = synthetic_dir(a.size, a.ranks, a.root)
    t0 = time.perf_counter()
    ck = dcp_explorer.open(d)
    t_open = time.perf_counter() - t0
    m = parse_mesh(a.mesh)

    t0 = time.perf_counter()
    r = ReshardExplorer(ck, a.mesh, preset=a.preset)
    t_first = time.perf_counter() - t0
    if r.error.value:
        print(f"error in the first update: {r.error.value}", file=sys.stderr)
        return 2
    first_update = r.last_update_seconds

    def timed(set_value) -> tuple[float, float]:
        t = time.perf_counter()
        set_value()
        wall = time.perf_counter() - t
        if r.error.value:
            raise RuntimeError(r.error.value)
        return wall, r.last_update_seconds

    slider: list[tuple[float, float]] = []
    for v in slider_values(m.shape[0], a.updates):
        slider.append(timed(lambda v=v: setattr(r.world_size, "value", v)))
    # mesh text edits (a new second dim each time) and preset switches: reported, not targeted
    mesh_edits: list[float] = []
    if m.ndim == 2:
        for tp in (4, 16, 2):
            if m.size % tp == 0:
                mesh_edits.append(
                    timed(
                        lambda tp=tp: setattr(
                            r.mesh, "value", f"{m.names[0]}={m.size // tp},{m.names[1]}={tp}"
                        )
                    )[0]
                )
    presets: list[float] = []
    r.mesh.value = str(m)  # back to the starting mesh (cached plan)
    for p in ("hsdp", "fsdp", "replicate") if m.ndim == 2 else ("fsdp", "replicate"):
        if p != a.preset:
            presets.append(timed(lambda p=p: setattr(r.preset, "value", p))[0])

    walls = [w for w, _ in slider]
    res = {
        "checkpoint": d.name,
        "mesh": str(m),
        "preset": a.preset,
        "world_size": m.size,
        "open_seconds": t_open,
        "first_update_seconds": t_first,
        "first_update_inner_seconds": first_update,
        "slider_seconds": walls,
        "median_seconds": statistics.median(walls),
        "median_inner_seconds": statistics.median(x for _, x in slider),
        "mesh_edit_seconds": mesh_edits,
        "preset_switch_seconds": presets,
        "target_seconds": TARGET,
    }
    res["ok"] = res["median_seconds"] <= TARGET
    if a.json:
        print(json.dumps(res))
    else:
        print(f"synthetic Llama-{a.size} saved on {a.ranks} ranks ({d.name}), opened in {t_open:.2f} s")
        print(f"ReshardExplorer on {m} ({m.size} ranks), preset {a.preset}")
        print(f"first update (construction)  {t_first:.3f} s  (update itself {first_update:.3f} s)")
        print(f"world-size slider, {len(walls)} updates: " + " ".join(f"{w:.3f}" for w in walls))
        print(f"median update                {res['median_seconds']:.3f} s  (target <= {TARGET} s: "
              f"{'met' if res['ok'] else 'MISSED'})")  # fmt: skip
        if mesh_edits:
            print("mesh text edits              " + " ".join(f"{w:.3f}" for w in mesh_edits) + " s")
        if presets:
            print("preset switches              " + " ".join(f"{w:.3f}" for w in presets) + " s")
    return 1 if a.strict and not res["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
