"""Readers for safetensors checkpoints: one file, Hugging Face sharded, DCP's HF shards, quantized.

Metadata comes from each file's header alone (8-byte little-endian length, then JSON);
tensor data is never read.  Chunk order follows torch's ``HuggingFaceStorageReader``:
files in directory-listing order (not recursive), keys sorted by name within a file,
one chunk per (file, key) at ``DCP_SHARDING_INFO`` offsets (or zeros), the tensor's size
being the max of offset + shape.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import IndexFileError, MetadataError, NotACheckpointError, SafetensorsHeaderError
from ..model import CheckpointIndex, ChunkColumns, itemsize
from ..store import Store
from .base import BackendEntrypoint

__all__ = [
    "SAFETENSORS_DTYPES",
    "SafetensorsReader",
    "parse_header",
    "read_header",
    "detect_quantization",
    "find_quant_orphans",
]

SUFFIX = ".safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # safetensors' own limit
HEADER_PROBE = 16 << 10  # first read of a file: covers the header of most shards (else one more read)
#: safetensors dtype code -> torch dtype name
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
    "F4": "float4_e2m1fn_x2",
}  # fmt: skip
_SHARD = re.compile(r"^shard-(\d+)-model-\d+-of-\d+\.safetensors$")
SHARDING_KEY = "DCP_SHARDING_INFO"
_BIG = 1 << 62  # shapes and offsets must stay int64 (their sums too)


def read_header(store: Store, name: str) -> tuple[dict[str, Any], int]:
    """Read and parse the header of safetensors file ``name``.

    Returns
    -------
    (header, data_start)
        The parsed JSON header and the byte offset where tensor data begins.

    Raises
    ------
    SafetensorsHeaderError
        Length past the end of the file, invalid JSON or entries.
    """
    where = store.display(name)
    size = store.size(name)
    if size < 8:
        raise SafetensorsHeaderError(
            f"file is {size} bytes, too short for the 8-byte safetensors header length", path=where
        )
    # one ranged request usually covers the whole header (no read-ahead of tensor data)
    first = store.read_range(name, 0, min(size, HEADER_PROBE))
    n = int.from_bytes(first[:8], "little")
    if n > size - 8 or n > MAX_HEADER:
        raise SafetensorsHeaderError(
            f"header length {n} runs past the end of the file ({size} bytes; at most "
            f"{min(size - 8, MAX_HEADER)} possible): truncated or not a safetensors file",
            path=where,
        )
    raw = first[8 : 8 + n]
    if len(raw) < n:
        raw += store.read_range(name, len(first), 8 + n - len(first))
    return parse_header(raw, size, where), 8 + n


def parse_header(raw: bytes, file_size: int, where: str) -> dict[str, Any]:
    """Validate a safetensors JSON header (bytes after the length); returns the dict.

    Every tensor entry must have a known dtype, a shape of non-negative ints and
    ``data_offsets`` consistent with that shape and inside the file.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsHeaderError(f"header is not valid JSON ({e})", path=where) from e
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(
            f"header is a JSON {type(header).__name__}, expected an object", path=where
        )
    data_len = file_size - 8 - len(raw)
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsHeaderError("__metadata__ must map strings to strings", path=where)
    for key, ent in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(ent, dict):
            raise SafetensorsHeaderError(f"entry {key!r} is not an object", path=where)
        dt = ent.get("dtype")
        if dt not in SAFETENSORS_DTYPES:
            raise SafetensorsHeaderError(
                f"tensor {key!r} has unknown dtype {dt!r}; known: {', '.join(SAFETENSORS_DTYPES)}", path=where
            )
        shape = ent.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < _BIG
                                                  for s in shape):  # fmt: skip
            raise SafetensorsHeaderError(f"tensor {key!r} has invalid shape {shape!r}", path=where)
        offs = ent.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise SafetensorsHeaderError(f"tensor {key!r} has invalid data_offsets {offs!r}", path=where)
        expect = math.prod(shape) * itemsize(SAFETENSORS_DTYPES[dt])
        if dt == "F4":  # 4-bit elements; torch sees pairs (float4_e2m1fn_x2) along the last dim
            if not shape or shape[-1] % 2:
                raise SafetensorsHeaderError(
                    f"tensor {key!r} of F4 has shape {shape}: the last dim must be even (torch packs pairs)",
                    path=where,
                )
            expect = math.prod(shape) // 2
        if offs[1] - offs[0] != expect:
            raise SafetensorsHeaderError(
                f"tensor {key!r}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but shape {shape} "
                f"of {dt} needs {int(expect)}",
                path=where,
            )
        if offs[1] > data_len:
            raise SafetensorsHeaderError(
                f"tensor {key!r}: data_offsets {offs} end past the end of the file (data section is "
                f"{data_len} bytes): truncated file?",
                path=where,
            )
    # two tensors may not share bytes (safetensors itself refuses it)
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items()
                   if k != "__metadata__" and e["data_offsets"][1] > e["data_offsets"][0])  # fmt: skip
    for (_, end0, k0), (begin1, _, k1) in itertools.pairwise(spans):
        if begin1 < end0:
            raise SafetensorsHeaderError(
                f"tensors {k0!r} and {k1!r} overlap: {k1!r} starts at data offset {begin1}, before {k0!r} "
                f"ends at {end0}",
                path=where,
            )
    return header


def _sharding_info(header: dict[str, Any], where: str) -> dict[str, Any] | None:
    meta = header.get("__metadata__") or {}
    raw = meta.get(SHARDING_KEY)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise MetadataError(f"__metadata__['{SHARDING_KEY}'] is not valid JSON ({e})", path=where) from e
    if not isinstance(info, dict):
        raise MetadataError(f"{SHARDING_KEY} is not a JSON object", path=where)
    return info


def _rank_of(name: str) -> int:
    m = _SHARD.match(name)
    return int(m.group(1)) - 1 if m else -1


def detect_quantization(
    fqns: tuple[str, ...], shapes: list[tuple[int, ...]], dtypes: list[str | None], weight_map: dict[str, str]
) -> dict[int, dict[str, Any]]:
    """Find FP8 block-wise and MXFP4 pairs as torch's ``QuantizedHuggingFaceStorageReader`` does.

    Pairs come from the index's ``weight_map`` names: ``X.weight`` + ``X.weight_scale_inv``
    (FP8, block size inferred from the scale's shape, default 128), and ``Y_blocks`` +
    ``Y_scales`` (MXFP4, logical shape ``[..., G * B * 2]``).

    Returns
    -------
    dict
        entry index -> description with keys ``format``, ``partner``, ``stored_shape``,
        ``stored_dtype``, ``logical_shape``, ``block_size``.
    """
    pos = {f: i for i, f in enumerate(fqns)}
    out: dict[int, dict[str, Any]] = {}
    for name in weight_map:
        if name.endswith(".weight_scale_inv"):
            w = name.replace(".weight_scale_inv", ".weight")
            if w in weight_map and w in pos and name in pos:
                i, j = pos[w], pos[name]
                ws, ss = shapes[i], shapes[j]
                block = _fp8_block(ws, ss)
                out[i] = dict(format="fp8_block", partner=name, stored_shape=ws, stored_dtype=dtypes[i],
                              logical_shape=ws, block_size=block)  # fmt: skip
        elif name.endswith("_scales"):
            b = name.replace("_scales", "_blocks")
            if b in weight_map and b in pos:
                i = pos[b]
                bs = shapes[i]
                logical = (*bs[:-2], bs[-2] * bs[-1] * 2) if len(bs) >= 2 else bs
                out[i] = dict(format="mxfp4", partner=name, stored_shape=bs, stored_dtype=dtypes[i],
                              logical_shape=logical, block_size=(bs[-1] * 2 if bs else 0))  # fmt: skip
    return out


def find_quant_orphans(
    fqns: tuple[str, ...],
    shapes: list[tuple[int, ...]],
    dtypes: list[str | None],
    weight_map: dict[str, str],
    pairs: dict[int, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Quantized-looking tensors that :func:`detect_quantization` could not pair (health checks).

    Looks at every tensor of the files (not only the index's ``weight_map``): an FP8 ``X.weight``
    without ``X.weight_scale_inv``, a uint8 ``Y_blocks`` without ``Y_scales``, a lone
    ``weight_scale_inv`` or uint8 ``_scales``, and pairs present in the files that the index does not
    list (or there is no index): torch's ``QuantizedHuggingFaceStorageReader`` does not dequantize
    those, and neither does ``ckpt.load``.

    Returns
    -------
    list of dict
        One per orphan, with keys ``fqn``, ``format`` (``"fp8_block"`` / ``"mxfp4"``), ``partner``
        (the partner's expected name), ``code`` (``"missing_partner"`` / ``"not_in_index"``),
        ``message``, ``stored_shape``, ``stored_dtype``.
    """
    pos = {f: i for i, f in enumerate(fqns)}
    paired = {i for i in pairs} | {pos[q["partner"]] for q in pairs.values() if q["partner"] in pos}
    why = (
        "there is no model.safetensors.index.json"
        if not weight_map
        else f"{INDEX}'s weight_map does not list both"
    )
    out: list[dict[str, Any]] = []

    def add(i: int, fmt: str, partner: str, code: str, message: str) -> None:
        out.append(dict(fqn=fqns[i], format=fmt, partner=partner, code=code, message=message,
                        stored_shape=tuple(shapes[i]), stored_dtype=dtypes[i]))  # fmt: skip

    for i, name in enumerate(fqns):
        if i in paired:
            continue
        dt = dtypes[i] or ""
        if name.endswith(".weight") and dt.startswith("float8"):
            partner = name + "_scale_inv"
            if partner in pos:
                add(i, "fp8_block", partner, "not_in_index",
                    f"{partner} is in the files but {why}: torch's quantized reader (and ckpt.load) return the "
                    "raw FP8 values, not multiplied by the scales")  # fmt: skip
            elif name + "_scale" not in pos:  # X.weight_scale: per-tensor/channel FP8, another convention
                listed = " (the index lists it, but no file holds it)" if partner in weight_map else ""
                add(i, "fp8_block", partner, "missing_partner",
                    f"{dt} weight without its scale {partner}{listed}: its values are the raw FP8 codes, "
                    "off by the missing per-block scale")  # fmt: skip
        elif name.endswith(".weight_scale_inv"):
            w = name[: -len("_scale_inv")]
            if w not in pos:
                add(i, "fp8_block", w, "missing_partner", f"scale without its weight {w}")
            elif not (dtypes[pos[w]] or "").startswith("float8"):
                add(i, "fp8_block", w, "not_in_index",
                    f"{w} is in the files but {why}: it is not dequantized")  # fmt: skip
        elif name.endswith("_blocks") and dt == "uint8" and len(shapes[i]) >= 2:
            partner = name[: -len("_blocks")] + "_scales"
            if partner in pos:
                add(i, "mxfp4", partner, "not_in_index",
                    f"{partner} is in the files but {why}: torch's quantized reader (and ckpt.load) return the "
                    "packed uint8 blocks, not values")  # fmt: skip
            else:
                listed = " (the index lists it, but no file holds it)" if partner in weight_map else ""
                add(
                    i,
                    "mxfp4",
                    partner,
                    "missing_partner",
                    f"MXFP4 blocks without their scales {partner}{listed}: they cannot be dequantized",
                )
        elif name.endswith("_scales") and dt == "uint8":
            b = name[: -len("_scales")] + "_blocks"
            if b not in pos:
                add(i, "mxfp4", b, "missing_partner", f"MXFP4 scales without their blocks {b}")
    return out


def _fp8_block(w: tuple[int, ...], s: tuple[int, ...]) -> tuple[int, ...] | None:
    """Block size (per dim) that maps weight shape ``w`` onto scale shape ``s``; None if none fits."""
    if len(w) != len(s):
        return None
    if all(-(-wd // 128) == sd for wd, sd in zip(w, s, strict=True)):
        return (128,) * len(w)
    # the scale's shape alone is ambiguous (ceil(200/b) == 4 for b in 50..66): prefer powers of two near
    # 128, the same for every dim if one fits them all (64x64 blocks), then the smallest size that fits
    pows = sorted((1 << k for k in range(21)), key=lambda b: abs(b.bit_length() - 8))
    common = [b for b in pows if all(sd > 0 and -(-wd // b) == sd for wd, sd in zip(w, s, strict=True))]
    if common:
        return (common[0],) * len(w)
    per_dim = [
        next((b for b in pows if sd > 0 and -(-wd // b) == sd), None) for wd, sd in zip(w, s, strict=True)
    ]
    if all(b is not None for b in per_dim):
        return tuple(per_dim)  # type: ignore[arg-type]
    out = []
    for wd, sd in zip(w, s, strict=True):
        if sd <= 0:
            return None
        b = -(-wd // sd)
        if -(-wd // b) != sd:
            return None
        out.append(b)
    return tuple(out)


class SafetensorsReader(BackendEntrypoint):
    """One ``.safetensors`` file, a Hugging Face sharded checkpoint, or DCP's HF shards."""

    name = "safetensors"
    looks_for = (
        "'*.safetensors' files (Hugging Face safetensors, optionally with model.safetensors.index.json)"
    )

    def guess_can_open(self, store: Store) -> bool:
        if store.selected is not None:
            return store.selected.endswith(SUFFIX) or store.selected == INDEX
        return any(n.endswith(SUFFIX) for n in store.listing)

    def files(self, store: Store) -> list[str]:
        """The safetensors files read, in directory-listing order (torch's order)."""
        if store.selected is not None and store.selected.endswith(SUFFIX):
            return [store.selected]
        return [n for n in store.listing if n.endswith(SUFFIX)]

    def cache_files(self, store: Store, **kwargs: Any) -> list[str] | None:
        return None  # headers are cheap to read

    def open_index(self, store: Store, **kwargs: Any) -> CheckpointIndex:
        files = self.files(store)
        if not files:
            raise NotACheckpointError(f"no '*{SUFFIX}' file found", path=store.url)
        weight_map = self._weight_map(store)
        order: dict[str, int] = {}
        dtypes: list[str | None] = []
        shapes: list[list[int]] = []
        chunk_rows: list[list[tuple[int, int, tuple[int, ...], tuple[int, ...], int, int]]] = []
        file_meta: dict[str, dict[str, str]] = {}
        for fi, name in enumerate(files):
            header, data_start = read_header(store, name)
            where = store.display(name)
            file_meta[name] = dict(header.get("__metadata__") or {})
            sharding = _sharding_info(header, where)
            rank = _rank_of(name)
            for key in sorted(k for k in header if k != "__metadata__"):
                ent = header[key]
                shape = tuple(ent["shape"])
                if ent["dtype"] == "F4":  # the shape torch gives it (float4_e2m1fn_x2: pairs)
                    shape = (*shape[:-1], shape[-1] // 2)
                if sharding is not None:
                    info = sharding.get(key)
                    offs = info.get("saved_offsets") if isinstance(info, dict) else None
                    if (
                        not isinstance(offs, list)
                        or len(offs) != len(shape)
                        or not all(
                            isinstance(o, int) and not isinstance(o, bool) and 0 <= o < _BIG for o in offs
                        )
                    ):
                        raise MetadataError(
                            f"{SHARDING_KEY} gives tensor {key!r} saved_offsets {offs!r}, expected "
                            f"{len(shape)} non-negative ints",
                            path=where,
                        )
                    offset = tuple(offs)
                else:
                    offset = (0,) * len(shape)
                dt = SAFETENSORS_DTYPES[ent["dtype"]]
                b, e = ent["data_offsets"]
                if key not in order:
                    order[key] = len(order)
                    dtypes.append(dt)
                    shapes.append([s + o for s, o in zip(shape, offset, strict=True)])
                    chunk_rows.append([])
                else:
                    i = order[key]
                    if dtypes[i] != dt or len(shapes[i]) != len(shape):
                        raise MetadataError(
                            f"tensor {key!r} is {dt} {list(shape)} here but {dtypes[i]} with "
                            f"{len(shapes[i])} dims in another file",
                            path=where,
                        )
                    shapes[i] = [max(a, s + o) for a, s, o in zip(shapes[i], shape, offset, strict=True)]
                chunk_rows[order[key]].append((fi, rank, offset, shape, data_start + b, e - b))
        fqns = tuple(order)
        n = len(fqns)
        counts = np.array([len(r) for r in chunk_rows], np.int64)
        chunk_start = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=chunk_start[1:])
        rows = [r for lst in chunk_rows for r in lst]
        m = len(rows)
        nd = np.array([len(r[2]) for r in rows], np.int64)
        coord_start = np.zeros(m + 1, np.int64)
        np.cumsum(nd, out=coord_start[1:])

        def flat(coords: Iterable[tuple[int, ...]]) -> np.ndarray:
            return np.array([x for c in coords for x in c], np.int64)

        chunks = ChunkColumns(
            entry=np.repeat(np.arange(n, dtype=np.int32), counts),
            coord_start=coord_start,
            offsets=flat(r[2] for r in rows),
            sizes=flat(r[3] for r in rows),
            file=np.array([r[0] for r in rows], np.int32),
            byte_offset=np.array([r[4] for r in rows], np.int64),
            byte_length=np.array([r[5] for r in rows], np.int64),
            rank=np.array([r[1] for r in rows], np.int32),
            transform=np.full(m, -1, np.int16),
        )
        tshapes = [tuple(s) for s in shapes]
        quant = detect_quantization(fqns, tshapes, dtypes, weight_map) if weight_map else {}
        warnings = []
        if weight_map:
            missing = [k for k in weight_map if k not in order]
            if missing:
                warnings.append(
                    f"{len(missing)} name(s) of {INDEX} are in no safetensors header, e.g. {missing[0]!r}"
                )
        orphans = find_quant_orphans(fqns, tshapes, dtypes, weight_map, quant)
        if orphans:
            warnings.append(
                f"{len(orphans)} quantized-looking tensor(s) cannot be dequantized, e.g. {orphans[0]['fqn']!r}: "
                f"{orphans[0]['message']} (see ckpt.quant)"
            )
        for i, q in quant.items():  # torch reports the dequantized size
            tshapes[i] = tuple(q["logical_shape"])
        fmt = "safetensors"
        if quant:
            fmt = "hf_quantized"
        elif any(SHARDING_KEY in m for m in file_meta.values()):
            fmt = "hf_dcp_shards"
        return CheckpointIndex(
            format=fmt,
            fqns=fqns,
            kinds=np.zeros(n, np.int8),
            dtypes=tuple(dtypes),
            shapes=tuple(tshapes),
            chunk_start=chunk_start,
            chunks=chunks,
            files=tuple(files),
            quant=quant,
            attrs={
                "file_metadata": file_meta,
                "weight_map": weight_map,
                "index_file": INDEX if weight_map else None,
                "quant_orphans": orphans,
            },  # fmt: skip
            warnings=tuple(warnings),
        )

    def _weight_map(self, store: Store) -> dict[str, str]:
        if INDEX not in store.listing or (store.selected is not None and store.selected != INDEX):
            return {}
        where = store.display(INDEX)
        size = store.size(INDEX)
        if size > 1 << 30:
            raise IndexFileError(f"index file is {size} bytes; refusing to parse more than 1 GiB", path=where)
        raw = store.read_range(INDEX, 0, size)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise IndexFileError(f"not valid JSON ({e})", path=where) from e
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
        ):
            raise IndexFileError(
                "expected an object with a 'weight_map' of tensor name -> file name", path=where
            )
        for fname in dict.fromkeys(wm.values()):
            if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
                raise IndexFileError(
                    f"weight_map names {fname!r}, which is not a file name inside the checkpoint directory",
                    path=where,
                )
            if fname not in store.listing:
                raise IndexFileError(
                    f"weight_map names {fname!r}, which does not exist in the checkpoint directory",
                    path=where,
                )
        return wm
