"""Real sample checkpoints, written by torch's own writers in real multi-process runs.

Every sample is produced by the code path a training job uses: worker processes join a
real ``gloo`` process group on 127.0.0.1 (world sizes 1, 2 and 4, started as
``python -c ...`` subprocesses with ``OMP_NUM_THREADS=1``), build DTensors / FSDP2 / TP
modules on CPU meshes from :func:`~torch.distributed.device_mesh.init_device_mesh`, and
call ``dcp.save``; the quantized samples are written with ``safetensors`` as model
releases are. Values are seeded and deterministic. :func:`make_samples` writes each
sample into a temporary sibling directory and renames it into place only when its run
succeeded; samples are cached under :func:`default_root`. A full build takes ~10-25 s
on 2 cores (seven processes importing torch dominate).

Samples (directory name = sample name)
--------------------------------------
``llama_fsdp_ws1``, ``llama_fsdp_ws2``, ``llama_fsdp_ws4``
    A 2-layer Llama-shaped model in torchtitan naming (no RoPE), float32:
    ``tok_embeddings.weight`` [251, 72], ``layers.{0,1}.attention.wq.weight`` [72, 72],
    ``...wk.weight`` / ``...wv.weight`` [24, 72] (6 heads, 2 kv heads of 12),
    ``...wo.weight`` [72, 72], ``layers.{i}.feed_forward.{w1,w3}.weight`` [190, 72],
    ``...w2.weight`` [72, 190], ``layers.{i}.{attention_norm,ffn_norm}.weight`` [72],
    ``norm.weight`` [72], ``output.weight`` [251, 72] (21 tensors, 146k parameters).
    Each block and the root are wrapped with FSDP2 ``fully_shard`` on a 1-D mesh of
    all ranks, trained one AdamW step (lr 1e-2, weight decay 0.1) on one seeded batch
    (the same on every rank, so the result equals single-process training), and saved
    as ``{"model": ..., "optim": ...}`` from ``get_state_dict``. Keys ``model.<fqn>``;
    ``optim.state.<fqn>.{exp_avg,exp_avg_sq}`` with the parameter's layout;
    ``optim.state.<fqn>.step`` a plain 0-d float32 tensor (1.0), written once;
    ``optim.param_groups.0.{lr,betas,eps,weight_decay,amsgrad,maximize,foreach,
    capturable,differentiable,fused,decoupled_weight_decay,params}`` bytes items.
    Placement ``Shard(0)``, chunks as ``torch.chunk``: on 4 ranks 251 -> 63,63,63,62 and
    190 -> 48,48,48,46; on 2 ranks 251 -> 126,125; on 1 rank one chunk per tensor.
    Files ``.metadata`` + ``__{rank}_0.distcp``; ~1.9-2.2 MiB each.
``llama_fsdp_tp_2x2``
    The same model on 4 ranks, mesh ("dp_shard"=2, "tp"=2), rank r at (r // 2, r % 2).
    TP with ``parallelize_module`` (torchtitan's plan without sequence parallel):
    ``ColwiseParallel`` for wq/wk/wv/w1/w3, ``RowwiseParallel`` for wo/w2,
    ``tok_embeddings`` ``RowwiseParallel(input_layouts=Replicate())``, ``output``
    ``ColwiseParallel(output_layouts=Replicate())``; then ``fully_shard`` on
    ``mesh["dp_shard"]``. Resulting placements: colwise weights, tok_embeddings and
    output ``(_StridedShard(dim=0, sf=2), Shard(0))`` -- chunk rows in rank order are
    not increasing, e.g. w1 [190, 72]: 0:48, 95:143, 48:95, 143:190; wo/w2
    ``(Shard(0), Shard(1))`` -- a 2x2 grid of blocks ([36, 36] for wo, [36, 95] for w2);
    norms are not TP'd: DTensors on the 1-D ``dp_shard`` sub-mesh, ``(Shard(0),)``,
    2 chunks of 36, written once (deduplicated over tp). Same values as above. All of it
    (including the uneven vocab 251 under TP) works in torch 2.13 as is.
``mixed``
    A hand-built nested state dict on 4 ranks, mesh "1d" = (4,) and "2d" = (2, 2):
    ``model.row_sharded`` f32 [10, 6] Shard(0) -> 3,3,3,1 rows;
    ``model.col_sharded`` f32 [5, 13] Shard(1) -> 4,4,4,1 cols;
    ``model.tiny_rows`` f32 [3, 8] Shard(0) -> 1,1,1,0 (rank 3: an EMPTY chunk [0, 8] at
    offset (3, 0)); ``model.grid`` f32 [7, 9] on the 2x2 mesh (Shard(0), Shard(1)) ->
    [4, 5], [4, 4], [3, 5], [3, 4]; ``model.replicated`` f32 [4, 4] Replicate;
    ``model.embed_bf16`` bf16 [11, 4] Shard(0) -> 3,3,3,2; ``model.token_ids`` int64 [9]
    Shard(0) -> 3,3,3,0 (empty chunk); plain tensors ``model.mask`` bool [6, 5],
    ``model.plain`` f32 [3, 4], ``model.scalar`` f32 0-d (3.5),
    ``extra.list.1`` int64 [5] (arange); ``extra.list.0`` f32 [6, 2] Shard(0) -> 2,2,2,0;
    bytes items ``extra.cfg.{lr=0.1, name="mixed", betas=(0.9, 0.95), warmup=100}``,
    ``extra.records.{0,1}.{name,n}`` (a list of dicts is descended),
    ``extra.history`` ([1, 2, 3]: a list without tensors or dicts is one item),
    ``step`` (7). Replicated and plain tensors are written once (dedup); here all
    bytes items land on rank 3. Reference values: ``_mixed_reference()``.
``mixed_per_rank``
    The same state dict saved with ``dcp.save(..., use_collectives=False)``. torch 2.13
    writes ``__{rank}.metadata`` + ``__{rank}_0.distcp`` per rank and NO ``.metadata``.
    Each rank's metadata lists only its own chunk of sharded tensors (chunk index 0),
    but every rank also writes its own full copy of every replicated/plain tensor and
    every bytes item (no dedup), so the sample is twice the size of ``mixed``. Read one
    with ``FileSystemReader(dir).read_metadata(rank=r)``. ``dcp.load`` without a global
    ``.metadata`` logs a warning and falls back to ``__{its rank}.metadata``; with
    ``no_dist=True`` that is rank 0's, and the other ranks' regions stay untouched,
    silently.
``mixed_zstd``
    The same state dict saved with ``FileSystemWriter(dir, _extensions=[ZStandard()])``:
    same chunks and files, every item is one zstd frame, ``transform_descriptors ==
    ['stream.zstd/1']``, lengths are compressed lengths (about half of ``mixed``).
``hf_rank0``
    The trained llama weights (full tensors, cast to bf16) saved with
    ``HuggingFaceStorageWriter(dir, save_distributed=False, fqn_to_index_mapping=...)``
    and ``no_dist=True``: ``model-00001-of-00003.safetensors`` (tok_embeddings +
    layers.0), ``-00002-`` (layers.1), ``-00003-`` (norm + output) and
    ``model.safetensors.index.json`` (total_size 292464). The files still carry
    ``DCP_SHARDING_INFO`` with zero offsets.
``hf_distributed``
    DTensors on a 4-rank mesh saved with ``HuggingFaceStorageWriter(dir,
    save_distributed=True)``: ``shard-0000{rank+1}-model-00001-of-00001.safetensors``,
    no index. ``model.embed_tokens.weight`` f32 [37, 16] Shard(0) (10,10,10,7),
    ``model.layers.0.self_attn.q_proj.weight`` bf16 [18, 16] Shard(0) (5,5,5,3),
    ``...o_proj.weight`` bf16 [16, 18] Shard(1), ``model.layers.0.mlp.down_proj.weight``
    f32 [16, 3] Shard(1) (1,1,1,0: rank 3 writes an empty [16, 0] tensor with
    ``saved_offsets`` [0, 3]), ``model.norm.weight`` f32 [16] Replicate (written once, by
    rank 1), ``lm_head.weight`` f32 [37, 16] Shard(0), ``position_ids`` int64 [10] Shard(0).
``hf_consolidated``
    As ``hf_distributed`` without ``position_ids`` (consolidation calls ``torch.finfo``),
    with ``enable_consolidation=True`` and a 2-file ``fqn_to_index_mapping`` (embed,
    q_proj, o_proj -> 1; down_proj, norm, lm_head -> 2): ``sharded/`` holds
    ``shard-0000{r}-model-0000{i}-of-00002.safetensors`` (8 files, with
    ``DCP_SHARDING_INFO``); the top holds ``model-0000{i}-of-00002.safetensors`` (full
    tensors, no ``__metadata__`` at all) + ``model.safetensors.index.json``.
``fp8_block``
    DeepSeek-V3 style block-wise FP8, written with ``safetensors.torch.save_file`` + a
    hand-written index, 2 files. ``X.weight`` float8_e4m3fn with ``X.weight_scale_inv``
    float32 [ceil(R/128), ceil(C/128)] = absmax/448 of each 128x128 block of a seeded
    bf16 original: ``model.layers.0.self_attn.q_proj.weight`` [300, 200] (scale [3, 2]),
    ``model.layers.0.mlp.gate_proj.weight`` [128, 384] ([1, 3]),
    ``model.layers.0.mlp.down_proj.weight`` [129, 130] ([2, 2]; the weight is in file 1,
    its scale in file 2), ``model.layers.1.self_attn.o_proj.weight`` [256, 256] ([2, 2]);
    bf16 ``model.embed_tokens.weight`` [100, 200], ``model.layers.0.input_layernorm.weight``
    [200], ``model.norm.weight`` [200]. ``QuantizedHuggingFaceStorageReader`` reads it;
    its ``dcp.load`` into float32 equals ``W.float() * scale_inv`` (block-expanded) exactly.
``mxfp4``
    gpt-oss style MXFP4 (E=4 experts, hidden 96, intermediate 64), 2 files + index:
    ``model.layers.0.mlp.experts.gate_up_proj_blocks`` uint8 [4, 128, 3, 16] +
    ``..._scales`` uint8 [4, 128, 3] (file 1), ``...down_proj_blocks`` uint8
    [4, 96, 2, 16] + ``..._scales`` [4, 96, 2] (file 2); random codes, scales in
    120..130 (E8M0, bias 127); bf16 ``...gate_up_proj_bias`` [4, 128],
    ``...down_proj_bias`` [4, 96], ``model.layers.0.mlp.router.weight`` [4, 96],
    ``model.embed_tokens.weight`` [50, 96], ``model.norm.weight`` [96]. torch 2.13's
    reader reports ``_blocks`` with the dequantized size [E, R, G*32] but keeps the 4-D
    chunk [E, R, G, 16], and ``dcp.load`` fills only the first G values of the last dim.

Notes
-----
``Metadata.storage_meta.checkpoint_id`` of the DCP samples names the temporary directory
the sample was written in (``.<name>.tmp-<pid>-<token>``): DCP records the path it was
saved to, and checkpoints get moved. The private ``_*_reference()`` functions rebuild the
exact values a sample holds; the tests compare torch's loads with them.

Examples
--------
>>> from dcp_explorer.samples import sample_path
>>> path = sample_path("llama_fsdp_ws4")  # written on first use (~10-25 s), then cached
>>> sorted(p.name for p in path.iterdir())
['.metadata', '__0_0.distcp', '__1_0.distcp', '__2_0.distcp', '__3_0.distcp']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from dcp_explorer import _procs
from dcp_explorer.errors import DcpExplorerError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "DESCRIPTIONS",
    "SAMPLES_VERSION",
    "SAMPLE_NAMES",
    "SampleBuildError",
    "default_root",
    "make_samples",
    "sample_path",
]

#: Bump when a sample's content or layout changes: :func:`default_root` hashes it,
#: so changed parameters give a fresh cache folder instead of stale samples.
SAMPLES_VERSION: str = "1"

SAMPLE_NAMES: tuple[str, ...] = (
    "llama_fsdp_ws1",
    "llama_fsdp_ws2",
    "llama_fsdp_ws4",
    "llama_fsdp_tp_2x2",
    "mixed",
    "mixed_per_rank",
    "mixed_zstd",
    "hf_rank0",
    "hf_distributed",
    "hf_consolidated",
    "fp8_block",
    "mxfp4",
)

DESCRIPTIONS: dict[str, str] = {
    "llama_fsdp_ws1": "Llama-shaped model + AdamW state, FSDP2 on 1 rank, dcp.save",
    "llama_fsdp_ws2": "Llama-shaped model + AdamW state, FSDP2 on 2 ranks, dcp.save",
    "llama_fsdp_ws4": "Llama-shaped model + AdamW state, FSDP2 on 4 ranks, dcp.save",
    "llama_fsdp_tp_2x2": (
        "Llama-shaped model + AdamW state, FSDP2 x TP on a 2x2 mesh (_StridedShard), dcp.save"
    ),
    "mixed": (
        "hand-built nested state dict on 4 ranks: Shard/Replicate/2-D DTensors, "
        "empty shards, bf16/int64/bool, bytes items"
    ),
    "mixed_per_rank": (
        "the 'mixed' state dict saved with use_collectives=False (per-rank __{rank}.metadata)"
    ),
    "mixed_zstd": "the 'mixed' state dict saved with FileSystemWriter(_extensions=[ZStandard()])",
    "hf_rank0": "Llama weights (bf16) via HuggingFaceStorageWriter, rank-0 style: 3 files + index",
    "hf_distributed": (
        "DTensors on 4 ranks via HuggingFaceStorageWriter(save_distributed=True): "
        "per-rank shard files, no index"
    ),
    "hf_consolidated": (
        "as hf_distributed with enable_consolidation=True: sharded/ + consolidated files + index"
    ),
    "fp8_block": "DeepSeek-V3 style FP8 block-quantized safetensors (weight_scale_inv) + index",
    "mxfp4": "gpt-oss style MXFP4 safetensors (_blocks + _scales, uint8) + index",
}

# Which real process group writes which sample. "local" samples need no process group
# and are written by the single process of the world-size-1 run.
_LOCAL_SAMPLES: tuple[str, ...] = ("hf_rank0", "fp8_block", "mxfp4")
_WORLD_OF: dict[str, int] = {
    "llama_fsdp_ws1": 1,
    "llama_fsdp_ws2": 2,
    "llama_fsdp_ws4": 4,
    "llama_fsdp_tp_2x2": 4,
    "mixed": 4,
    "mixed_per_rank": 4,
    "mixed_zstd": 4,
    "hf_rank0": 1,
    "hf_distributed": 4,
    "hf_consolidated": 4,
    "fp8_block": 1,
    "mxfp4": 1,
}

_ENV_ROOT = "DCP_EXPLORER_SAMPLES"
#: Test hook: ``"fail:WORLD:RANK"`` or ``"hang:WORLD:RANK"`` makes that worker fail or hang.
_ENV_INJECT = "_DCP_EXPLORER_SAMPLES_INJECT"
_TMP_MARK = ".tmp-"
#: Seconds a whole make_samples() run may take before its workers are killed.
_DEFAULT_TIMEOUT = 600.0
#: Seconds a collective may block inside a worker (a dead peer fails fast).
_PG_TIMEOUT = 120.0


class SampleBuildError(DcpExplorerError, RuntimeError):
    """A worker process failed (or timed out) while writing sample checkpoints.

    The message names the samples, the rank, and ends with the tail of its log.
    """


# --------------------------------------------------------------------------- public API


def _torch_version() -> str:
    """Return the installed torch version without importing torch when possible."""
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # pragma: no cover - unusual installs
        import torch

        return str(torch.__version__)


def default_root() -> pathlib.Path:
    """Return the folder where samples are cached by default.

    The base is ``$DCP_EXPLORER_SAMPLES`` if set, else ``~/.cache/dcp_explorer/samples``;
    inside it, a subfolder is keyed by a hash of (:data:`SAMPLES_VERSION`, torch version),
    so new sample parameters or another torch give fresh samples.

    Returns
    -------
    pathlib.Path
        The (possibly not yet existing) folder.

    Examples
    --------
    >>> default_root().name.startswith("v")
    True
    """
    base = os.environ.get(_ENV_ROOT)
    base_path = (
        pathlib.Path(base).expanduser()
        if base
        else pathlib.Path.home() / ".cache" / "dcp_explorer" / "samples"
    )
    tv = _torch_version()
    key = hashlib.sha256(f"{SAMPLES_VERSION}|{tv}".encode()).hexdigest()[:12]
    return base_path / f"v{SAMPLES_VERSION}-torch{tv}-{key}"


def make_samples(
    root: str | os.PathLike[str] | None = None,
    names: Iterable[str] | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    timeout: float = _DEFAULT_TIMEOUT,
) -> dict[str, pathlib.Path]:
    """Write sample checkpoints (those missing) and return their directories.

    Each sample is written into a temporary sibling directory by real torch writers
    in fresh worker processes (gloo process groups on 127.0.0.1), and renamed into
    place only when its run succeeded, so an interrupted run never leaves a
    half-written sample that looks complete. The first failing worker stops the whole
    run (its peers are killed). The workers meet on a port the OS picks while rank 0
    binds it (:mod:`dcp_explorer._procs`), so no other process can take it first.

    Parameters
    ----------
    root
        Folder holding one subfolder per sample; :func:`default_root` if None.
    names
        Sample names (see :data:`SAMPLE_NAMES`); all if None.
    force
        Rewrite the requested samples even if they already exist.
    progress
        Print short progress lines to stderr.
    timeout
        Seconds the whole run may take; workers are killed after that.

    Returns
    -------
    dict[str, pathlib.Path]
        Sample name -> checkpoint directory, in the order of ``names``.

    Raises
    ------
    KeyError
        If a name is not a known sample.
    SampleBuildError
        If a worker process fails or times out; the message holds its stderr tail.

    Examples
    --------
    >>> paths = make_samples(names=["mixed"], progress=False)
    >>> sorted(p.name for p in paths["mixed"].iterdir())
    ['.metadata', '__0_0.distcp', '__1_0.distcp', '__2_0.distcp', '__3_0.distcp']
    """
    root_path = (pathlib.Path(root).expanduser() if root is not None else default_root()).absolute()
    if isinstance(names, str):
        names = [names]
    wanted = list(SAMPLE_NAMES) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in _WORLD_OF]
    if unknown:
        raise KeyError(f"unknown sample name(s) {unknown}; expected some of {list(SAMPLE_NAMES)}")
    result = {name: root_path / name for name in wanted}
    todo = [n for n in wanted if force or not result[n].is_dir()]
    if not todo:
        return result

    root_path.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(root_path)
    token = f"{os.getpid()}-{os.urandom(3).hex()}"
    tmp_dirs = {n: root_path / f".{n}{_TMP_MARK}{token}" for n in todo}
    by_world: dict[int, list[str]] = {}
    for n in sorted(todo, key=SAMPLE_NAMES.index):
        by_world.setdefault(_WORLD_OF[n], []).append(n)

    def say(msg: str) -> None:
        if progress:
            print(f"dcp_explorer.samples: {msg}", file=sys.stderr, flush=True)

    say(f"writing {len(todo)} sample(s) under {root_path}")
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="dcp_explorer_samples_logs_") as logs:
            runs = {
                world: _start(world, by_world[world], tmp_dirs, logs)
                for world in sorted(by_world, reverse=True)
            }
            try:
                pending = list(runs)
                while pending:
                    for world in list(pending):
                        if not runs[world].check(
                            what=f"the {world}-rank run writing {by_world[world]}",
                            error=SampleBuildError,
                            hint="nothing was published for these samples. Fix the cause shown below "
                            "and call make_samples() again.",
                        ):
                            continue
                        pending.remove(world)
                        for n in by_world[world]:
                            _publish(tmp_dirs[n], result[n], force=force)
                            say(
                                f"{n}: {_fmt_size(_dir_size(result[n]))} "
                                f"({world} rank{'s' if world > 1 else ''}, "
                                f"{time.monotonic() - start:.1f} s)"
                            )
                    if pending and time.monotonic() - start > timeout:
                        for world in pending:
                            runs[world].kill()
                        raise SampleBuildError(
                            f"writing samples {[n for w in pending for n in by_world[w]]} "
                            f"took longer than timeout={timeout:.0f} s; the workers were "
                            "killed and nothing was published for these samples. Pass a "
                            "larger timeout on a slow machine, or read the logs below.\n"
                            + "\n".join(runs[w].tail(0) for w in pending),
                            path=str(root_path),
                        )
                    time.sleep(0.05)
            finally:
                for workers in runs.values():
                    workers.kill()
    finally:
        for tmp in tmp_dirs.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {time.monotonic() - start:.1f} s")
    return result


def sample_path(name: str, root: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the directory of one sample, writing it first if needed.

    Parameters
    ----------
    name
        A name from :data:`SAMPLE_NAMES`.
    root
        Folder of the samples; :func:`default_root` if None.

    Returns
    -------
    pathlib.Path
        The checkpoint directory.

    Examples
    --------
    >>> sample_path("fp8_block")  # doctest: +ELLIPSIS
    PosixPath('.../fp8_block')
    """
    return make_samples(root, [name])[name]


# --------------------------------------------------------------------------- orchestration


def _start(
    world: int, names: list[str], tmp_dirs: Mapping[str, pathlib.Path], log_dir: str
) -> _procs.Workers:
    """Start the ``world`` worker processes (one gloo process group) writing ``names`` into ``tmp_dirs``."""
    spec = {"jobs": [[n, str(tmp_dirs[n])] for n in names]}
    code = "import sys; from dcp_explorer.samples import _worker_main; sys.exit(_worker_main(sys.argv[1]))"
    return _procs.start(["-c", code, json.dumps(spec)], world, log_dir, prefix=f"world{world}_")


def _publish(tmp: pathlib.Path, final: pathlib.Path, *, force: bool) -> None:
    """Move a finished sample from its temporary sibling into place."""
    if not tmp.is_dir():
        raise SampleBuildError(
            f"the workers exited cleanly but wrote no checkpoint directory at {tmp}; "
            "expected one per sample. This is a bug in dcp_explorer.samples.",
            path=str(tmp),
        )
    if final.exists():
        if not force:  # another process published it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = final.with_name(f".{final.name}{_TMP_MARK}{os.getpid()}-old")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp_dirs(root: pathlib.Path) -> None:
    """Remove temporary sample dirs left by runs whose process is gone."""
    for p in root.iterdir():
        if not (p.name.startswith(".") and _TMP_MARK in p.name):
            continue
        pid_text = p.name.split(_TMP_MARK, 1)[1].split("-", 1)[0]
        try:
            pid = int(pid_text)
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def _dir_size(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fmt_size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


# --------------------------------------------------------------------------- worker side


def _worker_main(spec_json: str) -> int:
    """Entry point of one worker process (rank) of a sample-writing run."""
    import traceback
    import warnings

    spec = json.loads(spec_json)
    rank, world = _procs.rank_and_world()
    jobs: list[tuple[str, str]] = [(n, p) for n, p in spec["jobs"]]
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    needs_pg = any(n not in _LOCAL_SAMPLES for n, _ in jobs)
    try:
        # an exception leaves the process group without teardown (see _procs.process_group)
        with _procs.process_group("gloo", timeout=_PG_TIMEOUT) if needs_pg else contextlib.nullcontext():
            _maybe_inject_fault(world, rank)
            for name, path in jobs:
                t0 = time.monotonic()
                _WRITERS[name](pathlib.Path(path))
                if needs_pg:
                    dist.barrier()
                print(f"rank {rank}: wrote {name} in {time.monotonic() - t0:.2f} s", flush=True)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # do not wait on peers or process-group teardown
    return 0


def _maybe_inject_fault(world: int, rank: int) -> None:
    """Fail or hang on purpose when the test hook names this worker."""
    what, _, where = os.environ.get(_ENV_INJECT, "").partition(":")
    if where != f"{world}:{rank}":
        return
    if what == "fail":
        raise RuntimeError(f"injected failure in world {world} rank {rank}")
    if what == "hang":
        time.sleep(3600)


# ----- the Llama-shaped model


#: Sizes chosen so that several dims do not divide evenly by 2, 3 or 4.
LLAMA_CONFIG: dict[str, int] = {
    "dim": 72,
    "n_layers": 2,
    "n_heads": 6,
    "n_kv_heads": 2,
    "head_dim": 12,
    "ffn_dim": 190,
    "vocab_size": 251,
    "batch": 2,
    "seq_len": 16,
    "seed": 0,
}
_LLAMA_LR = 1e-2
_LLAMA_WEIGHT_DECAY = 0.1


def _llama_model() -> torch.nn.Module:
    """Build the seeded Llama-shaped model (torchtitan names, no RoPE) on CPU."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    c = LLAMA_CONFIG

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n_rep = c["n_heads"] // c["n_kv_heads"]
            self.head_dim = c["head_dim"]
            self.wq = nn.Linear(c["dim"], c["n_heads"] * c["head_dim"], bias=False)
            self.wk = nn.Linear(c["dim"], c["n_kv_heads"] * c["head_dim"], bias=False)
            self.wv = nn.Linear(c["dim"], c["n_kv_heads"] * c["head_dim"], bias=False)
            self.wo = nn.Linear(c["n_heads"] * c["head_dim"], c["dim"], bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            # -1 heads: under TP each rank sees its local heads only.
            q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
            k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
            v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.wo(o.transpose(1, 2).reshape(b, s, -1))

    class FeedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Linear(c["dim"], c["ffn_dim"], bias=False)
            self.w2 = nn.Linear(c["ffn_dim"], c["dim"], bias=False)
            self.w3 = nn.Linear(c["dim"], c["ffn_dim"], bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    class TransformerBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.feed_forward = FeedForward()
            self.attention_norm = nn.RMSNorm(c["dim"], eps=1e-5)
            self.ffn_norm = nn.RMSNorm(c["dim"], eps=1e-5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + self.attention(self.attention_norm(x))
            return h + self.feed_forward(self.ffn_norm(h))

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_embeddings = nn.Embedding(c["vocab_size"], c["dim"])
            self.layers = nn.ModuleList(TransformerBlock() for _ in range(c["n_layers"]))
            self.norm = nn.RMSNorm(c["dim"], eps=1e-5)
            self.output = nn.Linear(c["dim"], c["vocab_size"], bias=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.tok_embeddings(tokens)
            for layer in self.layers:
                h = layer(h)
            return self.output(self.norm(h))

    torch.manual_seed(c["seed"])
    return Transformer()


def _llama_batch() -> torch.Tensor:
    """Return the seeded token batch (the same on every rank)."""
    import torch

    c = LLAMA_CONFIG
    g = torch.Generator().manual_seed(c["seed"] + 1)
    return torch.randint(0, c["vocab_size"], (c["batch"], c["seq_len"]), generator=g)


def _llama_train_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Run one AdamW step on the seeded batch; return the optimizer."""
    import torch
    import torch.nn.functional as F

    optim = torch.optim.AdamW(
        model.parameters(), lr=_LLAMA_LR, weight_decay=_LLAMA_WEIGHT_DECAY, foreach=False
    )
    tokens = _llama_batch()
    logits = model(tokens)
    v = LLAMA_CONFIG["vocab_size"]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1))
    loss.backward()
    optim.step()
    optim.zero_grad()
    return optim


def _llama_reference() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Train the model one step in this process, without any parallelism.

    Returns
    -------
    tuple
        ``(weights, optim_state)``: fqn -> full tensor, and fqn ->
        ``{"exp_avg", "exp_avg_sq", "step"}``; what every llama sample should hold.
    """
    model = _llama_model()
    optim = _llama_train_step(model)
    names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters()}
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    state = {names[p]: {k: v.detach().clone() for k, v in s.items()} for p, s in optim.state.items()}
    return weights, state


def _write_llama_fsdp(path: pathlib.Path) -> None:
    """FSDP2 over all ranks of the world (1-D mesh), one AdamW step, dcp.save."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    model = _llama_model()
    # cast: torch types a module's attribute as Tensor | Module; _llama_model's is a ModuleList
    for layer in cast("torch.nn.ModuleList", model.layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = _llama_train_step(model)
    model_sd, optim_sd = get_state_dict(model, optim)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _write_llama_fsdp_tp(path: pathlib.Path) -> None:
    """TP (torchtitan plan) on mesh dim "tp", then FSDP2 on "dp_shard"; one step; dcp.save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    model = _llama_model()
    parallelize_module(
        model,
        mesh["tp"],
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    # cast: torch types a module's attribute as Tensor | Module; _llama_model's is a ModuleList
    for layer in cast("torch.nn.ModuleList", model.layers):
        parallelize_module(
            layer,
            mesh["tp"],
            {
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
            },
        )
    # cast: torch types a module's attribute as Tensor | Module; _llama_model's is a ModuleList
    for layer in cast("torch.nn.ModuleList", model.layers):
        fully_shard(layer, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    optim = _llama_train_step(model)
    model_sd, optim_sd = get_state_dict(model, optim)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


# ----- the hand-built "mixed" state dict

#: fqn -> (mesh, placements) for the DTensors of the mixed state dict; "1d" is a mesh
#: of 4 ranks, "2d" a 2x2 mesh. Placements as (kind, dim) pairs.
_MIXED_LAYOUT: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {
    "model.row_sharded": ("1d", (("S", 0),)),
    "model.col_sharded": ("1d", (("S", 1),)),
    "model.tiny_rows": ("1d", (("S", 0),)),
    "model.grid": ("2d", (("S", 0), ("S", 1))),
    "model.replicated": ("1d", (("R", 0),)),
    "model.embed_bf16": ("1d", (("S", 0),)),
    "model.token_ids": ("1d", (("S", 0),)),
    "extra.list.0": ("1d", (("S", 0),)),
}


def _mixed_reference() -> dict[str, Any]:
    """Return the full (undistributed) nested state dict of the mixed samples."""
    import torch

    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "model": {
            "row_sharded": randn(10, 6),
            "col_sharded": randn(5, 13),
            "tiny_rows": randn(3, 8),
            "grid": randn(7, 9),
            "replicated": randn(4, 4),
            "embed_bf16": randn(11, 4).to(torch.bfloat16),
            "token_ids": torch.randint(0, 1000, (9,), generator=g, dtype=torch.int64),
            "mask": torch.rand(6, 5, generator=g) > 0.5,
            "plain": randn(3, 4),
            "scalar": torch.tensor(3.5),
        },
        "extra": {
            "list": [randn(6, 2), torch.arange(5, dtype=torch.int64)],
            "cfg": {"lr": 0.1, "name": "mixed", "betas": (0.9, 0.95), "warmup": 100},
            "records": [{"name": "a", "n": 1}, {"name": "b", "n": 2}],
            "history": [1, 2, 3],
        },
        "step": 7,
    }


def _distribute_mixed(ref: dict[str, Any]) -> dict[str, Any]:
    """Turn the full mixed state dict into this rank's state dict (DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    meshes = {
        "1d": init_device_mesh("cpu", (4,), mesh_dim_names=("dp",)),
        "2d": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")),
    }

    def walk(obj: Any, prefix: str) -> Any:
        if isinstance(obj, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, f"{prefix}{i}.") for i, v in enumerate(obj)]
        fqn = prefix[:-1]
        if fqn in _MIXED_LAYOUT:
            mesh_key, spec = _MIXED_LAYOUT[fqn]
            placements = [Shard(d) if kind == "S" else Replicate() for kind, d in spec]
            return distribute_tensor(obj, meshes[mesh_key], placements)
        return obj

    return walk(ref, "")


def _write_mixed(path: pathlib.Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_distribute_mixed(_mixed_reference()), checkpoint_id=path)


def _write_mixed_per_rank(path: pathlib.Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_distribute_mixed(_mixed_reference()), checkpoint_id=path, use_collectives=False)


def _write_mixed_zstd(path: pathlib.Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    dcp.save(
        _distribute_mixed(_mixed_reference()),
        storage_writer=FileSystemWriter(path, _extensions=[ZStandard()]),
    )


# ----- Hugging Face storage

#: fqn -> placements on the 4-rank mesh, for the distributed HF samples.
_HF_LAYOUT: dict[str, tuple[str, int]] = {
    "model.embed_tokens.weight": ("S", 0),
    "model.layers.0.self_attn.q_proj.weight": ("S", 0),
    "model.layers.0.self_attn.o_proj.weight": ("S", 1),
    "model.layers.0.mlp.down_proj.weight": ("S", 1),
    "model.norm.weight": ("R", 0),
    "lm_head.weight": ("S", 0),
    "position_ids": ("S", 0),
}
#: fqn -> file index (1-based) for the consolidated sample.
_HF_FILES: dict[str, int] = {
    "model.embed_tokens.weight": 1,
    "model.layers.0.self_attn.q_proj.weight": 1,
    "model.layers.0.self_attn.o_proj.weight": 1,
    "model.layers.0.mlp.down_proj.weight": 2,
    "model.norm.weight": 2,
    "lm_head.weight": 2,
}


def _hf_reference(include_int: bool = True) -> dict[str, torch.Tensor]:
    """Return the full tensors of the distributed HF samples (fqn -> tensor)."""
    import torch

    g = torch.Generator().manual_seed(4321)
    out = {
        "model.embed_tokens.weight": torch.randn(37, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(18, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 18, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 3, generator=g),
        "model.norm.weight": torch.ones(16) + 0.01 * torch.randn(16, generator=g),
        "lm_head.weight": torch.randn(37, 16, generator=g),
        "position_ids": torch.arange(10, dtype=torch.int64),
    }
    if not include_int:
        del out["position_ids"]
    return out


def _write_hf_sharded(path: pathlib.Path, *, consolidate: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    sd = {}
    for fqn, full in _hf_reference(include_int=not consolidate).items():
        kind, d = _HF_LAYOUT[fqn]
        sd[fqn] = distribute_tensor(full, mesh, [Shard(d) if kind == "S" else Replicate()])
    writer = HuggingFaceStorageWriter(
        str(path),
        save_distributed=True,
        enable_consolidation=consolidate,
        fqn_to_index_mapping=dict(_HF_FILES) if consolidate else None,
    )
    dcp.save(sd, storage_writer=writer)


def _write_hf_distributed(path: pathlib.Path) -> None:
    _write_hf_sharded(path, consolidate=False)


def _write_hf_consolidated(path: pathlib.Path) -> None:
    _write_hf_sharded(path, consolidate=True)


def _hf_rank0_files() -> dict[str, int]:
    """fqn -> file index of hf_rank0: embeddings + layer 0, layer 1, final norm + output."""
    files = {}
    for fqn in _llama_model().state_dict():
        if fqn.startswith("layers.1."):
            files[fqn] = 2
        elif fqn.startswith(("norm.", "output.")):
            files[fqn] = 3
        else:
            files[fqn] = 1
    return files


def _write_hf_rank0(path: pathlib.Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    weights, _ = _llama_reference()
    sd = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    writer = HuggingFaceStorageWriter(
        str(path), save_distributed=False, fqn_to_index_mapping=_hf_rank0_files()
    )
    dcp.save(sd, storage_writer=writer, no_dist=True)


# ----- quantized safetensors (written with safetensors itself, like real releases)

_FP8_BLOCK = 128
_FP8_MAX = 448.0
#: fqn of each FP8 weight -> (shape, file of the weight, file of its weight_scale_inv).
_FP8_WEIGHTS: dict[str, tuple[tuple[int, int], int, int]] = {
    "model.layers.0.self_attn.q_proj.weight": ((300, 200), 1, 1),
    "model.layers.0.mlp.gate_proj.weight": ((128, 384), 1, 1),
    "model.layers.0.mlp.down_proj.weight": ((129, 130), 1, 2),  # scale in the other file
    "model.layers.1.self_attn.o_proj.weight": ((256, 256), 2, 2),
}
#: Unquantized bf16 tensors: fqn -> (shape, file).
_FP8_PLAIN: dict[str, tuple[tuple[int, ...], int]] = {
    "model.embed_tokens.weight": ((100, 200), 1),
    "model.layers.0.input_layernorm.weight": ((200,), 1),
    "model.norm.weight": ((200,), 2),
}


def _fp8_reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """Build the FP8 sample's tensors.

    Returns
    -------
    tuple
        ``(stored, originals, files)``: fqn -> tensor as written (float8_e4m3fn weights,
        float32 ``weight_scale_inv``, bf16 plain tensors); fqn of each quantized weight ->
        its bf16 original; fqn -> file index (1-based).
    """
    import torch

    g = torch.Generator().manual_seed(88)
    b = _FP8_BLOCK
    stored: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    files: dict[str, int] = {}
    for fqn, ((r, c), f_w, f_s) in _FP8_WEIGHTS.items():
        w = (torch.randn(r, c, generator=g) * 0.02).to(torch.bfloat16)
        originals[fqn] = w
        rb, cb = -(-r // b), -(-c // b)
        wf = w.float()
        padded = torch.zeros(rb * b, cb * b)
        padded[:r, :c] = wf.abs()
        absmax = padded.view(rb, b, cb, b).amax(dim=(1, 3))
        scale_inv = (absmax / _FP8_MAX).clamp(min=1e-12).float()
        expanded = scale_inv.repeat_interleave(b, 0).repeat_interleave(b, 1)[:r, :c]
        q = (wf / expanded).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        stored[fqn] = q
        stored[fqn + "_scale_inv"] = scale_inv
        files[fqn] = f_w
        files[fqn + "_scale_inv"] = f_s
    for fqn, (shape, f) in _FP8_PLAIN.items():
        t = torch.randn(*shape, generator=g)
        if fqn.endswith("norm.weight"):
            t = 1 + 0.05 * t
        stored[fqn] = t.to(torch.bfloat16)
        files[fqn] = f
    return stored, originals, files


#: (experts, hidden, intermediate) of the MXFP4 sample; gpt-oss layout.
_MX_E, _MX_H, _MX_I = 4, 96, 64


def _mxfp4_reference() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Build the MXFP4 sample's tensors: ``(stored, files)`` (fqn -> tensor, fqn -> file)."""
    import torch

    g = torch.Generator().manual_seed(99)
    e, h, i = _MX_E, _MX_H, _MX_I
    p = "model.layers.0.mlp.experts."
    stored = {
        # gate_up: [E, 2*I rows, H/32 groups, 16 bytes] -> dequantized [E, 2*I, H]
        p + "gate_up_proj_blocks": torch.randint(
            0, 256, (e, 2 * i, h // 32, 16), generator=g, dtype=torch.uint8
        ),
        p + "gate_up_proj_scales": torch.randint(
            120, 131, (e, 2 * i, h // 32), generator=g, dtype=torch.uint8
        ),
        p + "gate_up_proj_bias": (0.01 * torch.randn(e, 2 * i, generator=g)).to(torch.bfloat16),
        # down: [E, H rows, I/32 groups, 16 bytes] -> dequantized [E, H, I]
        p + "down_proj_blocks": torch.randint(0, 256, (e, h, i // 32, 16), generator=g, dtype=torch.uint8),
        p + "down_proj_scales": torch.randint(120, 131, (e, h, i // 32), generator=g, dtype=torch.uint8),
        p + "down_proj_bias": (0.01 * torch.randn(e, h, generator=g)).to(torch.bfloat16),
        "model.layers.0.mlp.router.weight": torch.randn(e, h, generator=g).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(50, h, generator=g).to(torch.bfloat16),
        "model.norm.weight": (1 + 0.05 * torch.randn(h, generator=g)).to(torch.bfloat16),
    }
    files = {k: (2 if "down_proj" in k or k == "model.norm.weight" else 1) for k in stored}
    return stored, files


def _write_safetensors_with_index(
    path: pathlib.Path, stored: Mapping[str, torch.Tensor], files: Mapping[str, int]
) -> None:
    """Write ``model-0000i-of-0000N.safetensors`` files plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    n = max(files.values())
    names = {i: f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    path.mkdir(parents=True, exist_ok=True)
    for i, fname in names.items():
        part = {k: v.contiguous() for k, v in stored.items() if files[k] == i}
        save_file(part, str(path / fname), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": int(sum(t.numel() * t.element_size() for t in stored.values()))},
        "weight_map": {k: names[files[k]] for k in sorted(stored)},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_fp8_block(path: pathlib.Path) -> None:
    stored, _, files = _fp8_reference()
    _write_safetensors_with_index(path, stored, files)


def _write_mxfp4(path: pathlib.Path) -> None:
    stored, files = _mxfp4_reference()
    _write_safetensors_with_index(path, stored, files)


_WRITERS: dict[str, Any] = {
    "llama_fsdp_ws1": _write_llama_fsdp,
    "llama_fsdp_ws2": _write_llama_fsdp,
    "llama_fsdp_ws4": _write_llama_fsdp,
    "llama_fsdp_tp_2x2": _write_llama_fsdp_tp,
    "mixed": _write_mixed,
    "mixed_per_rank": _write_mixed_per_rank,
    "mixed_zstd": _write_mixed_zstd,
    "hf_rank0": _write_hf_rank0,
    "hf_distributed": _write_hf_distributed,
    "hf_consolidated": _write_hf_consolidated,
    "fp8_block": _write_fp8_block,
    "mxfp4": _write_mxfp4,
}
