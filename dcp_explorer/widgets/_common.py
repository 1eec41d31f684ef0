"""Helpers shared by the widgets: figure -> PNG, safe callbacks, small HTML tables."""

from __future__ import annotations

import html
import io
import traceback
from collections.abc import Callable
from typing import Any

__all__ = [
    "figure_png",
    "new_axes",
    "guarded",
    "error_html",
    "frame_html",
    "set_png",
    "png_image",
    "toggle_buttons",
]

#: Widget tables: cells do not wrap (a shape stays ``(251, 72)`` on one line), and a table wider
#: than its column scrolls sideways instead of being cut off.
_TABLE_STYLE = (
    "<style>.dcpx.dcpx-w{max-width:100%}.dcpx-w td,.dcpx-w th{white-space:nowrap;padding:2px 6px}</style>"
)


def set_png(image: Any, png: bytes | None) -> None:
    """Show ``png`` in an Image widget, or hide the widget when there is nothing to show
    (an empty Image renders as the browser's broken-image icon)."""
    image.value = png or b""
    image.layout.display = None if png else "none"


def png_image(max_width: str = "100%") -> Any:
    """An empty PNG Image widget with a Layout of its own, drawn at the picture's aspect ratio.

    Each Image needs its own Layout: :func:`set_png` hides an Image through its layout, so a
    shared one hides them all. ``height: auto`` with ``align-self: flex-start`` keeps a picture
    from being stretched to the height of its neighbour in an ``HBox`` (whose items stretch).
    """
    import ipywidgets as w

    layout = w.Layout(max_width=max_width, height="auto", align_self="flex-start", object_fit="contain")
    return w.Image(format="png", layout=layout)


def toggle_buttons(options: list[str], value: str, **kwargs: Any) -> Any:
    """A compact ToggleButtons: buttons as wide as their text, on one line, no description.

    Put a ``Label`` beside it in an ``HBox``: a ToggleButtons' own ``description`` ends up on a
    line of its own above the buttons in JupyterLab.
    """
    import ipywidgets as w

    return w.ToggleButtons(options=options, value=value, style={"button_width": "auto"},
                           layout=w.Layout(width="auto"), **kwargs)  # fmt: skip


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

    return (f"{_STYLE}{_TABLE_STYLE}<div class='dcpx dcpx-w' style='overflow-x:auto'>"
            f"{table_html(df, max_rows)}</div>")  # fmt: skip
