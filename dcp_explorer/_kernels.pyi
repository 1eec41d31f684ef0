"""Types of the optional C extension ``_kernels`` (``_kernels.c``; setup.py builds it when it can)."""

from typing_extensions import Buffer

def fp8_rows(codes: Buffer, lut: Buffer, scol: Buffer, out: Buffer, n: int, w: int, per: int, /) -> None:
    """``out[i, j] = lut[codes[i, j]] * scol[i // per, j]`` (float32), GIL released."""

def mxfp4_pairs(
    blocks: Buffer, scales: Buffer, table: Buffer, out: Buffer, groups: int, width: int, /
) -> None:
    """``out[g * width + j] = table[scales[g] << 8 | blocks[g * width + j]]``, GIL released."""
