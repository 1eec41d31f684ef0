"""Pictures of checkpoints and load plans (matplotlib, ``ax=`` style, readable at 1,000 ranks).

Every function takes ``ax=None`` (a new pyplot figure when omitted, so notebooks display it
inline), draws, and returns the ``Axes``; none calls ``plt.show()`` or changes rcParams.  Labels are drawn only where
they stay legible (few chunks); above that, colour and the colour bar carry the rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .checkpoint import Checkpoint
    from .plan import LoadPlan

__all__ = [
    "plot_chunk_map",
    "plot_reshard_overlay",
    "plot_rank_bytes",
    "plot_traffic",
    "plot_file_fanin",
    "plot_module_bytes",
    "chunk_rectangles",
]

MAX_LABELS = 48


def _ax(ax: Axes | None, figsize: tuple[float, float] = (7, 4)) -> Axes:
    """``ax``, or a new pyplot figure's axes (so a notebook shows it inline, as xarray does)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _fig, new = plt.subplots(figsize=figsize, layout="constrained")
    return new


def _fold(
    offsets: np.ndarray, sizes: np.ndarray, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Map n-d chunks to 2-D rectangles: leading dims folded into rows, last dim as columns."""
    nd = len(shape)
    if nd == 0:
        return np.zeros((len(offsets), 2), np.int64), np.ones((len(offsets), 2), np.int64), (1, 1)
    if nd == 1:
        return (np.stack([np.zeros(len(offsets), np.int64), offsets[:, 0]], 1),
                np.stack([np.ones(len(offsets), np.int64), sizes[:, 0]], 1), (1, int(shape[0])))  # fmt: skip
    if nd == 2:
        return offsets, sizes, (int(shape[0]), int(shape[1]))
    # rows = leading dims flattened: a chunk covering a box of leading dims folds to a row band
    # when it spans whole inner leading dims (DCP chunks do); otherwise we draw its bounding band
    lead = [int(s) for s in shape[:-1]]
    strides = np.cumprod([1, *lead[::-1]])[:-1][::-1]
    row0 = (offsets[:, :-1] * strides).sum(1)
    row1 = ((offsets[:, :-1] + np.maximum(sizes[:, :-1], 1) - 1) * strides).sum(1) + 1
    o = np.stack([row0, offsets[:, -1]], 1)
    s = np.stack([np.where((sizes[:, :-1] == 0).any(1), 0, row1 - row0), sizes[:, -1]], 1)
    return o, s, (int(math.prod(lead)), int(shape[-1]))


def chunk_rectangles(ckpt: Checkpoint, fqn: str) -> dict[str, Any]:
    """The 2-D rectangles (rows, cols) of a tensor's saved chunks, with rank and file per chunk."""
    idx = ckpt.index
    e = idx.entry_index(fqn)
    shape = tuple(idx.shapes[e])
    c = idx.chunks
    a, b = int(idx.chunk_start[e]), int(idx.chunk_start[e + 1])
    q = idx.quant.get(e)
    nd = len(c.sizes[c.coord_start[a] : c.coord_start[a + 1]]) if b > a else len(shape)
    if q is not None and nd != len(shape):
        shape = tuple(q["stored_shape"])
    ca, cb = int(c.coord_start[a]), int(c.coord_start[b])
    offs = c.offsets[ca:cb].reshape(b - a, nd)
    sizes = c.sizes[ca:cb].reshape(b - a, nd)
    o, s, grid = _fold(offs, sizes, shape)
    files = [idx.files[int(f)] if f >= 0 else "?" for f in c.file[a:b]]
    return {"offsets": o, "sizes": s, "grid": grid, "rank": c.rank[a:b].astype(np.int64), "file": files,
            "shape": shape, "ndim": nd}  # fmt: skip


def _unit(max_bytes: float) -> tuple[float, str]:
    for div, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if max_bytes >= div:
            return div, name
    return 1, "B"


def _rank_colors(ranks: np.ndarray, cmap: str = "viridis") -> tuple[Any, Any]:
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, Normalize

    hi = int(ranks.max(initial=0))
    n = hi + 1
    cm = colormaps["tab20" if n <= 20 else cmap]
    norm = (
        BoundaryNorm(np.arange(-0.5, n + 0.5), cm.N if n <= 20 else 256)
        if n <= 20
        else Normalize(-0.5, hi + 0.5)
    )
    return cm, norm


def plot_chunk_map(ckpt: Checkpoint, fqn: str, *, ax: Axes | None = None, labels: bool | None = None) -> Axes:
    """A tensor's saved chunks as rectangles coloured by saving rank, labelled with their file.

    2-D tensors are drawn as (rows x columns); 1-D as a bar; higher dims fold the leading
    dims into rows.  Empty chunks are not drawn (they hold nothing).
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    r = chunk_rectangles(ckpt, fqn)
    ax = _ax(ax)
    rows, cols = r["grid"]
    o, s, ranks = r["offsets"], r["sizes"], r["rank"]
    keep = (s > 0).all(1)
    by = "saving rank"
    if (ranks < 0).all():  # the format records no saving rank: colour by file instead
        names = list(dict.fromkeys(r["file"]))
        ranks = np.array([names.index(f) for f in r["file"]], np.int64)
        by = "file"
    cm, norm = _rank_colors(ranks)
    patches = [
        Rectangle((float(x), float(y)), float(w), float(h))
        for (y, x), (h, w) in zip(o[keep], s[keep], strict=True)
    ]
    pc = PatchCollection(
        patches, cmap=cm, norm=norm, edgecolor="white", linewidth=0.6 if len(patches) < 400 else 0
    )
    pc.set_array(ranks[keep].astype(float))
    ax.add_collection(pc)
    ax.set_xlim(0, max(cols, 1))
    ax.set_ylim(max(rows, 1), 0)
    ax.set_xlabel(f"dim {r['ndim'] - 1}" if r["ndim"] else "")
    ax.set_ylabel("dim 0" if r["ndim"] == 2 else ("folded leading dims" if r["ndim"] > 2 else ""))
    ax.set_title(f"{fqn}  {list(r['shape'])}  {int(keep.sum())} chunks", fontsize=9)
    if labels is None:
        labels = keep.sum() <= MAX_LABELS
    if labels:
        for (y, x), (h, w), rk, f in zip(
            o[keep], s[keep], ranks[keep], np.asarray(r["file"], object)[keep], strict=True
        ):
            tag = f"r{rk}" if by == "saving rank" else ""
            ax.text(x + w / 2, y + h / 2, f"{tag}\n{f}".strip() if h * 6 > rows or len(patches) < 12 else tag or f,
                    ha="center", va="center", fontsize=7, color="black",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.6))  # fmt: skip
    cb = ax.figure.colorbar(pc, ax=ax, label=by, shrink=0.8)
    n = int(ranks.max(initial=0)) + 1
    if n <= 20:
        cb.set_ticks(range(n))
    if r["ndim"] == 1 or rows == 1:
        ax.set_aspect("auto")
        ax.set_yticks([])
    return ax


def plot_reshard_overlay(
    plan: LoadPlan, fqn: str, *, ranks: Sequence[int] | None = None, ax: Axes | None = None
) -> Axes:
    """Saved chunks (filled, by saving rank) with the target ranks' local chunks outlined on top.

    ``ranks``: which loading ranks to outline (default: all when <= 64, else a spread of 16).
    """
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    ckpt = type("C", (), {"index": plan.index})()  # a stand-in: the two functions below use only .index
    ax = plot_chunk_map(ckpt, fqn, ax=ax, labels=False)
    gid = next((g for f, _e, g in plan._order if f == fqn and g is not None), None)
    if gid is None:
        ax.set_title(ax.get_title() + "  (not a tensor of this plan)", fontsize=9)
        return ax
    p = plan._groups[gid].pattern
    shape = chunk_rectangles(ckpt, fqn)["shape"]
    R = len(p.local_offsets)
    if ranks is None:
        ranks = list(range(R)) if R <= 64 else sorted(set(np.linspace(0, R - 1, 16).astype(int).tolist()))
    lo, ls, _ = _fold(p.local_offsets[list(ranks)], p.local_sizes[list(ranks)], shape)
    cm = colormaps["tab10"]
    rows, cols = chunk_rectangles(ckpt, fqn)["grid"]
    inset_y, inset_x = rows * 0.006, cols * 0.006
    for i, (r, (y, x), (h, w)) in enumerate(zip(ranks, lo, ls, strict=True)):
        if h == 0 or w == 0:
            continue
        col = cm(i % 10)
        ax.add_patch(Rectangle((x + inset_x, y + inset_y), w - 2 * inset_x, h - 2 * inset_y, fill=False, ec="black",
                               lw=3.2, ls="-", alpha=0.5))  # fmt: skip
        ax.add_patch(Rectangle((x + inset_x, y + inset_y), w - 2 * inset_x, h - 2 * inset_y, fill=False, ec=col,
                               lw=2.0, ls="--"))  # fmt: skip
        if len(ranks) <= 16:
            # kept off the edges: a one-row chunk at row 0 would put its label over the title
            ylab = min(max(y + h / 2, 0.04 * rows), 0.96 * rows)
            ax.text(x + w / 2, ylab, f"R{r}", color="white", fontsize=8, va="center", ha="center",
                    fontweight="bold", bbox=dict(boxstyle="round,pad=0.2", fc=col, ec="none"))  # fmt: skip
    ax.set_title(f"{fqn}: saved chunks (fill) vs target ranks {plan.mesh} (dashed)", fontsize=9)
    return ax


def plot_rank_bytes(plan: LoadPlan, *, ax: Axes | None = None) -> Axes:
    """Bytes needed vs bytes read per loading rank (bars up to 64 ranks, lines beyond)."""
    pr = plan.per_rank
    ax = _ax(ax, (8, 3.5))
    x = pr["rank"].to_numpy()
    div, unit = _unit(float(pr["bytes_read"].max()) if len(pr) else 0.0)
    need = pr["bytes_needed"].to_numpy() / div
    read = pr["bytes_read"].to_numpy() / div
    if len(x) <= 64:
        ax.bar(x - 0.2, need, 0.4, label="needed", color="#4c78a8")
        ax.bar(x + 0.2, read, 0.4, label="read", color="#f58518")
    else:
        ax.fill_between(x, read, step="mid", alpha=0.35, color="#f58518", label="read")
        ax.step(x, need, where="mid", color="#4c78a8", label="needed")
    ax.set_xlabel("loading rank")
    ax.set_ylabel(unit)
    if len(x) <= 16:
        ax.set_xticks(x)
    t = plan.totals()
    tdiv, tunit = _unit(t["bytes_read"])
    ax.set_title(f"{plan.mesh}: {t['bytes_read'] / tdiv:.3g} {tunit} read for {t['bytes_needed'] / tdiv:.3g} {tunit} "
                 f"needed (x{t['amplification']:.2f})", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    return ax


def plot_traffic(plan: LoadPlan, *, ax: Axes | None = None, log: bool = True) -> Axes:
    """Saving rank x loading rank bytes read, as a heatmap (log colour scale)."""
    from matplotlib.colors import LogNorm, Normalize

    t = plan.traffic
    ax = _ax(ax, (6, 5))
    m = t.to_numpy().astype(float)
    vmax = m.max(initial=0)
    pos = m[m > 0]
    norm = (
        LogNorm(vmin=max(pos.min(initial=1), vmax / 1e6), vmax=max(vmax, 1))
        if log and len(pos)
        else Normalize(0, max(vmax, 1))
    )
    im = ax.imshow(np.where(m > 0, m, np.nan), aspect="auto", interpolation="nearest", norm=norm, cmap="magma_r",
                   extent=(-0.5, m.shape[1] - 0.5, m.shape[0] - 0.5, -0.5))  # fmt: skip
    ax.set_xlabel("loading rank")
    ax.set_ylabel("saving rank")
    if len(t.index) <= 32:
        ax.set_yticks(range(len(t.index)), [str(i) for i in t.index])
    if m.shape[1] <= 32:
        ax.set_xticks(range(m.shape[1]))
    ax.figure.colorbar(im, ax=ax, label="bytes read")
    ax.set_title("who reads from whom", fontsize=9)
    return ax


def plot_file_fanin(plan: LoadPlan, *, ax: Axes | None = None, top: int = 40) -> Axes:
    """How many loading ranks read each file, and how many bytes (the most-read files)."""
    pf = plan.per_file.sort_values("bytes_read", ascending=False).head(top)
    ax = _ax(ax, (8, max(2.5, 0.18 * len(pf) + 1)))
    y = np.arange(len(pf))
    div, unit = _unit(float(pf["bytes_read"].max()) if len(pf) else 0.0)
    ax.barh(y, pf["bytes_read"].to_numpy() / div, color="#54a24b")
    ax.set_yticks(y, [str(f) for f in pf["file"]], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} read from the file (all ranks)")
    for yi, (b, n) in enumerate(zip(pf["bytes_read"], pf["num_ranks"], strict=True)):
        ax.text(b / div, yi, f"  {n} ranks", va="center", fontsize=7)
    ax.set_title(f"file fan-in (top {len(pf)} of {len(plan.per_file)} files)", fontsize=9)
    return ax


def plot_module_bytes(ckpt: Checkpoint, *, depth: int = 2, top: int = 20, ax: Axes | None = None) -> Axes:
    """Bytes by module (fqn prefix), largest first, as horizontal bars."""
    m = ckpt.modules(depth=depth).sort_values("nbytes", ascending=False)
    rest = m.iloc[top:]
    m = m.head(top)
    div, unit = _unit(float(m["nbytes"].max()) if len(m) else 0.0)
    labels = [str(x) for x in m["module"]]
    vals = list(m["nbytes"] / div)
    if len(rest):
        labels.append(f"({len(rest)} more)")
        vals.append(float(rest["nbytes"].sum()) / div)
    ax = _ax(ax, (7, max(2.5, 0.22 * len(labels) + 1)))
    y = np.arange(len(labels))
    ax.barh(y, vals, color="#4c78a8")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(f"bytes by module (depth {depth})", fontsize=9)
    return ax
