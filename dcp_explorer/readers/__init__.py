"""Checkpoint formats, each a backend behind :class:`~dcp_explorer.readers.base.BackendEntrypoint`.

:func:`guess_reader` picks the backend for a location; its error lists what each looked for.
"""

from __future__ import annotations

from ..errors import NotACheckpointError, UnsupportedError
from ..store import Store
from .base import BackendEntrypoint
from .dcp import DcpReader
from .safetensors import SafetensorsReader

__all__ = ["BackendEntrypoint", "READERS", "get_reader", "guess_reader"]

#: Registered backends, tried in this order.
READERS: dict[str, BackendEntrypoint] = {r.name: r for r in (DcpReader(), SafetensorsReader())}


def get_reader(name: str) -> BackendEntrypoint:
    """The backend called ``name``."""
    try:
        return READERS[name]
    except KeyError:
        raise UnsupportedError(f"unknown format {name!r}; known: {', '.join(READERS)}") from None


def guess_reader(store: Store) -> BackendEntrypoint:
    """The first backend that recognises ``store``.

    Raises
    ------
    NotACheckpointError
        None does; the message lists what each looked for and what the directory holds.
    """
    for r in READERS.values():
        if r.guess_can_open(store):
            return r
    names = sorted(store.listing)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} files)" if len(names) > 8 else "")
    looked = "; ".join(f"{r.name}: {r.looks_for}" for r in READERS.values())
    raise NotACheckpointError(
        f"not a checkpoint dcp_explorer can read. Looked for {looked}. Found: {shown or 'no files'}"
        + (f" and sub-directories {', '.join(store.subdirs)}" if store.subdirs else ""),
        path=store.url,
    )
