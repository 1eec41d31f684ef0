"""Compare two checkpoints, tensor by tensor, streaming: what changed, and by how much.

:func:`diff` answers "what changed between step 1000 and step 2000?", "did my DCP -> HF
conversion keep every value?" and "is the resharded checkpoint identical to the original?"
for checkpoints far bigger than memory:

* **structure** first, from metadata alone: entries only in A or only in B, kind, shape and
  dtype changes, and *layout* changes (the same logical tensor cut into different chunks, or
  the same chunks saved by different ranks);
* then **values**, per common tensor, by *logical* tensor: both sides are read block by
  block (row blocks of at most ``block_bytes`` per side, through
  :meth:`~dcp_explorer.load.Loader.read_region`, which reads only the bytes a block needs),
  so DCP on 4 ranks compares with DCP on 2 ranks, with safetensors, or with a ``torch.save``
  file. Statistics are accumulated in float64; tensors whose dtype changed are compared
  after casting both sides to a common type (bf16 / fp8 bits are converted exactly). Pairs of
  float32 / bf16 / fp16 / fp8 tensors are computed in float32 (twice as fast): ``rel_l2``,
  ``cosine`` and ``mean_abs_diff`` then agree with float64 to about 1e-7 relative, and the
  other statistics (``max_abs_diff``, counts, first index) are exactly the float64 ones;
* bytes entries (pickled objects) are decoded with the restricted unpickler and compared
  with ``==``.

Formats: anything :func:`dcp_explorer.open` reads (DCP, safetensors / HF, quantized HF:
compared as dequantized float32 unless ``dequantize=False``), an opened
:class:`~dcp_explorer.checkpoint.Checkpoint`, an in-memory state dict, or a ``torch.save``
file. A ``torch.save`` file is opened with ``torch.load(mmap=True, weights_only=True)``: the
tensors stay in the file and only the pages a block touches are read, but those pages count
in the process's RSS while the file is mapped (the kernel may drop them at any time).

Memory: about ``4 * block_bytes`` (two blocks in flight per side: one being compared while
the next is read by a background thread) plus a few fixed 256 KiB buffers. I/O: every byte of
both sides is read once, except that when a tensor differs after an identical beginning, A's
identical prefix is read again for the norms that ``rel_l2`` and ``cosine`` need (identical
blocks are only compared bit for bit, which is what makes an unchanged tensor cheap).
Integers above 2**53 are compared exactly (bits) but their statistics round in float64.

Distributed: ``torchrun --nproc-per-node N -m dcp_explorer.diff A B`` splits the common
tensors across the ranks (largest first, each to the least loaded rank; ``gloo``, or
``nccl`` when CUDA is available), and rank 0 gathers the rows and prints the same report a
single process would. Without ``torchrun``, ``python -m dcp_explorer.diff A B --nproc N``
(or :func:`run_distributed`) starts N local ``gloo`` workers on 127.0.0.1 itself.

Exit status of ``python -m dcp_explorer.diff`` and ``dcp-explorer diff``: 0 when equal
within tolerance, 1 when different, 2 on error (like ``diff``). Under ``torchrun`` that is
rank 0's exit status (so ``torchrun`` reports rank 0 as failed when the checkpoints differ).

This module imports torch only inside functions that need it (``torch.save`` inputs,
fp8 values, dequantization, the distributed mode).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _procs
from .errors import DcpExplorerError
from .model import KIND_BYTES

if TYPE_CHECKING:
    import pandas as pd

    from .checkpoint import Checkpoint

__all__ = [
    "STATUSES",
    "CHANGES",
    "EntryDiff",
    "CheckpointDiff",
    "diff",
    "run_distributed",
    "add_arguments",
    "run_cli",
    "main",
]

#: Values of the ``status`` column, one per row.
STATUSES: tuple[str, ...] = (
    "equal",  # identical: same bits (same dtype) or same values (dtype changed); bytes entries ==
    "close",  # not identical, but every element within atol + rtol * |b|
    "different",  # elements outside tolerance (tensors) or unequal objects (bytes entries)
    "only_in_a",
    "only_in_b",
    "shape_changed",  # values not compared
    "kind_changed",  # a tensor on one side, a bytes entry on the other
    "not_compared",  # fail_fast stopped before this entry
    "error",  # reading failed; the message is in ``detail``
)

#: Kinds of change in the ``changes`` column; ``ignore=`` takes any of them.
CHANGES: tuple[str, ...] = (
    "only_in_a",
    "only_in_b",
    "kind",
    "shape",
    "dtype",
    "layout",
    "values",
    "bytes",
    "error",
)

#: Elements per compute sub-block: three float64 buffers of this size stay in the L2 cache
#: (float32 sub-blocks have twice as many elements: as many bytes).
_SUB = 1 << 15

_GLOB = re.compile(r"[*?\[]")
_einsum = np.einsum


# ============================================================================================
# results
# ============================================================================================
@dataclass(frozen=True, slots=True)
class EntryDiff:
    """One row of :attr:`CheckpointDiff.table`: an entry of A, of B, or of both."""

    fqn: str
    """Common name: B's spelling (A's names are mapped by ``rename``)."""
    status: str
    """One of :data:`STATUSES`."""
    kind: str
    """``"tensor"`` or ``"bytes"`` (for ``kind_changed``, A's kind)."""
    fqn_a: str | None = None
    """The name in A (``None``: only in B)."""
    fqn_b: str | None = None
    """The name in B (``None``: only in A)."""
    dtype_a: str | None = None
    """Stored dtype in A (``None`` for bytes entries or when absent)."""
    dtype_b: str | None = None
    """Stored dtype in B."""
    shape_a: tuple[int, ...] | None = None
    """Logical shape in A."""
    shape_b: tuple[int, ...] | None = None
    """Logical shape in B."""
    chunks_a: int | None = None
    """Stored chunks in A (1 for ``torch.save`` / in-memory tensors)."""
    chunks_b: int | None = None
    """Stored chunks in B."""
    dtype_changed: bool = False
    """Both tensors, different stored dtypes (values compared after casting to float64)."""
    layout_changed: bool = False
    """Same logical tensor stored differently: other chunk boxes (resharded), or, when both formats
    record saving ranks (DCP), the same boxes saved by other ranks."""
    equal: bool | None = None
    """Every element identical (bits when the dtype is the same, values otherwise); ``None``: not compared."""
    numel: int = 0
    """Elements compared (the tensor's numel; fewer when fail_fast stopped inside it)."""
    max_abs_diff: float | None = None
    """max |a - b| over the element pairs where both are finite."""
    mean_abs_diff: float | None = None
    """mean |a - b| over the element pairs where both are finite."""
    rel_l2: float | None = None
    """||a - b|| / ||a|| (over finite pairs; 0 when both are zero, inf when only a is)."""
    cosine: float | None = None
    """<a, b> / (||a|| ||b||) (1 when both are zero, 0 when one is)."""
    num_outside: int | None = None
    """Elements with |a - b| > atol + rtol * |b|; a NaN or inf on one side only counts too."""
    num_nonfinite: int | None = None
    """Element pairs where a or b is NaN or inf (equal when both NaN or the same inf)."""
    first_diff_index: tuple[int, ...] | None = None
    """Index of the first element (row-major) that is not identical."""
    detail: str | None = None
    """Bytes entries: the two values; errors: the message; fail_fast: where it stopped."""

    @property
    def changes(self) -> tuple[str, ...]:
        """The kinds of change this row shows (a subset of :data:`CHANGES`, in that order)."""
        s = self.status
        if s in ("only_in_a", "only_in_b"):
            return (s,)
        if s == "kind_changed":
            return ("kind",)
        out: list[str] = []
        if s == "shape_changed":
            out.append("shape")
        if self.dtype_changed:
            out.append("dtype")
        if self.layout_changed:
            out.append("layout")
        if s == "different":
            out.append("bytes" if self.kind == "bytes" else "values")
        if s == "error":
            out.append("error")
        return tuple(out)


_ROW_FIELDS = tuple(f.name for f in fields(EntryDiff))
_TUPLE_FIELDS = ("shape_a", "shape_b", "first_diff_index")


def _row_to_json(r: EntryDiff) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in _ROW_FIELDS}
    for k in _TUPLE_FIELDS:
        if d[k] is not None:
            d[k] = list(d[k])
    return d


def _row_from_json(d: Mapping[str, Any]) -> EntryDiff:
    kw: dict[str, Any] = {k: d.get(k) for k in _ROW_FIELDS if k in d}
    for k in _TUPLE_FIELDS:
        if kw.get(k) is not None:
            kw[k] = tuple(int(x) for x in kw[k])
    return EntryDiff(**kw)


@dataclass(frozen=True)
class CheckpointDiff:
    """What :func:`diff` found: one :class:`EntryDiff` per entry of A or B, plus the verdict.

    Use :attr:`table` (pandas), :meth:`summary`, :attr:`differences`, :meth:`report` (text),
    :meth:`to_dict` (JSON) and :meth:`block_map` (a per-block |d| map of one tensor).
    """

    a: str
    """A's location (or a description of an in-memory input)."""
    b: str
    """B's location."""
    format_a: str
    """A's format (``"dcp"``, ``"safetensors"``, ``"hf_dcp_shards"``, ``"torch_save"``, ``"state_dict"``...)."""
    format_b: str
    """B's format."""
    rows: tuple[EntryDiff, ...]
    """Every entry: A's order (names mapped), then the entries only in B in B's order."""
    atol: float = 0.0
    """Absolute tolerance."""
    rtol: float = 0.0
    """Relative tolerance (relative to B, like ``numpy.isclose``)."""
    ignore: tuple[str, ...] = ("layout",)
    """Kinds of change that do not make the checkpoints different (see :data:`CHANGES`)."""
    stopped_early: bool = False
    """``fail_fast`` stopped at the first difference; later entries are ``not_compared``."""
    seconds: float = 0.0
    """Wall time of the comparison."""
    bytes_read: int = 0
    """Tensor and object bytes read from both sides (all ranks together)."""
    world_size: int = 1
    """Processes that shared the work."""
    warnings: tuple[str, ...] = ()
    """Problems that did not stop the comparison (e.g. warnings from opening either side)."""
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """How the comparison was made (rename, select, dequantize, block_bytes...), for :meth:`block_map`."""
    _inputs: Any = field(default=None, compare=False, repr=False)

    # -- verdict --------------------------------------------------------------------------
    @property
    def errors(self) -> tuple[EntryDiff, ...]:
        """Rows whose comparison failed (status ``error``)."""
        return tuple(r for r in self.rows if r.status == "error")

    @property
    def equal(self) -> bool:
        """True when no row shows a change other than those in :attr:`ignore` (and nothing failed)."""
        if self.stopped_early:
            return False
        ign = set(self.ignore)
        return all(set(r.changes) <= ign for r in self.rows) and not self.errors

    def __bool__(self) -> bool:
        raise TypeError("the truth value of a CheckpointDiff is ambiguous; use .equal")

    # -- tables ---------------------------------------------------------------------------
    @cached_property
    def table(self) -> pd.DataFrame:
        """One row per entry.

        Columns
        -------
        fqn : str
            Common name (B's spelling; A's names mapped by ``rename``).
        status : str
            One of :data:`STATUSES`: ``equal``, ``close``, ``different``, ``only_in_a``,
            ``only_in_b``, ``shape_changed``, ``kind_changed``, ``not_compared``, ``error``.
        changes : str
            Comma-separated kinds of change (:data:`CHANGES`); ``""`` when none.
        kind : str
            ``"tensor"`` or ``"bytes"``.
        fqn_a, fqn_b : str or None
            The names in A and in B.
        dtype_a, dtype_b : str or None
            Stored dtypes.
        shape_a, shape_b : tuple of int or None
            Logical shapes.
        chunks_a, chunks_b : Int64
            Stored chunks per side.
        dtype_changed, layout_changed : bool
            Structural changes of a common tensor.
        equal : boolean
            Identical bits (same dtype) or identical values (dtype changed); ``<NA>`` when not compared.
        numel : int
            Elements compared.
        max_abs_diff, mean_abs_diff : float
            max and mean of |a - b| over finite pairs (NaN when not compared).
        rel_l2 : float
            ||a - b|| / ||a||.
        cosine : float
            Cosine similarity of a and b.
        num_outside : Int64
            Elements outside ``atol + rtol * |b|`` (mismatched NaN/inf count).
        num_nonfinite : Int64
            Pairs where either side is NaN or inf.
        first_diff_index : tuple of int or None
            First element (row-major) that is not identical.
        detail : str or None
            Values of changed bytes entries, error messages, where fail_fast stopped.
        """
        import pandas as pd

        rows = self.rows
        col: dict[str, Any] = {}

        def obj(name: str, vals: Any) -> None:
            col[name] = pd.Series(list(vals), dtype=object)

        col["fqn"] = pd.Series([r.fqn for r in rows], dtype=object)
        col["status"] = pd.Series([r.status for r in rows], dtype=object)
        col["changes"] = pd.Series([",".join(r.changes) for r in rows], dtype=object)
        col["kind"] = pd.Series([r.kind for r in rows], dtype=object)
        for name in ("fqn_a", "fqn_b", "dtype_a", "dtype_b", "shape_a", "shape_b"):
            obj(name, (getattr(r, name) for r in rows))
        for name in ("chunks_a", "chunks_b"):
            col[name] = pd.array([getattr(r, name) for r in rows], dtype="Int64")
        col["dtype_changed"] = np.array([r.dtype_changed for r in rows], bool)
        col["layout_changed"] = np.array([r.layout_changed for r in rows], bool)
        col["equal"] = pd.array([r.equal for r in rows], dtype="boolean")
        col["numel"] = np.array([r.numel for r in rows], np.int64)
        for name in ("max_abs_diff", "mean_abs_diff", "rel_l2", "cosine"):
            col[name] = np.array(
                [np.nan if getattr(r, name) is None else getattr(r, name) for r in rows], np.float64
            )
        for name in ("num_outside", "num_nonfinite"):
            col[name] = pd.array([getattr(r, name) for r in rows], dtype="Int64")
        obj("first_diff_index", (r.first_diff_index for r in rows))
        obj("detail", (r.detail for r in rows))
        return pd.DataFrame(col)

    @property
    def differences(self) -> pd.DataFrame:
        """The rows of :attr:`table` that show a change not in :attr:`ignore` (or an error)."""
        ign = set(self.ignore)
        keep = [bool(set(r.changes) - ign) for r in self.rows]
        return self.table[np.array(keep, bool)].reset_index(drop=True)

    @property
    def changed(self) -> pd.DataFrame:
        """The rows of :attr:`table` with any change at all, ignored kinds included."""
        return self.table[self.table["changes"] != ""].reset_index(drop=True)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: the verdict, rows per status, rows per kind of change, tolerances, timing."""
        by_status = {s: 0 for s in STATUSES}
        by_change = {c: 0 for c in CHANGES}
        for r in self.rows:
            by_status[r.status] += 1
            for c in r.changes:
                by_change[c] += 1
        return {
            "a": self.a,
            "b": self.b,
            "format_a": self.format_a,
            "format_b": self.format_b,
            "equal": self.equal,
            "entries": len(self.rows),
            "status": {k: v for k, v in by_status.items() if v},
            "changes": {k: v for k, v in by_change.items() if v},
            "atol": self.atol,
            "rtol": self.rtol,
            "ignore": list(self.ignore),
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            "world_size": self.world_size,
            "warnings": list(self.warnings),
        }

    # -- text / json / html -----------------------------------------------------------------
    def report(self, max_rows: int = 50) -> str:
        """A text report like the command line prints: the verdict, then every change."""
        s = self.summary()
        lines = [f"A: {self.a} ({self.format_a})", f"B: {self.b} ({self.format_b})"]
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in s["status"].items())
        lines.append(f"{len(self.rows)} entries: {counts}")
        tol = f"atol={self.atol:g} rtol={self.rtol:g}"
        ign = set(self.ignore)
        counted = [r for r in self.rows if set(r.changes) - ign]
        for r in counted[:max_rows]:
            lines.append(f"  {r.status:<13} {_row_text(r)}")
        if len(counted) > max_rows:
            lines.append(f"  ... {len(counted) - max_rows} more changed entries")
        only_ignored: dict[str, int] = {}
        for r in self.rows:
            if r.changes and not set(r.changes) - ign:
                for c in r.changes:
                    only_ignored[c] = only_ignored.get(c, 0) + 1
        for c, n in only_ignored.items():
            lines.append(f"  ({n} entries with only {c} changes, ignored)")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        if self.stopped_early:
            lines.append("  (stopped at the first difference: fail_fast)")
        verdict = "EQUAL" if self.equal else "DIFFERENT"
        if self.errors:
            verdict = "ERROR"
        ig = f", ignoring {', '.join(self.ignore)}" if self.ignore else ""
        lines.append(f"{verdict} ({tol}{ig}; {self.seconds:.2f} s, {_fmt_bytes(self.bytes_read)} read"
                     + (f", {self.world_size} processes" if self.world_size > 1 else "") + ")")  # fmt: skip
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able data (``json.dumps`` writes NaN/inf as ``NaN``/``Infinity``)."""
        return {
            "a": self.a, "b": self.b, "format_a": self.format_a, "format_b": self.format_b,
            "atol": self.atol, "rtol": self.rtol, "ignore": list(self.ignore),
            "stopped_early": self.stopped_early, "seconds": self.seconds, "bytes_read": self.bytes_read,
            "world_size": self.world_size, "warnings": list(self.warnings), "equal": self.equal,
            "options": _jsonable_options(self.options),
            "summary": self.summary(),
            "rows": [_row_to_json(r) for r in self.rows],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointDiff:
        """The inverse of :meth:`to_dict`."""
        return cls(
            a=d["a"], b=d["b"], format_a=d["format_a"], format_b=d["format_b"],
            rows=tuple(_row_from_json(r) for r in d["rows"]), atol=float(d["atol"]), rtol=float(d["rtol"]),
            ignore=tuple(d.get("ignore", ("layout",))), stopped_early=bool(d.get("stopped_early", False)),
            seconds=float(d.get("seconds", 0.0)), bytes_read=int(d.get("bytes_read", 0)),
            world_size=int(d.get("world_size", 1)), warnings=tuple(d.get("warnings", ())),
            options=dict(d.get("options") or {}),
        )  # fmt: skip

    def __repr__(self) -> str:
        s = self.summary()
        counts = ", ".join(f"{v} {k}" for k, v in s["status"].items())
        return (f"<CheckpointDiff {self.a!r} vs {self.b!r}: {len(self.rows)} entries ({counts}): "
                f"{'EQUAL' if self.equal else 'DIFFERENT'}>")  # fmt: skip

    def _repr_html_(self) -> str:
        return diff_html(self)

    # -- per-block map ------------------------------------------------------------------------
    def _row(self, fqn: str) -> EntryDiff:
        for r in self.rows:
            if fqn in (r.fqn, r.fqn_a, r.fqn_b):
                return r
        import difflib

        close = difflib.get_close_matches(fqn, [r.fqn for r in self.rows], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"{fqn!r} is in neither checkpoint{hint}")

    def block_map(self, fqn: str, block: int | Sequence[int] = 64, *, stat: str = "max",
                  block_bytes: int | None = None) -> np.ndarray:  # fmt: skip
        """|a - b| of one common tensor reduced over blocks: a small array for a heatmap.

        The tensor is read again, tile row by tile row, with bounded memory.

        Parameters
        ----------
        fqn
            The common name (or A's or B's name).
        block
            Tile size per dim (an int applies to every dim; missing trailing dims are whole).
        stat
            ``"max"`` (max |d| per tile), ``"mean"`` (mean |d|) or ``"count"`` (elements not
            identical). A pair with a NaN or inf on one side only counts as |d| = inf.
        block_bytes
            Memory budget per read (default: the one the diff used).

        Returns
        -------
        numpy.ndarray
            float64 of shape ``ceil(shape / block)``.

        Raises
        ------
        ValueError
            The entry is not a tensor present in both with the same shape.

        Examples
        --------
        >>> import dcp_explorer
        >>> import matplotlib.pyplot as plt
        >>> from dcp_explorer.samples import sample_path
        >>> d = dcp_explorer.diff(sample_path("llama_fsdp_ws1"), sample_path("hf_rank0"),  # f32 vs bf16
        ...                       select="model.*", rename={"model.": ""}, progress=False)
        >>> m = d.block_map("layers.0.attention.wq.weight", block=(8, 8))
        >>> m.shape, bool((m > 0).all()), bool(m.max() < 2**-8)  # bf16 rounding in every tile, no more
        ((9, 9), True, True)
        >>> im = plt.imshow(m)
        """
        if stat not in ("max", "mean", "count"):
            raise ValueError(f"stat must be 'max', 'mean' or 'count', got {stat!r}")
        r = self._row(fqn)
        if r.kind != "tensor" or r.fqn_a is None or r.fqn_b is None or r.shape_a != r.shape_b:
            raise ValueError(
                f"{fqn!r} is not a tensor of the same shape in both checkpoints (status {r.status})"
            )
        shape = tuple(r.shape_a or ())
        nd = len(shape)
        if isinstance(block, (int, np.integer)):
            tile = (int(block),) * nd
        else:
            tile = tuple(int(x) for x in block)
            if len(tile) > nd:
                raise ValueError(f"block {tile} has more dims than the tensor's shape {shape}")
            tile = tile + tuple(shape[len(tile) :])
        if any(t <= 0 for t in tile):
            raise ValueError(f"block sizes must be positive, got {tile}")
        tile = tuple(max(1, min(t, s)) if s else 1 for t, s in zip(tile, shape, strict=True))
        grid = tuple(-(-s // t) for s, t in zip(shape, tile, strict=True))
        src_a, src_b = self._sources()
        budget = int(block_bytes or self.options.get("block_bytes") or (32 << 20)) // 24
        out = np.zeros(grid, np.float64)
        cnt = np.zeros(grid, np.float64) if stat == "mean" else None
        ea, eb = src_a.entry(r.fqn_a), src_b.entry(r.fqn_b)
        if math.prod(shape) == 0:
            return out
        for starts, stops in _boxes(shape, tile, max(1, budget)):
            va = _to_float64_array(src_a.read(ea, starts, stops), ea.value_dtype)
            vb = _to_float64_array(src_b.read(eb, starts, stops), eb.value_dtype)
            d = _abs_diff_array(va, vb)
            if stat == "count":
                d = (d != 0).astype(np.float64)
            # tile boundaries inside the box (boxes are tile-aligned)
            red_max = stat == "max"
            x = d
            for ax in range(nd):
                idx = np.arange(0, stops[ax] - starts[ax], tile[ax])
                x = (np.maximum if red_max else np.add).reduceat(x, idx, axis=ax)
            gs = tuple(slice(a // t, -(-b // t)) for a, b, t in zip(starts, stops, tile, strict=True))
            if nd == 0:
                out[()] = x
                if cnt is not None:
                    cnt[()] = 1
                continue
            out[gs] = x
            if cnt is not None:
                c = np.ones([b - a for a, b in zip(starts, stops, strict=True)], np.float64)
                for ax in range(nd):
                    c = np.add.reduceat(c, np.arange(0, stops[ax] - starts[ax], tile[ax]), axis=ax)
                cnt[gs] = c
        if cnt is not None:
            out = out / np.maximum(cnt, 1)
        return out

    def _sources(self) -> tuple[_Source, _Source]:
        inp = self._inputs
        if inp is None:
            if "state_dict" in (self.format_a, self.format_b):
                raise ValueError("this diff compared an in-memory state dict that is no longer available; "
                                 "run dcp_explorer.diff again to get a block map")  # fmt: skip
            o = self.options
            inp = (_open_source(self.a, o.get("dequantize", True), o.get("trusted", False)),
                   _open_source(self.b, o.get("dequantize", True), o.get("trusted", False)))  # fmt: skip
            object.__setattr__(self, "_inputs", inp)
        return inp


def _jsonable_options(o: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in o.items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = repr(v)
    return out


def _fmt_bytes(n: float) -> str:
    from .html import fmt_bytes

    return fmt_bytes(n)


def _fmt_num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def _row_text(r: EntryDiff) -> str:
    """One line about a changed row (used by the text report)."""
    name = r.fqn if r.fqn_a in (None, r.fqn) else f"{r.fqn_a} -> {r.fqn}"
    bits: list[str] = []
    if r.status == "only_in_a":
        bits.append(f"{r.kind} {r.dtype_a or ''} {list(r.shape_a) if r.shape_a is not None else ''}".rstrip())
    elif r.status == "only_in_b":
        bits.append(f"{r.kind} {r.dtype_b or ''} {list(r.shape_b) if r.shape_b is not None else ''}".rstrip())
    elif r.status == "kind_changed":
        bits.append(f"{r.kind} -> {'bytes' if r.kind == 'tensor' else 'tensor'}")
    if r.status == "shape_changed":
        bits.append(f"shape {list(r.shape_a or ())} -> {list(r.shape_b or ())}")
    if r.dtype_changed:
        bits.append(f"dtype {r.dtype_a} -> {r.dtype_b}")
    if r.layout_changed:
        bits.append(f"layout {r.chunks_a} -> {r.chunks_b} chunks")
    if r.kind == "tensor" and r.status in ("different", "close") or (r.status == "equal" and r.dtype_changed):
        bits.append(f"max|d|={_fmt_num(r.max_abs_diff)} mean|d|={_fmt_num(r.mean_abs_diff)} "
                    f"rel_l2={_fmt_num(r.rel_l2)} cos={_fmt_num(r.cosine, 9)} outside={r.num_outside:,}/{r.numel:,}"
                    + (f" first at {list(r.first_diff_index)}" if r.first_diff_index is not None else ""))  # fmt: skip
    if r.detail:
        bits.append(r.detail)
    return f"{name}: " + "; ".join(b for b in bits if b)


def diff_html(d: CheckpointDiff, max_rows: int = 30) -> str:
    """The ``_repr_html_`` of a :class:`CheckpointDiff` (every name escaped)."""
    from html import escape

    from .html import _STYLE, table_html

    s = d.summary()
    ok = d.equal
    verdict = "<b style='color:#2a7a2a'>equal</b>" if ok else "<b style='color:#b00020'>different</b>"
    if d.errors:
        verdict = "<b style='color:#b00020'>error</b>"
    facts = [
        ("A", f"{d.a} ({d.format_a})"),
        ("B", f"{d.b} ({d.format_b})"),
        ("entries", f"{len(d.rows):,}"),
        ("tolerance", f"atol={d.atol:g}, rtol={d.rtol:g}" + (f"; ignoring {', '.join(d.ignore)}" if d.ignore else "")),
        ("read", f"{_fmt_bytes(d.bytes_read)} in {d.seconds:.2f} s"
                 + (f" on {d.world_size} processes" if d.world_size > 1 else "")),
    ]  # fmt: skip
    fact_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts)
    stat_rows = "".join(f"<tr><td>{escape(k.replace('_', ' '))}</td><td class='num'>{v:,}</td></tr>"
                        for k, v in s["status"].items())  # fmt: skip
    ch = d.changed
    cols = ["fqn", "status", "changes", "dtype_a", "dtype_b", "max_abs_diff", "rel_l2", "cosine", "num_outside",
            "first_diff_index"]  # fmt: skip
    body = table_html(ch[cols], max_rows) if len(ch) else "<p>no changes</p>"
    warn = ""
    if d.warnings:
        items = "".join(f"<li>{escape(w)}</li>" for w in d.warnings[:20])
        warn = f"<div class='warn'><ul>{items}</ul></div>"
    return (
        f"{_STYLE}<div class='dcpx'><div><b>dcp_explorer.CheckpointDiff</b> {verdict}</div>"
        f"<table>{fact_rows}</table><details open><summary>entries by status</summary><table>{stat_rows}</table>"
        f"</details><details open><summary>changed entries ({len(ch):,})</summary>{body}</details>{warn}</div>"
    )


# ============================================================================================
# sources: what both sides look like to the comparison
# ============================================================================================
@dataclass(frozen=True, slots=True)
class _Entry:
    """One entry of a side, as the comparison sees it."""

    fqn: str
    kind: str  # "tensor" | "bytes"
    dtype: str | None  # stored dtype
    shape: tuple[int, ...]
    num_chunks: int
    quant: str | None = None
    value_dtype: str | None = None  # dtype of what read() returns (float32 when dequantized)
    nbytes: int = 0


class _Source:
    """One side of a diff (interface)."""

    label: str
    format: str
    warnings: tuple[str, ...] = ()

    def entries(self) -> list[_Entry]:
        raise NotImplementedError

    def entry(self, fqn: str) -> _Entry:
        e = self.__dict__.get("_by_name")
        if e is None:
            e = {x.fqn: x for x in self.entries()}
            self.__dict__["_by_name"] = e
        return e[fqn]

    def boxes(self, fqn: str) -> np.ndarray:
        """Sorted distinct non-empty chunks, one row ``offsets + sizes + [saving rank]`` each (rank -1: unknown)."""
        raise NotImplementedError

    def read(
        self, e: _Entry, starts: Sequence[int], stops: Sequence[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw elements (the value dtype's bits, :data:`~dcp_explorer.load.RAW_NUMPY`) of a box."""
        raise NotImplementedError

    def obj(self, fqn: str) -> Any:
        """The decoded value of a bytes entry."""
        raise NotImplementedError

    def done(self, fqn: str) -> None:
        """Forget cached state about ``fqn`` (bounded memory over many tensors)."""

    @property
    def bytes_read(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _CkptSource(_Source):
    """A :class:`~dcp_explorer.checkpoint.Checkpoint` (DCP, safetensors, quantized HF)."""

    def __init__(self, ckpt: Checkpoint, dequantize: bool = True, trusted: bool = False) -> None:
        from .load import Loader

        self.ckpt = ckpt
        self.label = str(ckpt.path)
        self.format = ckpt.format
        self.warnings = tuple(ckpt.warnings)
        self.loader = Loader(ckpt)  # our own: its caches are ours to evict
        self.dequantize = dequantize
        self.trusted = trusted

    def entries(self) -> list[_Entry]:
        from .model import itemsize

        idx = self.ckpt.index
        cs = idx.chunk_start
        out = []
        for e, fqn in enumerate(idx.fqns):
            if idx.kinds[e] == KIND_BYTES:
                loc = idx.bytes_items.get(e)
                out.append(_Entry(fqn, "bytes", None, (), 0, nbytes=int(loc[2]) if loc else 0))
                continue
            q = idx.quant.get(e)
            dt = idx.dtypes[e] or "uint8"
            shape = tuple(int(x) for x in idx.shapes[e])
            quant = q["format"] if q is not None else None
            vdt = "float32" if (q is not None and self.dequantize) else dt
            if q is not None and not self.dequantize:
                shape = tuple(int(x) for x in q["stored_shape"])
            nb = int(math.prod(shape) * itemsize(dt))
            out.append(_Entry(fqn, "tensor", dt, shape, int(cs[e + 1] - cs[e]), quant, vdt, nb))
        return out

    def boxes(self, fqn: str) -> np.ndarray:
        idx = self.ckpt.index
        e = idx.entry_index(fqn)
        c = idx.chunks
        a, b = int(idx.chunk_start[e]), int(idx.chunk_start[e + 1])
        if b <= a:
            return np.zeros((0, 1), np.int64)
        cs = c.coord_start[a : b + 1]
        nds = np.diff(cs)
        k = int(nds[0])
        rank = c.rank[a:b].astype(np.int64)
        if (nds != k).any():  # ragged (should not happen): compare as sorted tuples
            rows = {
                (
                    tuple(c.offsets[int(cs[i]) : int(cs[i + 1])].tolist()),
                    tuple(c.sizes[int(cs[i]) : int(cs[i + 1])].tolist()),
                    int(rank[i]),
                )
                for i in range(b - a)
            }
            out = np.empty(len(rows), dtype=object)
            out[:] = sorted(r for r in rows if all(s > 0 for s in r[1]))
            return out
        pos = cs[:-1, None] + np.arange(k)
        box = np.concatenate([c.offsets[pos], c.sizes[pos], rank[:, None]], axis=1)
        box = box[(box[:, k : 2 * k] > 0).all(axis=1)]
        return np.unique(box, axis=0) if len(box) else box

    def read(
        self, e: _Entry, starts: Sequence[int], stops: Sequence[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        if e.quant is not None and self.dequantize:
            from .quant import dequantize_region

            t = dequantize_region(self.loader, self.ckpt.index.entry_index(e.fqn), list(starts), list(stops))
            arr = t.numpy()
            if out is None:
                return arr
            np.copyto(out, arr)
            return out
        return self.loader.read_region(e.fqn, starts, stops, out=out)

    def obj(self, fqn: str) -> Any:
        try:
            return self.loader.load_object(fqn, trusted=self.trusted)
        except DcpExplorerError as ex:
            # e.g. an object the restricted unpickler refuses: compare the stored bytes instead
            idx = self.ckpt.index
            f, off, length, _t = idx.bytes_items[idx.entry_index(fqn)]
            raw = self.loader._src(idx.files[f]).read(off, length)
            return _Opaque(raw, type(ex).__name__)

    def done(self, fqn: str) -> None:
        idx = self.ckpt.index
        try:
            e = idx.entry_index(fqn)
        except KeyError:
            return
        lay = self.loader._layouts  # parsed item layouts (and decompressed zstd items): drop them
        for row in range(int(idx.chunk_start[e]), int(idx.chunk_start[e + 1])):
            lay.pop(row, None)
        q = idx.quant.get(e)
        if q is not None and q.get("partner") in idx.fqns:
            self.done(q["partner"]) if q["partner"] != fqn else None

    @property
    def bytes_read(self) -> int:
        return int(self.loader.stats.bytes_read)

    def close(self) -> None:
        self.loader.close()


@dataclass(frozen=True)
class _Opaque:
    """A bytes entry that could not be decoded safely: compared by its stored bytes."""

    raw: bytes
    why: str

    def __repr__(self) -> str:
        return f"<undecodable {len(self.raw)} bytes ({self.why})>"


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    """DCP's flattening: mappings always, lists when they hold tensors or mappings; else a leaf."""
    import torch

    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
        return
    if isinstance(obj, list) and any(isinstance(x, (torch.Tensor, Mapping)) for x in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}.", out)
        return
    out[prefix[:-1]] = obj


class _TorchSource(_Source):
    """An in-memory state dict, or a ``torch.save`` file opened with ``mmap=True, weights_only=True``."""

    def __init__(self, sd: Mapping[str, Any], label: str, fmt: str) -> None:
        import torch

        flat: dict[str, Any] = {}
        _flatten(sd, "", flat)
        self.values: dict[str, Any] = {}
        for k, v in flat.items():
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(v)
            self.values[k] = v
        self.label, self.format = label, fmt
        self._read = 0

    @classmethod
    def from_file(cls, path: str) -> _TorchSource:
        import torch

        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as ex:  # noqa: BLE001 - e.g. a global the weights-only unpickler refuses
            raise DcpExplorerError(f"cannot read it as a torch.save file with weights_only=True ({ex})",
                                   path=path) from ex  # fmt: skip
        if not isinstance(sd, Mapping):
            raise DcpExplorerError(f"torch.save file holds a {type(sd).__name__}, expected a (nested) state dict",
                                   path=path)  # fmt: skip
        return cls(sd, path, "torch_save")

    def entries(self) -> list[_Entry]:
        import torch

        from .model import itemsize

        out = []
        for k, v in self.values.items():
            if isinstance(v, torch.Tensor):
                dt = str(v.dtype).removeprefix("torch.")
                shape = tuple(int(x) for x in v.shape)
                out.append(_Entry(k, "tensor", dt, shape, 1, None, dt, int(math.prod(shape) * itemsize(dt))))
            else:
                out.append(_Entry(k, "bytes", None, (), 0))
        return out

    def boxes(self, fqn: str) -> np.ndarray:
        shape = tuple(self.values[fqn].shape)
        if 0 in shape:
            return np.zeros((0, 2 * len(shape) + 1), np.int64)
        return np.array([[0] * len(shape) + list(shape) + [-1]], np.int64)

    def read(
        self, e: _Entry, starts: Sequence[int], stops: Sequence[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        import torch

        from .load import RAW_NUMPY

        t = self.values[e.fqn]
        if t.dim():
            t = t[tuple(slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True))]
        t = t.contiguous()
        raw = np.dtype(RAW_NUMPY.get(e.value_dtype or "", "u1"))
        if t.dtype.is_floating_point and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.view({1: torch.uint8, 2: torch.int16}[t.element_size()])
        arr = t.numpy().view(raw) if t.numel() else np.empty(tuple(t.shape), raw)
        self._read += arr.nbytes
        if out is None:
            return arr
        np.copyto(out, arr.reshape(out.shape))
        return out

    def obj(self, fqn: str) -> Any:
        return self.values[fqn]

    @property
    def bytes_read(self) -> int:
        return self._read


def _is_torch_save(path: str) -> bool:
    import zipfile

    p = pathlib.Path(path)
    if not p.is_file() or p.suffix == ".safetensors":
        return False
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return True
    return zipfile.is_zipfile(p)


def _open_source(x: Any, dequantize: bool = True, trusted: bool = False) -> _Source:
    from .checkpoint import Checkpoint

    if isinstance(x, _Source):
        return x
    if isinstance(x, Checkpoint):
        return _CkptSource(x, dequantize, trusted)
    if isinstance(x, Mapping):
        return _TorchSource(x, f"<state dict of {len(x)} keys>", "state_dict")
    if isinstance(x, (str, os.PathLike)):
        s = os.fspath(x)
        if "://" not in s and _is_torch_save(s):
            return _TorchSource.from_file(s)
        from . import open as dx_open

        return _CkptSource(dx_open(s), dequantize, trusted)
    raise TypeError(f"cannot diff a {type(x).__name__}: pass a path, a Checkpoint or a state dict")


# ============================================================================================
# names: select and rename
# ============================================================================================
def _matcher(selection: Any) -> Callable[[str], bool] | None:
    """A predicate for ``select``: names, globs, ``"re:<regex>"``, compiled regexes, or a list of these."""
    if selection is None:
        return None
    items = [selection] if isinstance(selection, (str, re.Pattern)) else list(selection)
    exact: set[str] = set()
    # (str) -> bool; spelled with ... because mypy cannot infer a lambda with a default (python/mypy#15459)
    tests: list[Callable[..., bool]] = []
    for s in items:
        if isinstance(s, re.Pattern):
            tests.append(lambda f, rx=s: rx.search(f) is not None)
        elif isinstance(s, str) and s.startswith("re:"):
            rx = re.compile(s[3:])
            tests.append(lambda f, rx=rx: rx.search(f) is not None)
        elif isinstance(s, str) and _GLOB.search(s):
            exact.add(s)  # a name may contain glob characters
            tests.append(lambda f, pat=s: fnmatch.fnmatchcase(f, pat))
        else:
            exact.add(str(s))
    return lambda f: f in exact or any(t(f) for t in tests)


def _renamer(rename: Any) -> Callable[[str], str | None]:
    """``rename`` as a function A-name -> B-name (``None``: leave the entry out).

    A callable is used as is. A mapping (or a list of pairs) holds rules tried in order after
    an exact-name lookup: ``"re:<regex>"`` keys substitute (``re.sub``, first match, ``\\1``
    groups allowed); other keys are prefixes (``{"model.": ""}`` drops the prefix). A value
    ``None`` drops matching entries.
    """
    if rename is None:
        return lambda f: f
    if callable(rename) and not isinstance(rename, Mapping):
        return rename
    pairs = list(rename.items()) if isinstance(rename, Mapping) else [tuple(p) for p in rename]
    exact = {k: v for k, v in pairs if isinstance(k, str) and not k.startswith("re:")}
    rules: list[tuple[Any, Any]] = []
    for k, v in pairs:
        if isinstance(k, re.Pattern):
            rules.append((k, v))
        elif k.startswith("re:"):
            rules.append((re.compile(k[3:]), v))
        else:
            rules.append((str(k), v))

    def fn(f: str) -> str | None:
        if f in exact:
            return exact[f]
        for k, v in rules:
            if isinstance(k, re.Pattern):
                if k.search(f):
                    return None if v is None else k.sub(v, f, count=1)
            elif f.startswith(k):
                return None if v is None else v + f[len(k) :]
        return f

    return fn


# ============================================================================================
# value conversion and the streaming statistics
# ============================================================================================
_FP8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_TABLES: dict[str, np.ndarray] = {}


def _fp8_table(dtype: str) -> np.ndarray:
    """float64 value of each of the 256 codes of an 8-bit float dtype (from torch itself)."""
    t = _TABLES.get(dtype)
    if t is None:
        import torch

        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        t = codes.view(getattr(torch, dtype)).to(torch.float64).numpy().copy()
        _TABLES[dtype] = t
    return t


def _fp8_table32(dtype: str) -> np.ndarray:
    """:func:`_fp8_table` as float32 (every 8-bit float value is a float32 value)."""
    t = _TABLES.get(dtype + "/f32")
    if t is None:
        t = _TABLES[dtype + "/f32"] = _fp8_table(dtype).astype(np.float32)
    return t


def _raw_dtype(dtype: str | None) -> np.dtype:
    from .load import RAW_NUMPY

    return np.dtype(RAW_NUMPY.get(dtype or "uint8", "u1"))


def _bits_dtype(dtype: str | None) -> np.dtype | None:
    """Unsigned integer dtype to compare raw bits, ``None`` when there is none (complex128)."""
    size = _raw_dtype(dtype).itemsize
    by_size: dict[int, np.dtype] = {
        1: np.dtype("u1"),
        2: np.dtype("<u2"),
        4: np.dtype("<u4"),
        8: np.dtype("<u8"),
    }
    return by_size.get(size)


def _is_complex(dtype: str | None) -> bool:
    return bool(dtype) and dtype.startswith("complex")  # type: ignore[union-attr]


def _convert(x: np.ndarray, dtype: str | None, out: np.ndarray, scratch: np.ndarray) -> None:
    """Raw bits ``x`` of ``dtype`` -> float64 ``out`` (exact for every float format; ints above 2**53 round)."""
    if dtype == "bfloat16":
        s = scratch[: x.size]
        np.copyto(s, x, casting="unsafe")  # u16 -> u32
        np.left_shift(s, 16, out=s)
        np.copyto(out, s.view(np.float32), casting="unsafe")
    elif dtype in _FP8:
        np.take(_fp8_table(dtype), x, out=out)
    else:
        np.copyto(out, x, casting="unsafe")


def _convert32(x: np.ndarray, dtype: str | None, out: np.ndarray) -> np.ndarray:
    """Raw bits ``x`` of a dtype in :data:`_F32` -> float32 (exact): ``x``, or a view of ``out`` (uint32)."""
    if dtype == "float32":
        return x
    o = out[: x.size]
    if dtype == "bfloat16":
        np.copyto(o, x, casting="unsafe")  # u16 -> u32
        np.left_shift(o, 16, out=o)
        return o.view(np.float32)
    f = o.view(np.float32)
    if dtype == "float16":
        np.copyto(f, x)
    else:
        np.take(_fp8_table32(dtype), x, out=f)  # type: ignore[arg-type]
    return f


def _to_float64_array(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """Whole-array version of :func:`_convert` (complex stays complex128)."""
    if _is_complex(dtype):
        return x.astype(np.complex128)
    out = np.empty(x.shape, np.float64)
    if dtype == "bfloat16":
        np.copyto(out, (x.astype(np.uint32) << 16).view(np.float32))
    elif dtype in _FP8:
        out[...] = _fp8_table(dtype)[x]
    else:
        np.copyto(out, x, casting="unsafe")
    return out


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """float64 dot product of two 1-D float64 arrays, without BLAS.

    ``np.dot`` goes to a multi-threaded BLAS whose threads, with the reader thread busy on the
    other core, turned a 32 K-element dot into milliseconds; einsum's own loop does not thread.
    """
    return float(_einsum("i,i->", x, y))


#: dtypes whose values are all float32 values (and whose differences round once in float32):
#: compared in float32 (see :class:`_Stats`).
_F32 = frozenset(("float32", "bfloat16", "float16", *_FP8))
#: Elements per row of the dot products in :func:`_sumsq` and :func:`_sum32`.
_ROW = 1024
_ONES = np.ones(_ROW, np.float32)
_vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0


def _rowdots(x: np.ndarray, y: np.ndarray) -> float:
    """float64 sum of the dot products of the rows of ``x`` (k, _ROW) with ``y`` (k, _ROW) or (_ROW,)."""
    r = _vecdot(x, y) if _vecdot is not None else _einsum("ij,ij->i" if y.ndim == 2 else "ij,j->i", x, y)
    return float(np.add.reduce(r, dtype=np.float64))


def _sumsq(x: np.ndarray) -> float:
    """Sum of squares of a 1-D float32 or float64 array, by rows of :data:`_ROW` added in float64.

    Each row is summed in the array's dtype, by one BLAS dot (``np.vecdot``): vectorized (about
    0.07 ns per float32 element, 0.17 per float64, against 0.3-1 for einsum) and, at 1024
    elements, below the threading threshold of the usual BLASes (see :func:`_dot`). A float32 row
    is summed in the BLAS's SIMD lanes, each adding a few dozen squares: measured 1e-8 relative
    error per row on random data (1e-7 at most; the worst case of a plain float32 loop over 1024
    terms is 1024 * 2**-24 = 6e-5). Rows are added in float64: the error does not grow with the
    tensor.
    """
    n = x.size
    k = n - n % _ROW
    s = 0.0
    if k:
        X = x[:k].reshape(-1, _ROW)
        s = _rowdots(X, X)
    if k < n:
        t = x[k:]
        s += float(np.dot(t, t))
    return s


def _sum32(x: np.ndarray) -> float:
    """Sum of a 1-D float32 array, as :func:`_sumsq` (dot products with ones)."""
    n = x.size
    k = n - n % _ROW
    s = _rowdots(x[:k].reshape(-1, _ROW), _ONES) if k else 0.0
    if k < n:
        s += float(np.add.reduce(x[k:], dtype=np.float64))
    return s


def _ok32(s: float, x: np.ndarray) -> bool:
    """Whether ``s``, the float32-computed sum of squares of ``x``, is as accurate as :func:`_sumsq` says.

    Not when it overflowed (or ``x`` holds NaN/inf), nor when squares underflowed: each square
    below 2**-126 loses up to 2**-126, so with ``s >= x.size * 2**-100`` the loss is at most 2**-26
    of ``s``; ``s == 0`` is exact only when ``x`` is all zeros.
    """
    if s >= x.size * 2.0**-100:
        return s < math.inf
    return s == 0.0 and not x.any()


def _abs_diff_array(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| with NaN == NaN and equal infinities as 0, a non-finite mismatch as inf."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
    d = np.where(same, 0.0, d)
    d[np.isnan(d)] = np.inf
    return d


class _Stats:
    """Streaming comparison of one tensor pair, fed with raw blocks in row-major order.

    Sub-blocks of :data:`_SUB` elements. When both dtypes are in :data:`_F32` (float32, bf16,
    fp16, fp8), sub-blocks of ``2 * _SUB`` elements are compared in float32 (:meth:`_diff32`,
    about half the time of float64): ``a - b`` rounded once to float32 (relative error at most
    2**-24 per element), sums of squares and of ``|a - b|`` by :func:`_sumsq` / :func:`_sum32`
    (float64 across rows), so ``rel_l2``, ``cosine`` and ``mean_abs_diff`` agree with a float64
    computation to about 1e-7 relative (tests hold them to 1e-6), while ``equal``,
    ``first_diff_index``, ``num_outside``, ``num_nonfinite`` and ``max_abs_diff`` are exactly
    the float64 ones. A sub-block with NaN/inf, float32 overflow (values or differences beyond
    ~1e19) or underflow (RMS below ~1e-15) takes the float64 path; so do other dtypes.
    """

    def __init__(self, dt_a: str | None, dt_b: str | None, atol: float, rtol: float) -> None:
        self.dt_a, self.dt_b = dt_a, dt_b
        self.atol, self.rtol = float(atol), float(rtol)
        self.same = dt_a == dt_b and _bits_dtype(dt_a) is not None
        self.bits = _bits_dtype(dt_a) if self.same else None
        self.complex = _is_complex(dt_a) or _is_complex(dt_b)
        self.f32 = dt_a in _F32 and dt_b in _F32
        self.sub = sub = 2 * _SUB if self.f32 else _SUB  # elements per sub-block
        # float32 sub-blocks: |a - b|, and a and b converted (a view of the raw block for float32)
        self.D32 = np.empty(sub if self.f32 else 0, np.float32)
        self.A32 = np.empty(sub if self.f32 and dt_a != "float32" else 0, np.uint32)
        self.B32 = np.empty(sub if self.f32 and dt_b != "float32" else 0, np.uint32)
        self.n = 0
        self.nonfinite = 0
        self.ssa = self.ssb = self.ssd = self.sad = 0.0
        self.mx = 0.0
        self.outside = 0
        self.first: int | None = None
        self.equal = True
        self.prefix_end = 0  # elements [0, prefix_end) were identical and their norms not computed
        self.A = np.empty(sub)  # (pages are touched only when used: by float64 sub-blocks)
        self.B = np.empty(sub)
        self.D = np.empty(sub)
        self.M = np.empty(sub, bool)
        self.S = np.empty(sub, np.uint32)

    # -- the kernel -------------------------------------------------------------------------
    def update(self, ra: np.ndarray, rb: np.ndarray, base: int) -> None:
        """Add a block: raw flat arrays of equal length whose first element has flat index ``base``."""
        ra = ra.reshape(-1)
        rb = rb.reshape(-1)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: found and handled in _nonfinite
            if self.complex:
                self._update_complex(ra, rb, base)
            else:
                self._update_real(ra, rb, base)

    def _update_real(self, ra: np.ndarray, rb: np.ndarray, base: int) -> None:
        n = ra.size
        ss, cp, sub, absf, cnz = _sumsq, _convert, np.subtract, np.abs, np.count_nonzero
        A0, B0, D0, M0, S = self.A, self.B, self.D, self.M, self.S
        dta, dtb, same, f32 = self.dt_a, self.dt_b, self.same, self.f32
        bits = self.bits  # not None exactly when same
        ua = ra.view(bits) if same and bits is not None else None
        ub = rb.view(bits) if same and bits is not None else None
        atol, rtol = self.atol, self.rtol
        ssa = ssb = ssd = sad = 0.0
        mx = self.mx
        outside = 0
        step = self.sub
        for i in range(0, n, step):
            j = min(n, i + step)
            m = j - i
            if m == step:
                A, B, D, M = A0, B0, D0, M0
            else:
                A, B, D, M = A0[:m], B0[:m], D0[:m], M0[:m]
            xa = ra[i:j]
            if same:
                sa, sb = ua[i:j], ub[i:j]  # type: ignore[index]
                eq = False
                if sa[0] == sb[0]:
                    np.equal(sa, sb, out=M)
                    eq = bool(M.all())
                if eq:
                    if self.equal:
                        # identical so far: the norms of this prefix are only needed if a later element
                        # differs (rel_l2, cosine); then _Comparer reads it again (norms_of_prefix)
                        self.nonfinite += self._count_nonfinite_raw(xa, M, S)
                        self.prefix_end = base + j
                    else:
                        if f32:
                            x32 = _convert32(xa, dta, self.A32)
                            s = _sumsq(x32)
                            if _ok32(s, x32):
                                ssa += s
                                ssb += s
                                continue
                        cp(xa, dta, A, S)
                        s = ss(A)
                        if not math.isfinite(s):
                            s = self._nonfinite_equal(A)
                        ssa += s
                        ssb += s
                    continue
                self.equal = False
                if self.first is None:
                    self.first = base + i + (int(np.argmin(M)) if sa[0] == sb[0] else 0)
            if f32:
                want_first = not same and self.first is None
                r = self._diff32(xa, rb[i:j], M, mx, want_first)
                if r is not None:
                    s_a, s_b, s_d, s_ad, dmax, k, off = r
                    ssa += s_a
                    ssb += s_b
                    ssd += s_d
                    sad += s_ad
                    if dmax > mx:
                        mx = dmax
                    outside += k
                    if off >= 0 and not same:
                        self.equal = False
                        if want_first:
                            self.first = base + i + off
                    continue
            cp(xa, dta, A, S)
            cp(rb[i:j], dtb, B, S)
            sub(A, B, out=D)
            s_a = ss(A)
            s_b = ss(B)
            s_d = ss(D)
            if not math.isfinite(s_a + s_b + s_d):
                s_a, s_b, s_d = self._nonfinite(A, B, D, M, base + i)
            ssa += s_a
            ssb += s_b
            ssd += s_d
            absf(D, out=D)
            dmax = float(D.max())
            if dmax > mx:
                mx = dmax
            sad += float(np.add.reduce(D))
            if dmax > 0:
                if rtol:
                    absf(B, out=A)
                    A *= rtol
                    A += atol
                    np.greater(D, A, out=M)
                    outside += int(cnz(M))
                elif atol:
                    np.greater(D, atol, out=M)
                    outside += int(cnz(M))
                else:
                    np.greater(D, 0.0, out=M)  # count_nonzero of a float array is slow
                    outside += int(cnz(M))
                if not same:
                    self.equal = False
                    if self.first is None or self.first >= base + i:  # (maybe set by _nonfinite just now)
                        cand = base + i + int(np.argmax(D > 0))
                        self.first = cand if self.first is None else min(self.first, cand)
        self.n += n
        self.ssa += ssa
        self.ssb += ssb
        self.ssd += ssd
        self.sad += sad
        self.mx = mx
        self.outside += outside

    def _diff32(self, xa: np.ndarray, xb: np.ndarray, M: np.ndarray, mx: float,
                want_first: bool) -> tuple[float, float, float, float, float, int, int] | None:  # fmt: skip
        """A sub-block compared in float32 (see the class docstring), or ``None``: redo it in float64.

        Returns the sums of squares of a, b and a - b, the sum of ``|a - b|``, the exact (float64)
        max ``|a - b|`` when it may exceed ``mx`` (else at most ``mx``), the count outside tolerance,
        and the offset of the first element whose value differs (-1: none; 0 if not ``want_first``).
        Changes nothing in ``self``.
        """
        a = _convert32(xa, self.dt_a, self.A32)
        b = _convert32(xb, self.dt_b, self.B32)
        m = a.size
        D, M = self.D32[:m], M[:m]
        np.subtract(a, b, out=D)  # exactly 0 only where a == b (subnormals are exact)
        s_a, s_b, s_d = _sumsq(a), _sumsq(b), _sumsq(D)
        if not (_ok32(s_a, a) and _ok32(s_b, b) and _ok32(s_d, D)):
            return None
        if s_d == 0.0:  # D all zeros (_ok32)
            return s_a, s_b, 0.0, 0.0, 0.0, 0, -1
        np.abs(D, out=D)
        d32 = float(np.maximum.reduce(D))
        sad = _sum32(D)
        # The exact |a - b| is at most d32 * (1 + 2**-24); and rounding is monotonic, so the
        # element with the largest exact |a - b| is among those with D == d32.
        dmax = self._max64(a, b, D, M, d32) if d32 * (1 + 2.0**-20) >= mx else 0.0
        atol, rtol = self.atol, self.rtol
        if not (atol or rtol):
            np.greater(D, 0.0, out=M)
            k = int(np.count_nonzero(M))
        elif d32 * (1 + 2.0**-20) <= atol:  # every |a - b| <= atol <= atol + rtol * |b|
            k = 0
        else:
            k = self._outside64(a, b, M)
        off = 0
        if want_first:
            np.greater(D, 0.0, out=M)
            off = int(np.argmax(M))
        return s_a, s_b, s_d, sad, dmax, k, off

    def _max64(self, a: np.ndarray, b: np.ndarray, D: np.ndarray, M: np.ndarray, d32: float) -> float:
        """Max of float64 ``|a - b|`` over the elements where the float32 ``D == d32``."""
        np.equal(D, d32, out=M)
        if int(np.count_nonzero(M)) > 64:  # many ties (a constant offset?): the whole sub-block
            m = a.size
            A, B = self.A[:m], self.B[:m]
            np.copyto(A, a)
            np.copyto(B, b)
            np.subtract(A, B, out=A)
            np.abs(A, out=A)
            return float(A.max())
        idx = np.flatnonzero(M)
        return float(np.abs(a[idx].astype(np.float64) - b[idx].astype(np.float64)).max())

    def _outside64(self, a: np.ndarray, b: np.ndarray, M: np.ndarray) -> int:
        """Count of ``|a - b| > atol + rtol * |b|``, computed in float64 as :meth:`_update_real` does."""
        m = a.size
        A, B, D = self.A[:m], self.B[:m], self.D[:m]
        np.copyto(A, a)
        np.copyto(B, b)
        np.subtract(A, B, out=D)
        np.abs(D, out=D)
        if self.rtol:
            np.abs(B, out=A)
            A *= self.rtol
            A += self.atol
            np.greater(D, A, out=M)
        else:
            np.greater(D, self.atol, out=M)
        return int(np.count_nonzero(M))

    def _count_nonfinite_raw(self, x: np.ndarray, M: np.ndarray, S: np.ndarray) -> int:
        """NaN/inf among raw elements ``x`` of dtype A (without converting them)."""
        dt = self.dt_a
        m = x.size
        if dt in ("float32", "float64", "float16"):
            np.isfinite(x, out=M[:m])
            return 0 if M[:m].all() else m - int(np.count_nonzero(M[:m]))
        if dt == "bfloat16":
            t = S.view(np.uint16)[:m]
            np.bitwise_and(x, 0x7F80, out=t)
            np.equal(t, 0x7F80, out=M[:m])
            return int(np.count_nonzero(M[:m]))
        if dt in _FP8:
            return int(np.count_nonzero(~np.isfinite(_fp8_table(dt)[x])))
        return 0

    def norms_of_prefix(self, x: np.ndarray) -> None:
        """Add the norms of raw elements of A that were identical and skipped (see ``prefix_end``)."""
        x = x.reshape(-1)
        s = 0.0
        step = self.sub
        for i in range(0, x.size, step):
            if self.f32:
                with np.errstate(invalid="ignore", over="ignore"):
                    x32 = _convert32(x[i : i + step], self.dt_a, self.A32)
                    v = _sumsq(x32)
                if _ok32(v, x32):
                    s += v
                    continue
            A = self.A[: min(step, x.size - i)]
            _convert(x[i : i + step], self.dt_a, A, self.S)
            v = _sumsq(A)
            if not math.isfinite(v):
                A[~np.isfinite(A)] = 0.0
                v = _sumsq(A)
            s += v
        self.ssa += s
        self.ssb += s

    def _nonfinite_equal(self, A: np.ndarray) -> float:
        bad = ~np.isfinite(A)
        self.nonfinite += int(np.count_nonzero(bad))
        A[bad] = 0.0
        return float(_dot(A, A))

    def _nonfinite(self, A: np.ndarray, B: np.ndarray, D: np.ndarray, M: np.ndarray,
                   base: int) -> tuple[float, float, float]:  # fmt: skip
        """Sub-block with NaN/inf: count them, count mismatches as outside, compare the finite pairs."""
        both = np.isfinite(A) & np.isfinite(B)
        nf = ~both
        k = int(np.count_nonzero(nf))
        if k:
            self.nonfinite += k
            with np.errstate(invalid="ignore"):
                same = (A == B) | (np.isnan(A) & np.isnan(B))
            mism = nf & ~same
            km = int(np.count_nonzero(mism))
            if km:
                self.outside += km
                self.equal = False
                if self.first is None or base + int(np.argmax(mism)) < self.first:
                    self.first = base + int(np.argmax(mism))
            A[nf] = 0.0
            B[nf] = 0.0
        np.subtract(A, B, out=D)
        return float(_dot(A, A)), float(_dot(B, B)), float(_dot(D, D))

    def _update_complex(self, ra: np.ndarray, rb: np.ndarray, base: int) -> None:
        a = _to_float64_array(ra, self.dt_a).astype(np.complex128)
        b = _to_float64_array(rb, self.dt_b).astype(np.complex128)
        fin = np.isfinite(a) & np.isfinite(b)
        with np.errstate(invalid="ignore"):
            same = (a == b) | (np.isnan(a) & np.isnan(b))
        if self.same:
            neq = ra.view(np.uint8).reshape(ra.size, -1) != rb.view(np.uint8).reshape(rb.size, -1)
            neq = neq.any(axis=1)
        else:
            neq = ~same
        if neq.any():
            self.equal = False
            if self.first is None:
                self.first = base + int(np.argmax(neq))
        nf = ~fin
        self.nonfinite += int(np.count_nonzero(nf))
        self.outside += int(np.count_nonzero(nf & ~same))
        a = np.where(fin, a, 0)
        b = np.where(fin, b, 0)
        d = np.abs(a - b)
        aa, bb = np.abs(a), np.abs(b)
        self.ssa += _dot(aa, aa)
        self.ssb += _dot(bb, bb)
        self.ssd += _dot(d, d)
        self.sad += float(d.sum())
        if d.size:
            self.mx = max(self.mx, float(d.max()))
        tol = self.atol + self.rtol * np.abs(b)
        self.outside += int(np.count_nonzero((d > tol) & fin))
        self.n += ra.size

    # -- results ------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        nfin = self.n - self.nonfinite
        ssa, ssb, ssd = self.ssa, self.ssb, self.ssd
        rel = math.sqrt(ssd) / math.sqrt(ssa) if ssa > 0 else 0.0 if ssd == 0 else math.inf
        if ssa == 0 and ssb == 0:
            cos = 1.0
        elif ssa == 0 or ssb == 0:
            cos = 0.0
        else:
            cos = max(-1.0, min(1.0, (ssa + ssb - ssd) / 2 / (math.sqrt(ssa) * math.sqrt(ssb))))
        if self.equal and self.outside == 0:
            rel, cos = 0.0, 1.0
        return {
            "equal": bool(self.equal),
            "numel": int(self.n),
            "max_abs_diff": float(self.mx) if nfin else math.nan,
            "mean_abs_diff": self.sad / nfin if nfin else math.nan,
            "rel_l2": float(rel),
            "cosine": float(cos),
            "num_outside": int(self.outside),
            "num_nonfinite": int(self.nonfinite),
        }


def _boxes(shape: Sequence[int], tile: Sequence[int], budget: int) -> Iterator[tuple[list[int], list[int]]]:
    """Tile-aligned boxes covering ``shape`` in row-major order, each of about ``budget`` elements at most.

    Trailing dims are covered whole while they fit; one dim is covered by as many tiles as fit;
    leading dims one tile at a time. With ``tile`` all ones every box is contiguous in row-major order.
    """
    import itertools

    nd = len(shape)
    if nd == 0:
        yield [], []
        return
    if 0 in shape:
        return
    group = [1] * nd  # tiles per box, per dim
    ntiles = [-(-int(s) // int(t)) for s, t in zip(shape, tile, strict=True)]
    inner = 1
    for d in range(nd - 1, -1, -1):
        if inner * int(shape[d]) <= budget:
            group[d] = ntiles[d]
            inner *= int(shape[d])
            continue
        group[d] = max(1, min(ntiles[d], budget // max(1, inner * int(tile[d]))))
        break
    ranges = []
    for d in range(nd):
        step = group[d] * int(tile[d])
        ranges.append([(a, min(int(shape[d]), a + step)) for a in range(0, int(shape[d]), step)])
    for combo in itertools.product(*ranges):
        yield [a for a, _ in combo], [b for _, b in combo]


# ============================================================================================
# the comparison
# ============================================================================================
@dataclass
class _Pair:
    fqn: str
    a: _Entry | None
    b: _Entry | None


def _plan(src_a: _Source, src_b: _Source, select: Any, rename: Any) -> list[_Pair]:
    """Match A's entries (renamed) with B's; apply ``select`` to either side's spelling."""
    ren = _renamer(rename)
    match = _matcher(select)
    a_entries = src_a.entries()
    b_entries = src_b.entries()
    b_by = {e.fqn: e for e in b_entries}
    pairs: list[_Pair] = []
    taken: dict[str, str] = {}
    for e in a_entries:
        new = ren(e.fqn)
        if new is None:
            continue
        new = str(new)
        if new in taken:
            raise ValueError(f"rename maps both {taken[new]!r} and {e.fqn!r} of A to {new!r}")
        taken[new] = e.fqn
        pairs.append(_Pair(new, e, b_by.get(new)))
    for e in b_entries:
        if e.fqn not in taken:
            pairs.append(_Pair(e.fqn, None, e))
    if match is not None:
        pairs = [p for p in pairs if match(p.fqn) or (p.a is not None and match(p.a.fqn))]
        if not pairs:
            raise KeyError(f"select={select!r} matches no entry of either checkpoint")
    return pairs


def _structural(p: _Pair, src_a: _Source, src_b: _Source) -> tuple[EntryDiff, bool]:
    """The row from metadata alone, and whether values must be read."""
    a, b = p.a, p.b
    if b is None:
        assert a is not None
        return EntryDiff(p.fqn, "only_in_a", a.kind, fqn_a=a.fqn, dtype_a=a.dtype,
                         shape_a=a.shape if a.kind == "tensor" else None,
                         chunks_a=a.num_chunks if a.kind == "tensor" else None), False  # fmt: skip
    if a is None:
        return EntryDiff(p.fqn, "only_in_b", b.kind, fqn_b=b.fqn, dtype_b=b.dtype,
                         shape_b=b.shape if b.kind == "tensor" else None,
                         chunks_b=b.num_chunks if b.kind == "tensor" else None), False  # fmt: skip
    # (Any: mypy checks **dict against every parameter of EntryDiff, not just these four)
    common: dict[str, Any] = dict(fqn_a=a.fqn, fqn_b=b.fqn, dtype_a=a.dtype, dtype_b=b.dtype)
    if a.kind != b.kind:
        return EntryDiff(p.fqn, "kind_changed", a.kind, **common,
                         shape_a=a.shape if a.kind == "tensor" else None,
                         shape_b=b.shape if b.kind == "tensor" else None), False  # fmt: skip
    if a.kind == "bytes":
        return EntryDiff(p.fqn, "not_compared", "bytes", **common), True
    dtype_changed = a.dtype != b.dtype
    row = EntryDiff(p.fqn, "not_compared", "tensor", **common, shape_a=a.shape, shape_b=b.shape,
                    chunks_a=a.num_chunks, chunks_b=b.num_chunks, dtype_changed=dtype_changed)  # fmt: skip
    if a.shape != b.shape:
        return _replace(row, status="shape_changed"), False
    layout = False
    if a.quant == b.quant:
        layout = _layout_differs(src_a.boxes(a.fqn), src_b.boxes(b.fqn))
    return _replace(row, layout_changed=bool(layout), numel=int(math.prod(a.shape))), True


def _layout_differs(ba: np.ndarray, bb: np.ndarray) -> bool:
    """Different chunk boxes, or (when both sides record saving ranks) different placement of them."""
    if ba.dtype == object or bb.dtype == object:
        if ba.dtype != object or bb.dtype != object:
            return True
        known = all(r[2] >= 0 for r in (*ba, *bb))
        ka = sorted({r if known else r[:2] for r in ba})
        kb = sorted({r if known else r[:2] for r in bb})
        return ka != kb
    if ba.shape[1:] != bb.shape[1:]:
        return True
    known = bool((ba[:, -1] >= 0).all() and (bb[:, -1] >= 0).all()) if ba.shape[1] else False
    if not known:  # a format without ranks on either side: compare the boxes alone
        ba = np.unique(ba[:, :-1], axis=0) if len(ba) else ba[:, :-1]
        bb = np.unique(bb[:, :-1], axis=0) if len(bb) else bb[:, :-1]
    return ba.shape != bb.shape or not np.array_equal(ba, bb)


def _replace(r: EntryDiff, **kw: Any) -> EntryDiff:
    d = {k: getattr(r, k) for k in _ROW_FIELDS}
    d.update(kw)
    return EntryDiff(**d)


def _obj_equal(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    try:
        r = x == y
        if isinstance(r, bool):
            return r
        if hasattr(r, "all"):
            return bool(r.all())
        return bool(r)
    except Exception:  # noqa: BLE001 - objects that cannot be compared: fall back to repr
        return repr(x) == repr(y)


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 1] + "…"


class _Buffers:
    """Reusable raw block buffers (two per side): allocation and page faults happen once."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int], np.ndarray] = {}

    def get(self, side: int, slot: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        n = int(math.prod(shape)) * dtype.itemsize
        buf = self._bufs.get((side, slot))
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 64), np.uint8)
            self._bufs[(side, slot)] = buf
        return buf[:n].view(dtype).reshape(tuple(shape))


#: A tensor pair as :class:`_Comparer` reads it: shape, raw dtypes of A and B, blocks (starts, stops).
_Layout = tuple[tuple[int, ...], np.dtype, np.dtype, list[tuple[list[int], list[int]]]]


class _Comparer:
    """Compares the values of tensor pairs and bytes entries; holds the buffers and the reader thread."""

    def __init__(self, src_a: _Source, src_b: _Source, atol: float, rtol: float, block_bytes: int,
                 fail_fast: bool) -> None:  # fmt: skip
        self.a, self.b = src_a, src_b
        self.atol, self.rtol = atol, rtol
        self.block_bytes = max(int(block_bytes), 1)
        self.fail_fast = fail_fast
        self.bufs = _Buffers()
        self._pool: Any = None
        # the next tensor's first block, read while the last block of the current one is compared:
        # (pair, its _layout, buffer slot, future)
        self._ahead: tuple[_Pair, _Layout, int, Any] | None = None

    def _drop_ahead(self) -> None:
        """Wait for a read-ahead and forget it (its buffer is about to be reused)."""
        if self._ahead is not None:
            fut = self._ahead[3]
            self._ahead = None
            fut.cancel()
            with contextlib.suppress(Exception):
                fut.result()

    def _layout(self, p: _Pair) -> _Layout:
        """Shape, raw dtypes of A and B, and the blocks of a tensor pair."""
        assert p.a is not None and p.b is not None
        rda, rdb = _raw_dtype(p.a.value_dtype), _raw_dtype(p.b.value_dtype)
        budget = max(1, self.block_bytes // max(rda.itemsize, rdb.itemsize))
        return p.a.shape, rda, rdb, list(_boxes(p.a.shape, (1,) * len(p.a.shape), budget))

    def _read(self, p: _Pair, rda: np.dtype, rdb: np.dtype, box: tuple[list[int], list[int]],
              slot: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Block ``box`` of both sides, into the buffers of ``slot``."""
        assert p.a is not None and p.b is not None
        starts, stops = box
        bshape = [b - a for a, b in zip(starts, stops, strict=True)]
        oa = self.bufs.get(0, slot, bshape, rda)
        ob = self.bufs.get(1, slot, bshape, rdb)
        return self.a.read(p.a, starts, stops, oa), self.b.read(p.b, starts, stops, ob)

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcpx-diff-read")
        return self._pool

    def compare(self, row: EntryDiff, p: _Pair, nxt: _Pair | None = None) -> EntryDiff:
        """Compare one entry; ``nxt``: the tensor pair compared next, whose first block may be read ahead."""
        try:
            if row.kind == "bytes":
                return self._bytes(row, p)
            return self._tensor(row, p, nxt)
        except Exception as ex:  # noqa: BLE001 - a scan collects problems; the row says what failed
            return _replace(row, status="error", detail=f"{type(ex).__name__}: {ex}")
        finally:
            for src, e in ((self.a, p.a), (self.b, p.b)):
                if e is not None:
                    src.done(e.fqn)

    def _bytes(self, row: EntryDiff, p: _Pair) -> EntryDiff:
        assert p.a is not None and p.b is not None
        x, y = self.a.obj(p.a.fqn), self.b.obj(p.b.fqn)
        if _obj_equal(x, y):
            return _replace(row, status="equal", equal=True)
        return _replace(row, status="different", equal=False, detail=f"{_short(x)} != {_short(y)}")

    def _tensor(self, row: EntryDiff, p: _Pair, nxt: _Pair | None = None) -> EntryDiff:
        ea, eb = p.a, p.b
        assert ea is not None and eb is not None
        fut = None
        slot0 = 0  # block k is read into the buffers of slot (slot0 + k) % 2
        if self._ahead is not None and self._ahead[0] is p:
            _p, lay, slot0, fut = self._ahead
            self._ahead = None
        else:
            self._drop_ahead()
            lay = self._layout(p)
        shape, rda, rdb, boxes = lay
        st = _Stats(ea.value_dtype, eb.value_dtype, self.atol, self.rtol)
        stopped = None
        # read the next tensor's first block while this one's last block is compared (not for small
        # blocks: a thread hand-off costs more than reading them)
        nlay = self._layout(nxt) if nxt is not None else None
        if nlay is not None:
            first_box = nlay[3][0] if nlay[3] else None
            if first_box is None or math.prod(b - a for a, b in zip(*first_box, strict=True)) < 1 << 18:
                nlay = None

        def read(k: int) -> tuple[np.ndarray, np.ndarray]:
            return self._read(p, rda, rdb, boxes[k], (slot0 + k) % 2)

        threaded = len(boxes) > 1 or fut is not None
        try:
            for k, (starts, _stops) in enumerate(boxes):
                if threaded:
                    if fut is None:
                        fut = self._executor().submit(read, k)
                    ra, rb = fut.result()
                    fut = self._executor().submit(read, k + 1) if k + 1 < len(boxes) else None
                else:
                    ra, rb = read(k)
                if k + 1 == len(boxes) and nlay is not None:
                    assert nxt is not None
                    s = (slot0 + k + 1) % 2
                    f = self._executor().submit(self._read, nxt, nlay[1], nlay[2], nlay[3][0], s)
                    self._ahead = (nxt, nlay, s, f)
                base = int(np.ravel_multi_index(starts, shape)) if shape else 0
                st.update(ra, rb, base)
                if self.fail_fast and st.outside and k + 1 < len(boxes):
                    stopped = base + ra.size
                    break
        finally:
            if fut is not None:  # a prefetch we no longer need: let it finish before its buffer is reused
                fut.cancel()
                with contextlib.suppress(Exception):
                    fut.result()
        if not st.equal and st.prefix_end:  # rel_l2 and cosine need the norms of the identical prefix too
            slot = 0
            if self._ahead is not None:  # one reading thread at a time: let the read-ahead finish first
                with contextlib.suppress(Exception):  # (the next tensor reports its error)
                    self._ahead[3].result()
                slot = 1 - self._ahead[2]
            for starts, stops in boxes:
                base = int(np.ravel_multi_index(starts, shape)) if shape else 0
                if base >= st.prefix_end:
                    break
                oa = self.bufs.get(0, slot, [b - a for a, b in zip(starts, stops, strict=True)], rda)
                ra = self.a.read(ea, starts, stops, oa).reshape(-1)
                st.norms_of_prefix(ra[: st.prefix_end - base])
        res = st.result()
        status = "equal" if res["equal"] else ("close" if res["num_outside"] == 0 else "different")
        first = None
        if st.first is not None and shape:
            first = tuple(int(i) for i in np.unravel_index(st.first, shape))
        elif st.first is not None:
            first = ()
        detail = None
        if stopped is not None:
            detail = f"fail_fast: stopped after {stopped:,} of {math.prod(shape):,} elements"
        return _replace(row, status=status, first_diff_index=first, detail=detail, **res)


def _assign(costs: Sequence[int], world: int) -> list[int]:
    """Owner rank of each work item: largest first, each to the least loaded rank (ties: lowest rank)."""
    owner = [0] * len(costs)
    load = [0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += max(1, costs[i])
    return owner


def _ignore_tuple(ignore: Any) -> tuple[str, ...]:
    if ignore is None:
        return ()
    ig = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    bad = [x for x in ig if x not in CHANGES]
    if bad:
        raise ValueError(f"ignore={bad!r}: not kinds of change; choose from {', '.join(CHANGES)}")
    return ig


def diff(
    a: Any,
    b: Any,
    *,
    select: Any = None,
    rename: Mapping[str, str | None] | Callable[[str], str | None] | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    ignore: Sequence[str] | str | None = ("layout",),
    fail_fast: bool = False,
    dequantize: bool = True,
    trusted: bool = False,
    block_bytes: int = 32 << 20,
    progress: bool | None = None,
) -> CheckpointDiff:
    """Compare two checkpoints: structure from metadata, then values block by block.

    Parameters
    ----------
    a, b
        Paths (DCP directories, safetensors files or directories, fsspec URLs, ``torch.save``
        files), opened :class:`~dcp_explorer.checkpoint.Checkpoint` objects, or in-memory
        (nested) state dicts. B is the reference for ``rtol``.
    select
        Compare only these entries: a name, a glob (``"model.*"``), ``"re:<regex>"``, a compiled
        regex, or a list of these; an entry is kept when its name in A or in B matches.
    rename
        Maps A's names to B's: a function (return ``None`` to leave an entry out), or a mapping of
        rules tried in order after an exact-name lookup: ``"re:<regex>"`` keys substitute
        (``{"re:^layers\\.(\\d+)\\.attention\\.wq": "model.layers.\\1.self_attn.q_proj"}``), other
        keys are prefixes (``{"model.": ""}``).
    atol, rtol
        An element is within tolerance when ``|a - b| <= atol + rtol * |b|`` (NaN matches NaN).
    ignore
        Kinds of change (:data:`CHANGES`) that do not make the checkpoints different: they are
        still reported. Default ``("layout",)``: a resharded checkpoint with the same values is
        equal. Add ``"dtype"`` to accept a cast whose values are within tolerance.
    fail_fast
        Stop at the first difference (a structural one before any data is read); the entries
        left are ``not_compared``.
    dequantize
        Compare FP8 block-scaled and MXFP4 weights as dequantized float32 (default), or their
        stored codes.
    trusted
        Decode bytes entries with ``torch.load(weights_only=False)`` (can run code from the file)
        instead of the restricted unpickler; objects the restricted unpickler refuses are
        compared by their stored bytes.
    block_bytes
        Largest block read per side at once; memory is about four such blocks.
    progress
        Show a progress bar over the tensors (default: when comparing more than 8 entries).

    Returns
    -------
    CheckpointDiff

    Raises
    ------
    NotACheckpointError, MetadataError
        A side cannot be opened.
    KeyError
        ``select`` matches nothing.
    ValueError
        ``rename`` maps two entries of A to one name, or ``ignore`` names an unknown change.

    Examples
    --------
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> d = dcp_explorer.diff(sample_path("llama_fsdp_ws4"), sample_path("llama_fsdp_ws2"), progress=False)
    >>> d.equal, len(d.table.query("status != 'equal'"))  # resharded: same values, another layout
    (True, 0)
    >>> dcp_explorer.diff(sample_path("llama_fsdp_ws1"), sample_path("hf_rank0"),  # DCP f32 vs HF bf16
    ...                   select="model.*", rename={"model.": ""}, rtol=2**-8,
    ...                   ignore=["layout", "dtype"], progress=False).equal
    True
    """
    res, _mine = _run(a, b, select=select, rename=rename, atol=atol, rtol=rtol, ignore=ignore,
                      fail_fast=fail_fast, dequantize=dequantize, trusted=trusted, block_bytes=block_bytes,
                      progress=progress, shard=None)  # fmt: skip
    return res


def _run(a: Any, b: Any, *, select: Any, rename: Any, atol: float, rtol: float, ignore: Any, fail_fast: bool,
         dequantize: bool, trusted: bool, block_bytes: int, progress: bool | None,
         shard: tuple[int, int] | None) -> tuple[CheckpointDiff, list[int]]:  # fmt: skip
    """:func:`diff`, comparing only this rank's share of the entries when ``shard=(rank, world)``.

    Returns the result (rows this rank did not compare keep their structural ``not_compared``
    state) and the indices of the rows this rank compared.
    """
    t0 = time.perf_counter()
    ign = _ignore_tuple(ignore)
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    own_a = not isinstance(a, _Source)
    own_b = not isinstance(b, _Source)
    src_a = _open_source(a, dequantize, trusted)
    try:
        src_b = _open_source(b, dequantize, trusted)
    except BaseException:
        if own_a:
            src_a.close()
        raise
    ren_opt = rename if rename is None or isinstance(rename, Mapping) else repr(rename)
    options = {"select": select, "rename": ren_opt, "dequantize": dequantize, "trusted": trusted,
               "block_bytes": block_bytes, "fail_fast": fail_fast}  # fmt: skip
    try:
        pairs = _plan(src_a, src_b, select, rename)
        rows: list[EntryDiff] = []
        work: list[int] = []
        for i, p in enumerate(pairs):
            row, needs = _structural(p, src_a, src_b)
            rows.append(row)
            if needs:
                work.append(i)
        rank, world = shard if shard is not None else (0, 1)
        todo = work
        if world > 1:
            costs = [
                max(p.a.nbytes if p.a else 0, p.b.nbytes if p.b else 0) for p in (pairs[i] for i in work)
            ]
            todo = [i for i, o in zip(work, _assign(costs, world), strict=True) if o == rank]
        ign_set = set(ign)
        stopped = bool(fail_fast and any(set(r.changes) - ign_set for r in rows))
        if stopped:
            todo = []
        show = progress if progress is not None else len(todo) > 8
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="diff", unit="tensor")
        comparer = _Comparer(src_a, src_b, atol, rtol, block_bytes, fail_fast)
        done: list[int] = []
        try:
            for t, i in enumerate(todo):
                if bar is not None:
                    bar.set_postfix_str(pairs[i].fqn[-48:], refresh=False)
                j = todo[t + 1] if t + 1 < len(todo) else None
                nxt = pairs[j] if j is not None and rows[j].kind == "tensor" else None
                rows[i] = comparer.compare(rows[i], pairs[i], nxt)
                done.append(i)
                if bar is not None:
                    bar.update(1)
                if fail_fast and set(rows[i].changes) - ign_set:
                    stopped = True
                    break
        finally:
            comparer.close()
            if bar is not None:
                bar.close()
        warnings = tuple(f"A: {w}" for w in src_a.warnings) + tuple(f"B: {w}" for w in src_b.warnings)
        result = CheckpointDiff(
            a=src_a.label, b=src_b.label, format_a=src_a.format, format_b=src_b.format,
            rows=tuple(rows), atol=float(atol), rtol=float(rtol), ignore=ign, stopped_early=stopped,
            seconds=time.perf_counter() - t0, bytes_read=src_a.bytes_read + src_b.bytes_read,
            world_size=world, warnings=warnings, options=options,
            _inputs=None if world > 1 else (src_a, src_b),
        )  # fmt: skip
        return result, done
    finally:
        if own_a:
            src_a.close()
        if own_b:
            src_b.close()


# ============================================================================================
# distributed: torchrun, or local gloo workers
# ============================================================================================
def _diff_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    rename: dict[str, Any] = {}
    if getattr(args, "rename_file", None):
        rename.update(json.loads(pathlib.Path(args.rename_file).read_text()))
    if getattr(args, "rename_json", None):
        rename.update(json.loads(args.rename_json))
    for r in args.rename or ():
        if "=" not in r:
            raise ValueError(f"--rename {r!r}: expected OLD=NEW (NEW may be empty)")
        old, new = r.split("=", 1)
        rename[old] = new
    ignore = list(args.ignore) if args.ignore is not None else ["layout"]
    return dict(select=args.select or None, rename=rename or None, atol=args.atol, rtol=args.rtol, ignore=ignore,
                fail_fast=args.fail_fast, dequantize=not args.raw,
                block_bytes=int(float(args.block_mib) * (1 << 20)))  # fmt: skip


def _torchrun(args: argparse.Namespace) -> CheckpointDiff | None:
    """One rank of a ``torchrun`` job: compare this rank's share; rank 0 gathers the rows.

    Every rank plans the whole comparison (metadata only) and compares the entries
    :func:`_assign` gives it; rank 0 puts the gathered rows into its own plan, so the report
    is the one a single process makes.
    """
    import torch
    import torch.distributed as dist

    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torchrun's group (env://), or that of the workers run_distributed started (rank 0's port file)
    with _procs.process_group(backend, timeout=float(args.timeout)):
        t0 = time.perf_counter()
        rank, world = dist.get_rank(), dist.get_world_size()
        part: CheckpointDiff | None = None
        try:
            part, done = _run(args.a, args.b, **_diff_kwargs(args), trusted=False, progress=False,
                              shard=(rank, world))  # fmt: skip
            payload: dict[str, Any] = {"rows": {i: _row_to_json(part.rows[i]) for i in done},
                                       "stopped": part.stopped_early, "bytes_read": part.bytes_read}  # fmt: skip
        except Exception as ex:  # noqa: BLE001 - reported by rank 0
            payload = {"error": f"rank {rank}: {type(ex).__name__}: {ex}"}
        out: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(payload, out, dst=0)
        if rank != 0:
            return None
        assert out is not None
        errs = [p["error"] for p in out if "error" in p]
        if errs or part is None:
            raise DcpExplorerError("; ".join(errs) or "rank 0 failed")
        rows = list(part.rows)
        for p in out:
            for i, r in p["rows"].items():
                rows[int(i)] = _row_from_json(r)
        return CheckpointDiff(
            a=part.a, b=part.b, format_a=part.format_a, format_b=part.format_b, rows=tuple(rows),
            atol=part.atol, rtol=part.rtol, ignore=part.ignore, stopped_early=any(p["stopped"] for p in out),
            seconds=time.perf_counter() - t0, bytes_read=sum(int(p["bytes_read"]) for p in out),
            world_size=world, warnings=part.warnings, options=part.options,
        )  # fmt: skip


def run_distributed(a: str | os.PathLike[str], b: str | os.PathLike[str], nproc: int = 2, *,
                    timeout: float = 300.0, **kwargs: Any) -> CheckpointDiff:  # fmt: skip
    """:func:`diff` split across ``nproc`` local worker processes (``gloo`` on 127.0.0.1).

    Each worker runs ``python -m dcp_explorer.diff A B`` with ``RANK``/``WORLD_SIZE`` set, as
    ``torchrun`` would; rank 0 gathers the rows. Keyword arguments are those of :func:`diff`
    that the command line takes: ``select`` (str or list of str), ``rename`` (a mapping of str),
    ``atol``, ``rtol``, ``ignore``, ``fail_fast``, ``dequantize``, ``block_bytes``.

    Returns
    -------
    CheckpointDiff
        The same rows a single-process :func:`diff` returns (``world_size == nproc``).

    Raises
    ------
    DcpExplorerError
        A worker failed or timed out (the message holds its log).
    """
    argv = [os.fspath(a), os.fspath(b)]
    sel = kwargs.pop("select", None)
    if sel is not None:
        argv += ["--select", *([sel] if isinstance(sel, str) else list(sel))]
    ren = kwargs.pop("rename", None)
    if ren:
        if not isinstance(ren, Mapping):
            raise TypeError("run_distributed takes rename as a mapping of strings (it goes through JSON)")
        argv += ["--rename-json", json.dumps(dict(ren))]
    argv += ["--atol", repr(float(kwargs.pop("atol", 0.0))), "--rtol", repr(float(kwargs.pop("rtol", 0.0)))]
    ig = kwargs.pop("ignore", ("layout",))
    argv += ["--ignore", *(_ignore_tuple(ig))]
    if kwargs.pop("fail_fast", False):
        argv.append("--fail-fast")
    if not kwargs.pop("dequantize", True):
        argv.append("--raw")
    argv += ["--block-mib", repr(kwargs.pop("block_bytes", 32 << 20) / (1 << 20))]
    if kwargs:
        raise TypeError(f"run_distributed: unsupported arguments {sorted(kwargs)}")
    # one attempt: the workers' store binds a port of the OS's choosing (dcp_explorer._procs), so
    # there is no port race to retry
    with tempfile.TemporaryDirectory(prefix="dcpx-diff-") as d:
        tmp = pathlib.Path(d)
        out = tmp / "result.json"
        args = ["-m", "dcp_explorer.diff", *argv, "--json", "--out", str(out), "--backend", "gloo"]
        workers = _procs.start([*args, "--timeout", str(timeout)], nproc, tmp)
        # exit status 1 is "different"; 2 (an error, or rows with errors) fails the run
        workers.wait(timeout, what=f"the {nproc} diff workers", error=DcpExplorerError, ok=(0, 1))
        if not out.exists():
            raise DcpExplorerError(
                f"the {nproc} diff workers exited but rank 0 wrote no result\n" + workers.tail(0)
            )
        return CheckpointDiff.from_dict(json.loads(out.read_text()))


# ============================================================================================
# command line
# ============================================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The diff options, shared by ``python -m dcp_explorer.diff`` and ``dcp-explorer diff``."""
    p.add_argument(
        "a", help="checkpoint A: DCP directory, safetensors file/directory, torch.save file, or URL"
    )
    p.add_argument("b", help="checkpoint B (the reference for --rtol)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance, relative to B (default 0)")
    p.add_argument(
        "--select", nargs="+", help="only these entries: names, globs or re:regex (either side's names)"
    )
    p.add_argument("--rename", nargs="+", help="map A's names to B's: OLD=NEW prefix rules or re:REGEX=REPL")
    p.add_argument(
        "--rename-file", help="JSON file with a mapping of rename rules (exact names, prefixes, re:...)"
    )
    p.add_argument("--rename-json", help=argparse.SUPPRESS)
    p.add_argument("--ignore", nargs="*", choices=CHANGES, default=None,
                   help="kinds of change that do not count as a difference (default: layout)")  # fmt: skip
    p.add_argument("--fail-fast", action="store_true", help="stop at the first difference")
    p.add_argument(
        "--raw", action="store_true", help="compare FP8/MXFP4 weights as stored codes, not dequantized"
    )
    p.add_argument("--block-mib", default="32", help="largest block read per side, MiB (default 32)")
    p.add_argument("--max-rows", type=int, default=50, help="changed entries listed in the text report")
    p.add_argument("--nproc", type=int, default=1, help="without torchrun: local worker processes (gloo)")
    p.add_argument("--out", help="also write the JSON result to this file (rank 0)")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "gloo", "nccl"], help="torchrun mode: backend"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the process group / workers")


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed command line; returns the exit status (0 equal, 1 different, 2 error)."""
    try:
        kwargs = _diff_kwargs(args)
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            res = _torchrun(args)
            if res is None:
                return 0
        elif args.nproc > 1:
            res = run_distributed(args.a, args.b, args.nproc, timeout=args.timeout, **kwargs)
        else:
            res = diff(args.a, args.b, **kwargs, progress=None)
    except Exception as ex:  # noqa: BLE001 - exit 2 on any error, as diff(1) does
        msg = ex.args[0] if isinstance(ex, KeyError) and ex.args else ex
        print(f"dcp-explorer diff: error: {msg}", file=sys.stderr)
        return 2
    if args.out:
        tmp = pathlib.Path(args.out + ".tmp")
        tmp.write_text(json.dumps(res.to_dict()))
        tmp.replace(args.out)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        print(res.report(max_rows=args.max_rows))
    if res.errors:
        return 2
    return 0 if res.equal else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dcp_explorer.diff A B``; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m dcp_explorer.diff",
                                description="Compare two checkpoints: structure, then values, streaming.")  # fmt: skip
    add_arguments(p)
    return run_cli(p.parse_args(argv))


class _CallableModule(types.ModuleType):
    """``dcp_explorer.diff`` is both this module and the function: importing the submodule
    replaces the package attribute ``diff`` with the module, so the module calls :func:`diff`."""

    def __call__(self, *args: Any, **kwargs: Any) -> CheckpointDiff:
        return diff(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
