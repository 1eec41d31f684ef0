"""Pictures of quantized tensors (matplotlib): block scales, codes, values, dynamic range, error.

Every function draws on ``ax`` (a new figure's axes when None), returns the ``Axes``, never calls
``plt.show()`` and changes no global state. Each takes a :class:`~dcp_explorer.quant.BlockStats`
(compute it once with :func:`~dcp_explorer.quant.block_stats` and draw several pictures), or a
:class:`~dcp_explorer.checkpoint.Checkpoint` and the tensor's name, in which case it computes what
it needs (scales only for :func:`plot_quant_scales`).

>>> import dcp_explorer
>>> from dcp_explorer.quant import block_stats
>>> from dcp_explorer.samples import sample_path
>>> ckpt = dcp_explorer.open(sample_path("fp8_block"))
>>> st = block_stats(ckpt, "model.layers.0.mlp.down_proj.weight")  # reference=the bf16 original, if any
>>> st.grid_shape
(2, 2)
>>> ax = plot_quant_scales(st)
>>> ax = plot_quant_dynamic_range(st)
>>> ax.get_title().splitlines()
['per-block dynamic range', 'model.layers.0.mlp.down_proj.weight']

Heatmaps show the block grid: FP8 ``[row blocks, column blocks]``; MXFP4 rows are the leading
dims flattened (expert x row), columns the groups of 32 values. Blocks whose value cannot be
drawn on a log scale (zero, negative, NaN, inf) are shown in the colormap's "bad" colour and
counted in the title.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .quant import BlockStats

__all__ = [
    "plot_quant_scales",
    "plot_quant_codes",
    "plot_quant_values",
    "plot_quant_dynamic_range",
    "plot_quant_error",
]

BAD_COLOR = "#d62728"


def _axes(ax: Axes | None) -> Axes:
    """``ax``, or the axes of a new figure (through pyplot, as xarray does, so notebooks display it)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _fig, new = plt.subplots(figsize=(6.4, 4.2))
    return new


def _stats(obj: Any, fqn: str | None, *, weights: bool, **kwargs: Any) -> BlockStats:
    from .quant import BlockStats, block_stats

    if isinstance(obj, BlockStats):
        if weights and obj.absmax is None:
            raise ValueError(
                f"these BlockStats of {obj.fqn!r} hold scales only: compute them with weights=True"
            )
        return obj
    if fqn is None:
        raise TypeError("pass a BlockStats, or a Checkpoint and the name of a quantized tensor")
    return block_stats(obj, fqn, weights=weights, **kwargs)


def _grid_labels(ax: Axes, st: BlockStats) -> None:
    if st.format == "fp8_block":
        ax.set_xlabel(f"column block ({st.block_size[1]} columns)")
        ax.set_ylabel(f"row block ({st.block_size[0]} rows)")
    else:
        lead = "x".join(str(n) for n in st.grid_shape[:-1]) or "1"
        ax.set_xlabel(f"group ({st.block_size[-1]} values)")
        ax.set_ylabel(f"row (leading dims {lead}, flattened)")


def _extent(st: BlockStats, grid2: np.ndarray) -> tuple[float, float, float, float]:
    """Block indices on the axes: the grid's origin (a slice's blocks keep their global numbers)."""
    c0 = st.grid_origin[-1]
    r0 = st.grid_origin[0] if st.format == "fp8_block" else 0
    return (c0 - 0.5, c0 + grid2.shape[1] - 0.5, r0 + grid2.shape[0] - 0.5, r0 - 0.5)


def _heatmap(ax: Axes, st: BlockStats, grid: np.ndarray, *, log: bool, label: str, cmap: str,
             title: str) -> Axes:  # fmt: skip
    import matplotlib as mpl
    from matplotlib.colors import LogNorm, Normalize

    g2 = st.as_2d(np.asarray(grid, dtype=np.float64))
    bad = ~np.isfinite(g2) | ((g2 <= 0) if log else False)
    shown = np.ma.masked_array(g2, mask=bad)
    ok = g2[~bad]
    if log:
        norm: Any = LogNorm(vmin=float(ok.min()), vmax=float(ok.max())) if ok.size else LogNorm(1e-3, 1)
        if ok.size and ok.min() == ok.max():
            norm = LogNorm(vmin=float(ok.min()) / 2, vmax=float(ok.max()) * 2)
    else:
        lo, hi = (float(ok.min()), float(ok.max())) if ok.size else (0.0, 1.0)
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    cm = mpl.colormaps[cmap].with_extremes(bad=BAD_COLOR)
    im = ax.imshow(shown, cmap=cm, norm=norm, aspect="auto", interpolation="nearest", extent=_extent(st, g2))
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):  # block numbers: whole ticks at block centres, never 0.25
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.figure.colorbar(im, ax=ax, label=label)
    _grid_labels(ax, st)
    nbad = int(bad.sum())
    ax.set_title(
        f"{title}\n{st.fqn}" + (f"  ({nbad:,} blocks not drawable: red)" if nbad else ""), fontsize=9
    )
    return ax


def plot_quant_scales(obj: Any, fqn: str | None = None, *, ax: Axes | None = None, slices: Any = None,
                      cmap: str = "viridis") -> Axes:  # fmt: skip
    """Heatmap of the block scales (log colour scale) of one quantized tensor.

    Parameters
    ----------
    obj
        A :class:`~dcp_explorer.quant.BlockStats`, or a Checkpoint (then ``fqn`` is required; only the
        scales are read).
    fqn
        The quantized tensor, when ``obj`` is a Checkpoint.
    ax
        Where to draw (a new figure when None).
    slices
        With a Checkpoint: only the blocks this slice of the logical tensor touches.
    cmap
        Colormap name; zero / negative / NaN / inf scales are drawn red.

    Returns
    -------
    matplotlib.axes.Axes
    """
    kw = {"slices": slices} if slices is not None else {}
    st = _stats(obj, fqn, weights=False, **kw)
    name = "scale_inv (multiplier)" if st.format == "fp8_block" else "scale 2**(s-127)"
    return _heatmap(_axes(ax), st, st.scale, log=True, label=name, cmap=cmap, title="block scales")


def plot_quant_codes(obj: Any, fqn: str | None = None, *, ax: Axes | None = None, log: bool = True) -> Axes:
    """Histogram of the stored codes (FP8: the 256 byte values; MXFP4: the 16 E2M1 codes).

    Bars are coloured by sign (negative codes orange); unused codes have no bar.

    Parameters
    ----------
    obj, fqn
        BlockStats, or Checkpoint and tensor name (reads the weights).
    ax
        Where to draw.
    log
        Logarithmic count axis.

    Returns
    -------
    matplotlib.axes.Axes
    """
    st = _stats(obj, fqn, weights=True)
    ax = _axes(ax)
    counts = np.asarray(st.code_counts)
    vals = np.asarray(st.code_values)
    codes = np.arange(len(counts))
    neg = np.signbit(vals) & ~np.isnan(vals)
    colors = np.where(neg, "tab:orange", "tab:blue")
    ax.bar(codes, counts, width=0.9 if len(codes) <= 16 else 1.0, color=colors.tolist())
    if log and counts.any():
        ax.set_yscale("log")
    if len(codes) <= 16:
        ax.set_xticks(codes, [f"{v:g}" for v in vals], rotation=90)
        ax.set_xlabel("E2M1 code (value)")
    else:
        ax.set_xlabel("stored byte (0-127 positive, 128-255 negative)")
    ax.set_ylabel("count")
    nan = int(counts[np.isnan(vals)].sum()) if np.isnan(vals).any() else 0
    ax.set_title(
        f"stored codes{'  (' + format(nan, ',') + ' NaN codes)' if nan else ''}\n{st.fqn}", fontsize=9
    )
    return ax


def plot_quant_values(obj: Any, fqn: str | None = None, *, ax: Axes | None = None, log: bool = True) -> Axes:
    """Histogram of the dequantized values (finite ones; the counts of the others in the title).

    Parameters
    ----------
    obj, fqn
        BlockStats (with a value histogram: ``bins > 0``), or Checkpoint and tensor name.
    ax
        Where to draw.
    log
        Logarithmic count axis.

    Returns
    -------
    matplotlib.axes.Axes
    """
    st = _stats(obj, fqn, weights=True)
    if st.value_counts is None or st.value_edges is None:
        raise ValueError("these BlockStats have no value histogram: compute them with bins > 0")
    ax = _axes(ax)
    ax.stairs(st.value_counts, st.value_edges, fill=True, alpha=0.8)
    if log and st.value_counts.any():
        ax.set_yscale("log")
    ax.set_xlabel(f"dequantized value ({st.dtype})")
    ax.set_ylabel("count")
    nonfinite = int(st.nonfinite.sum()) if st.nonfinite is not None else 0
    extra = f"  ({nonfinite:,} NaN/inf not shown)" if nonfinite else ""
    ax.set_title(f"dequantized values{extra}\n{st.fqn}", fontsize=9)
    return ax


def plot_quant_dynamic_range(obj: Any, fqn: str | None = None, *, ax: Axes | None = None,
                             quantity: str = "dynamic_range", cmap: str = "magma") -> Axes:  # fmt: skip
    """Heatmap of a per-block range statistic.

    Parameters
    ----------
    obj, fqn
        BlockStats, or Checkpoint and tensor name (reads the weights).
    ax
        Where to draw.
    quantity
        ``"dynamic_range"``: ``log2(max|v| / min|v != 0|)`` per block (octaves the block spans; all-zero
        blocks red); ``"utilization"``: ``max|v| / (|scale| * code_max)`` (1 when the block's largest value
        uses the largest code; low values waste precision); ``"absmax"``: max |v| (log scale).
    cmap
        Colormap name.

    Returns
    -------
    matplotlib.axes.Axes
    """
    st = _stats(obj, fqn, weights=True)
    if quantity == "dynamic_range":
        grid, log, label = st.dynamic_range_bits, False, "log2(max|v| / min|v≠0|)  [bits]"
    elif quantity == "utilization":
        grid, log, label = st.utilization, False, f"max|v| / (scale x {st.code_max:g})"
    elif quantity == "absmax":
        grid, log, label = st.absmax, True, "max |v|"
    else:
        raise ValueError(f"quantity must be 'dynamic_range', 'utilization' or 'absmax', not {quantity!r}")
    title = f"per-block {quantity.replace('_', ' ')}"
    return _heatmap(_axes(ax), st, grid, log=log, label=label, cmap=cmap, title=title)  # type: ignore[arg-type]


def plot_quant_error(obj: Any, fqn: str | None = None, reference: Any = None, *, ax: Axes | None = None,
                     metric: str = "rel", reference_fqn: str | None = None, cmap: str = "inferno") -> Axes:  # fmt: skip
    """Heatmap of the per-block error of the dequantized values against a reference (log colour scale).

    Parameters
    ----------
    obj
        BlockStats computed with a ``reference``, or a Checkpoint (then ``fqn`` and ``reference`` are required).
    fqn
        The quantized tensor, when ``obj`` is a Checkpoint.
    reference
        The unquantized original (a Checkpoint such as the bf16 release, a mapping, or a tensor).
    ax
        Where to draw.
    metric
        ``"rel"``: max |error| / max |reference| per block; ``"max"``: max |error|.
    reference_fqn
        Name in ``reference`` (default: ``fqn``, then without ``_blocks``).
    cmap
        Colormap name; exact blocks (error 0) are drawn red, as nothing to show on a log scale.

    Returns
    -------
    matplotlib.axes.Axes
    """
    from .quant import BlockStats

    if not isinstance(obj, BlockStats):
        if reference is None:
            raise TypeError("plot_quant_error needs a reference (the unquantized original)")
        st = _stats(obj, fqn, weights=True, reference=reference, reference_fqn=reference_fqn, bins=0)
    else:
        st = obj
    if st.error_max is None or st.error_rel is None:
        raise ValueError(f"these BlockStats of {st.fqn!r} have no errors: compute them with reference=")
    if metric == "rel":
        grid, label = st.error_rel, "max|deq - ref| / max|ref|"
    elif metric == "max":
        grid, label = st.error_max, "max|deq - ref|"
    else:
        raise ValueError(f"metric must be 'rel' or 'max', not {metric!r}")
    return _heatmap(_axes(ax), st, grid, log=True, label=label, cmap=cmap,
                    title=f"per-block error vs {st.reference}")  # fmt: skip
