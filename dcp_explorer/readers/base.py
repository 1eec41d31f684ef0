"""The reader interface: every format is a backend that returns the same model.

Modelled on xarray's ``BackendEntrypoint`` / ``guess_engine``: each backend says whether
it can open a location, and the error when none can lists what each looked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..model import CheckpointIndex
from ..store import Store

__all__ = ["BackendEntrypoint"]


class BackendEntrypoint(ABC):
    """A checkpoint format.

    Subclasses set :attr:`name` and :attr:`looks_for` and implement
    :meth:`guess_can_open` (cheap: looks at the directory listing only) and
    :meth:`open_index` (reads metadata, never tensor data).
    """

    name: ClassVar[str]
    """Short name, e.g. ``"dcp"``; what ``open(..., format=name)`` takes."""
    looks_for: ClassVar[str]
    """What makes a location this format, for "not a checkpoint" messages."""

    @abstractmethod
    def guess_can_open(self, store: Store) -> bool:
        """Whether this backend recognises ``store`` (from the listing alone)."""

    @abstractmethod
    def open_index(self, store: Store, **kwargs: Any) -> CheckpointIndex:
        """Read the metadata of ``store`` into a :class:`CheckpointIndex`."""

    def cache_files(self, store: Store, **kwargs: Any) -> list[str] | None:
        """Files whose size+mtime key a cached parse (``None``: do not cache)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
