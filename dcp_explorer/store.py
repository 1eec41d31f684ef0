"""Read-only access to a checkpoint location, local or remote, through fsspec.

Paths stay strings so URLs (``s3://bucket/ckpt``) survive.  A :class:`Store` only reads:
there is no method that writes, so nothing in a checkpoint directory is ever written.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from .errors import (
    ByteRangeError,
    ChunkFileMissing,
    DcpExplorerError,
    MetadataError,
    NotACheckpointError,
    ReadTimeoutError,
)

if TYPE_CHECKING:
    import fsspec

__all__ = ["Store", "open_store", "remote_timeout", "DEFAULT_TIMEOUT"]

#: Seconds a remote request may wait for a connection or for the next bytes before failing with
#: :class:`ReadTimeoutError`; ``$DCP_EXPLORER_TIMEOUT`` overrides it (``storage_options`` win over both).
DEFAULT_TIMEOUT = 60.0


def remote_timeout() -> float:
    """The remote read timeout in seconds: ``$DCP_EXPLORER_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    try:
        t = float(os.environ.get("DCP_EXPLORER_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT
    return t if t > 0 else DEFAULT_TIMEOUT


def _with_timeouts(url: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` plus default connect/read timeouts for the HTTP and S3 filesystems (the user's win)."""
    import fsspec.core

    opts = dict(options)
    proto = fsspec.core.split_protocol(url)[0]
    t = remote_timeout()
    if proto in ("http", "https"):
        import aiohttp

        ck = dict(opts.get("client_kwargs") or {})
        ck.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t))
        opts["client_kwargs"] = ck
    elif proto in ("s3", "s3a"):
        cfg = dict(opts.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", t)
        cfg.setdefault("read_timeout", t)
        opts["config_kwargs"] = cfg
    return opts


def _timeout_in(exc: BaseException) -> BaseException | None:
    """The timeout (asyncio, aiohttp, botocore...) ``exc`` is or was raised from, if any."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 16:
        if isinstance(e, TimeoutError) or any("Timeout" in k.__name__ for k in type(e).__mro__):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is a timeout."""
    return _timeout_in(exc) is not None


@contextmanager
def _timeouts(where: str) -> Iterator[None]:
    """Turn a remote timeout (however the filesystem wraps it) into :class:`ReadTimeoutError`."""
    try:
        yield
    except DcpExplorerError:
        raise
    except Exception as e:
        cause = _timeout_in(e)
        if cause is not None:
            raise ReadTimeoutError(
                f"no answer from the storage within {remote_timeout():g} s ({type(cause).__name__}); set "
                "$DCP_EXPLORER_TIMEOUT (seconds) or the filesystem's timeout in storage_options to wait longer",
                path=where,
            ) from e
        raise


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
        if name in self.subdirs:
            raise ChunkFileMissing("is a directory, expected a file", path=self.display(name))
        try:
            with _timeouts(self.display(name)):
                return int(self.fs.size(self.full_path(name)))
        except DcpExplorerError:
            raise
        except (FileNotFoundError, OSError) as e:
            raise ChunkFileMissing("file does not exist", path=self.display(name)) from e

    def allowed_roots(self) -> tuple[str, ...]:
        """Real paths a local file of the checkpoint may resolve into: the checkpoint directory, and for
        a Hugging Face hub cache snapshot (``models--org--name/snapshots/<revision>``, whose files are
        symlinks to ``../../blobs/<hash>``) that repository's own ``blobs`` folder."""
        root = os.path.realpath(self.root or ".")
        out = [root]
        snapshots = os.path.dirname(root)
        repo = os.path.dirname(snapshots)
        kinds = ("models--", "datasets--", "spaces--")
        if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(kinds):
            blobs = os.path.join(repo, "blobs")
            if os.path.isdir(blobs) and not os.path.islink(blobs):
                out.append(blobs)
        return tuple(out)

    def check_inside(self, name: str) -> None:
        """Refuse a local file that resolves (through symlinks) outside the checkpoint directory (or, for
        a Hugging Face hub cache snapshot, outside the repository's ``blobs``: :meth:`allowed_roots`)."""
        if not self.is_local:
            return
        roots = self.allowed_roots()
        real = os.path.realpath(self.full_path(name))
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            where = "the checkpoint directory" + (" or its hub cache blobs" if len(roots) > 1 else "")
            raise MetadataError(
                f"{name!r} resolves to {real}, outside {where} (a symlink?); refusing to read outside it",
                path=self.display(name),
            )

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists (directly in the root or below it)."""
        return name in self.listing or self.fs.isfile(self.full_path(name))

    def open(self, name: str, **kwargs: Any) -> IO[bytes]:
        """Open file ``name`` for reading (binary)."""
        self.check_inside(name)
        try:
            with _timeouts(self.display(name)):
                return self.fs.open(self.full_path(name), "rb", **kwargs)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ChunkFileMissing("file does not exist", path=self.display(name)) from e

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes of ``name`` at ``start``; error if the range passes the end."""
        size = self.size(name)
        if start < 0 or length < 0 or start + length > size:
            raise ByteRangeError(
                f"byte range [{start}, {start + length}) lies past the end of the file ({size} bytes)",
                path=self.display(name),
            )
        self.check_inside(name)
        try:
            # one ranged request (fsspec file objects would read ahead in large blocks)
            with _timeouts(self.display(name)):
                data = (
                    self.fs.cat_file(self.full_path(name), start=start, end=start + length) if length else b""
                )
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ChunkFileMissing("file does not exist", path=self.display(name)) from e
        if len(data) != length:
            raise ByteRangeError(
                f"read {len(data)} bytes at {start}, expected {length}", path=self.display(name)
            )
        return bytes(data)

    def local_path(self, name: str) -> str | None:
        """OS path of ``name`` when the store is local, else ``None``; refuses a path that leads outside."""
        if not self.is_local:
            return None
        self.check_inside(name)
        return self.full_path(name)

    def stat_key(self, name: str) -> tuple[Any, ...]:
        """What identifies the current content of ``name``: (size, mtime or etag); the stamp is None when unknown."""
        info = self.info.get(name) or {}
        keys = ("mtime", "LastModified", "last_modified", "ETag", "etag", "generation", "updated", "created")
        stamp: Any = next((info[k] for k in keys if info.get(k)), None)
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
    fs, root = fsspec.core.url_to_fs(url, **_with_timeouts(url, storage_options or {}))
    root = root.rstrip("/") if root not in ("/", "") else root
    selected = None
    try:
        with _timeouts(url):
            if "file" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
                try:  # isfile/isdir swallow every error: surface a stalled server here
                    fs.info(root)
                except Exception as e:
                    if _is_timeout(e):
                        raise
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
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if entry.get("type") == "directory":
            subdirs.append(name)
        else:
            listing[name] = int(entry.get("size") or 0)
            info[name] = entry
    return Store(
        fs=fs, root=root, url=url, listing=listing, subdirs=tuple(subdirs), selected=selected, info=info
    )
