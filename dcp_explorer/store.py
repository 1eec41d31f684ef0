"""Read-only access to a checkpoint location, local or remote, through fsspec.

Paths stay strings so URLs (``s3://bucket/ckpt``) survive.  A :class:`Store` only reads:
there is no method that writes, so nothing in a checkpoint directory is ever written.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from .errors import ByteRangeError, ChunkFileMissing, NotACheckpointError

if TYPE_CHECKING:
    import fsspec

__all__ = ["Store", "open_store"]


@dataclass(frozen=True)
class Store:
    """A checkpoint directory (or the directory of a single file) on some filesystem."""

    fs: fsspec.AbstractFileSystem
    """The fsspec filesystem."""
    root: str
    """Directory path on ``fs`` (no protocol, no trailing slash)."""
    url: str
    """What the user gave, for messages."""
    listing: Mapping[str, int]
    """Names of the regular files directly in ``root`` -> size in bytes."""
    subdirs: tuple[str, ...] = ()
    """Names of the sub-directories directly in ``root``."""
    selected: str | None = None
    """When the user named a single file, its name."""
    info: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    """Raw fsspec ``info`` per file (mtime, etag...), for cache keys."""

    @property
    def is_local(self) -> bool:
        """Whether the filesystem is the local one (mmap and stat are available)."""
        proto = self.fs.protocol
        return "file" in (proto if isinstance(proto, (tuple, list)) else (proto,))

    def full_path(self, name: str) -> str:
        """Path of ``name`` on the filesystem (``name`` relative to the root)."""
        return posixpath.join(self.root, name) if self.root else name

    def display(self, name: str) -> str:
        """How to name the file ``name`` in messages (the user's spelling of the root + name)."""
        base = self.url.rstrip("/")
        if self.selected and base.endswith(self.selected):
            base = base[: -len(self.selected)].rstrip("/")
        return f"{base}/{name}" if base else name

    def size(self, name: str) -> int:
        """Size of file ``name``; :class:`ChunkFileMissing` if it does not exist."""
        if name in self.listing:
            return self.listing[name]
        try:
            return int(self.fs.size(self.full_path(name)))
        except (FileNotFoundError, OSError) as e:
            raise ChunkFileMissing("file does not exist", path=self.display(name)) from e

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists (directly in the root or below it)."""
        return name in self.listing or self.fs.isfile(self.full_path(name))

    def open(self, name: str, **kwargs: Any) -> IO[bytes]:
        """Open file ``name`` for reading (binary)."""
        try:
            return self.fs.open(self.full_path(name), "rb", **kwargs)
        except FileNotFoundError as e:
            raise ChunkFileMissing("file does not exist", path=self.display(name)) from e

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes of ``name`` at ``start``; error if the range passes the end."""
        size = self.size(name)
        if start < 0 or length < 0 or start + length > size:
            raise ByteRangeError(
                f"byte range [{start}, {start + length}) lies past the end of the file ({size} bytes)",
                path=self.display(name),
            )
        try:
            # one ranged request (fsspec file objects would read ahead in large blocks)
            data = self.fs.cat_file(self.full_path(name), start=start, end=start + length) if length else b""
        except FileNotFoundError as e:
            raise ChunkFileMissing("file does not exist", path=self.display(name)) from e
        if len(data) != length:
            raise ByteRangeError(
                f"read {len(data)} bytes at {start}, expected {length}", path=self.display(name)
            )
        return bytes(data)

    def local_path(self, name: str) -> str | None:
        """OS path of ``name`` when the store is local, else ``None``."""
        return self.full_path(name) if self.is_local else None

    def stat_key(self, name: str) -> tuple[Any, ...]:
        """What identifies the current content of ``name``: (size, mtime or etag); the stamp is None when unknown."""
        info = self.info.get(name) or {}
        keys = ("mtime", "LastModified", "last_modified", "ETag", "etag", "generation", "updated", "created")
        stamp = next((info[k] for k in keys if info.get(k)), None)
        if hasattr(stamp, "isoformat"):
            stamp = stamp.isoformat()
        return (self.size(name), None if stamp is None else str(stamp))


def open_store(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Store:
    """Resolve ``path`` (a local path or an fsspec URL) to a :class:`Store`.

    A path to a single file gives a store rooted at its directory with ``selected`` set.

    Raises
    ------
    NotACheckpointError
        Nothing exists at ``path``.
    """
    import fsspec.core

    url = os.fspath(path)
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    root = root.rstrip("/") if root not in ("/", "") else root
    selected = None
    try:
        if fs.isfile(root):
            selected = posixpath.basename(root)
            root = posixpath.dirname(root)
        elif not fs.isdir(root):
            raise NotACheckpointError("no such file or directory", path=url)
        entries = fs.ls(root, detail=True)
    except NotACheckpointError:
        raise
    except FileNotFoundError as e:
        raise NotACheckpointError("no such file or directory", path=url) from e
    except NotADirectoryError as e:
        raise NotACheckpointError("not a directory", path=url) from e
    listing: dict[str, int] = {}
    info: dict[str, Mapping[str, Any]] = {}
    subdirs: list[str] = []
    for e in entries:
        name = posixpath.basename(str(e["name"]).rstrip("/"))
        if e.get("type") == "directory":
            subdirs.append(name)
        else:
            listing[name] = int(e.get("size") or 0)
            info[name] = e
    return Store(fs=fs, root=root, url=url, listing=listing, subdirs=tuple(subdirs), selected=selected, info=info)
