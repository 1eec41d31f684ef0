"""Dequantization of FP8 block-scaled and MXFP4 weights, for whole tensors and any slice.

* FP8 block-wise (DeepSeek-V3): ``X.weight`` (float8_e4m3fn ``[R, C]``) with ``X.weight_scale_inv``
  (float32 ``[ceil(R/b0), ceil(C/b1)]``): ``out[i, j] = float32(W[i, j]) * scale_inv[i // b0, j // b1]``
  (a multiply, despite the name; tail blocks clipped), then cast to the target dtype — what
  torch's ``QuantizedHuggingFaceStorageReader`` computes.
* MXFP4 (gpt-oss): ``Y_blocks`` (uint8 ``[..., G, B]``, two E2M1 codes per byte, low nibble first)
  with ``Y_scales`` (uint8 ``[..., G]``, E8M0, bias 127): ``ldexp(FP4[code], scale - 127)``,
  reshaped to ``[..., G * B * 2]``.

Only the blocks and scales a region touches are read, through :class:`~dcp_explorer.load.Loader`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from .load import Loader

__all__ = ["FP4_VALUES", "dequantize_region", "fp8_dequantize", "mxfp4_dequantize"]

#: E2M1 code -> value
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)  # fmt: skip


def fp8_dequantize(w: np.ndarray, scale: np.ndarray, row0: int, col0: int, block: Sequence[int]) -> np.ndarray:
    """float32 values of an FP8 region.

    Parameters
    ----------
    w
        float32 values of the weight region (already converted from fp8), ``[r, c]``.
    scale
        The scale rows/cols covering the region: ``scale[i // b0 - row0 // b0, j // b1 - col0 // b1]``.
    row0, col0
        Global index of the region's first element.
    block
        Block size per dim.
    """
    b0, b1 = int(block[0]), int(block[1])
    ri = (np.arange(row0, row0 + w.shape[0]) // b0) - row0 // b0
    ci = (np.arange(col0, col0 + w.shape[1]) // b1) - col0 // b1
    return w * scale[np.ix_(ri, ci)]


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 ``[..., G * B * 2]`` from uint8 ``blocks [..., G, B]`` and ``scales [..., G]``."""
    lo = FP4_VALUES[blocks & 0x0F]
    hi = FP4_VALUES[blocks >> 4]
    vals = np.empty((*blocks.shape[:-1], blocks.shape[-1] * 2), np.float32)
    vals[..., 0::2] = lo
    vals[..., 1::2] = hi
    exp = scales.astype(np.int32) - 127
    out = np.ldexp(vals, exp[..., None]).astype(np.float32)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2)


def _fp8_to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(raw)).view(getattr(torch, dtype)).to(torch.float32).numpy()


def dequantize_region(loader: Loader, e: int, starts: Sequence[int], stops: Sequence[int]) -> torch.Tensor:
    """float32 ``torch.Tensor`` of the logical region ``[starts, stops)`` of quantized entry ``e``."""
    import torch

    idx = loader.index
    q = idx.quant[e]
    fqn = idx.fqns[e]
    if q["format"] == "fp8_block":
        block = q.get("block_size") or (128, 128)
        r0, c0 = int(starts[0]), int(starts[1])
        r1, c1 = int(stops[0]), int(stops[1])
        raw = loader.read_region(fqn, [r0, c0], [r1, c1])
        w = _fp8_to_float32(raw, idx.dtypes[e] or "float8_e4m3fn")
        if r1 <= r0 or c1 <= c0:  # not from_numpy: that gives an empty tensor stride 0, which .view() rejects
            return torch.zeros(w.shape, dtype=torch.float32)
        sb = [r0 // block[0], c0 // block[1]]
        se = [(r1 - 1) // block[0] + 1, (c1 - 1) // block[1] + 1]
        s = loader.read_region(q["partner"], sb, se).astype(np.float32, copy=False)
        return torch.from_numpy(np.ascontiguousarray(fp8_dequantize(w, s, r0, c0, block)))
    if q["format"] == "mxfp4":
        stored = tuple(q["stored_shape"])
        per_group = stored[-1] * 2
        lead_a, lead_b = [int(x) for x in starts[:-1]], [int(x) for x in stops[:-1]]
        l0, l1 = int(starts[-1]), int(stops[-1])
        if l1 <= l0 or any(b <= a for a, b in zip(lead_a, lead_b)):
            return torch.zeros([b - a for a, b in zip(starts, stops)], dtype=torch.float32)
        g0, g1 = l0 // per_group, (l1 - 1) // per_group + 1
        blocks = loader.read_region(fqn, [*lead_a, g0, 0], [*lead_b, g1, stored[-1]])
        scales = loader.read_region(q["partner"], [*lead_a, g0], [*lead_b, g1])
        vals = mxfp4_dequantize(blocks, scales)
        a = l0 - g0 * per_group
        return torch.from_numpy(np.ascontiguousarray(vals[..., a : a + (l1 - l0)]))
    raise ValueError(f"unknown quantization {q['format']!r}")


def describe(q: dict[str, Any]) -> str:
    """One line about a quantized entry's description."""
    return f"{q['format']} stored {list(q['stored_shape'])} {q.get('stored_dtype')} -> logical {list(q['logical_shape'])}"
