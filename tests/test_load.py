"""``ckpt.load`` returns exactly what torch (or safetensors) returns, and reads only what it needs.

The truth is never dcp_explorer itself:

* DCP samples: torch's ``_load_state_dict_from_keys`` (no process group), flattened with
  ``flatten_state_dict``; for ``mixed_per_rank`` (``__{rank}.metadata`` only) torch loads once
  per rank with that rank's metadata and the chunks each rank's metadata lists are assembled.
* HF samples: ``safetensors.safe_open(...).get_tensor``; for DCP-written shards the full
  tensors are assembled here from the ``DCP_SHARDING_INFO`` offsets of each file.
* FP8 block-wise: torch's ``QuantizedHuggingFaceStorageReader`` through ``dcp.load(no_dist=True)``
  into float32 tensors; MXFP4: the formula of DCP_FORMAT.md §3 computed here with torch ops
  (torch 2.13's ``dcp.load`` of MXFP4 fills only part of the tensor).

Every comparison is dtype, shape and raw bytes (bit for bit, so ``-0.0`` and NaN payloads count).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import pickle
import shutil
import tracemalloc
import warnings
from typing import Any

import pytest
from _reference import per_rank_ranks, sample_kind, sample_names
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcp_explorer
from dcp_explorer import DcpExplorerError, MetadataError, UnsafePickleError

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

#: every sample, plus the DCP-written shards that ``hf_consolidated`` keeps in ``sharded/``
CASES = (*sample_names(), "hf_consolidated/sharded")

pytestmark = pytest.mark.usefixtures("private_cache")


def case_path(samples, case: str) -> str:
    name, _, sub = case.partition("/")
    return str(samples[name] / sub) if sub else str(samples[name])


# ----------------------------------------------------------------------------- the truth


def _torch_flat(path: str, storage_reader: Any = None) -> dict[str, Any]:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if storage_reader is None:
            sd = _load_state_dict_from_keys(checkpoint_id=path)
        else:
            sd = _load_state_dict_from_keys(storage_reader=storage_reader)
    return flatten_state_dict(sd)[0]


def _rank_reader(path: str, rank: int) -> Any:
    """torch's FileSystemReader reading ``__{rank}.metadata`` (``use_collectives=False`` checkpoints)."""
    from torch.distributed.checkpoint import FileSystemReader

    class RankReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["rank"] = rank
            return super().read_metadata(*args, **kwargs)

    return RankReader(path)


@functools.cache
def torch_per_rank(path: str, rank: int) -> tuple[dict[str, Any], dict[str, list[tuple[tuple, tuple]]]]:
    """torch's load with rank ``rank``'s metadata, and the chunk regions (offsets, sizes) it lists."""
    reader = _rank_reader(path, rank)
    flat = _torch_flat(path, reader)
    md = _rank_reader(path, rank).read_metadata()
    regions = {
        k: [(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks]
        for k, v in md.state_dict_metadata.items()
        if hasattr(v, "chunks")
    }
    return flat, regions


def _region(offsets: tuple, sizes: tuple) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))


def _assemble(pieces: list[tuple[tuple, torch.Tensor]], where: str) -> torch.Tensor:
    """A full tensor from (global offsets, chunk) pieces; every element must be covered."""
    nd = pieces[0][1].dim()
    size = [max(o[d] + t.shape[d] for o, t in pieces) for d in range(nd)]
    full = torch.zeros(size, dtype=pieces[0][1].dtype)
    cover = torch.zeros(size, dtype=torch.int32)
    for o, t in pieces:
        full[_region(o, tuple(t.shape))] = t
        cover[_region(o, tuple(t.shape))] += 1
    assert bool((cover >= 1).all()), f"{where}: the pieces leave holes"
    return full


@functools.cache
def stored_reference(case: str, path: str) -> dict[str, Any]:
    """fqn -> what torch / safetensors returns for each stored entry (quantized ones as stored)."""
    name = case.partition("/")[0]
    kind = sample_kind(name, path) if "/" not in case else "hf"
    if kind == "dcp":
        return _torch_flat(path)
    if kind == "dcp_per_rank":
        ranks = per_rank_ranks(path)
        out: dict[str, Any] = {}
        pieces: dict[str, list] = {}
        for r in ranks:
            flat, regions = torch_per_rank(path, r)
            for k, v in flat.items():
                if not isinstance(v, torch.Tensor):
                    out.setdefault(k, v)
                    continue
                for off, sz in regions[k]:
                    pieces.setdefault(k, []).append((off, v[_region(off, sz)].clone()))
        for k, ps in pieces.items():
            out[k] = _assemble(ps, f"{path}: {k}") if ps[0][1].dim() else ps[0][1]
        return out
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    pieces = {}
    for f in files:
        with safe_open(f, "pt") as so:
            info = json.loads((so.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for k in so.keys():  # noqa: SIM118 - not a dict
                t = so.get_tensor(k)
                off = tuple(info[k]["saved_offsets"]) if k in info else (0,) * t.dim()
                pieces.setdefault(k, []).append((off, t))
    return {k: _assemble(ps, f"{path}: {k}") if len(ps) > 1 else ps[0][1] for k, ps in pieces.items()}


FP4 = [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4_formula(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """DCP_FORMAT.md §3: two E2M1 codes per byte (low nibble first), times 2**(scale - 127)."""
    table = torch.tensor(FP4, dtype=torch.float32)
    lo = table[(blocks & 0x0F).long()]
    hi = table[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)
    out = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).to(torch.float32))
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2)


@functools.cache
def dequantized_reference(case: str, path: str) -> dict[str, torch.Tensor]:
    """fqn -> float32 dequantized value, for the quantized entries of ``fp8_block`` / ``mxfp4``."""
    if case == "fp8_block":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

        md = QuantizedHuggingFaceStorageReader(path).read_metadata()
        sd = {
            k: torch.full(tuple(v.size), float("nan"), dtype=torch.float32)
            for k, v in md.state_dict_metadata.items()
            if v.properties.dtype == torch.float8_e4m3fn
        }
        assert len(sd) == 4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(sd, storage_reader=QuantizedHuggingFaceStorageReader(path), no_dist=True)
        return sd
    if case == "mxfp4":
        ref = stored_reference(case, path)
        out = {k: mxfp4_formula(v, ref[k.removesuffix("_blocks") + "_scales"]) for k, v in ref.items()
               if k.endswith("_blocks")}  # fmt: skip
        assert len(out) == 2
        return out
    return {}


# ----------------------------------------------------------------------------- comparing


def raw_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in row-major order (any strides, size-1 and empty dims included)."""
    if t.numel() == 0:
        return b""
    return (
        t.detach()
        .clone(memory_format=torch.contiguous_format)
        .reshape(-1)
        .view(torch.uint8)
        .numpy()
        .tobytes()
    )


def assert_same(got: Any, ref: Any, what: str) -> None:
    """Same dtype, shape and raw bytes (tensors), or same type and value (objects)."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{what}: got a {type(got).__name__}, expected a tensor"
        assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype}, expected {ref.dtype}"
        assert tuple(got.shape) == tuple(ref.shape), (
            f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        )
        a, b = raw_bytes(got), raw_bytes(ref)
        if a != b:
            w = ref.element_size()
            bad = sum(a[i : i + w] != b[i : i + w] for i in range(0, len(a), w))
            raise AssertionError(f"{what}: bytes differ in {bad} of {ref.numel()} elements")
    else:
        assert type(got) is type(ref) and got == ref, f"{what}: {got!r} != {ref!r}"


_OPEN: dict[tuple, dcp_explorer.Checkpoint] = {}


def opened(path: str, *, partial: bool = False, **kw: Any) -> dcp_explorer.Checkpoint:
    """One Checkpoint per (path, options), reused across tests and hypothesis examples.

    ``partial``: its loader locates and reads every DCP item partially (by default items up to
    ``Loader.SMALL_ITEM`` are read whole, which is every item of most samples).
    """
    key = (path, partial, tuple(sorted(kw.items())))
    if key not in _OPEN:
        ck = _OPEN[key] = dcp_explorer.open(path, cache=False, **kw)
        if partial:
            ck.loader.SMALL_ITEM = 0
    return _OPEN[key]


# ----------------------------------------------------------------------------- whole entries


@pytest.mark.parametrize("case", CASES)
def test_every_entry_whole_equals_truth(samples, case):
    path = case_path(samples, case)
    ref = stored_reference(case, path)
    ck = opened(path)
    assert set(ck.fqns) == set(ref)
    got = ck.load(list(ck.fqns), dequantize=False, progress=False)
    assert list(got) == list(ck.fqns)
    for k, v in ref.items():
        assert_same(got[k], v, f"{case}: {k}")
    # one by one (the single-name form) gives the same
    for k in list(ck.fqns)[:5]:
        assert_same(ck.load(k, dequantize=False), ref[k], f"{case}: {k} alone")


def test_consolidated_equals_its_shards(samples):
    """The DCP-written shards of hf_consolidated assemble to the consolidated files."""
    top = stored_reference("hf_consolidated", case_path(samples, "hf_consolidated"))
    ck = opened(case_path(samples, "hf_consolidated/sharded"))
    for k, v in top.items():
        assert_same(ck.load(k), v, f"sharded/{k}")


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_per_rank_metadata_regions_equal_torch(samples, rank):
    """``open(rank=r)`` of a use_collectives=False checkpoint: each chunk rank r lists == torch with __r.metadata."""
    path = str(samples["mixed_per_rank"])
    flat, regions = torch_per_rank(path, rank)
    ck = opened(path, rank=rank)
    assert set(ck.fqns) == set(flat)
    for k, v in flat.items():
        if not isinstance(v, torch.Tensor):
            assert_same(ck.load(k), v, f"rank {rank}: {k}")
            continue
        assert [(c.offsets, c.sizes) for c in ck.chunks_of(k)] == regions[k]
        for off, sz in regions[k]:
            sl = _region(off, sz)
            assert_same(ck.load(k, slices=sl), v[sl], f"rank {rank}: {k}{list(off)}")
    sharded = [k for k, r in regions.items() if r and tuple(r[0][1]) != tuple(flat[k].shape)]
    assert sharded, "expected sharded tensors in the per-rank metadata"
    with pytest.raises(MetadataError, match="holes"):
        ck.load(sharded[0])


def test_replicated_copies_are_read_once(samples):
    """Per-rank metadata lists every rank's own copy of a replicated tensor: one copy is read."""
    path = str(samples["mixed_per_rank"])
    ck = dcp_explorer.open(path, cache=False)
    copies = ck.chunks_of("model.replicated")
    assert len(copies) == 4 and len({(c.offsets, c.sizes) for c in copies}) == 1
    assert_same(
        ck.load("model.replicated"),
        stored_reference("mixed_per_rank", path)["model.replicated"],
        "replicated",
    )
    assert ck.loader.stats.items_opened == 1 and ck.loader.stats.bytes_read == copies[0].byte_length


def test_overlapping_chunks_do_not_hide_a_hole(samples, tmp_path):
    """Rank 1's chunk moved onto rank 0's rows: the chunk sizes still add up, but rows 3-5 are missing."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    ck_dir = tmp_path / "ck"
    shutil.copytree(samples["mixed_per_rank"], ck_dir)
    md = _rank_reader(str(ck_dir), 1).read_metadata()
    md.storage_meta.load_id = None
    tmd = md.state_dict_metadata["model.row_sharded"]
    assert tuple(tmd.chunks[0].offsets) == (3, 0)
    tmd.chunks[0] = dataclasses.replace(tmd.chunks[0], offsets=torch.Size([0, 0]))
    old = MetadataIndex("model.row_sharded", torch.Size([3, 0]))
    md.storage_data[MetadataIndex("model.row_sharded", torch.Size([0, 0]), 0)] = md.storage_data.pop(old)
    with open(ck_dir / "__1.metadata", "wb") as f:
        pickle.dump(md, f, protocol=4)

    ck = dcp_explorer.open(str(ck_dir), cache=False)
    assert sorted(c.offsets for c in ck.chunks_of("model.row_sharded")) == [(0, 0), (0, 0), (6, 0), (9, 0)]
    assert sum(c.sizes[0] for c in ck.chunks_of("model.row_sharded")) == 10  # sizes add up to the tensor
    with pytest.raises(MetadataError, match="holes"):
        ck.load("model.row_sharded")
    ref = stored_reference("mixed", str(samples["mixed"]))["model.row_sharded"]
    assert_same(ck.load("model.row_sharded", slices="6:"), ref[6:], "rows without the hole")


@pytest.mark.parametrize("case", ["fp8_block", "mxfp4"])
def test_dequantized_whole_equals_truth(samples, case):
    path = case_path(samples, case)
    ref = dequantized_reference(case, path)
    ck = opened(path)
    got = ck.load(list(ref))
    for k, v in ref.items():
        assert_same(got[k], v, f"{case}: {k} dequantized")
    # non-quantized entries are unaffected by dequantize=True
    stored = stored_reference(case, path)
    plain = [k for k in ck.fqns if k not in ref]
    for k, v in ck.load(plain).items():
        assert_same(v, stored[k], f"{case}: {k}")


def test_mxfp4_formula_is_not_vacuous(samples):
    """The independent formula yields -0.0, fractions and both exponent signs on this sample."""
    ref = dequantized_reference("mxfp4", str(samples["mxfp4"]))
    v = torch.cat([t.reshape(-1) for t in ref.values()])
    assert bool(((v == 0) & torch.signbit(v)).any())
    assert bool((v.abs() < 0.01).any() & (v.abs() > 40).any())


# ----------------------------------------------------------------------------- random slices


def _bound(n: int) -> st.SearchStrategy:
    return st.none() | st.integers(-n - 3, n + 3)


@st.composite
def index_specs(draw: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """(spec handed to ``load``, the equivalent torch index)."""
    per_dim: list[Any] = []
    for n in shape:
        if n > 0 and draw(st.integers(0, 3)) == 0:
            per_dim.append(draw(st.integers(-n, n - 1)))
        else:
            per_dim.append(slice(draw(_bound(n)), draw(_bound(n)), draw(st.none() | st.integers(1, 5))))
    mode = draw(st.sampled_from(["full", "truncate", "ellipsis"]))
    if mode == "truncate":
        items = per_dim[: draw(st.integers(0, len(per_dim)))]
    elif mode == "ellipsis":
        i = draw(st.integers(0, len(per_dim)))
        j = draw(st.integers(i, len(per_dim)))
        items = [*per_dim[:i], Ellipsis, *per_dim[j:]]
    else:
        items = per_dim
    form = draw(st.sampled_from(["tuple", "string", "bare"] if len(items) == 1 else ["tuple", "string"]))
    if form == "bare":
        return items[0], items[0]
    if form == "string":

        def one(x: Any) -> str:
            if x is Ellipsis:
                return "..."
            if isinstance(x, int):
                return str(x)
            s = f"{'' if x.start is None else x.start}:{'' if x.stop is None else x.stop}"
            return s + ("" if x.step is None else f":{x.step}")

        return ", ".join(one(x) for x in items), tuple(items)
    return tuple(items), tuple(items)


SLICE_CASES = ("llama_fsdp_ws1", "llama_fsdp_ws4", "llama_fsdp_tp_2x2", "mixed", "mixed_per_rank", "mixed_zstd",
               "hf_rank0", "hf_distributed", "hf_consolidated", "fp8_block", "mxfp4")  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_slices_equal_torch_sliced(samples, data):
    case = data.draw(st.sampled_from(SLICE_CASES), label="case")
    path = case_path(samples, case)
    stored = stored_reference(case, path)
    deq = dequantized_reference(case, path)
    ck = opened(path, partial=data.draw(st.booleans(), label="partial"))
    fqn = data.draw(
        st.sampled_from(sorted(k for k, v in stored.items() if isinstance(v, torch.Tensor))), label="fqn"
    )
    dequantize = fqn in deq and data.draw(st.booleans(), label="dequantize")
    ref = deq[fqn] if dequantize else stored[fqn]
    spec, torch_index = data.draw(index_specs(tuple(ref.shape)), label="spec")
    got = ck.load(fqn, slices=spec, dequantize=dequantize)
    assert_same(got, ref[torch_index], f"{case}: {fqn}[{spec!r}] dequantize={dequantize}")


QUANT_CASES = ("fp8_block", "mxfp4")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_dequantized_slices(samples, data):
    """A dequantized slice == the dequantized full tensor (torch's reader / the formula) sliced."""
    case = data.draw(st.sampled_from(QUANT_CASES), label="case")
    path = case_path(samples, case)
    deq = dequantized_reference(case, path)
    fqn = data.draw(st.sampled_from(sorted(deq)), label="fqn")
    ref = deq[fqn]
    spec, torch_index = data.draw(index_specs(tuple(ref.shape)), label="spec")
    assert_same(opened(path).load(fqn, slices=spec), ref[torch_index], f"{case}: {fqn}[{spec!r}]")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_slices_of_a_big_tensor(big, data):
    """Slices of a 32 MiB tensor (one chunk, 4 row chunks, safetensors): the partial-read paths."""
    t, paths = big
    layout = data.draw(st.sampled_from(["one", "rows", "st"]), label="layout")
    spec, torch_index = data.draw(index_specs(tuple(t.shape)), label="spec")
    assert_same(opened(paths[layout]).load("w", slices=spec), t[torch_index], f"{layout}: w[{spec!r}]")


@pytest.mark.parametrize(
    "spec, index",
    [
        ((7, slice(None)), (7, slice(None))),
        ("-1, 2:-3:2", (-1, slice(2, -3, 2))),
        ("..., 5", (Ellipsis, 5)),
        ("", ()),
        (slice(-4, None), slice(-4, None)),
        ((Ellipsis,), (Ellipsis,)),
        ("10:3, :", (slice(10, 3), slice(None))),  # empty
        ("0:1000:7", (slice(0, 1000, 7),)),  # past the end
    ],
)
def test_slice_forms(samples, spec, index):
    path = str(samples["llama_fsdp_ws4"])
    ref = stored_reference("llama_fsdp_ws4", path)["model.tok_embeddings.weight"]
    got = opened(path).load("model.tok_embeddings.weight", slices=spec)
    assert_same(got, ref[index], repr(spec))


@pytest.mark.parametrize(
    "case, fqn, spec",
    [
        ("mixed", "model.grid", "2:2"),
        ("mixed", "model.token_ids", "5:1"),
        ("mixed_per_rank", "model.tiny_rows", "..., 8:"),
        ("hf_distributed", "model.layers.0.mlp.down_proj.weight", ":, 3:"),
        ("fp8_block", "model.layers.0.mlp.down_proj.weight", "3:3, :"),
        ("mxfp4", "model.layers.0.mlp.experts.down_proj_blocks", "..., 5:5"),
    ],
)
def test_empty_slices_are_ordinary_tensors(samples, case, fqn, spec):
    """An empty result has the strides torch gives a new empty tensor (so ``.view`` to another width works)."""
    got = opened(case_path(samples, case)).load(fqn, slices=spec)
    assert got.numel() == 0 and got.is_contiguous()
    assert got.stride() == torch.empty(got.shape, dtype=got.dtype).stride()
    assert got.view(torch.uint8).numel() == 0


def test_bad_slices_raise(samples):
    ck = opened(str(samples["mixed"]))
    with pytest.raises(IndexError):
        ck.load("model.row_sharded", slices=(10, 0))
    with pytest.raises(IndexError):
        ck.load("model.row_sharded", slices=(0, 0, 0))
    with pytest.raises(ValueError):
        ck.load("model.row_sharded", slices=(slice(None, None, -1),))
    with pytest.raises(ValueError):
        ck.load("model.row_sharded", slices=(Ellipsis, Ellipsis))


# ----------------------------------------------------------------------------- selection


def test_selection_forms(samples):
    import re

    path = str(samples["mixed"])
    ref = stored_reference("mixed", path)
    ck = opened(path)
    t = ck.load("model.grid")
    assert_same(t, ref["model.grid"], "exact")
    assert ck.load("step") == 7

    got = ck.load("model.*_sharded")
    assert isinstance(got, dict) and list(got) == ["model.row_sharded", "model.col_sharded"]
    for k, v in got.items():
        assert_same(v, ref[k], k)
    assert set(ck.load("re:^extra\\.cfg\\.")) == {"extra.cfg.lr", "extra.cfg.name", "extra.cfg.betas",
                                                  "extra.cfg.warmup"}  # fmt: skip
    assert list(ck.load(re.compile(r"list\.\d$"))) == ["extra.list.0", "extra.list.1"]
    both = ck.load(["model.plain", "extra.cfg.betas", "model.plain"])
    assert list(both) == ["model.plain", "extra.cfg.betas"]  # duplicates once, in the given order
    assert both["extra.cfg.betas"] == (0.9, 0.95)
    one = ck.load(["model.plain"])
    assert isinstance(one, dict) and list(one) == ["model.plain"]

    # slices per name
    got = ck.load(["model.grid", "model.plain"], slices={"model.grid": "1:3, ::2"})
    assert_same(got["model.grid"], ref["model.grid"][1:3, ::2], "grid slice")
    assert_same(got["model.plain"], ref["model.plain"], "plain unsliced")


def test_exact_names_with_glob_characters(tmp_path):
    """A name containing ``*?[`` is that entry (a tensor), on a freshly opened checkpoint too."""
    from safetensors.torch import save_file

    tensors = {"w[0]": torch.ones(2), "w1": torch.zeros(2), "w?": torch.full((2,), 2.0)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ck = dcp_explorer.open(str(tmp_path / "m.safetensors"), cache=False)
    assert_same(ck.load("w[0]"), torch.ones(2), "w[0]")
    assert_same(ck.load("w?"), torch.full((2,), 2.0), "w?")
    assert list(ck.load("w[01]")) == ["w1"]  # not a name: a pattern
    assert sorted(ck.load("w*")) == ["w1", "w?", "w[0]"]


def test_missing_name_suggests(samples):
    ck = opened(str(samples["mixed"]))
    with pytest.raises(KeyError, match=r"did you mean 'model\.row_sharded'"):
        ck.load("model.row_shardd")
    with pytest.raises(KeyError, match="matches no entry"):
        ck.load("model.nothing.*")
    with pytest.raises(KeyError, match="matches no entry"):
        ck.load("re:^zzz")
    with pytest.raises(KeyError, match="did you mean"):
        ck.load(["model.plain", "model.plian"])


def test_dtype_cast(samples):
    path = str(samples["mixed"])
    ref = stored_reference("mixed", path)
    ck = opened(path)
    assert_same(
        ck.load("model.embed_bf16", dtype=torch.float32), ref["model.embed_bf16"].float(), "bf16->f32"
    )
    assert_same(
        ck.load("model.row_sharded", dtype="bfloat16"), ref["model.row_sharded"].bfloat16(), "f32->bf16"
    )
    assert_same(ck.load("model.token_ids", dtype="torch.float64", slices="1:"),
                ref["model.token_ids"][1:].double(), "i64->f64")  # fmt: skip
    fp8 = opened(str(samples["fp8_block"]))
    w = dequantized_reference("fp8_block", str(samples["fp8_block"]))["model.layers.0.mlp.down_proj.weight"]
    assert_same(
        fp8.load("model.layers.0.mlp.down_proj.weight", dtype=torch.bfloat16), w.bfloat16(), "dequant->bf16"
    )


def test_max_bytes(samples):
    ck = opened(str(samples["llama_fsdp_ws1"]))
    nbytes = 251 * 72 * 4
    with pytest.raises(DcpExplorerError, match="max_bytes") as ei:
        ck.load("model.tok_embeddings.weight", max_bytes=nbytes - 1)
    assert f"{nbytes:,}" in str(ei.value)
    assert ck.load("model.tok_embeddings.weight", max_bytes=nbytes).shape == (251, 72)
    with pytest.raises(DcpExplorerError, match="max_bytes"):
        ck.load("model.layers.*", max_bytes=10_000)
    # a slice counts its own size only (it reads only the slice)
    assert ck.load("model.tok_embeddings.weight", slices=(0,), max_bytes=72 * 4).shape == (72,)
    with pytest.raises(DcpExplorerError, match="max_bytes"):
        ck.load("model.tok_embeddings.weight", slices=(0,), max_bytes=72 * 4 - 1)


# ----------------------------------------------------------------------------- bytes read

ROWS, COLS = 2048, 4096
ROW_BYTES = COLS * 4
#: Fixed allowance for a DCP item opened partially: the loader prefetches the item's last
#: 4096 bytes (zip end-of-central-directory, zip64 locator and the central directory of the
#: ~6 members torch.save writes, ~600 B), then reads data.pkl's local header (30 B + name
#: + extra, < 100 B), data.pkl itself (~200-300 B for one tensor) and the storage member's
#: local header (30 B): about 4.4 KiB, bounded here by 8 KiB.
ZIP_ALLOWANCE = 8 << 10
#: what reading ``/proc/self/io`` itself adds to ``rchar`` (one buffered read of ~100 B)
PROC_ALLOWANCE = 1 << 10


def _rchar() -> int:
    """Bytes this process got from read syscalls so far (an independent count of every file read)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


class _RowShards(torch.Tensor):
    """A tensor that ``dcp.save`` writes as ``k`` row blocks, as k FSDP ranks would (no process group).

    It implements the protocol DTensor uses (``__create_write_items__`` /
    ``__get_tensor_shard__``), so the checkpoint's metadata and items are written by torch's own
    planner and FileSystemWriter.
    """

    @staticmethod
    def make(t: torch.Tensor, k: int) -> _RowShards:
        s = t.as_subclass(_RowShards)
        s._full, s._rows = t, t.shape[0] // k
        return s

    def __create_write_items__(self, fqn: str, obj: Any) -> list:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
        )
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        props = TensorProperties.create_from_tensor(self._full)
        out = []
        for a in range(0, self._full.shape[0], self._rows):
            off = torch.Size([a, 0])
            chunk = ChunkStorageMetadata(offsets=off, sizes=self._full[a : a + self._rows].shape)
            data = TensorWriteData(chunk=chunk, properties=props, size=self._full.shape)
            out.append(WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD, tensor_data=data))
        return out

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        a = index.offset[0]
        return self._full[a : a + self._rows]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 32 MiB float32 [2048, 4096] tensor saved three ways: one DCP chunk, 4 row-sharded DCP chunks, safetensors."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    t = torch.randn(ROWS, COLS, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": t}, checkpoint_id=str(root / "one"), no_dist=True)
        dcp.save({"w": _RowShards.make(t, 4)}, no_dist=True,
                 storage_writer=dcp.FileSystemWriter(str(root / "rows"), single_file_per_rank=False))  # fmt: skip
    save_file({"w": t}, str(root / "w.safetensors"))
    return t, {"one": str(root / "one"), "rows": str(root / "rows"), "st": str(root / "w.safetensors")}


def test_big_layouts_are_what_torch_wrote(big):
    t, paths = big
    for p in (paths["one"], paths["rows"]):
        assert_same(_torch_flat(p)["w"], t, p)
    ck = dcp_explorer.open(paths["rows"], cache=False)
    assert [(c.offsets, c.sizes) for c in ck.chunks_of("w")] == [
        ((a, 0), (512, COLS)) for a in range(0, ROWS, 512)
    ]
    assert len(ck.index.files) == 4


@pytest.mark.parametrize("layout", ["one", "rows", "st"])
def test_one_row_reads_about_one_row(big, layout):
    """Loading row 7 reads < 2 rows + a fixed zip allowance, by the loader's count and by the kernel's."""
    t, paths = big
    # warm-up on another Checkpoint: lazy imports must not count as reads below
    dcp_explorer.open(paths[layout], cache=False).load("w", slices=(0, slice(None)))
    ck = dcp_explorer.open(paths[layout], cache=False)
    r0 = _rchar()
    row = ck.load("w", slices=(7, slice(None)))
    read_by_process = _rchar() - r0
    assert_same(row, t[7], "row 7")
    st_ = ck.loader.stats
    allowance = 0 if layout == "st" else ZIP_ALLOWANCE  # safetensors: the header was read at open
    bound = 2 * ROW_BYTES + allowance
    assert st_.bytes_read < bound, st_
    assert read_by_process < bound + PROC_ALLOWANCE, (read_by_process, st_)
    assert st_.bytes_read >= ROW_BYTES
    if layout == "st":
        assert st_.bytes_read == ROW_BYTES and st_.requests == 1
    else:
        assert st_.items_opened == 1 and len(st_.by_file) == 1  # only the chunk holding row 7
    # a second row of the same item: no more zip parsing, just the row
    before = st_.bytes_read
    assert_same(ck.load("w", slices="1000, :"), t[1000], "row 1000")
    assert st_.bytes_read - before == ROW_BYTES if layout != "rows" else st_.bytes_read - before < bound


def test_whole_tensor_reads_it_once(big):
    t, paths = big
    for layout in ("one", "rows", "st"):
        ck = dcp_explorer.open(paths[layout], cache=False)
        assert_same(ck.load("w"), t, layout)
        assert t.nbytes <= ck.loader.stats.bytes_read <= t.nbytes + 4 * ZIP_ALLOWANCE


# ----------------------------------------------------------------------------- untrusted bytes entries


class _OpenForWrite:
    """Unpickling this calls ``open(target, "w")``: creates the file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_bytes_entry_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    target = tmp_path / "pwned.txt"
    ck_dir = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"x": _OpenForWrite(str(target)), "t": torch.arange(3)}, checkpoint_id=str(ck_dir), no_dist=True
        )
    assert not target.exists()  # pickled at save time, nothing ran

    ck = dcp_explorer.open(str(ck_dir), cache=False)
    assert ck.tensor("x").kind == "bytes"
    with pytest.raises(UnsafePickleError) as ei:
        ck.load("x")
    assert ei.value.global_name == "io.open"
    assert "io.open" in str(ei.value) and "trusted=True" in str(ei.value)
    assert "__0_0.distcp" in str(ei.value)
    with pytest.raises(UnsafePickleError):
        ck.load(["t", "x"])
    assert not target.exists()
    assert_same(ck.load("t"), torch.arange(3), "the tensor next to it")

    # the payload is live: with trusted=True (torch.load(weights_only=False)) it runs
    f = ck.load("x", trusted=True)
    try:
        assert target.exists()
    finally:
        f.close()


# ----------------------------------------------------------------------------- zstd items


def _zstd_copy(samples, tmp_path) -> tuple[str, dcp_explorer.Checkpoint]:
    ck_dir = tmp_path / "ck"
    shutil.copytree(samples["mixed_zstd"], ck_dir)
    return str(ck_dir), dcp_explorer.open(str(ck_dir), cache=False)


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_zstd_item_not_zstd(samples, tmp_path):
    ck_dir, ck = _zstd_copy(samples, tmp_path)
    c = ck.chunks.set_index("fqn").loc["model.plain"]
    _overwrite(os.path.join(ck_dir, c["file"]), int(c["byte_offset"]), b"\x11" * int(c["byte_length"]))
    e = ck.index.entry_index("extra.cfg.betas")
    fi, off, length, _t = ck.index.bytes_items[e]
    _overwrite(os.path.join(ck_dir, ck.index.files[fi]), off, b"\x22" * length)

    ck = dcp_explorer.open(ck_dir, cache=False)
    with pytest.raises(MetadataError, match="not a valid zstd frame") as ei:
        ck.load("model.plain")
    assert c["file"] in str(ei.value) and ei.value.path.endswith(c["file"])
    with pytest.raises(MetadataError, match="not a valid zstd frame") as ei:
        ck.load("extra.cfg.betas")
    assert ck.index.files[fi] in str(ei.value)
    # the rest still loads
    assert_same(ck.load("model.grid"), stored_reference("mixed", str(samples["mixed"]))["model.grid"], "grid")


def test_zstd_decompression_bomb(samples, tmp_path):
    """An item whose zstd frame expands to 1 GiB is refused after ~cap bytes: MetadataError, no MemoryError."""
    import zstandard
    from torch.distributed.checkpoint import FileSystemReader

    ck_dir, _ = _zstd_copy(samples, tmp_path)
    total, piece = 1 << 30, bytes(16 << 20)
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=total)
    bomb = b"".join(cobj.compress(piece) for _ in range(total // len(piece))) + cobj.flush()
    assert len(bomb) < 1 << 20
    assert zstandard.frame_content_size(bomb) == total

    md = FileSystemReader(ck_dir).read_metadata()
    md.storage_meta.load_id = None
    idx = next(i for i in md.storage_data if i.fqn == "model.plain")
    info = md.storage_data[idx]
    assert info.transform_descriptors == ["stream.zstd/1"]
    fname = os.path.join(ck_dir, info.relative_path)
    end = os.path.getsize(fname)
    with open(fname, "ab") as f:
        f.write(bomb)
    md.storage_data[idx] = dataclasses.replace(info, offset=end, length=len(bomb))
    with open(os.path.join(ck_dir, ".metadata"), "wb") as f:
        pickle.dump(md, f, protocol=4)

    ck = dcp_explorer.open(ck_dir, cache=False)
    tracemalloc.start()
    try:
        with pytest.raises(MetadataError, match="decompression bomb") as ei:
            ck.load("model.plain")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.relative_path in str(ei.value)
    assert peak < 64 << 20, f"peak Python allocation {peak:,} B: the frame was expanded"
