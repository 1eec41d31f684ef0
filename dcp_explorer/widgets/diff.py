"""``DiffViewer``: browse a :class:`~dcp_explorer.diff.CheckpointDiff` -- filter, pick a tensor, see where it differs."""

from __future__ import annotations

import base64
import html
import math
from typing import Any

import numpy as np

from ._common import figure_png, frame_html, guarded, new_axes, png_image, set_png, toggle_buttons
from .browser import _matches

__all__ = ["DiffViewer"]

#: Columns of :attr:`CheckpointDiff.table` shown in the widget's table (each ``x_a``/``x_b`` pair
#: as one column ``x``: the value when both sides agree, else ``a → b``, so the table fits).
TABLE_COLUMNS = ("fqn", "status", "changes", "dtype_a", "dtype_b", "shape_a", "shape_b", "chunks_a", "chunks_b",
                 "max_abs_diff", "rel_l2", "cosine", "num_outside")  # fmt: skip
#: Block-map figure: width, and the height range (inches) it takes from the tile grid's aspect.
MAP_WIDTH, MAP_HEIGHTS = 6.4, (2.6, 6.0)
#: Rows shown in the table (the filter narrows them down).
MAX_TABLE_ROWS = 50
#: Tensors offered in the tensor dropdown (the first ones of the filtered rows; narrow the filter for others).
MAX_OPTIONS = 2000
#: Block maps of tensors up to this many elements are drawn on selection; larger ones on "draw block map"
#: (a block map reads both tensors again).
AUTO_MAP_ELEMENTS = 1 << 26
#: Filter values besides the statuses: every row, or rows with any change (ignored kinds included).
FILTERS = ("all", "changed")
IDENTICAL_COLOR = "#d9d9d9"
NONFINITE_COLOR = "#d62728"


def parse_block(text: str) -> int | tuple[int, ...]:
    """Tile size for :meth:`CheckpointDiff.block_map`: ``"64"`` -> ``64``; ``"8, 16"`` / ``"8x16"`` -> ``(8, 16)``."""
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    if not parts:
        raise ValueError("block: give a tile size, e.g. 64 or 8,16")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"block: {text!r} is not a tile size such as 64 or 8,16") from None
    return vals[0] if len(vals) == 1 else vals


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, tuple):
        return str(list(v))
    return str(v)


def _pair(a: Any, b: Any) -> str:
    """One cell for an ``_a``/``_b`` pair: ``a`` when equal, else ``a → b`` (``—`` for a missing side)."""

    def text(v: Any) -> str:
        v = _plain(v)
        return str(tuple(int(x) for x in v)) if isinstance(v, tuple) else _fmt(v)

    sa, sb = text(a), text(b)
    return sa if sa == sb else f"{sa} → {sb}"


def _display_table(rows: Any) -> Any:
    """:data:`TABLE_COLUMNS` of ``rows`` with each ``x_a``/``x_b`` pair merged into one column ``x``."""
    out = rows[list(TABLE_COLUMNS)].copy()
    for name in ("dtype", "shape", "chunks"):
        a, b = f"{name}_a", f"{name}_b"
        out[a] = [_pair(x, y) for x, y in zip(out[a], out[b], strict=True)]
        out = out.drop(columns=b).rename(columns={a: name})
    return out


def _map_figsize(m: np.ndarray) -> tuple[float, float]:
    """Figure size for a block map: the tile grid's aspect ratio (rows / columns), within bounds."""
    g = np.asarray(m)
    rows, cols = (
        (1, 1) if g.ndim == 0 else (1, g.shape[0]) if g.ndim == 1 else (g.size // g.shape[-1], g.shape[-1])
    )
    # the axes take ~70% of the width (the colour bar and labels the rest)
    h = 0.7 * MAP_WIDTH * rows / max(cols, 1) + 1.2
    return MAP_WIDTH, float(min(max(h, MAP_HEIGHTS[0]), MAP_HEIGHTS[1]))


def _plot_block_map(m: np.ndarray, *, fqn: str, stat: str, tile: Any, ax: Any) -> Any:
    """Heatmap of a block map (leading dims flattened into rows); identical tiles grey, non-finite red."""
    import matplotlib as mpl
    from matplotlib.colors import LogNorm, Normalize

    g = np.asarray(m, dtype=np.float64)
    g2 = g.reshape(1, 1) if g.ndim == 0 else g.reshape(1, -1) if g.ndim == 1 else g.reshape(-1, g.shape[-1])
    zero = g2 == 0
    inf = ~np.isfinite(g2)
    pos = g2[~zero & ~inf]
    lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (1.0, 1.0)
    # a log scale only when the differences span orders of magnitude; else 0..max reads better
    norm: Any = (
        LogNorm(vmin=lo, vmax=hi) if stat != "count" and hi >= 100 * lo else Normalize(vmin=0, vmax=hi)
    )
    # identical tiles (0) are "bad" on a log scale: grey; non-finite ones are painted red on top
    cm = mpl.colormaps["viridis"].with_extremes(bad=IDENTICAL_COLOR)
    shown = np.ma.masked_array(np.where(inf, np.nan, g2), mask=zero | inf)
    im = ax.imshow(shown, cmap=cm, norm=norm, aspect="auto", interpolation="nearest")
    if inf.any():
        red = np.ma.masked_array(np.ones_like(g2), mask=~inf)
        ax.imshow(
            red, cmap=mpl.colors.ListedColormap([NONFINITE_COLOR]), aspect="auto", interpolation="nearest"
        )
    label = {
        "max": "max |a - b| per tile",
        "mean": "mean |a - b| per tile",
        "count": "elements not identical",
    }[stat]
    ax.figure.colorbar(im, ax=ax, label=label)
    ax.set_xlabel(f"tile along the last dim ({tile[-1] if isinstance(tile, tuple) else tile} elements)")
    ax.set_ylabel("tile row" + (" (leading dims flattened)" if g.ndim > 2 else ""))
    n0, ninf = int(zero.sum()), int(inf.sum())
    note = f"{n0:,} of {g2.size:,} tiles identical (grey)"
    if ninf:
        note += f", {ninf:,} with NaN/inf on one side (red)"
    ax.set_title(f"{fqn}\n{note}", fontsize=9)
    return ax


class DiffViewer:
    """Browse the result of :func:`dcp_explorer.diff`: the table by status, and where a tensor differs.

    Parameters
    ----------
    diff
        A :class:`~dcp_explorer.diff.CheckpointDiff`.
    block
        Initial tile size of the block map (``64``, or ``(8, 16)`` per dim).

    Attributes
    ----------
    status, search, tensor, block, stat, draw_button
        The controls (set their ``value`` to drive the widget from code; ``draw_button.click()``). ``status`` is ``"all"``,
        ``"changed"`` (any change, ignored kinds included) or one of :data:`~dcp_explorer.diff.STATUSES`;
        ``search`` filters names (substring, glob or ``re:``); ``stat`` is the block-map statistic
        (``"max"``, ``"mean"`` or ``"count"``). Block maps of tensors above :data:`AUTO_MAP_ELEMENTS`
        are drawn only on ``draw_button``.
    summary, count, table, details, block_map, error
        The outputs (HTML / Image widgets).
    rows : pandas.DataFrame
        The rows of ``diff.table`` the filters select.
    last_block_map : numpy.ndarray or None
        The array behind the heatmap (from :meth:`CheckpointDiff.block_map`).

    Examples
    --------
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> viewer = DiffViewer(dcp_explorer.diff(sample_path("llama_fsdp_ws1"), sample_path("hf_rank0"),
    ...                                       select="model.*", rename={"model.": ""}, progress=False))
    >>> len(viewer.rows), viewer.tensor.value  # display `viewer` in a notebook
    (21, 'tok_embeddings.weight')
    """

    def __init__(self, diff: Any, *, block: int | tuple[int, ...] = 64) -> None:
        import ipywidgets as w

        from ..diff import STATUSES

        self.diff = diff
        self._table = diff.table
        self.rows = self._table
        self.last_block_map: np.ndarray | None = None
        self._rows = {r.fqn: r for r in diff.rows}
        self._busy = False
        self.error = w.HTML()
        self.summary = w.HTML(self._summary_html())
        counts = self._table["status"].value_counts()
        nchanged = int((self._table["changes"] != "").sum())
        opts = [(f"all ({len(self._table):,})", "all"), (f"changed ({nchanged:,})", "changed")]
        opts += [(f"{s.replace('_', ' ')} ({int(counts[s]):,})", s) for s in STATUSES if s in counts.index]
        self.status = w.Dropdown(options=opts, value="all", description="status")
        self.search = w.Text(placeholder="filter names: substring, glob or re:regex", description="filter",
                             continuous_update=False, layout=w.Layout(width="420px"))  # fmt: skip
        self.count = w.HTML()
        self.table = w.HTML()
        self.tensor = w.Dropdown(options=[], description="tensor", layout=w.Layout(width="640px"))
        btxt = str(block) if isinstance(block, int) else ",".join(map(str, block))
        self.block = w.Text(value=btxt, description="tile", continuous_update=False,
                            tooltip="block-map tile size: 64, or one size per dim (8,16)")  # fmt: skip
        self.stat = toggle_buttons(["max", "mean", "count"], "max")  # labelled by a Label beside it
        self.details = w.HTML()
        self.block_map = png_image("640px")
        self.draw_button = w.Button(description="draw block map", icon="th",
                                    tooltip="read both tensors again and reduce |a - b| over tiles")  # fmt: skip

        g = guarded(self.error)
        self.status.observe(g(self._on_filter), names="value")
        self.search.observe(g(self._on_filter), names="value")
        self.tensor.observe(g(self._on_tensor), names="value")
        self.block.observe(g(self._draw), names="value")
        self.stat.observe(g(self._draw), names="value")
        self.draw_button.on_click(g(lambda _b: self._draw(force=True)))

        self.widget = w.VBox([
            self.summary,
            w.HBox([self.status, self.search]),
            self.count,
            self.table,
            self.tensor,
            w.HBox([self.block, w.Label("statistic", layout=w.Layout(margin="0 4px 0 16px")), self.stat,
                    self.draw_button], layout=w.Layout(align_items="center")),
            w.HBox([self.details, self.block_map]),
            self.error,
        ])  # fmt: skip
        g(self._on_filter)()

    # -- helpers ----------------------------------------------------------------------------------
    def _summary_html(self) -> str:
        s = self.diff.summary()
        d = self.diff
        verdict = (
            "<b style='color:#2a7a2a'>EQUAL</b>" if s["equal"] else "<b style='color:#b00020'>DIFFERENT</b>"
        )
        if d.errors:
            verdict = "<b style='color:#b00020'>ERROR</b>"
        st = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in s["status"].items())
        ch = ", ".join(f"{v:,} {k}" for k, v in s["changes"].items()) or "none"
        ign = f"; ignoring {', '.join(s['ignore'])}" if s["ignore"] else ""
        # one line per fact; a long path breaks anywhere rather than pushing the layout around
        path = "style='word-break:break-all'"
        return (f"<div><b>CheckpointDiff</b> {verdict}</div>"
                f"<div {path}><b>A</b> {html.escape(str(s['a']))} ({html.escape(s['format_a'])})</div>"
                f"<div {path}><b>B</b> {html.escape(str(s['b']))} ({html.escape(s['format_b'])})</div>"
                f"<div>{s['entries']:,} entries: {html.escape(st)}. Changes: {html.escape(ch)}"
                f" (atol={s['atol']:g}, rtol={s['rtol']:g}{html.escape(ign)})</div>")  # fmt: skip

    def _numel(self, fqn: str) -> int:
        return math.prod(self._rows[fqn].shape_a or ())

    def _mappable(self, fqn: str) -> bool:
        r = self._rows[fqn]
        return r.kind == "tensor" and r.fqn_a is not None and r.fqn_b is not None and r.shape_a == r.shape_b

    # -- callbacks ----------------------------------------------------------------------------------
    def _on_filter(self, change: Any = None) -> None:
        t = self._table
        f = self.status.value
        if f == "changed":
            t = t[t["changes"] != ""]
        elif f != "all":
            t = t[t["status"] == f]
        q = self.search.value
        if q.strip():  # a row matches by its common name or by its name in A
            in_b = _matches(tuple(t["fqn"]), q)
            in_a = _matches(tuple(x for x in t["fqn_a"] if x is not None), q)
            t = t[t["fqn"].isin(in_b) | t["fqn_a"].isin(in_a)]
        self.rows = t.reset_index(drop=True)
        shown = _display_table(self.rows)
        more = f", first {MAX_TABLE_ROWS} shown" if len(shown) > MAX_TABLE_ROWS else ""
        self.count.value = f"<small>{len(self.rows):,} of {len(self._table):,} entries{more}</small>"
        self.table.value = frame_html(shown, MAX_TABLE_ROWS) if len(shown) else "<i>no entries match</i>"
        names = list(self.rows["fqn"])[:MAX_OPTIONS]
        keep = self.tensor.value if self.tensor.value in names else None
        if keep is None and names:
            pick = [n for n in names if self._mappable(n) and self._rows[n].status in ("different", "close")]
            keep = pick[0] if pick else names[0]
        self._busy = True
        try:
            self.tensor.options = [(f"{n}   [{self._rows[n].status}]", n) for n in names]
            self.tensor.value = keep
        finally:
            self._busy = False
        self._on_tensor()

    def _on_tensor(self, change: Any = None) -> None:
        if self._busy:
            return
        fqn = self.tensor.value
        set_png(self.block_map, None)
        self.last_block_map = None
        if fqn is None:
            self.details.value = ""
            return
        r = self._rows[fqn]
        row = self._table[self._table["fqn"] == fqn].iloc[0]
        pairs = [(c, row[c]) for c in self._table.columns if c != "fqn"]
        body = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(_plain(v)))}</td></tr>" for k, v in pairs
        )
        note = ""
        if not self._mappable(fqn):
            note = (f"<div><i>no block map: {html.escape(r.status.replace('_', ' '))}"
                    f"{' (bytes entry)' if r.kind == 'bytes' else ''}</i></div>")  # fmt: skip
        elif self._numel(fqn) > AUTO_MAP_ELEMENTS:
            note = (f"<div><i>{self._numel(fqn):,} elements: press <b>draw block map</b> "
                    "(reads both tensors again)</i></div>")  # fmt: skip
        self.details.value = f"<div><b>{html.escape(fqn)}</b></div>{note}<table>{body}</table>"
        self._draw()

    def _draw(self, change: Any = None, *, force: bool = False) -> None:
        fqn = self.tensor.value
        set_png(self.block_map, None)
        self.last_block_map = None
        if fqn is None or not self._mappable(fqn):
            return
        if not force and self._numel(fqn) > AUTO_MAP_ELEMENTS:
            return  # large: drawn on "draw block map"
        tile = parse_block(self.block.value)
        m = self.diff.block_map(fqn, tile, stat=self.stat.value)
        self.last_block_map = m
        ax = _plot_block_map(m, fqn=fqn, stat=self.stat.value, tile=tile, ax=new_axes(_map_figsize(m)))
        set_png(self.block_map, figure_png(ax.figure))

    # -- display ------------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget, with an HTML fallback for frontends without the widget manager."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self._repr_html_()
        return bundle

    def _repr_html_(self) -> str:
        """Static fallback (exported notebooks): the diff's HTML summary and the selected tensor's block map."""
        parts = [self.diff._repr_html_()]
        if self.tensor.value is not None and self.details.value:
            parts.append(self.details.value)
        if self.block_map.value:
            b64 = base64.b64encode(bytes(self.block_map.value)).decode("ascii")
            parts.append(f"<img alt='block map' src='data:image/png;base64,{b64}' style='max-width:640px'/>")
        if self.error.value:
            parts.append(self.error.value)
        return "".join(parts)


def _plain(v: Any) -> Any:
    try:
        import pandas as pd

        if v is pd.NA:
            return None
    except ImportError:  # pragma: no cover
        pass
    return v.item() if hasattr(v, "item") and not isinstance(v, tuple) else v
