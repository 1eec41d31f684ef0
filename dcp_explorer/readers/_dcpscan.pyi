"""Types of the optional C extension ``_dcpscan`` (``_dcpscan.c``; setup.py builds it when it can)."""

from typing import Any

from typing_extensions import Buffer as _Buffer

class Unsupported(Exception):
    """The pickle holds something the scanner does not model: use the reference reader."""

class Malformed(ValueError):
    """``args`` is ``(message, truncated)``."""

class Refused(Exception):
    """``args`` is ``(module, name)`` of a global outside the allow-list."""

class Buffer:
    """Memory owned by the scanner, exported through the buffer protocol."""

    def __buffer__(self, flags: int, /) -> memoryview: ...

G_METADATA: int
G_TSM: int
G_BSM: int
G_CHUNK: int
G_TP: int
G_MIDX: int
G_SMETA: int
G_MEMFMT: int
G_SINFO: int
G_SIZE: int
G_LAYOUT: int
G_POSIX: int
G_WINPATH: int
G_ODICT: int
G_NCODES: int

def scan(
    src: object,
    start: int,
    total: int,
    gmap: dict[tuple[str, str], int],
    dtmap: dict[str, str],
    funcs: list[Any],
    dtype_cls: Any,
    /,
) -> dict[str, Any]:
    """Scan a DCP ``.metadata`` pickle: ``src`` is a bytes-like object (``start=-1``) or a binary
    file positioned at ``start`` with ``total`` bytes left."""

def memo_guard(buffer: _Buffer, /) -> tuple[str, str] | None:
    """``None``, or ``(kind, message)`` with kind ``"memo"`` or ``"truncated"``."""

def _utf8_check(buffer: _Buffer, surrogatepass: bool, /) -> bool:
    """Test hook: the scanner's UTF-8 validator."""
