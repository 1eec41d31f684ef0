"""Watch what code under test does to files and processes, with CPython audit hooks (PEP 578).

``with watching() as w: ...`` records every file opened (resolved through symlinks, with whether
it was opened for writing), every file-system change (remove, rename, mkdir, chmod, utime,
truncate, symlink, link) and every attempt to start a process or run a shell command, from
every thread, while the block runs. Tests then assert on ``w``:

* ``w.spawned``: ``os.system``, ``subprocess.Popen``, ``os.exec*``, ``os.posix_spawn``, ``os.fork``...
* ``w.writes_under(root)``: writes or changes inside ``root``;
* ``w.reads_outside(scope, *allowed)``: files opened inside ``scope`` (say the test's tmp dir)
  but outside every ``allowed`` directory (the checkpoint, the parse cache).

The hook is installed once per process (audit hooks cannot be removed) and does nothing while
no block is active. It sees what Python itself opens (``open``, ``os.open``, ``io``, fsspec's
local files); C code that calls ``fopen`` directly is invisible to it, which is why the tests
also compare snapshots of the directories before and after.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Watch", "watching", "paused"]

_SPAWN = frozenset({
    "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "pty.spawn", "os.startfile", "webbrowser.open",
})  # fmt: skip
#: event -> positions of the path arguments it changes
_CHANGE = {
    "os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.utime": (0,), "os.truncate": (0,), "os.symlink": (1,), "os.link": (1,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,), "os.lchown": (0,),
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclass
class Watch:
    """What happened while a :func:`watching` block ran."""

    opened: list[tuple[str, bool]] = field(default_factory=list)
    """(resolved path, opened for writing) of every file opened by path."""
    changed: list[tuple[str, str]] = field(default_factory=list)
    """(event, resolved path) of every file-system change."""
    spawned: list[tuple[str, str]] = field(default_factory=list)
    """(event, repr of the arguments) of every process start or shell command."""

    def writes_under(self, root: str | os.PathLike[str]) -> list[str]:
        """Files opened for writing or changed inside ``root``."""
        r = _real(root)
        out = [p for p, w in self.opened if w and _inside(p, r)]
        out += [f"{ev} {p}" for ev, p in self.changed if _inside(p, r)]
        return out

    def reads_outside(self, scope: str | os.PathLike[str], *allowed: str | os.PathLike[str]) -> list[str]:
        """Files opened inside ``scope`` but outside all of ``allowed``."""
        s = _real(scope)
        ok = [_real(a) for a in allowed]
        return [p for p, _ in self.opened if _inside(p, s) and not any(_inside(p, a) for a in ok)]


def _real(p: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(p))


def _inside(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


_active: Watch | None = None
_lock = threading.Lock()
_busy = threading.local()
_installed = False


def _path(x: object) -> str | None:
    if isinstance(x, (str, bytes, os.PathLike)):
        try:
            return os.path.realpath(os.fsdecode(x))
        except (TypeError, ValueError, OSError):
            return None
    return None


def _hook(event: str, args: tuple) -> None:
    w = _active
    if w is None or getattr(_busy, "on", False):
        return
    _busy.on = True
    try:
        if event == "open":
            p = _path(args[0]) if args else None
            if p is not None:
                mode = args[1] if len(args) > 1 else None
                flags = args[2] if len(args) > 2 else 0
                write = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or (
                    isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
                )
                w.opened.append((p, write))
        elif event in _CHANGE:
            for i in _CHANGE[event]:
                p = _path(args[i]) if len(args) > i else None
                if p is not None:
                    w.changed.append((event, p))
        elif event in _SPAWN:
            w.spawned.append((event, repr(args)[:200]))
    finally:
        _busy.on = False


@contextmanager
def watching() -> Iterator[Watch]:
    """Record file and process activity (all threads) while the block runs; one block at a time."""
    global _active, _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True
        if _active is not None:
            raise RuntimeError("watching() blocks do not nest")
        w = _active = Watch()
    try:
        yield w
    finally:
        _active = None


@contextmanager
def paused() -> Iterator[None]:
    """Record nothing while the block runs (a test's own file changes inside a :func:`watching` block)."""
    global _active
    w, _active = _active, None
    try:
        yield
    finally:
        _active = w
