"""Quantized weights: dequantization of any region, health checks, per-block statistics.

Two formats, paired as torch's ``QuantizedHuggingFaceStorageReader`` pairs them (through the
index's ``weight_map``; see :func:`dcp_explorer.readers.safetensors.detect_quantization`):

* **FP8 block-wise** (DeepSeek-V3): ``X.weight`` (float8_e4m3fn ``[R, C]``) with ``X.weight_scale_inv``
  (float32 ``[ceil(R/b0), ceil(C/b1)]``, block size from the scale's shape, 128 by default):
  ``out[i, j] = float32(W[i, j]) * scale_inv[i // b0, j // b1]`` (a multiply, despite the name; tail
  blocks clipped), then rounded to the target dtype -- exactly what torch's reader computes.
* **MXFP4** (gpt-oss): ``Y_blocks`` (uint8 ``[..., G, B]``, two E2M1 codes per byte, low nibble first)
  with ``Y_scales`` (uint8 ``[..., G]``, E8M0, bias 127): ``ldexp(FP4[code], scale - 127)`` (the exact
  value, rounded to the target dtype), reshaped to ``[..., G * B * 2]``.

Dequantization (:func:`dequantize_region`, what ``ckpt.load`` calls) reads only the blocks and
scales a region touches, slab by slab (bounded temporaries), on as many threads as torch's intra-op
setting allows (numpy kernels that release the GIL). It is vectorized: FP8 codes are looked up two
at a time in a 65,536-entry table of their float32 values (as torch converts them), then multiplied
by the block's scale -- one float32 rounding, as in torch; MXFP4 looks each (scale, byte) pair up
in a 65,536-entry table of the two exact results. Both are bit-identical to torch / the formula
(``tests/test_quant.py``).

Health and pictures:

* :func:`quant_table` (``ckpt.quant``): one row per quantized tensor -- shapes, bytes, scale
  statistics and problems found from the metadata and the scale tensors (cheap: never reads weights).
* :func:`quant_check` (``ckpt.quant_check()``): the same plus a scan of the weights, slab by slab with
  bounded memory (all-zero blocks, NaN codes, values that overflow the target dtype).
* :func:`block_stats`: per-block grids (scale, absmax, dynamic range, zeros, error vs a reference) and
  histograms of codes and values, for :mod:`dcp_explorer.viz_quant`.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DcpExplorerError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from .checkpoint import Checkpoint
    from .load import Loader
    from .model import CheckpointIndex

__all__ = [
    "FP4_VALUES",
    "PROBLEM_CODES",
    "QuantizationError",
    "QuantizationWarning",
    "BlockStats",
    "dequantize",
    "dequantize_region",
    "fp8_dequantize",
    "mxfp4_dequantize",
    "quant_table",
    "quant_check",
    "block_stats",
    "entry_problems",
]

#: E2M1 code -> value
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)  # fmt: skip

#: Largest finite magnitude of each code format.
CODE_MAX: dict[str, float] = {
    "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "float8_e4m3fnuz": 240.0, "float8_e5m2fnuz": 57344.0,
    "mxfp4": 6.0,
}  # fmt: skip

DEFAULT_BLOCK = 128
#: Values per slab when reading and dequantizing FP8 (bounds temporaries: ~9 bytes per value per thread).
SLAB_VALUES = 1 << 22
#: Values per slab for MXFP4 (the (scale, byte) index stays in cache: ~3 bytes per value per thread).
MX_SLAB_VALUES = 1 << 20
#: Values per piece of an FP8 slab looked up and scaled while in the core's cache (256 KiB of float32).
CACHE_VALUES = 1 << 16

#: problem code -> (severity, meaning). ``error``: values are wrong or cannot be computed;
#: ``warning``: suspicious, or torch's reader would decode differently.
PROBLEM_CODES: dict[str, tuple[str, str]] = {
    "missing_partner": ("error", "weight without its scale tensor, or scale without its weight"),
    "not_in_index": ("error", "pair present in the files but not in the index's weight_map: not dequantized"),
    "scale_shape": (
        "error",
        "scale shape inconsistent with the weight (no block size fits, or only non-square "
        "ones: a truncated scale?); not dequantized",
    ),
    "block_size": (
        "warning",
        "block size other than 128 (FP8) or 32 values (MXFP4): torch's reader assumes those",
    ),
    "unsupported": ("error", "layout torch's reader cannot dequantize (e.g. FP8 weight that is not 2-D)"),
    "weight_dtype": (
        "warning",
        "weight stored in an unexpected dtype (FP8 expects float8_e4m3fn, MXFP4 uint8)",
    ),
    "scale_dtype": ("warning", "scale stored in an unexpected dtype (FP8 expects float32, MXFP4 uint8)"),
    "scale_nan": ("error", "NaN scales (MXFP4: E8M0 byte 0xFF): their blocks decode to NaN/inf/huge values"),
    "scale_inf": ("error", "infinite scales: their blocks decode to inf/NaN"),
    "scale_zero": ("error", "zero scales (MXFP4: byte 0, 2**-127): their blocks decode to (almost) zero"),
    "scale_negative": ("warning", "negative scales: their blocks have flipped signs"),
    "zero_blocks": ("warning", "blocks whose dequantized values are all zero (quant_check)"),
    "nan_codes": ("error", "FP8 NaN codes in the weight (quant_check)"),
    "overflow": ("error", "finite codes and scales whose product overflows the target dtype (quant_check)"),
}
_FATAL = ("missing_partner", "not_in_index", "scale_shape", "unsupported")


class QuantizationError(DcpExplorerError, ValueError):
    """A quantized tensor cannot be dequantized (inconsistent scale shape, missing partner...)."""


class QuantizationWarning(UserWarning):
    """A quantized tensor was dequantized despite a suspicious layout (see ``ckpt.quant``)."""


# ----------------------------------------------------------------------------- dtypes and tables


def _torch_dtype(dtype: Any) -> torch.dtype:
    """``None`` / ``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> a torch dtype (None: float32)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"{dtype!r} is not a torch dtype")
    return dt


def _target(dtype: Any) -> torch.dtype:
    """The dtype dequantized values are produced in: ``dtype`` if floating, else float32 (cast later)."""
    import torch

    dt = _torch_dtype(dtype)
    return dt if dt.is_floating_point and dt.itemsize >= 2 else torch.float32


@functools.cache
def _code_lut(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 codes of a 1-byte float dtype, as torch converts them."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(getattr(torch, dtype)).to(torch.float32).numpy().copy()


def _e8m0_exact(scales: np.ndarray) -> np.ndarray:
    """float64 ``2 ** (s - 127)`` of E8M0 bytes (exact; 0xFF gives 2**128, as the formula decodes it)."""
    return np.ldexp(1.0, scales.astype(np.int32) - 127)


def e8m0_values(scales: np.ndarray) -> np.ndarray:
    """float64 scale values of E8M0 bytes: ``2 ** (s - 127)``, NaN for 0xFF (NaN in the OCP MX spec)."""
    v = _e8m0_exact(scales)
    v[np.asarray(scales) == 255] = np.nan
    return v


@functools.cache
def _mxfp4_table(dtype_name: str) -> tuple[np.ndarray, int]:
    """``(scale << 8 | byte)`` -> the two values (low nibble first) packed as one integer, and its itemsize.

    Each value is the exact ``FP4[code] * 2 ** (scale - 127)`` rounded once to the target dtype.
    """
    import torch

    s = np.repeat(np.arange(256), 256)
    b = np.tile(np.arange(256), 256)
    lo = np.ldexp(FP4_VALUES[b & 0x0F].astype(np.float64), s - 127)
    hi = np.ldexp(FP4_VALUES[b >> 4].astype(np.float64), s - 127)
    with np.errstate(over="ignore"):
        pair = np.stack([lo, hi], -1).astype(np.float32)  # exact, or +-inf past float32's range
    t = torch.from_numpy(pair).to(getattr(torch, dtype_name)).contiguous()
    isz = t.element_size() * 2
    packed = t.view(torch.uint8).numpy().reshape(65536, isz).copy().view({4: np.uint32, 8: np.uint64}[isz])
    return packed.reshape(65536), isz


def _empty(shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor and the numpy array owning its memory (numpy asks for huge pages on Linux)."""
    import torch

    isz = torch.empty(0, dtype=dtype).element_size()
    raw = np.empty(tuple(int(s) for s in shape), dtype=f"u{isz}")
    t = torch.from_numpy(raw) if raw.size else torch.empty(raw.shape, dtype=getattr(torch, f"uint{isz * 8}"))
    return t.view(dtype), raw


# ----------------------------------------------------------------------------- kernels on arrays


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of raw stored bits (``RAW_NUMPY`` layout) of torch dtype ``dtype``."""
    import torch

    if dtype == "float32":
        return raw.astype(np.float32, copy=False)
    if raw.size == 0:
        return np.zeros(raw.shape, np.float32)
    return torch.from_numpy(np.ascontiguousarray(raw)).view(getattr(torch, dtype)).to(torch.float32).numpy()


@functools.cache
def _code_pairs(dtype: str) -> np.ndarray:
    """uint64 per 16-bit pair of codes (low byte first): the two float32 values, as torch converts them."""
    lut = _code_lut(dtype)
    v = np.arange(65536)
    return np.stack([lut[v & 0xFF], lut[v >> 8]], -1).astype(np.float32).view(np.uint64).reshape(65536)


def _workers(n_tasks: int) -> int:
    """Threads for ``n_tasks`` slabs: torch's intra-op thread count (the user's choice), at most the cores."""
    import os

    import torch

    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, n_tasks))


def _run_parallel(tasks: Sequence[Any], work: Any, make_state: Any, loader: Loader | None = None) -> None:
    """``work(task, state, loader)`` for every task, on :func:`_workers` threads, each with its own
    ``make_state()`` and (when ``loader`` is given) its own :class:`~dcp_explorer.load.Loader` of the same
    checkpoint, so that reads proceed in parallel; their byte counts are added to ``loader.stats``.

    The kernels are numpy calls that release the GIL (``take``, ``multiply``, file reads): plain threads
    use the cores without OpenMP's barriers, which stall when other processes compete for the cores.
    """
    n = _workers(len(tasks))
    if n <= 1:
        st = make_state()
        for t in tasks:
            work(t, st, loader)
        return
    import threading
    from concurrent.futures import ThreadPoolExecutor

    loaders: list[Any] = [None] * n
    queue = iter(tasks)  # dynamic: a thread the OS preempts takes fewer slabs
    lock = threading.Lock()

    def run(i: int) -> None:
        st = make_state()
        ldr = None
        if loader is not None:
            ldr = loaders[i] = type(loader)(loader.ckpt)
        while True:
            with lock:
                t = next(queue, None)
            if t is None:
                return
            work(t, st, ldr)

    try:
        with ThreadPoolExecutor(n, thread_name_prefix="dcpx-dequant") as ex:
            for f in [ex.submit(run, i) for i in range(n)]:
                f.result()
    finally:
        for ldr in loaders:
            if ldr is not None and loader is not None:
                ldr.close()
                _merge_stats(loader.stats, ldr.stats)


def _merge_stats(into: Any, other: Any) -> None:
    into.bytes_read += other.bytes_read
    into.requests += other.requests
    into.items_opened += other.items_opened
    for k, v in other.by_file.items():
        into.by_file[k] = into.by_file.get(k, 0) + v


@functools.cache
def _kernels() -> Any:
    """The optional compiled kernels (``_kernels.c``), or None where they were not built."""
    try:
        from . import _kernels as k
    except ImportError:
        return None
    return k


def _fp8_lookup(flat: np.ndarray, out: np.ndarray, stored: str) -> None:
    """float32 values of the 1-byte codes ``flat`` into ``out`` (both 1-D, same length), two codes
    per lookup where ``out`` is 8-byte aligned."""
    lut = _code_lut(stored)
    head = (out.ctypes.data % 8) // 4 if out.ctypes.data % 4 == 0 else -1
    if head < 0 or flat.size < 2:  # unaligned float32 memory: one code at a time
        np.take(lut, flat, out=out, mode="clip")
        return
    if head:
        out[0] = lut[flat[0]]
    m = (flat.size - head) & ~1
    np.take(_code_pairs(stored), flat[head : head + m].view(np.uint16), out=out[head : head + m].view(np.uint64),
            mode="clip")  # fmt: skip
    if head + m < flat.size:
        out[head + m :] = lut[flat[head + m :]]


def _fp8_rows(codes: np.ndarray, scol: np.ndarray, dst: np.ndarray, stored: str) -> None:
    """Dequantize rows of whole block-rows (or of part of one) into float32 ``dst`` (numpy, GIL released).

    ``codes`` [n, w] raw stored bits; ``scol`` [k, w] float32 scale per (block-row, column), ``n`` rows
    being ``k`` block-rows of ``n // k`` rows. ``dst[i, j] = float32(code) * scale``: the code's float32
    value is looked up (two codes at a time), then multiplied -- one rounding, as in torch. Both steps
    run on pieces of :data:`CACHE_VALUES` values, so that the product is taken while the looked-up
    values are still in the core's cache (one pass over ``dst`` in memory instead of three).
    """
    import torch

    n, w = codes.shape
    k = scol.shape[0]
    per = n // k  # rows per block-row
    lookup = codes.dtype.itemsize == 1 and stored.startswith("float8")
    kern = _kernels()
    if lookup and kern is not None and n and w and dst.flags.c_contiguous and dst.dtype == np.float32:
        # one pass: look-up and multiply per value (same float32 product, same bits)
        kern.fp8_rows(
            np.ascontiguousarray(codes), _code_lut(stored), np.ascontiguousarray(scol), dst, n, w, per
        )
        return
    if not lookup:  # 2-byte / 4-byte weights paired with a scale: torch's conversion
        dt = getattr(torch, stored)
        t = torch.from_numpy(codes)
        torch.from_numpy(dst).copy_(t.view(dt) if t.dtype != dt else t)
    step = max(1, min(per, CACHE_VALUES // max(w, 1)))
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):  # inf / NaN results are the data's
        for i in range(k):
            srow = scol[i]
            for a in range(i * per, (i + 1) * per, step):
                e = min(a + step, (i + 1) * per)
                piece = dst[a:e]
                if lookup:
                    _fp8_lookup(codes[a:e].reshape(-1), piece.reshape(-1), stored)
                np.multiply(piece, srow, out=piece)


def fp8_dequantize(codes: np.ndarray, scale: np.ndarray, row0: int = 0, col0: int = 0,
                   block: Sequence[int] = (DEFAULT_BLOCK, DEFAULT_BLOCK), *, stored_dtype: str = "float8_e4m3fn",
                   dtype: Any = None) -> torch.Tensor:  # fmt: skip
    """Dequantize an FP8 block-scaled region held in memory.

    Parameters
    ----------
    codes
        Raw stored bits of the region ``W[row0:row0+r, col0:col0+c]`` (uint8 for FP8), ``[r, c]``.
    scale
        The scales of the blocks the region touches: ``scale[i // b0 - row0 // b0, j // b1 - col0 // b1]``
        (float32, or any float: converted to float32 as torch does).
    row0, col0
        Global index of the region's first element.
    block
        Block size per dim.
    stored_dtype
        torch dtype name of ``codes``.
    dtype
        Target dtype (default float32; ``bfloat16`` rounds the float32 product once, as torch does).

    Returns
    -------
    torch.Tensor
        ``[r, c]`` in ``dtype``.
    """
    codes = np.ascontiguousarray(codes)
    scale = np.asarray(scale, dtype=np.float32)
    r, c = codes.shape
    b0, b1 = int(block[0]), int(block[1])
    colidx = (np.arange(col0, col0 + c) // b1) - col0 // b1
    return _fp8_slabs(lambda a, e, buf, ldr: codes[a - row0 : e - row0], scale, row0, row0 + r, col0, c, (b0, b1),
                      colidx, stored_dtype, _target(dtype), None)  # fmt: skip


def _fp8_slabs(get_codes: Any, scale: np.ndarray, r0: int, r1: int, c0: int, w: int, block: tuple[int, int],
               colidx: np.ndarray, stored: str, tdt: torch.dtype, raw_dtype: Any,
               loader: Loader | None = None) -> torch.Tensor:  # fmt: skip
    """Rows ``[r0, r1)`` x ``w`` columns of an FP8 region, slab by slab on :func:`_workers` threads.

    ``get_codes(a, e, buf, loader)`` returns the codes of rows ``[a, e)`` (reading them into ``buf`` with
    ``loader`` when they are given); ``scale`` holds the scales from block-row ``r0 // b0`` and the
    region's first block column on.
    """
    import torch

    out, raw = _empty((r1 - r0, w), tdt)
    if r1 <= r0 or w <= 0:
        return out
    b0 = block[0]
    rb0 = r0 // b0
    max_rows = max(1, SLAB_VALUES // w)
    slabs = list(_row_slabs(r0, r1, b0, max_rows))
    nmax = max(e - a for a, e in slabs)
    direct = tdt == torch.float32

    def state() -> tuple[np.ndarray | None, np.ndarray | None]:
        buf = np.empty(nmax * w, raw_dtype) if raw_dtype is not None else None
        return buf, (None if direct else np.empty(nmax * w, np.float32))

    def work(slab: tuple[int, int], st: tuple[np.ndarray | None, np.ndarray | None], ldr: Any) -> None:
        a, e = slab
        n = e - a
        buf, tmp = st
        codes = get_codes(a, e, None if buf is None else buf[: n * w].reshape(n, w), ldr)
        ra, rb = a // b0 - rb0, (e - 1) // b0 + 1 - rb0
        scol = np.ascontiguousarray(scale[ra:rb][:, colidx])
        if direct:
            _fp8_rows(codes, scol, raw[a - r0 : e - r0].view(np.float32), stored)
        else:
            t = tmp[: n * w].reshape(n, w)  # type: ignore[index]
            _fp8_rows(codes, scol, t, stored)
            out[a - r0 : e - r0].copy_(torch.from_numpy(t))

    _run_parallel(slabs, work, state, loader)
    return out


def _mxfp4_into(blocks: np.ndarray, scales: np.ndarray, out: np.ndarray, dtype_name: str) -> None:
    """Write the values of ``blocks [..., G, B]`` / ``scales [..., G]`` into contiguous ``out [..., G*B*2]``."""
    table, _isz = _mxfp4_table(dtype_name)
    if not out.flags.c_contiguous or out.ctypes.data % table.dtype.itemsize:
        tmp = np.empty(out.shape, out.dtype)
        _mxfp4_into(blocks, scales, tmp, dtype_name)
        out[...] = tmp
        return
    kern = _kernels()
    if kern is not None and blocks.size and scales.size * blocks.shape[-1] == blocks.size:
        width = blocks.shape[-1]
        kern.mxfp4_pairs(np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(scales, np.uint8), table,
                         out, blocks.size // width, width)  # fmt: skip
        return
    idx = np.left_shift(scales.astype(np.uint16), 8)[..., None] | blocks
    np.take(table, idx, out=out.view(table.dtype).reshape(idx.shape), mode="clip")


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray, *, dtype: Any = None) -> torch.Tensor:
    """Values ``[..., G * B * 2]`` from uint8 ``blocks [..., G, B]`` and E8M0 ``scales [..., G]``.

    Each value is ``ldexp(FP4_VALUES[code], scale - 127)`` (low nibble first), rounded once to ``dtype``
    (float32 by default).

    Raises
    ------
    QuantizationError
        ``scales.shape != blocks.shape[:-1]``.
    """
    import torch

    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    scales = np.ascontiguousarray(scales, dtype=np.uint8)
    if blocks.ndim < 2 or scales.shape != blocks.shape[:-1]:
        raise QuantizationError(f"MXFP4 scales of shape {list(scales.shape)} do not match blocks of shape "
                                f"{list(blocks.shape)}: expected {list(blocks.shape[:-1])}")  # fmt: skip
    tdt = _target(dtype)
    shape = (*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2)
    if tdt not in (torch.float32, torch.bfloat16, torch.float16):
        return mxfp4_dequantize(blocks, scales).to(tdt)
    out, raw = _empty(shape, tdt)
    if not raw.size:
        return out
    rows = raw.reshape(-1, shape[-1])
    b2 = blocks.reshape(-1, *blocks.shape[-2:])
    s2 = scales.reshape(-1, scales.shape[-1])
    step = max(1, MX_SLAB_VALUES // max(1, shape[-1]))
    tasks = [(i, min(i + step, rows.shape[0])) for i in range(0, rows.shape[0], step)]
    name = str(tdt).removeprefix("torch.")
    _run_parallel(tasks, lambda t, _st, _ldr: _mxfp4_into(b2[t[0] : t[1]], s2[t[0] : t[1]], rows[t[0] : t[1]], name),
                  lambda: None)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- regions of a checkpoint


def _row_slabs(r0: int, r1: int, b0: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """Row ranges covering ``[r0, r1)``: whole block-rows grouped (up to ``max_rows`` rows), else rows of
    one block-row (a partial one at either end, or pieces of a block-row taller than ``max_rows``)."""
    max_rows = max(1, max_rows)
    a = r0
    while a < r1:
        if a % b0 == 0 and r1 - a >= b0 and max_rows >= b0:
            e = a + min(max_rows // b0, (r1 - a) // b0) * b0
        else:
            e = min((a // b0 + 1) * b0, r1, a + max_rows)
        yield a, e
        a = e


def _lead_boxes(
    a: Sequence[int], b: Sequence[int], max_rows: int
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes covering the leading-dims box ``[a, b)``, each of at most ``max_rows`` rows (>= 1) and
    contiguous in a C-ordered array of that box's shape (one index on the outer dims, a range on one dim,
    whole inner dims)."""
    sizes = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    nd = len(sizes)
    if nd == 0:
        yield (), ()
        return
    if 0 in sizes:
        return
    d = 0
    while d < nd - 1 and math.prod(sizes[d + 1 :]) > max_rows:
        d += 1
    step = max(1, max_rows // max(1, math.prod(sizes[d + 1 :])))
    for outer in itertools.product(*[range(int(x), int(y)) for x, y in zip(a[:d], b[:d], strict=True)]):
        for s in range(int(a[d]), int(b[d]), step):
            e = min(int(b[d]), s + step)
            yield (*outer, s, *map(int, a[d + 1 :])), (*(o + 1 for o in outer), e, *map(int, b[d + 1 :]))


@dataclass(frozen=True, slots=True)
class _Entry:
    """What dequantization needs about one quantized tensor (from the index)."""

    fqn: str
    format: str
    partner: str
    stored_shape: tuple[int, ...]
    stored_dtype: str
    logical_shape: tuple[int, ...]
    block: tuple[int, ...] | None
    """FP8: block size per dim (None: none fits); MXFP4: (bytes per group,)."""
    scale_shape: tuple[int, ...] | None
    scale_dtype: str | None


def _entry(index: CheckpointIndex, e: int) -> _Entry:
    q = index.quant[e]
    partner = q["partner"]
    try:
        p = index.entry_index(partner)
        sshape, sdt = tuple(index.shapes[p]), index.dtypes[p]
    except KeyError:
        sshape, sdt = None, None
    stored = tuple(q["stored_shape"])
    block: tuple[int, ...] | None
    if q["format"] == "mxfp4":
        block = (stored[-1],) if stored else None
    else:
        bs = q.get("block_size")
        block = tuple(int(x) for x in bs) if bs else None
    return _Entry(index.fqns[e], q["format"], partner, stored, q.get("stored_dtype") or "uint8",
                  tuple(q["logical_shape"]), block, sshape, sdt)  # fmt: skip


def entry_problems(index: CheckpointIndex, e: int) -> list[tuple[str, str]]:
    """Problems of quantized entry ``e`` visible in the metadata alone, as ``(code, message)`` pairs."""
    x = _entry(index, e)
    out: list[tuple[str, str]] = []
    if x.scale_shape is None:
        return [("missing_partner", f"the index pairs it with {x.partner}, which no file holds")]
    if x.format == "fp8_block":
        if len(x.stored_shape) != 2:
            out.append(("unsupported", f"FP8 weight of {len(x.stored_shape)} dims {list(x.stored_shape)}: "
                                       "torch's reader dequantizes only 2-D weights"))  # fmt: skip
        expect = [-(-d // DEFAULT_BLOCK) for d in x.stored_shape]
        if x.block is None:
            out.append(("scale_shape", f"scale {list(x.scale_shape)} fits no block size for weight "
                                       f"{list(x.stored_shape)} (128x128 blocks need scale {expect})"))  # fmt: skip
        elif len(set(x.block)) > 1:
            out.append(("scale_shape", f"scale {list(x.scale_shape)} implies non-square blocks "
                                       f"{'x'.join(map(str, x.block))} for weight {list(x.stored_shape)} (128x128 "
                                       f"blocks need scale {expect}): truncated or mismatched scale?"))  # fmt: skip
        elif x.block[0] != DEFAULT_BLOCK:
            out.append(("block_size", f"scale {list(x.scale_shape)} implies {x.block[0]}x{x.block[0]} blocks; torch's "
                                      f"QuantizedHuggingFaceStorageReader assumes block_size=128 unless given "
                                      f"block_size={x.block[0]}"))  # fmt: skip
        if x.stored_dtype != "float8_e4m3fn":
            out.append(
                ("weight_dtype", f"weight is {x.stored_dtype}, expected float8_e4m3fn (multiplied as is)")
            )
        if x.scale_dtype not in ("float32", "bfloat16", "float16", "float64"):
            out.append(("scale_dtype", f"scale is {x.scale_dtype}, expected float32"))
    else:
        if len(x.stored_shape) < 2 or x.scale_shape != x.stored_shape[:-1]:
            out.append(("scale_shape", f"scales {list(x.scale_shape)} do not match blocks {list(x.stored_shape)}: "
                                       f"expected {list(x.stored_shape[:-1])}"))  # fmt: skip
        elif x.stored_shape[-1] * 2 != 32:
            out.append(("block_size", f"groups of {x.stored_shape[-1] * 2} values; MX blocks hold 32"))
        if x.stored_dtype != "uint8":
            out.append(("weight_dtype", f"blocks are {x.stored_dtype}, expected uint8"))
        if x.scale_dtype != "uint8":
            out.append(("scale_dtype", f"scales are {x.scale_dtype}, expected uint8 (E8M0)"))
            if x.scale_dtype not in ("uint8", "int8"):
                out.append(("unsupported", f"scales of dtype {x.scale_dtype} cannot be read as E8M0 bytes"))
    return out


_WARNED: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def _check_decodable(loader: Loader, e: int) -> _Entry:
    """The entry, if it can be dequantized; warns (once per checkpoint and tensor) about suspicious layouts."""
    idx = loader.index
    x = _entry(idx, e)
    probs = entry_problems(idx, e)
    fatal = [m for c, m in probs if c in _FATAL]
    if fatal:
        raise QuantizationError(f"{x.fqn!r} cannot be dequantized: {'; '.join(fatal)}. Load the stored tensors "
                                "with dequantize=False, and see ckpt.quant", path=loader.ckpt.path)  # fmt: skip
    if probs:
        seen = _WARNED.setdefault(loader, set())
        if e not in seen:
            seen.add(e)
            warnings.warn(QuantizationWarning(f"{x.fqn}: {'; '.join(m for _, m in probs)} (see ckpt.quant)"),
                          stacklevel=4)  # fmt: skip
    return x


def dequantize_region(loader: Loader, e: int, starts: Sequence[int], stops: Sequence[int], *,
                      dtype: Any = None) -> torch.Tensor:  # fmt: skip
    """Dequantized values of the logical region ``[starts, stops)`` of quantized entry ``e``.

    Only the blocks and scales the region touches are read, slab by slab (at most
    :data:`SLAB_VALUES` values of temporaries).

    Parameters
    ----------
    loader
        The checkpoint's :class:`~dcp_explorer.load.Loader`.
    e
        Entry index (a key of ``index.quant``).
    starts, stops
        The region, in logical (dequantized) coordinates.
    dtype
        Target dtype: float32 (default), bfloat16, float16 (each value rounded once from the exact
        product); any other floating dtype is computed in float32 and cast; non-floating ones give float32.

    Raises
    ------
    QuantizationError
        The pair is inconsistent (see :data:`PROBLEM_CODES`); load with ``dequantize=False``.
    """
    x = _check_decodable(loader, e)
    tdt = _target(dtype)
    starts = [int(s) for s in starts]
    stops = [int(s) for s in stops]
    if x.format == "fp8_block":
        return _fp8_region(loader, x, starts, stops, tdt)
    if x.format == "mxfp4":
        return _mxfp4_region(loader, x, starts, stops, tdt)
    raise QuantizationError(f"unknown quantization {x.format!r} of {x.fqn!r}")


def _read_scales(loader: Loader, x: _Entry, starts: Sequence[int], stops: Sequence[int]) -> np.ndarray:
    raw = loader.read_region(x.partner, starts, stops)
    if x.format == "mxfp4":
        return raw.view(np.uint8) if raw.dtype.itemsize == 1 else raw.astype(np.uint8)
    return _to_float32(raw, x.scale_dtype or "float32")


def _fp8_region(
    loader: Loader, x: _Entry, starts: list[int], stops: list[int], tdt: torch.dtype
) -> torch.Tensor:
    from .load import RAW_NUMPY

    (r0, c0), (r1, c1) = starts, stops
    if r1 <= r0 or c1 <= c0:
        return _empty((r1 - r0, c1 - c0), tdt)[0]
    b0, b1 = x.block  # type: ignore[misc]
    rb0, cb0 = r0 // b0, c0 // b1
    scale = _read_scales(loader, x, [rb0, cb0], [(r1 - 1) // b0 + 1, (c1 - 1) // b1 + 1])
    colidx = (np.arange(c0, c1) // b1) - cb0

    def get_codes(a: int, e: int, buf: np.ndarray, ldr: Loader) -> np.ndarray:
        return ldr.read_region(x.fqn, [a, c0], [e, c1], out=buf)

    raw_dt = np.dtype(RAW_NUMPY.get(x.stored_dtype, "u1"))
    return _fp8_slabs(
        get_codes, scale, r0, r1, c0, c1 - c0, (b0, b1), colidx, x.stored_dtype, tdt, raw_dt, loader
    )


def _mxfp4_region(
    loader: Loader, x: _Entry, starts: list[int], stops: list[int], tdt: torch.dtype
) -> torch.Tensor:
    import torch

    nb = x.stored_shape[-1]
    per = nb * 2
    shape = [b - a for a, b in zip(starts, stops, strict=True)]
    out, raw = _empty(shape, tdt)
    if 0 in shape:
        return out
    l0, l1 = starts[-1], stops[-1]
    g0, g1 = l0 // per, (l1 - 1) // per + 1
    aligned = l0 == g0 * per and l1 == g1 * per
    direct = tdt in (torch.float32, torch.bfloat16, torch.float16)
    name = str(tdt).removeprefix("torch.") if direct else "float32"
    lead_a, lead_b = starts[:-1], stops[:-1]
    boxes = list(_lead_boxes(lead_a, lead_b, max(1, MX_SLAB_VALUES // ((g1 - g0) * per))))

    def work(box: tuple[tuple[int, ...], tuple[int, ...]], _st: None, ldr: Loader) -> None:
        ba, bb = box
        blocks = ldr.read_region(x.fqn, [*ba, g0, 0], [*bb, g1, nb]).view(np.uint8)
        scales = _read_scales(ldr, x, [*ba, g0], [*bb, g1])
        sel = tuple(slice(p - q, r - q) for p, r, q in zip(ba, bb, lead_a, strict=True))
        if aligned and direct:
            _mxfp4_into(blocks, scales, raw[sel], name)
            return
        vdt = tdt if direct else torch.float32
        tmp, traw = _empty((*blocks.shape[:-2], blocks.shape[-2] * per), vdt)
        _mxfp4_into(blocks, scales, traw, name)
        a = l0 - g0 * per
        out[sel] = tmp[..., a : a + (l1 - l0)].to(tdt)

    _run_parallel(boxes, work, lambda: None, loader)
    return out


def dequantize(ckpt: Checkpoint, fqn: str, slices: Any = None, *, dtype: Any = None) -> torch.Tensor:
    """Dequantized ``fqn`` (or a slice of it); the same as ``ckpt.load(fqn, slices=..., dtype=...)``.

    Raises
    ------
    KeyError
        ``fqn`` is not a quantized tensor of the checkpoint.
    """
    e = ckpt.index.entry_index(fqn)
    if e not in ckpt.index.quant:
        raise KeyError(f"{fqn!r} is not a quantized tensor of {ckpt.path} (see ckpt.quant)")
    return ckpt.load(fqn, slices=slices, dtype=dtype)


def describe(q: dict[str, Any]) -> str:
    """One line about a quantized entry's description."""
    return f"{q['format']} stored {list(q['stored_shape'])} {q.get('stored_dtype')} -> logical {list(q['logical_shape'])}"


# ----------------------------------------------------------------------------- scale statistics (cheap)


def _scale_stats(loader: Loader, x: _Entry) -> dict[str, Any]:
    """min / max / counts of the scale tensor, read in slabs."""
    shape = x.scale_shape or ()
    out: dict[str, Any] = dict(scale_min=np.nan, scale_max=np.nan, scale_zero=0, scale_nan=0, scale_inf=0,
                               scale_subnormal=0, scale_negative=0)  # fmt: skip
    if not shape or 0 in shape:
        return out
    inner = math.prod(shape[1:])
    step = max(1, SLAB_VALUES // max(1, inner))
    tiny = float(np.finfo(np.float32).tiny)
    if x.format == "mxfp4":
        counts = np.zeros(256, np.int64)
        for a in range(0, shape[0], step):
            raw = loader.read_region(
                x.partner, [a, *[0] * (len(shape) - 1)], [min(shape[0], a + step), *shape[1:]]
            )
            counts += np.bincount(raw.view(np.uint8).reshape(-1), minlength=256)
        present = np.flatnonzero(counts[:255])
        if present.size:
            out["scale_min"] = math.ldexp(1.0, int(present[0]) - 127)
            out["scale_max"] = math.ldexp(1.0, int(present[-1]) - 127)
        out.update(scale_zero=int(counts[0]), scale_nan=int(counts[255]), scale_subnormal=int(counts[0]))
        return out
    lo, hi = np.inf, -np.inf
    for a in range(0, shape[0], step):
        s = _read_scales(loader, x, [a, *[0] * (len(shape) - 1)], [min(shape[0], a + step), *shape[1:]])
        fin = np.isfinite(s)
        f = s[fin]
        if f.size:
            lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
        out["scale_nan"] += int(np.isnan(s).sum())
        out["scale_inf"] += int(np.isinf(s).sum())
        out["scale_zero"] += int((s == 0).sum())
        out["scale_negative"] += int((s < 0).sum())
        out["scale_subnormal"] += int(((f != 0) & (np.abs(f) < tiny)).sum())
    if lo <= hi:
        out["scale_min"], out["scale_max"] = lo, hi
    return out


_SCALE_PROBLEMS = (("scale_nan", "NaN"), ("scale_inf", "infinite"), ("scale_zero", "zero"),
                   ("scale_negative", "negative"))  # fmt: skip


def _scale_problems(x: _Entry, st: Mapping[str, Any], n: int) -> list[tuple[str, str]]:
    out = []
    for code, word in _SCALE_PROBLEMS:
        k = int(st.get(code) or 0)
        if k:
            extra = ""
            if x.format == "mxfp4" and code == "scale_nan":
                extra = " (E8M0 0xFF; decoded as 2**128, as torch does)"
            elif x.format == "mxfp4" and code == "scale_zero":
                extra = " (byte 0 = 2**-127: the blocks decode to ~0)"
            out.append((code, f"{k:,} of {n:,} scales are {word}{extra}"))
    return out


_TABLE_COLUMNS = (
    "fqn", "format", "partner", "stored_shape", "stored_dtype", "logical_shape", "block_size", "scale_shape",
    "scale_dtype", "num_blocks", "stored_bytes", "dequantized_bytes", "bits_per_value", "scale_min", "scale_max",
    "scale_zero", "scale_nan", "scale_inf", "scale_subnormal", "scale_negative", "problems", "messages",
)  # fmt: skip
_CHECK_COLUMNS = ("checked", "zero_blocks", "nan_codes", "nonfinite_values", "overflow_values", "absmax")


def _rows(ckpt: Checkpoint, names: Sequence[str] | None, progress: bool | None, scales: bool = True,
          ) -> Iterator[tuple[_Entry | None, dict[str, Any]]]:  # fmt: skip
    """(entry or None for orphans, base row) per quantized tensor and orphan, in checkpoint order."""
    from .model import itemsize

    idx = ckpt.index
    loader = ckpt.loader
    orphans = list(idx.attrs.get("quant_orphans") or ())
    items: list[tuple[int, Any]] = [(e, None) for e in sorted(idx.quant)]
    pos = {f: i for i, f in enumerate(idx.fqns)}
    items += [(pos.get(o["fqn"], -1), o) for o in orphans]
    items.sort(key=lambda t: t[0])
    if names is not None:
        keep = set(names)
        items = [t for t in items if (idx.fqns[t[0]] if t[1] is None else t[1]["fqn"]) in keep]
    it: Any = items
    if progress or (progress is None and len(items) > 16):
        from tqdm.auto import tqdm

        it = tqdm(items, desc="quantized tensors", unit="tensor")
    for e, orphan in it:
        if orphan is not None:
            shape = tuple(orphan["stored_shape"])
            row = dict(fqn=orphan["fqn"], format=orphan["format"], partner=None, stored_shape=shape,
                       stored_dtype=orphan["stored_dtype"], logical_shape=None, block_size=None, scale_shape=None,
                       scale_dtype=None, num_blocks=None,
                       stored_bytes=int(math.prod(shape) * itemsize(orphan["stored_dtype"])),
                       dequantized_bytes=None, bits_per_value=np.nan, scale_min=np.nan, scale_max=np.nan,
                       scale_zero=None, scale_nan=None, scale_inf=None, scale_subnormal=None, scale_negative=None,
                       problems=(orphan["code"],), messages=(orphan["message"],))  # fmt: skip
            yield None, row
            continue
        x = _entry(idx, e)
        probs = entry_problems(idx, e)
        numel = math.prod(x.logical_shape)
        wbytes = math.prod(x.stored_shape) * itemsize(x.stored_dtype)
        sbytes = math.prod(x.scale_shape) * itemsize(x.scale_dtype) if x.scale_shape is not None else 0
        if x.format == "mxfp4":
            block: tuple[int, ...] | None = (*[1] * (len(x.logical_shape) - 1), x.stored_shape[-1] * 2)
        else:
            block = x.block
        st: dict[str, Any] = {}
        if scales and x.scale_shape is not None and not any(c == "unsupported" for c, _ in probs):
            st = _scale_stats(loader, x)
            probs += _scale_problems(x, st, math.prod(x.scale_shape))
        row = dict(fqn=x.fqn, format=x.format, partner=x.partner, stored_shape=x.stored_shape,
                   stored_dtype=x.stored_dtype, logical_shape=x.logical_shape, block_size=block,
                   scale_shape=x.scale_shape, scale_dtype=x.scale_dtype,
                   num_blocks=math.prod(x.scale_shape) if x.scale_shape is not None else None,
                   stored_bytes=int(wbytes + sbytes), dequantized_bytes=int(numel * 4),
                   bits_per_value=(wbytes + sbytes) * 8 / numel if numel else np.nan,
                   scale_min=st.get("scale_min", np.nan), scale_max=st.get("scale_max", np.nan),
                   **{k: st.get(k) for k in ("scale_zero", "scale_nan", "scale_inf", "scale_subnormal",
                                             "scale_negative")},
                   problems=tuple(c for c, _ in probs), messages=tuple(m for _, m in probs))  # fmt: skip
        yield x, row


def _frame(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    obj = {"fqn", "format", "partner", "stored_shape", "stored_dtype", "logical_shape", "block_size", "scale_shape",
           "scale_dtype", "problems", "messages"}  # fmt: skip
    ints = {"num_blocks", "stored_bytes", "dequantized_bytes", "scale_zero", "scale_nan", "scale_inf",
            "scale_subnormal", "scale_negative", "zero_blocks", "nan_codes", "nonfinite_values", "overflow_values"}  # fmt: skip
    data = {}
    for c in columns:
        vals = [r.get(c) for r in rows]
        if c in obj:
            data[c] = pd.Series(vals, dtype=object)
        elif c in ints:
            data[c] = pd.Series(vals, dtype="Int64")
        elif c == "checked":
            data[c] = pd.Series(vals, dtype=bool)
        else:
            data[c] = pd.Series([np.nan if v is None else v for v in vals], dtype=np.float64)
    return pd.DataFrame(data, columns=list(columns))


def quant_table(ckpt: Checkpoint, *, progress: bool | None = None) -> pd.DataFrame:
    """One row per quantized tensor, and per quantized-looking tensor that cannot be dequantized.

    Cheap: reads the metadata and the scale tensors (FP8: 1/16,384 of the weight bytes; MXFP4: 1/16),
    never the weights. For the checks that need the weights, see :func:`quant_check`.

    Columns
    -------
    fqn : str
        The weight (``X.weight`` / ``Y_blocks``); for a lone scale tensor, the scale.
    format : str
        ``"fp8_block"`` or ``"mxfp4"``.
    partner : str or None
        The scale tensor (``X.weight_scale_inv`` / ``Y_scales``); None when missing.
    stored_shape : tuple of int
        Shape in the file (MXFP4: ``[..., G, B]`` bytes).
    stored_dtype : str
        dtype in the file.
    logical_shape : tuple of int or None
        Shape after dequantization (MXFP4: ``[..., G * B * 2]``).
    block_size : tuple of int or None
        Values per block along each logical dim (FP8 ``(128, 128)``; MXFP4 ``(1, ..., 1, 32)``).
    scale_shape : tuple of int or None
        Shape of the scale tensor.
    scale_dtype : str or None
        dtype of the scale tensor.
    num_blocks : Int64
        Blocks (= scale elements).
    stored_bytes : Int64
        Bytes of the weight and its scale as stored.
    dequantized_bytes : Int64
        Bytes of the dequantized tensor in float32.
    bits_per_value : float
        ``stored_bytes * 8 / numel``.
    scale_min, scale_max : float
        Smallest / largest finite scale value (MXFP4: ``2 ** (s - 127)``).
    scale_zero : Int64
        Zero scales (MXFP4: byte 0, i.e. 2**-127, what a zero-filled scale tensor holds).
    scale_nan : Int64
        NaN scales (MXFP4: byte 0xFF, NaN in the OCP MX spec; the formula and torch decode it as 2**128).
    scale_inf : Int64
        Infinite scales (FP8 only; E8M0 has no infinity).
    scale_subnormal : Int64
        Scales whose value is a float32 subnormal (FP8: ``0 < |s| < 2**-126``; MXFP4: byte 0).
    scale_negative : Int64
        Negative scales (FP8 only).
    problems : tuple of str
        Problem codes (keys of :data:`PROBLEM_CODES`); empty when healthy.
    messages : tuple of str
        One sentence per problem: what was found and what was expected.

    Examples
    --------
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> ckpt = dcp_explorer.open(sample_path("fp8_block"))
    >>> ckpt.quant[["fqn", "num_blocks"]].to_dict("records")[:2]
    [{'fqn': 'model.layers.0.mlp.down_proj.weight', 'num_blocks': 4}, {'fqn': 'model.layers.0.mlp.gate_proj.weight', 'num_blocks': 3}]
    >>> ckpt.quant[ckpt.quant.problems.map(len) > 0].fqn.tolist()  # the unhealthy ones: none here
    []
    """
    rows = [row for _, row in _rows(ckpt, None, progress)]
    return _frame(rows, _TABLE_COLUMNS)


# ----------------------------------------------------------------------------- scanning the weights


@dataclass
class _Acc:
    """Per-block arrays of one slab (grid of the slab's blocks)."""

    absmax: np.ndarray
    minnz: np.ndarray
    zeros: np.ndarray
    nonfinite: np.ndarray
    nan: np.ndarray
    overflow: np.ndarray
    numel: np.ndarray


def _block_reduce(
    vals: np.ndarray, target: torch.dtype, scale_ok: np.ndarray, layout: tuple[str, Any]
) -> _Acc:
    """Reduce float32 values to per-block statistics.

    ``layout`` is ``("fp8", (k, rows, col_starts))`` for ``vals [k * rows, w]`` (blocks of ``rows`` rows
    and columns split at ``col_starts``) or ``("mx", per)`` for ``vals [..., G * per]``.
    ``scale_ok`` (grid-shaped bool) marks blocks with a finite scale (overflow counted only there).
    """
    import torch

    a = np.abs(vals)
    isnan = np.isnan(vals)
    fin = np.isfinite(vals)
    if target != torch.float32:
        tv = torch.from_numpy(vals).to(target)
        over = (torch.isinf(tv) & torch.from_numpy(fin)).numpy() | np.isinf(vals)
    else:
        over = np.isinf(vals)
    a_nonan = np.where(isnan, 0.0, a).astype(np.float32)
    nz = np.where((a == 0) | isnan, np.float32(np.inf), a).astype(np.float32)
    zeros = a == 0
    kind, info = layout
    if kind == "mx":
        per = info
        shp = (*vals.shape[:-1], vals.shape[-1] // per, per)
        red = lambda x, f: f(x.reshape(shp), axis=-1)  # noqa: E731
        numel = np.full(shp[:-1], per, np.int64)
    else:
        k, rows, starts = info
        w = vals.shape[-1]

        def red(x: np.ndarray, f: Any) -> np.ndarray:
            ufunc = {np.max: np.maximum, np.min: np.minimum, np.sum: np.add}[f]
            y = x.reshape(k, rows, w)
            y = f(y, axis=1) if f is not np.sum else y.sum(axis=1, dtype=np.int64)
            return ufunc.reduceat(y, starts, axis=1)

        widths = np.diff(np.append(starts, w))
        numel = np.broadcast_to(widths * rows, (k, len(starts))).astype(np.int64)
    absmax = red(a_nonan, np.max)
    minnz = red(nz, np.min)
    acc = _Acc(absmax=absmax, minnz=minnz, zeros=red(zeros, np.sum), nonfinite=red(~fin, np.sum),
               nan=red(isnan, np.sum), overflow=red(over, np.sum), numel=numel)  # fmt: skip
    acc.overflow = np.where(scale_ok, acc.overflow, 0)
    acc.nan = np.where(scale_ok, acc.nan, 0)
    return acc


@dataclass(frozen=True)
class BlockStats:
    """Per-block statistics of one quantized tensor (or a region of it), for tables and pictures.

    Grids have one element per block: FP8 ``[row blocks, column blocks]``; MXFP4 the scale's shape
    (leading dims, then groups). The region covers whole blocks (the blocks the requested slices touch).
    """

    fqn: str
    """The quantized tensor."""
    format: str
    """``"fp8_block"`` or ``"mxfp4"``."""
    block_size: tuple[int, ...]
    """Values per block along each logical dim."""
    region: tuple[tuple[int, ...], tuple[int, ...]]
    """(starts, stops) of the logical region covered (block-aligned, clipped at the tensor's end)."""
    grid_origin: tuple[int, ...]
    """Index of the first block of the grid, per grid dim."""
    scale: np.ndarray
    """float64 scale value per block (MXFP4: ``2 ** (s - 127)``, NaN for E8M0 0xFF)."""
    code_max: float
    """Largest finite code magnitude (448 for e4m3fn, 6 for FP4)."""
    dtype: str = "float32"
    """Target dtype of the overflow counts."""
    absmax: np.ndarray | None = None
    """float32 max |value| per block (NaN ignored); None when weights were not read."""
    min_nonzero: np.ndarray | None = None
    """float32 smallest non-zero |value| per block (inf when all zero)."""
    zeros: np.ndarray | None = None
    """int64 zero values per block."""
    nonfinite: np.ndarray | None = None
    """int64 NaN / inf values per block."""
    nan_codes: np.ndarray | None = None
    """int64 NaN values from NaN codes (blocks with a finite scale) per block."""
    overflow: np.ndarray | None = None
    """int64 values that overflow the target dtype (blocks with a finite scale) per block."""
    numel: np.ndarray | None = None
    """int64 values per block (edge blocks are smaller)."""
    code_values: np.ndarray | None = None
    """float64 value of each code (256 for FP8, 16 for FP4)."""
    code_counts: np.ndarray | None = None
    """int64 occurrences of each code."""
    value_edges: np.ndarray | None = None
    """float64 bin edges of the value histogram."""
    value_counts: np.ndarray | None = None
    """int64 finite dequantized values per bin."""
    reference: str | None = None
    """Name of the reference tensor the errors are measured against."""
    error_max: np.ndarray | None = None
    """float32 max |dequantized - reference| per block."""
    error_rel: np.ndarray | None = None
    """float32 ``error_max / max |reference|`` per block (inf where the reference block is all zero)."""

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Blocks per grid dim."""
        return tuple(self.scale.shape)

    @property
    def dynamic_range_bits(self) -> np.ndarray | None:
        """``log2(absmax / min_nonzero)`` per block: octaves spanned by the block's non-zero values."""
        if self.absmax is None or self.min_nonzero is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.log2(self.absmax.astype(np.float64) / self.min_nonzero)
        return np.where(np.isfinite(r), r, np.nan)

    @property
    def utilization(self) -> np.ndarray | None:
        """``absmax / (|scale| * code_max)`` per block: 1 when the block's largest value uses the largest code."""
        if self.absmax is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.absmax / (np.abs(self.scale) * self.code_max)

    @property
    def zero_blocks(self) -> np.ndarray | None:
        """bool per block: every value is zero."""
        return None if self.zeros is None else self.zeros == self.numel

    def as_2d(self, grid: np.ndarray) -> np.ndarray:
        """A grid as 2-D for a heatmap: leading dims flattened into rows (MXFP4), block columns last."""
        return grid.reshape(-1, grid.shape[-1]) if grid.ndim != 2 else grid


def _block_region(x: _Entry, starts: Sequence[int], stops: Sequence[int]) -> tuple[list[int], list[int]]:
    """The region expanded to whole blocks (clipped at the tensor's end)."""
    b = x.block if x.format == "fp8_block" else (*([1] * (len(x.logical_shape) - 1)), x.stored_shape[-1] * 2)
    a = [(s // bb) * bb for s, bb in zip(starts, b, strict=True)]  # type: ignore[arg-type]
    z = [min(n, -(-t // bb) * bb) for t, bb, n in zip(stops, b, x.logical_shape, strict=True)]  # type: ignore[arg-type]
    return a, z


def _iter_slabs(loader: Loader, x: _Entry, starts: list[int], stops: list[int], dtype: torch.dtype
                ) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray, Any]]:  # fmt: skip
    """Slabs of a block-aligned region: (grid slice, value slice, codes, scale values, float32 values, layout).

    The grid slice is relative to the region's first block; the value slice to its first value.
    """
    if x.format == "fp8_block":
        (r0, c0), (r1, c1) = starts, stops
        b0, b1 = x.block  # type: ignore[misc]
        rb0, cb0 = r0 // b0, c0 // b1
        scale = _read_scales(loader, x, [rb0, cb0], [(r1 - 1) // b0 + 1, (c1 - 1) // b1 + 1])
        w = c1 - c0
        col_starts = np.arange(0, w, b1)
        for a, e in _row_slabs(r0, r1, b0, max(1, SLAB_VALUES // max(w, 1))):
            codes = loader.read_region(x.fqn, [a, c0], [e, c1])
            ra, rb = a // b0 - rb0, (e - 1) // b0 + 1 - rb0
            sc = scale[ra:rb]
            vals = fp8_dequantize(codes, sc, a, c0, (b0, b1), stored_dtype=x.stored_dtype).numpy()
            yield ((slice(ra, rb), slice(None)), (slice(a - r0, e - r0), slice(None)), codes, sc.astype(np.float64),
                   vals, ("fp8", (rb - ra, (e - a) // (rb - ra), col_starts)))  # fmt: skip
        return
    nb = x.stored_shape[-1]
    per = nb * 2
    g0, g1 = starts[-1] // per, stops[-1] // per
    lead_a, lead_b = starts[:-1], stops[:-1]
    for ba, bb in _lead_boxes(lead_a, lead_b, max(1, SLAB_VALUES // max(1, (g1 - g0) * per))):
        blocks = loader.read_region(x.fqn, [*ba, g0, 0], [*bb, g1, nb]).view(np.uint8)
        scales = _read_scales(loader, x, [*ba, g0], [*bb, g1])
        vals = mxfp4_dequantize(blocks, scales).numpy()
        sel = tuple(slice(p - q, r - q) for p, r, q in zip(ba, bb, lead_a, strict=True))
        yield (*sel, slice(None)), (*sel, slice(None)), blocks, e8m0_values(scales), vals, ("mx", per)


def _code_counts(x: _Entry, codes: np.ndarray) -> np.ndarray:
    if x.format == "mxfp4":
        c = np.bincount(codes.reshape(-1), minlength=256).reshape(16, 16)  # [hi, lo]
        return c.sum(axis=0) + c.sum(axis=1)
    if codes.dtype.itemsize == 1:
        return np.bincount(codes.reshape(-1), minlength=256)
    return np.zeros(256, np.int64)


def _resolve_region(x: _Entry, slices: Any) -> tuple[list[int], list[int]]:
    from .load import parse_slices

    starts, stops, _steps, _sq = parse_slices(slices, x.logical_shape)
    return _block_region(x, starts, stops)


def _reference_values(reference: Any, x: _Entry, reference_fqn: str | None) -> tuple[str, Any]:
    """(name, getter(starts, stops) -> float32 ndarray) of the reference tensor."""
    import torch

    cands = [reference_fqn] if reference_fqn else list(dict.fromkeys([x.fqn, x.fqn.removesuffix("_blocks")]))
    shape = tuple(x.logical_shape)

    def check(s: Sequence[int], name: str) -> None:
        if tuple(s) != shape:
            raise ValueError(
                f"reference {name!r} has shape {list(s)}, the dequantized {x.fqn!r} has {list(shape)}"
            )

    if hasattr(reference, "index") and hasattr(reference, "load"):  # a Checkpoint
        for n in cands:
            if n in reference:
                e = reference.index.entry_index(n)
                q = reference.index.quant.get(e)
                check(tuple(q["logical_shape"]) if q else reference.index.shapes[e], n)

                def get(a: Sequence[int], b: Sequence[int], n: str = n) -> np.ndarray:
                    t = reference.load(n, slices=tuple(slice(i, j) for i, j in zip(a, b, strict=True)))
                    return t.to(torch.float32).numpy()

                return n, get
        raise KeyError(
            f"none of {cands} is in the reference checkpoint {reference.path}; pass reference_fqn="
        )
    if isinstance(reference, Mapping):
        for n in cands:
            if n in reference:
                return n, _reference_values(reference[n], x, n)[1]
        raise KeyError(f"none of {cands} is in the reference mapping; pass reference_fqn=")
    t = reference if isinstance(reference, torch.Tensor) else torch.as_tensor(np.asarray(reference))
    check(tuple(t.shape), reference_fqn or "reference")

    def get_t(a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        return t[tuple(slice(i, j) for i, j in zip(a, b, strict=True))].to(torch.float32).numpy()

    return reference_fqn or "reference", get_t


#: :func:`block_stats` refuses regions of more blocks than this (select one with ``slices=``).
MAX_GRID_BLOCKS = 1 << 25


@dataclass(frozen=True, slots=True)
class _Geometry:
    region: tuple[list[int], list[int]]
    origin: tuple[int, ...]
    grid: tuple[int, ...]
    block: tuple[int, ...]
    code_max: float


def _geometry(x: _Entry, slices: Any) -> _Geometry:
    starts, stops = _resolve_region(x, slices)
    if x.format == "fp8_block":
        b0, b1 = x.block  # type: ignore[misc]
        origin: tuple[int, ...] = (starts[0] // b0, starts[1] // b1)
        grid = tuple(-(-(t - s) // b) for s, t, b in zip(starts, stops, (b0, b1), strict=True))
        return _Geometry((starts, stops), origin, grid, (b0, b1), CODE_MAX.get(x.stored_dtype, float("nan")))
    per = x.stored_shape[-1] * 2
    origin = (*starts[:-1], starts[-1] // per)
    grid = (
        *[t - s for s, t in zip(starts[:-1], stops[:-1], strict=True)],
        -(-(stops[-1] - starts[-1]) // per),
    )
    return _Geometry((starts, stops), origin, grid, (*[1] * (len(starts) - 1), per), CODE_MAX["mxfp4"])


def _scan(loader: Loader, x: _Entry, geo: _Geometry, tdt: torch.dtype, progress: bool | None, what: str,
          ) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray, np.ndarray, _Acc]]:  # fmt: skip
    """(grid slice, value slice, codes, float32 values, per-block reductions) per slab of the region."""
    starts, stops = geo.region
    slabs: Any = _iter_slabs(loader, x, starts, stops, tdt)
    n = math.prod(t - s for s, t in zip(starts, stops, strict=True))
    if progress or (progress is None and n > 64 << 20):
        from tqdm.auto import tqdm

        if x.format == "fp8_block":
            w = max(1, stops[1] - starts[1])
            # (fp8_block entries have a block; misc: mypy's follow-on error of the same Optional)
            total = sum(1 for _ in _row_slabs(starts[0], stops[0], x.block[0], max(1, SLAB_VALUES // w)))  # type: ignore[index, misc]
        else:
            rows = max(1, SLAB_VALUES // max(1, stops[-1] - starts[-1]))
            total = sum(1 for _ in _lead_boxes(starts[:-1], stops[:-1], rows))
        slabs = tqdm(slabs, desc=f"{what} {x.fqn}", unit="slab", total=total, leave=False)
    for gsel, vsel, codes, sc, vals, layout in slabs:
        yield gsel, vsel, codes, vals, _block_reduce(vals, tdt, np.isfinite(sc), layout)


def block_stats(ckpt: Checkpoint, fqn: str, *, slices: Any = None, weights: bool = True, reference: Any = None,
                reference_fqn: str | None = None, dtype: Any = None, bins: int = 201,
                progress: bool | None = None) -> BlockStats:  # fmt: skip
    """Per-block statistics and histograms of one quantized tensor (or the blocks a slice touches).

    Parameters
    ----------
    ckpt
        The checkpoint.
    fqn
        A quantized tensor (a row of ``ckpt.quant`` that can be dequantized).
    slices
        Restrict to the blocks this slice of the logical tensor touches (e.g. one expert: ``(0,)``).
    weights
        Read the weights (absmax, dynamic range, zeros, histograms, errors); False reads only the scales.
    reference
        The unquantized original, to measure the per-block error: a :class:`Checkpoint` (e.g. the bf16
        release), a mapping name -> tensor, or a tensor of the logical shape.
    reference_fqn
        Name in ``reference`` (default: ``fqn``, then ``fqn`` without ``_blocks``).
    dtype
        Target dtype for the overflow counts (default float32).
    bins
        Bins of the value histogram (symmetric, up to ``code_max * max(|scale|)``); 0 for none.
    progress
        Show a progress bar (default: when the region holds more than 64 Mi values).

    Returns
    -------
    BlockStats

    Raises
    ------
    KeyError
        ``fqn`` is not a quantized tensor (or the reference has no such name).
    QuantizationError
        The tensor cannot be dequantized.
    ValueError
        More than :data:`MAX_GRID_BLOCKS` blocks (select a region with ``slices=``), or the reference's
        shape differs.

    Examples
    --------
    >>> import dcp_explorer
    >>> from dcp_explorer.samples import sample_path
    >>> ckpt = dcp_explorer.open(sample_path("mxfp4"))
    >>> st = block_stats(ckpt, "model.layers.0.mlp.experts.down_proj_blocks", slices=(0,))  # expert 0
    >>> st.grid_shape, int(st.zero_blocks.sum()), round(float(st.dynamic_range_bits.max()), 2)
    ((1, 96, 2), 0, 3.58)
    """
    idx = ckpt.index
    e = idx.entry_index(fqn)
    if e not in idx.quant:
        raise KeyError(f"{fqn!r} is not a quantized tensor of {ckpt.path} (see ckpt.quant)")
    loader = ckpt.loader
    x = _check_decodable(loader, e)
    tdt = _target(dtype)
    geo = _geometry(x, slices)
    starts, stops = geo.region
    gshape = geo.grid
    if math.prod(gshape) > MAX_GRID_BLOCKS:
        raise ValueError(f"{fqn!r}: {math.prod(gshape):,} blocks in the region, more than {MAX_GRID_BLOCKS:,}; "
                         "select a region with slices= (e.g. one expert: slices=(0,))")  # fmt: skip
    empty = 0 in gshape
    if empty:
        scale = np.zeros(gshape)
    else:
        raw = _read_scales(
            loader, x, list(geo.origin), [o + g for o, g in zip(geo.origin, gshape, strict=True)]
        )
        scale = raw.astype(np.float64) if x.format == "fp8_block" else e8m0_values(raw)
    base: dict[str, Any] = dict(fqn=fqn, format=x.format, block_size=geo.block, region=(tuple(starts), tuple(stops)),
                                grid_origin=geo.origin, scale=scale, code_max=geo.code_max, dtype=str(tdt).removeprefix("torch."))  # fmt: skip
    if not weights or empty:
        return BlockStats(**base)
    fin = np.abs(scale[np.isfinite(scale)])
    vmax = float(fin.max()) * geo.code_max if fin.size else 1.0
    vmax = vmax * (1 + 2.0**-10) if np.isfinite(vmax) and vmax > 0 else 1.0  # float32 rounding may pass it
    edges = np.linspace(-vmax, vmax, bins + 1) if bins else None
    g = {k: np.full(gshape, v, dt) for k, v, dt in (("absmax", 0, np.float32), ("minnz", np.inf, np.float32),
         ("zeros", 0, np.int64), ("nonfinite", 0, np.int64), ("nan", 0, np.int64), ("overflow", 0, np.int64),
         ("numel", 0, np.int64))}  # fmt: skip
    ref_name, ref_get = (None, None) if reference is None else _reference_values(reference, x, reference_fqn)
    err = np.zeros(gshape, np.float32) if ref_get else None
    refmax = np.zeros(gshape, np.float32) if ref_get else None
    counts = np.zeros(16 if x.format == "mxfp4" else 256, np.int64)
    vcounts = np.zeros(max(bins, 0), np.int64)
    for gsel, vsel, codes, vals, acc in _scan(loader, x, geo, tdt, progress, "scanning"):
        _merge(g, gsel, acc)
        counts += _code_counts(x, codes)
        if edges is not None:
            vcounts += np.histogram(vals[np.isfinite(vals)], bins=edges)[0]
        if ref_get is not None:
            a = [s + (v.start or 0) for s, v in zip(starts, vsel, strict=True)]
            ref = ref_get(a, [a_ + n for a_, n in zip(a, vals.shape, strict=True)]).reshape(vals.shape)
            layout = _layout_of(x, vals, gsel, starts, stops)
            ok = np.ones(g["absmax"][gsel].shape, bool)
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.abs(vals - ref).astype(np.float32)
            racc = _block_reduce(diff, _torch_f32(), ok, layout)
            facc = _block_reduce(np.abs(ref).astype(np.float32), _torch_f32(), ok, layout)
            sh = err[gsel].shape  # type: ignore[index]
            err[gsel] = np.maximum(err[gsel], racc.absmax.reshape(sh))  # type: ignore[index]
            refmax[gsel] = np.maximum(refmax[gsel], facc.absmax.reshape(sh))  # type: ignore[index]
    rel = None
    if err is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(err == 0, np.float32(0), err / refmax).astype(np.float32)  # type: ignore[operator]
    if x.format == "mxfp4":
        cvals = FP4_VALUES.astype(np.float64)
    elif x.stored_dtype.startswith("float8"):
        cvals = _code_lut(x.stored_dtype).astype(np.float64)
    else:
        cvals = np.full(256, np.nan)
    return BlockStats(**base, absmax=g["absmax"], min_nonzero=g["minnz"], zeros=g["zeros"],
                      nonfinite=g["nonfinite"], nan_codes=g["nan"], overflow=g["overflow"], numel=g["numel"],
                      code_values=cvals, code_counts=counts, value_edges=edges, value_counts=vcounts if bins else None,
                      reference=ref_name, error_max=err, error_rel=rel)  # fmt: skip


def _torch_f32() -> torch.dtype:
    import torch

    return torch.float32


def _layout_of(x: _Entry, vals: np.ndarray, gsel: tuple[slice, ...], starts: Sequence[int],
               stops: Sequence[int]) -> tuple[str, Any]:  # fmt: skip
    if x.format == "mxfp4":
        return ("mx", x.stored_shape[-1] * 2)
    b0, b1 = x.block  # type: ignore[misc]
    k = gsel[0].stop - gsel[0].start
    return ("fp8", (k, vals.shape[0] // k, np.arange(0, vals.shape[1], b1)))


def _merge(g: dict[str, np.ndarray], gsel: tuple[slice, ...], acc: _Acc) -> None:
    """Fold one slab's per-block reductions into the grids (a block-row may span several slabs)."""
    sh = g["absmax"][gsel].shape
    g["absmax"][gsel] = np.maximum(g["absmax"][gsel], acc.absmax.reshape(sh))
    g["minnz"][gsel] = np.minimum(g["minnz"][gsel], acc.minnz.reshape(sh))
    for k in ("zeros", "nonfinite", "nan", "overflow", "numel"):
        g[k][gsel] += getattr(acc, k).reshape(sh)


def quant_check(ckpt: Checkpoint, names: Sequence[str] | str | None = None, *, full: bool = True,
                dtype: Any = None, progress: bool | None = None) -> pd.DataFrame:  # fmt: skip
    """:func:`quant_table` plus a scan of the weights: all-zero blocks, NaN codes, overflow.

    Reads every block of the selected weights, slab by slab (temporary memory bounded by
    :data:`SLAB_VALUES`; no per-block grids are kept), with a progress bar. ``ckpt.quant`` stays cheap
    (scales only).

    Parameters
    ----------
    ckpt
        The checkpoint.
    names
        Quantized tensors to check (fqns or a glob / ``"re:"`` selection as in ``ckpt.load``); all when None.
    full
        Scan the weights; ``False`` gives the cheap columns only (the weight columns are NA).
    dtype
        Target dtype the overflow check is for (default float32; ``bfloat16`` has about the same range,
        ``float16`` overflows past 65504).
    progress
        Show progress bars (default: over tensors when more than 16, within a tensor past 64 Mi values).

    Returns
    -------
    pandas.DataFrame
        The columns of :func:`quant_table`, then:

        checked : bool
            The weights were scanned.
        zero_blocks : Int64
            Blocks whose dequantized values are all zero (any cause: zero codes or zero scale).
        nan_codes : Int64
            NaN values from NaN codes (FP8 e4m3fn 0x7F / 0xFF), in blocks with a finite scale.
        nonfinite_values : Int64
            NaN / inf dequantized values (any cause).
        overflow_values : Int64
            Values that overflow the target dtype although code and scale are finite.
        absmax : float
            Largest finite |dequantized value|.
    """
    from .load import select

    wanted = None if names is None else select(ckpt.index, names)
    tdt = _target(dtype)
    loader = ckpt.loader
    rows = []
    for x, row in _rows(ckpt, wanted, progress):
        row = dict(row, checked=False, zero_blocks=None, nan_codes=None, nonfinite_values=None,
                   overflow_values=None, absmax=np.nan)  # fmt: skip
        fatal = any(c in _FATAL for c in row["problems"])
        if full and x is not None and not fatal:
            _check_decodable(loader, ckpt.index.entry_index(x.fqn))
            geo = _geometry(x, None)
            tot = dict(zero_blocks=0, nan_codes=0, nonfinite_values=0, overflow_values=0)
            amax = -np.inf
            for _g, _v, _c, _vals, acc in _scan(loader, x, geo, tdt, progress, "checking"):
                tot["zero_blocks"] += int((acc.zeros == acc.numel).sum())
                tot["nan_codes"] += int(acc.nan.sum())
                tot["nonfinite_values"] += int(acc.nonfinite.sum())
                tot["overflow_values"] += int(acc.overflow.sum())
                fin = acc.absmax[np.isfinite(acc.absmax)]
                if fin.size:
                    amax = max(amax, float(fin.max()))
            row.update(checked=True, absmax=amax if np.isfinite(amax) else np.nan, **tot)
            n = math.prod(geo.grid)
            extra = []
            if tot["zero_blocks"]:
                extra.append(("zero_blocks", f"{tot['zero_blocks']:,} of {n:,} blocks are all zero"))
            if tot["nan_codes"]:
                extra.append(("nan_codes", f"{tot['nan_codes']:,} NaN codes in the weight"))
            if tot["overflow_values"]:
                name = str(tdt).removeprefix("torch.")
                extra.append(("overflow", f"{tot['overflow_values']:,} values overflow {name} "
                                          "(finite code x finite scale)"))  # fmt: skip
            row["problems"] = row["problems"] + tuple(c for c, _ in extra)
            row["messages"] = row["messages"] + tuple(m for _, m in extra)
        rows.append(row)
    return _frame(rows, (*_TABLE_COLUMNS, *_CHECK_COLUMNS))
