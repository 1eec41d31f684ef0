"""Notebook display without widgets: HTML built by pure functions that escape every name.

Modelled on xarray's ``formatting_html``: a compact card with the headline numbers, a
dtype breakdown, the largest modules and any warnings.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from .checkpoint import Checkpoint

__all__ = ["checkpoint_html", "table_html", "fmt_bytes"]

_STYLE = (
    "<style>.dcpx{font-family:var(--jp-content-font-family,sans-serif);font-size:13px;max-width:980px}"
    ".dcpx table{border-collapse:collapse;margin:4px 0}.dcpx td,.dcpx th{padding:2px 8px;text-align:left;"
    "border-bottom:1px solid #ddd}.dcpx .num{text-align:right;font-variant-numeric:tabular-nums}"
    ".dcpx .warn{color:#a15c00}.dcpx summary{cursor:pointer;font-weight:600}"
    ".dcpx .bar{display:inline-block;height:9px;background:#4c78a8;vertical-align:middle}</style>"
)


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _cell(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f'<td class="num">{escape(f"{v:,}" if isinstance(v, int) else f"{v:,.3g}")}</td>'
    return f"<td>{escape(str(v))}</td>"


def table_html(df: pd.DataFrame, max_rows: int = 12) -> str:
    """A small escaped HTML table of the first ``max_rows`` rows of ``df``."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    rows = []
    for rec in df.head(max_rows).itertuples(index=False):
        rows.append("<tr>" + "".join(_cell(v.item() if hasattr(v, "item") else v) for v in rec) + "</tr>")
    more = (
        f"<tr><td colspan={len(df.columns)}>… {len(df) - max_rows:,} more rows</td></tr>"
        if len(df) > max_rows
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}{more}</tbody></table>"


def checkpoint_html(ckpt: Checkpoint) -> str:
    """The ``_repr_html_`` of a :class:`~dcp_explorer.checkpoint.Checkpoint`."""
    s = ckpt.summary()
    facts = [
        ("format", s["format"]),
        ("tensors", f"{s['num_tensors']:,}"),
        ("bytes items", f"{s['num_bytes_items']:,}"),
        ("chunks", f"{s['num_chunks']:,}"),
        ("elements", f"{s['numel']:,}"),
        ("tensor bytes", fmt_bytes(s["tensor_bytes"])),
        ("files", f"{s['num_files']:,}"),
        ("saving ranks", f"{s['saving_ranks']:,}" if s["saving_ranks"] else "—"),
    ]
    if s["quantized"]:
        facts.append(("quantized tensors", f"{s['quantized']:,}"))
    fact_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts)
    total = max(1, sum(s["dtypes"].values()))
    dt_rows = "".join(
        f"<tr><td>{escape(k)}</td><td class='num'>{escape(fmt_bytes(v))}</td>"
        f"<td><span class='bar' style='width:{max(1, int(160 * v / total))}px'></span></td></tr>"
        for k, v in sorted(s["dtypes"].items(), key=lambda kv: -kv[1])
    )
    mods = ckpt.modules(depth=2).sort_values("nbytes", ascending=False)
    warn = ""
    if s["warnings"]:
        items = "".join(f"<li>{escape(w)}</li>" for w in s["warnings"][:20])
        warn = f"<div class='warn'><b>{len(s['warnings'])} warning(s)</b><ul>{items}</ul></div>"
    return (
        f"{_STYLE}<div class='dcpx'><div><b>dcp_explorer.Checkpoint</b> <code>{escape(s['path'])}</code></div>"
        f"<table>{fact_rows}</table>"
        f"<details open><summary>bytes by dtype</summary><table>{dt_rows}</table></details>"
        f"<details><summary>largest modules</summary>{table_html(mods, 15)}</details>"
        f"<details><summary>tensors</summary>{table_html(ckpt.tensors, 20)}</details>"
        f"{warn}</div>"
    )


def plan_html(plan: Any) -> str:
    """The ``_repr_html_`` of a :class:`~dcp_explorer.plan.LoadPlan`."""
    t = plan.totals()
    status = "<b style='color:#2a7a2a'>will load</b>" if t["ok"] else "<b style='color:#b00020'>will fail</b>"
    facts = [
        ("target mesh", f"{t['mesh']} ({t['world_size']:,} ranks)"),
        ("reader", f"{plan.reader} ({plan.storage.replace('_', ' ')} reads)"),
        ("read items", f"{t['read_items']:,}"),
        ("bytes needed", fmt_bytes(t["bytes_needed"])),
        ("bytes read", fmt_bytes(t["bytes_read"])),
        ("read amplification", f"{t['amplification']:.2f}x"),
        ("problems", f"{t['errors']} errors, {t['warnings']} warnings"),
    ]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts)
    errs = [p for p in plan.problems if p.severity != "info"]
    prob = ""
    if errs:
        items = "".join(
            f"<li><code>{escape(p.fqn)}</code> [{escape(p.kind)}] {escape(p.reason)}</li>" for p in errs[:20]
        )
        more = f"<li>… {len(errs) - 20} more</li>" if len(errs) > 20 else ""
        prob = f"<div class='warn'><ul>{items}{more}</ul></div>"
    pr = plan.per_rank.drop(columns=["coordinate"])
    return (
        f"{_STYLE}<div class='dcpx'><div><b>dcp_explorer.LoadPlan</b> {status}</div><table>{rows}</table>{prob}"
        f"<details><summary>per rank</summary>{table_html(pr, 16)}</details>"
        f"<details><summary>per file</summary>{table_html(plan.per_file, 16)}</details></div>"
    )
