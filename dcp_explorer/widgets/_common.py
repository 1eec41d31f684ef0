"""Helpers shared by the widgets: figure -> PNG, safe callbacks, small HTML tables."""

from __future__ import annotations

import html
import io
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["figure_png", "new_axes", "guarded", "error_html", "frame_html", "set_png"]


def set_png(image: Any, png: bytes | None) -> None:
    """Show ``png`` in an Image widget, or hide the widget when there is nothing to show
    (an empty Image renders as the browser's broken-image icon)."""
    image.value = png or b""
    image.layout.display = None if png else "none"


def new_axes(figsize: tuple[float, float] = (7, 4)) -> Any:
    """A fresh Axes on a standalone Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained", dpi=80).add_subplot()


def figure_png(fig: Any, dpi: int = 80) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def error_html(exc: BaseException) -> str:
    """An escaped, readable error box."""
    tb = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return (f"<div style='color:#b00020;border:1px solid #b00020;padding:4px 8px;border-radius:4px'>"
            f"<b>{html.escape(type(exc).__name__)}</b>: {html.escape(tb)}</div>")  # fmt: skip


def guarded(error_widget: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: run a callback, show any exception in ``error_widget`` (an HTML widget)."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
                error_widget.value = ""
            except Exception as e:  # noqa: BLE001 - shown to the user, not swallowed
                error_widget.value = error_html(e)

        run.__name__ = getattr(fn, "__name__", "callback")
        return run

    return deco


def frame_html(df: Any, max_rows: int = 20) -> str:
    """A compact escaped HTML table of a DataFrame (styles shared with the repr)."""
    from ..html import _STYLE, table_html

    return f"{_STYLE}<div class='dcpx'>{table_html(df, max_rows)}</div>"
