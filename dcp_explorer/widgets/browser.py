"""``CheckpointBrowser``: search tensors, see how each is chunked and where, preview its values."""

from __future__ import annotations

import html
import re
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from ._common import figure_png, frame_html, guarded, new_axes, png_image, set_png

__all__ = ["CheckpointBrowser"]

MAX_OPTIONS = 2000
PREVIEW_ELEMENTS = 1 << 22  # at most this many elements are loaded for a preview


def _matches(fqns: tuple[str, ...], query: str) -> list[str]:
    q = query.strip()
    if not q:
        return list(fqns)
    if q.startswith("re:"):
        try:
            rx = re.compile(q[3:])
        except re.error:
            return []
        return [f for f in fqns if rx.search(f)]
    if any(ch in q for ch in "*?["):
        return [f for f in fqns if fnmatchcase(f, q)]
    ql = q.lower()
    return [f for f in fqns if ql in f.lower()]


class CheckpointBrowser:
    """Browse a checkpoint: filter by name, module table, chunk map, byte ranges, load preview.

    Parameters
    ----------
    ckpt
        An opened :class:`~dcp_explorer.checkpoint.Checkpoint`.

    Attributes
    ----------
    search, depth, tensor, preview_button
        The controls (set their ``value`` to drive the widget from code).
    summary, modules, details, chunk_map, preview, error
        The outputs (HTML / Image widgets).
    """

    def __init__(self, ckpt: Any) -> None:
        import ipywidgets as w

        self.ckpt = ckpt
        self._info = {r.fqn: r for r in ckpt.tensors.itertuples(index=False)}
        self.error = w.HTML()
        self.summary = w.HTML(ckpt._repr_html_())
        self.search = w.Text(placeholder="filter: substring, glob (model.layers.*.wq.*) or re:regex",
                             description="filter", continuous_update=False, layout=w.Layout(width="520px"))  # fmt: skip
        self.count = w.HTML()
        self.tensor = w.Select(options=[], rows=14, layout=w.Layout(width="520px"))
        self.depth = w.IntSlider(value=2, min=1, max=6, description="module depth", continuous_update=False,
                                 style={"description_width": "initial"})  # fmt: skip
        self.modules = w.HTML()
        self.details = w.HTML()
        self.chunk_map = png_image()
        self.preview_button = w.Button(description="load preview", icon="download",
                                       tooltip="read this tensor (or its first rows) through the loader")  # fmt: skip
        self.preview = w.HTML()
        self.histogram = png_image()

        self.search.observe(guarded(self.error)(self._on_search), names="value")
        self.depth.observe(guarded(self.error)(self._on_depth), names="value")
        self.tensor.observe(guarded(self.error)(self._on_tensor), names="value")
        self.preview_button.on_click(guarded(self.error)(self._on_preview))

        set_png(self.chunk_map, None)
        set_png(self.histogram, None)
        left = w.VBox([self.search, self.count, self.tensor, self.depth, self.modules],
                      layout=w.Layout(width="540px", flex="0 0 auto"))  # fmt: skip
        right = w.VBox([self.details, self.chunk_map, self.preview_button, self.preview, self.histogram],
                       layout=w.Layout(flex="1 1 auto", min_width="0", overflow="auto"))  # fmt: skip
        self.widget = w.VBox([self.summary, w.HBox([left, right]), self.error])
        self._on_search()
        self._on_depth()

    # -- callbacks ----------------------------------------------------------------------------
    def _on_search(self, change: Any = None) -> None:
        hits = _matches(self.ckpt.fqns, self.search.value)
        shown = hits[:MAX_OPTIONS]
        opts = []
        for f in shown:
            r = self._info[f]
            desc = (
                f"{f}   [{'x'.join(map(str, r.shape)) or 'scalar'} {r.dtype}]"
                if r.kind == "tensor"
                else f"{f}   [bytes]"
            )
            opts.append((desc, f))
        keep = self.tensor.value if self.tensor.value in shown else None
        self.tensor.options = opts
        self.tensor.value = keep
        more = f" (showing {len(shown):,})" if len(hits) > len(shown) else ""
        self.count.value = f"<small>{len(hits):,} of {len(self.ckpt.fqns):,} entries match{more}</small>"

    def _on_depth(self, change: Any = None) -> None:
        from ..html import fmt_bytes

        m = self.ckpt.modules(depth=self.depth.value).sort_values("nbytes", ascending=False)
        # what fits the left column: sizes in readable units, short headers (ckpt.modules() has all)
        shown = m[["module", "num_tensors", "num_bytes_items", "nbytes", "num_chunks"]].rename(
            columns={"num_tensors": "tensors", "num_bytes_items": "bytes items", "nbytes": "size",
                     "num_chunks": "chunks"})  # fmt: skip
        shown["size"] = [fmt_bytes(int(n)) for n in shown["size"]]
        self.modules.value = frame_html(shown, 25)

    def _on_tensor(self, change: Any = None) -> None:
        fqn = self.tensor.value
        self.preview.value = ""
        set_png(self.histogram, None)
        if fqn is None:
            self.details.value = ""
            set_png(self.chunk_map, None)
            return
        r = self._info[fqn]
        head = (f"<b>{html.escape(fqn)}</b> — {html.escape(r.kind)}, {html.escape(str(r.dtype))}, shape "
                f"{html.escape(str(list(r.shape)))}, {r.num_chunks} chunk(s), {r.nbytes:,} bytes"
                + (f", quantized ({html.escape(r.quant)})" if r.quant else ""))  # fmt: skip
        if r.kind == "bytes":
            e = self.ckpt.index.entry_index(fqn)
            loc = self.ckpt.index.bytes_items.get(e)
            where = (
                ""
                if loc is None
                else f"<br>stored in {html.escape(self.ckpt.index.files[loc[0]])} at bytes [{loc[1]:,}, {loc[1] + loc[2]:,})"
            )
            self.details.value = head + where
            set_png(self.chunk_map, None)
            return
        chunks = self.ckpt.chunks_of(fqn)
        import pandas as pd

        tab = pd.DataFrame([{"chunk": c.chunk, "offsets": c.offsets, "sizes": c.sizes, "rank": c.rank,
                             "file": c.file, "byte_offset": c.byte_offset, "byte_length": c.byte_length,
                             "transform": c.transform or ""} for c in chunks])  # fmt: skip
        # fit the right-hand column: short headers, and no transform column when nothing is transformed
        tab = tab.rename(columns={"byte_offset": "at byte", "byte_length": "bytes"})
        if not tab.empty and not tab["transform"].astype(bool).any():
            tab = tab.drop(columns="transform")
        self.details.value = head + frame_html(tab, 16)
        from ..viz import plot_chunk_map

        ax = plot_chunk_map(self.ckpt, fqn, ax=new_axes((7, 3.6)))
        set_png(self.chunk_map, figure_png(ax.figure))

    def _on_preview(self, button: Any = None) -> None:
        fqn = self.tensor.value
        if fqn is None:
            self.preview.value = "<i>select a tensor first</i>"
            return
        r = self._info[fqn]
        if r.kind == "bytes":
            obj = self.ckpt.load(fqn)
            self.preview.value = f"<pre>{html.escape(repr(obj)[:2000])}</pre>"
            return
        shape = list(r.shape)
        sl = None
        if shape and int(np.prod(shape)) > PREVIEW_ELEMENTS:
            per_row = max(1, int(np.prod(shape[1:])))
            rows = max(1, PREVIEW_ELEMENTS // per_row)
            sl = (slice(0, rows),)
        before = self.ckpt.loader.stats.bytes_read
        t = self.ckpt.load(fqn, slices=sl)
        from ..load import tensor_stats

        st = tensor_stats(t)
        read = self.ckpt.loader.stats.bytes_read - before
        note = f" (first {sl[0].stop:,} rows)" if sl else ""
        trs = "".join(f"<tr><th>{k}</th><td>{v:.6g}</td></tr>" if isinstance(v, float) else
                      f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>"
                      for k, v in st.items())  # fmt: skip
        self.preview.value = (f"<div><b>preview{html.escape(note)}</b>, {read:,} bytes read</div>"
                              f"<table>{trs}</table>")  # fmt: skip
        if t.numel():
            import torch

            x = t.detach().to(torch.float64).reshape(-1)
            x = x[torch.isfinite(x)].numpy()
            ax = new_axes((5.5, 2.6))
            ax.hist(x, bins=80, color="#4c78a8")
            ax.set_title(f"values of {fqn}{note}", fontsize=8)
            ax.set_yscale("log")
            set_png(self.histogram, figure_png(ax.figure))

    # -- display --------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget, with an HTML fallback for frontends without the widget manager."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self._repr_html_()
        return bundle

    def _repr_html_(self) -> str:
        """Static fallback (exported notebooks): the checkpoint summary."""
        return str(self.summary.value)
