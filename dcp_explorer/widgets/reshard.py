"""``ReshardExplorer``: pick a target mesh and layout, see what every rank would read."""

from __future__ import annotations

import html
import time
from collections import OrderedDict
from typing import Any

from ._common import figure_png, frame_html, guarded, new_axes, png_image

__all__ = ["ReshardExplorer"]

TABS = ("per-rank bytes", "traffic", "overlay", "problems", "per rank table")


class ReshardExplorer:
    """Simulate loading a checkpoint on another mesh, interactively.

    Parameters
    ----------
    ckpt
        An opened :class:`~dcp_explorer.checkpoint.Checkpoint`.
    mesh
        Initial target mesh (``"dp_shard=2,tp=2"``, ``8``...); default: as many ranks as saved it.
    preset
        Initial placement preset (``"fsdp"``, ``"hsdp"``, ``"fsdp_tp"``, ``"replicate"``).

    Attributes
    ----------
    mesh, preset, world_size, tensor, tabs
        Controls. ``world_size`` sets the size of the first mesh dim (the data-parallel dim)
        and is kept in sync with ``mesh``.
    totals, rank_bytes, traffic, overlay, problems, per_rank, error
        Outputs.  Only the visible tab is re-rendered on an update; others when selected.
    last_update_seconds : float
        Wall time of the last update (simulation + the visible picture).
    """

    def __init__(self, ckpt: Any, mesh: Any = None, preset: str = "fsdp") -> None:
        import ipywidgets as w

        from ..layout import parse_mesh
        from ..plan import PRESETS

        self.ckpt = ckpt
        saved = int(ckpt.index.chunks.rank.max(initial=0)) + 1
        m = parse_mesh(mesh if mesh is not None else max(saved, 1))
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._stale = set(TABS)
        self.plan: Any = None
        self.last_update_seconds = 0.0
        self.error = w.HTML()
        self.mesh = w.Text(value=str(m), description="mesh", continuous_update=False,
                           tooltip="named dims, e.g. dp_shard=96,tp=8")  # fmt: skip
        self.preset = w.Dropdown(options=list(PRESETS), value=preset, description="preset")
        self.world_size = w.IntSlider(value=m.shape[0], min=1, max=max(1024, m.shape[0]), description=m.names[0],
                                      continuous_update=False, layout=w.Layout(width="420px"))  # fmt: skip
        big = ckpt.tensors[ckpt.tensors.kind == "tensor"].sort_values("nbytes", ascending=False)
        names = [f for f, s in zip(big["fqn"], big["shape"], strict=True) if len(s) >= 1][:300]
        self.tensor = w.Dropdown(options=names, value=names[0] if names else None, description="tensor",
                                 layout=w.Layout(width="520px"))  # fmt: skip
        self.totals = w.HTML()
        # pictures sized to fill a notebook's width (~1000 px), shrinking with a narrower one
        self.rank_bytes = png_image()
        self.traffic = png_image()
        self.overlay = png_image()
        self.problems = w.HTML()
        self.per_rank = w.HTML()
        self.tabs = w.Tab(
            children=[self.rank_bytes, self.traffic, self.overlay, self.problems, self.per_rank]
        )
        for i, t in enumerate(TABS):
            self.tabs.set_title(i, t)
        g = guarded(self.error)
        self.mesh.observe(g(self._on_mesh), names="value")
        self.world_size.observe(g(self._on_world_size), names="value")
        self.preset.observe(g(self._update), names="value")
        self.tensor.observe(g(self._on_tensor), names="value")
        self.tabs.observe(g(self._on_tab), names="selected_index")
        controls = w.VBox([w.HBox([self.mesh, self.preset]), self.world_size, self.tensor])
        self.widget = w.VBox([controls, self.totals, self.tabs, self.error])
        g(self._update)()

    # -- state ----------------------------------------------------------------------------------
    def _mesh(self) -> Any:
        from ..layout import parse_mesh

        return parse_mesh(self.mesh.value)

    def _on_mesh(self, change: Any = None) -> None:
        m = self._mesh()
        self.world_size.description = m.names[0]
        if self.world_size.value != m.shape[0]:
            self.world_size.max = max(self.world_size.max, m.shape[0])
            self.world_size.value = m.shape[0]  # triggers _on_world_size -> _update
        else:
            self._update()

    def _on_world_size(self, change: Any = None) -> None:
        from ..layout import Mesh

        m = self._mesh()
        if m.shape[0] != self.world_size.value:
            m = Mesh(m.names, (self.world_size.value, *m.shape[1:]))
            self.mesh.value = str(m)  # triggers _on_mesh -> _update
        else:
            self._update()

    def _simulate(self) -> Any:
        from ..plan import simulate_load

        key = (self.mesh.value, self.preset.value)
        plan = self._cache.get(key)
        if plan is None:
            plan = simulate_load(self.ckpt, self._mesh(), preset=self.preset.value)
            self._cache[key] = plan
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return plan

    def _update(self, change: Any = None) -> None:
        t0 = time.perf_counter()
        self.plan = self._simulate()
        t = self.plan.totals()
        status = ("<b style='color:#2a7a2a'>will load</b>" if t["ok"] else
                  f"<b style='color:#b00020'>will fail: {t['errors']} error(s)</b>")  # fmt: skip
        from ..html import fmt_bytes

        self.totals.value = (f"{status} &nbsp; {html.escape(t['mesh'])} ({t['world_size']:,} ranks) — "
                             f"{t['read_items']:,} read items, {fmt_bytes(t['bytes_needed'])} needed, "
                             f"{fmt_bytes(t['bytes_read'])} read (x{t['amplification']:.2f}), "
                             f"{t['warnings']} warning(s)")  # fmt: skip
        self._stale = set(TABS)
        self._render(TABS[self.tabs.selected_index or 0])
        self.last_update_seconds = time.perf_counter() - t0

    def _on_tensor(self, change: Any = None) -> None:
        self._stale.add("overlay")
        if TABS[self.tabs.selected_index or 0] == "overlay":
            self._render("overlay")

    def _on_tab(self, change: Any = None) -> None:
        self._render(TABS[self.tabs.selected_index or 0])

    def render_all(self) -> None:
        """Render every tab now (e.g. before exporting the notebook)."""
        for t in TABS:
            self._render(t)

    def _render(self, tab: str) -> None:
        if tab not in self._stale or self.plan is None:
            return
        from .. import viz

        p = self.plan
        if tab == "per-rank bytes":
            self.rank_bytes.value = figure_png(viz.plot_rank_bytes(p, ax=new_axes((12.5, 3.4))).figure)
        elif tab == "traffic":
            self.traffic.value = figure_png(viz.plot_traffic(p, ax=new_axes((6, 4.5))).figure)
        elif tab == "overlay":
            if self.tensor.value:
                self.overlay.value = figure_png(
                    viz.plot_reshard_overlay(p, self.tensor.value, ax=new_axes((10, 4.4))).figure
                )
        elif tab == "problems":
            rows = [x for x in p.problems]
            if not rows:
                self.problems.value = "<i>no problems: dcp.load would plan this without an error</i>"
            else:
                self.problems.value = frame_html(p.problems_table, 40)
        elif tab == "per rank table":
            self.per_rank.value = frame_html(p.per_rank, 40)
        self._stale.discard(tab)

    # -- display --------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget, with an HTML fallback for frontends without the widget manager."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self._repr_html_()
        return bundle

    def _repr_html_(self) -> str:
        """Static fallback: the plan's HTML summary."""
        return self.plan._repr_html_() if self.plan is not None else ""
