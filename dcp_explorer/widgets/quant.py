"""``QuantViewer``: one quantized tensor at a time -- its ``ckpt.quant`` row, problems, block pictures.

Everything shown comes from :mod:`dcp_explorer.quant` (``ckpt.quant``, :func:`~dcp_explorer.quant.quant_check`,
:func:`~dcp_explorer.quant.block_stats`) and :mod:`dcp_explorer.viz_quant`; this module only wires
controls to those functions and puts their answers into HTML / Image widgets.
"""

from __future__ import annotations

import base64
import html
import math
import os
from typing import Any

import numpy as np

from ._common import figure_png, frame_html, guarded, new_axes, png_image, set_png, toggle_buttons

__all__ = ["QuantViewer"]

#: A tensor with more dequantized values than this opens on a region (its first expert / first
#: rows) instead of the whole tensor; the ``slices`` box shows which, and can be edited.
MAX_REGION_VALUES = 1 << 26
#: Pictures, in display order: attribute name -> title.
PICTURES = {
    "scales": "block scales",
    "codes": "stored codes",
    "values": "dequantized values",
    "dynamic_range": "per-block range",
    "block_error": "per-block error vs reference",
}
_FIGSIZE = (5.6, 3.4)
#: Problem codes (see :data:`dcp_explorer.quant.PROBLEM_CODES`) after which a tensor cannot be dequantized.
_UNDECODABLE = ("missing_partner", "not_in_index", "scale_shape", "unsupported")


def _axes() -> Any:
    """A fresh Axes for one picture (standalone Figure, no pyplot state)."""
    return new_axes(_FIGSIZE)


def _default_slices(logical_shape: tuple[int, ...]) -> str:
    """``""`` (whole tensor) when small enough; else the first expert (3-D+) or the first rows (2-D)."""
    n = math.prod(logical_shape) if logical_shape else 0
    if n <= MAX_REGION_VALUES or not logical_shape:
        return ""
    if len(logical_shape) >= 3:
        return "0"
    per_row = max(1, math.prod(logical_shape[1:]))
    return f"0:{max(1, MAX_REGION_VALUES // per_row)}"


def _kv_html(pairs: list[tuple[str, Any]]) -> str:
    """A two-column escaped table (name, value)."""
    rows = []
    for k, v in pairs:
        if isinstance(v, float):
            s = "—" if math.isnan(v) else f"{v:.6g}"
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            s = f"{int(v):,}"
        else:
            s = "—" if v is None else str(v)
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(s)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _cell(v: Any) -> Any:
    """A DataFrame cell as a plain Python value (``pd.NA`` -> None)."""
    try:
        import pandas as pd

        if v is pd.NA:
            return None
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    return v.item() if hasattr(v, "item") else v


def _png_img(data: bytes, alt: str) -> str:
    if not data:
        return ""
    b64 = base64.b64encode(bytes(data)).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}' style='max-width:480px'/>"


class QuantViewer:
    """Look at the quantized tensors of a checkpoint (FP8 block-wise, MXFP4), one at a time.

    For the selected tensor: its row of ``ckpt.quant`` (shapes, bytes, scale statistics), its problems
    (:func:`~dcp_explorer.quant.quant_check`: scales, and with ``scan_weights`` the weights too), the
    block-scale heatmap, histograms of the stored codes and of the dequantized values, a per-block
    range map and, with a ``reference``, the per-block error against the unquantized original.

    Parameters
    ----------
    ckpt
        An opened :class:`~dcp_explorer.checkpoint.Checkpoint` with quantized tensors (``ckpt.quant``).
    reference
        Optional unquantized original: a Checkpoint (e.g. the bf16 release), a path to one, or a
        mapping name -> tensor. Tensors it lacks are shown without the error map.
    fqn
        The tensor selected first (default: the first row of ``ckpt.quant``).

    Attributes
    ----------
    tensor, slices, scan_weights, range_quantity, error_metric
        The controls (set their ``value`` to drive the widget from code). ``slices`` restricts the
        pictures to the blocks a slice of the dequantized tensor touches (``"0"``: the first expert;
        ``""``: the whole tensor; tensors above :data:`MAX_REGION_VALUES` open on a region).
        ``scan_weights`` adds the weight scan of :func:`~dcp_explorer.quant.quant_check` (all-zero
        blocks, NaN codes, overflow) to the scale checks; it reads the whole tensor, so it starts
        off when a tensor is larger than :data:`MAX_REGION_VALUES`.
    row, problems, stats, scales, codes, values, dynamic_range, block_error, error
        The outputs (HTML / Image widgets).
    block_stats : BlockStats or None
        The statistics behind the pictures (from :func:`~dcp_explorer.quant.block_stats`).
    check : pandas.DataFrame or None
        The :func:`~dcp_explorer.quant.quant_check` row of the selected tensor.

    Examples
    --------
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> viewer = QuantViewer(dcp_explorer.open(sample_path("fp8_block")))  # reference="bf16_release"
    >>> viewer.tensor.value  # the first quantized tensor; display `viewer` in a notebook
    'model.layers.0.mlp.down_proj.weight'
    """

    def __init__(self, ckpt: Any, reference: Any = None, *, fqn: str | None = None) -> None:
        import ipywidgets as w

        self.ckpt = ckpt
        if isinstance(reference, (str, os.PathLike)):
            from .. import open as _open

            reference = _open(reference)
        self.reference = reference
        self.block_stats: Any = None
        self.check: Any = None
        self._busy = False
        self._table = ckpt.quant
        self._rows = {r["fqn"]: r for r in self._table.to_dict("records")}
        self.error = w.HTML()
        self.header = w.HTML(self._header_html())
        opts = [(f"{f}   [{r['format']}{' — ' + ', '.join(r['problems']) if r['problems'] else ''}]", f)
                for f, r in self._rows.items()]  # fmt: skip
        first = fqn if fqn is not None else (opts[0][1] if opts else None)
        if first is not None and first not in self._rows:
            raise KeyError(f"{first!r} is not a quantized tensor of {ckpt.path} (see ckpt.quant)")
        self.tensor = w.Dropdown(
            options=opts, value=first, description="tensor", layout=w.Layout(width="640px")
        )
        self.slices = w.Text(value="", description="slices", continuous_update=False, layout=w.Layout(width="420px"),
                             placeholder="all blocks; e.g. 0 (first expert) or 0:256, :",
                             tooltip="only the blocks this slice of the dequantized tensor touches")  # fmt: skip
        # scanning reads every weight byte: on by default only when every tensor is small
        small = all(r["logical_shape"] is None or math.prod(r["logical_shape"]) <= MAX_REGION_VALUES
                    for r in self._rows.values())  # fmt: skip
        self.scan_weights = w.Checkbox(value=small, description="scan weights for problems", indent=False)
        # labelled by Label widgets beside them (a ToggleButtons' own description wraps above its buttons)
        self.range_quantity = toggle_buttons(["dynamic_range", "utilization", "absmax"], "dynamic_range")
        self.error_metric = toggle_buttons(["rel", "max"], "rel", disabled=reference is None)
        self.row = w.HTML()
        self.problems = w.HTML()
        self.stats = w.HTML()
        # one Layout per picture: set_png hides a picture through its layout
        self.scales = png_image("480px")
        self.codes = png_image("480px")
        self.values = png_image("480px")
        self.dynamic_range = png_image("480px")
        self.block_error = png_image("480px")

        g = guarded(self.error)
        self.tensor.observe(g(self._on_tensor), names="value")
        self.slices.observe(g(self._on_region), names="value")
        self.scan_weights.observe(g(self._on_scan), names="value")
        self.range_quantity.observe(g(self._draw_range), names="value")
        self.error_metric.observe(g(self._draw_error), names="value")

        controls = w.VBox([self.tensor, w.HBox([self.slices, self.scan_weights]),
                           w.HBox([w.Label("range map", layout=w.Layout(margin="0 4px 0 8px")), self.range_quantity,
                                   w.Label("error", layout=w.Layout(margin="0 4px 0 24px")), self.error_metric],
                                  layout=w.Layout(align_items="center"))])  # fmt: skip
        facts = w.HBox([
            w.VBox([w.HTML("<b>ckpt.quant row</b>"), self.row]),
            w.VBox([w.HTML("<b>problems</b>"), self.problems, w.HTML("<b>blocks</b>"), self.stats]),
        ])  # fmt: skip
        pictures = w.GridBox([self.scales, self.dynamic_range, self.codes, self.values, self.block_error],
                             layout=w.Layout(grid_template_columns="repeat(2, 490px)"))  # fmt: skip
        self.widget = w.VBox([self.header, controls, facts, pictures, self.error])
        if first is None:
            self.row.value = "<i>this checkpoint has no quantized tensors</i>"
        else:
            g(self._on_tensor)()

    # -- helpers ----------------------------------------------------------------------------------
    def _header_html(self) -> str:
        t = self._table
        bad = int((t["problems"].map(len) > 0).sum()) if len(t) else 0
        fmts = ", ".join(f"{n} {k}" for k, n in t["format"].value_counts().items()) if len(t) else "none"
        facts = [f"{len(t):,} quantized tensor(s) ({html.escape(fmts)})",
                 f"<span style='color:#b00020'>{bad:,} with problems</span>" if bad else "0 with problems"]  # fmt: skip
        if self.reference is not None:
            where = str(getattr(self.reference, "path", "in-memory tensors"))
            facts.append(f"reference: <span style='word-break:break-all'>{html.escape(where)}</span>")
        # the title and path on one line (a long path breaks anywhere), the facts on the next
        return (f"<div><b>QuantViewer</b> <span style='word-break:break-all'>{html.escape(str(self.ckpt.path))}"
                f"</span></div><div>{' · '.join(facts)}</div>")  # fmt: skip

    def _reference_has(self, fqn: str) -> bool:
        ref = self.reference
        if ref is None:
            return False
        names = {fqn, fqn.removesuffix("_blocks")}
        if hasattr(ref, "index") and hasattr(ref, "load"):
            return any(n in ref for n in names)
        if hasattr(ref, "keys"):
            return any(n in ref for n in names)
        return True  # a bare tensor: block_stats checks its shape

    # -- callbacks ----------------------------------------------------------------------------------
    def _on_tensor(self, change: Any = None) -> None:
        fqn = self.tensor.value
        r = self._rows[fqn]
        shape = tuple(r["logical_shape"]) if r["logical_shape"] is not None else ()
        self._busy = True  # one render for the new tensor, not one more for its default region
        try:
            self.slices.value = _default_slices(shape)
        finally:
            self._busy = False
        self._render()

    def _on_region(self, change: Any = None) -> None:
        if not self._busy:
            self._render(check=False)

    def _on_scan(self, change: Any = None) -> None:
        self._show_problems()

    def _render(self, check: bool = True) -> None:
        from ..quant import block_stats

        fqn = self.tensor.value
        if fqn is None:
            return
        self.block_stats = None
        for im in (self.scales, self.codes, self.values, self.dynamic_range, self.block_error):
            set_png(im, None)
        self.stats.value = ""
        r = self._rows[fqn]
        self.row.value = self._row_html(r)
        if check or self.check is None or self.check["fqn"].iloc[0] != fqn:
            self._show_problems()
        if r["logical_shape"] is None or any(c in _UNDECODABLE for c in r["problems"]):
            self.stats.value = "<i>cannot be dequantized (see the problems): no pictures</i>"
            return
        slices = self.slices.value.strip() or None
        ref = self.reference if self._reference_has(fqn) else None
        st = block_stats(self.ckpt, fqn, slices=slices, reference=ref)
        self.block_stats = st
        self.stats.value = self._stats_html(st, ref_missing=self.reference is not None and ref is None)
        from .. import viz_quant as vq

        set_png(self.scales, figure_png(vq.plot_quant_scales(st, ax=_axes()).figure))
        set_png(self.codes, figure_png(vq.plot_quant_codes(st, ax=_axes()).figure))
        set_png(self.values, figure_png(vq.plot_quant_values(st, ax=_axes()).figure))
        self._draw_range()
        self._draw_error()

    def _draw_range(self, change: Any = None) -> None:
        st = self.block_stats
        if st is None:
            return
        from ..viz_quant import plot_quant_dynamic_range

        ax = plot_quant_dynamic_range(st, ax=_axes(), quantity=self.range_quantity.value)
        set_png(self.dynamic_range, figure_png(ax.figure))

    def _draw_error(self, change: Any = None) -> None:
        st = self.block_stats
        if st is None or st.error_max is None:
            set_png(self.block_error, None)
            return
        from ..viz_quant import plot_quant_error

        ax = plot_quant_error(st, ax=_axes(), metric=self.error_metric.value)
        set_png(self.block_error, figure_png(ax.figure))

    def _show_problems(self) -> None:
        from ..quant import PROBLEM_CODES, quant_check

        fqn = self.tensor.value
        if fqn is None:
            return
        self.check = None
        self.problems.value = ""
        chk = quant_check(self.ckpt, [fqn], full=self.scan_weights.value, progress=False)
        self.check = chk
        row = chk.iloc[0]
        codes, msgs = tuple(row["problems"]), tuple(row["messages"])
        scanned = bool(row["checked"])
        note = ""
        if not scanned:
            why = "not dequantizable" if self.scan_weights.value else "tick <i>scan weights</i>"
            note = f"<div><small>weights not scanned ({why}): scales only</small></div>"
        if not codes:
            what = "scales and weights" if scanned else "scales"
            self.problems.value = (
                f"<span style='color:#2a7a2a'>no problems found ({what} checked)</span>{note}"
            )
            return
        items = []
        for c, m in zip(codes, msgs, strict=True):
            sev = PROBLEM_CODES.get(c, ("error", ""))[0]
            color = "#b00020" if sev == "error" else "#a15c00"
            items.append(f"<li><b style='color:{color}'>{html.escape(sev)}</b> <code>{html.escape(c)}</code>: "
                         f"{html.escape(m)}</li>")  # fmt: skip
        self.problems.value = f"<ul style='margin:2px 0;padding-left:18px'>{''.join(items)}</ul>{note}"

    def _row_html(self, r: dict[str, Any]) -> str:
        keys = ("format", "partner", "stored_shape", "stored_dtype", "logical_shape", "block_size", "scale_shape",
                "scale_dtype", "num_blocks", "stored_bytes", "dequantized_bytes", "bits_per_value", "scale_min",
                "scale_max", "scale_zero", "scale_nan", "scale_inf", "scale_negative")  # fmt: skip
        return _kv_html([(k, _cell(r[k])) for k in keys if k in r])

    def _stats_html(self, st: Any, *, ref_missing: bool) -> str:
        nblocks = int(np.prod(st.grid_shape))
        (a, b) = st.region
        region = ", ".join(f"{x}:{y}" for x, y in zip(a, b, strict=True))
        pairs: list[tuple[str, Any]] = [("region", f"[{region}]"), ("blocks", nblocks),
                                        ("block size", "x".join(map(str, st.block_size)))]  # fmt: skip
        if st.absmax is not None:
            zb = st.zero_blocks
            dr = st.dynamic_range_bits
            util = st.utilization
            fin_dr = dr[np.isfinite(dr)] if dr is not None else np.array([])
            fin_u = util[np.isfinite(util)] if util is not None else np.array([])
            pairs += [("all-zero blocks", int(zb.sum()) if zb is not None else None),
                      ("NaN / inf values", int(st.nonfinite.sum()) if st.nonfinite is not None else None),
                      ("max |value|", float(np.nanmax(st.absmax)) if st.absmax.size else float("nan")),
                      ("dynamic range, max (bits)", float(fin_dr.max()) if fin_dr.size else float("nan")),
                      ("utilization, median", float(np.median(fin_u)) if fin_u.size else float("nan"))]  # fmt: skip
        if st.error_rel is not None:
            er = st.error_rel[np.isfinite(st.error_rel)]
            pairs += [("reference", st.reference),
                      ("max |error|", float(np.nanmax(st.error_max)) if st.error_max.size else float("nan")),
                      ("max relative block error", float(er.max()) if er.size else float("nan"))]  # fmt: skip
        elif ref_missing:
            pairs.append(("reference", "has no tensor of this name: no error map"))
        return _kv_html(pairs)

    # -- display ------------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget, with an HTML fallback for frontends without the widget manager."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self._repr_html_()
        return bundle

    def _repr_html_(self) -> str:
        """Static fallback (exported notebooks): the quant table, the selected tensor and its pictures."""
        cols = [c for c in ("fqn", "format", "logical_shape", "block_size", "bits_per_value", "scale_min",
                            "scale_max", "problems") if c in self._table.columns]  # fmt: skip
        tab = self._table[cols].copy()
        if "problems" in tab:
            tab["problems"] = tab["problems"].map(", ".join)
        parts = [f"<div>{self.header.value}</div>", frame_html(tab, 30)]
        fqn = self.tensor.value
        if fqn is not None:
            parts.append(f"<div><b>{html.escape(fqn)}</b></div>")
            parts.append(f"<div style='display:flex;gap:16px'><div>{self.problems.value}</div>"
                         f"<div>{self.stats.value}</div></div>")  # fmt: skip
            pics = "".join(_png_img(im.value, name) for name, im in
                           ((PICTURES[k], getattr(self, k)) for k in PICTURES))  # fmt: skip
            parts.append(f"<div>{pics}</div>")
        if self.error.value:
            parts.append(self.error.value)
        return "".join(parts)
