"""The load-plan simulator against torch's real engine.

* Real multi-process ``dcp.load`` runs (:mod:`dcp_explorer.verify`): every rank records the
  ReadItems torch planned and compares them -- all fields, in order -- with
  ``simulate_load(...).reads_for(rank)``. All scenarios share one set of 4 worker processes
  (one torch import each); each scenario gets its own gloo process group of its mesh's size.
* "Will it load?": ``simulate_load(ckpt, state_dict=...)`` reports a wrong state dict with
  exactly the message torch raises (got by really calling ``dcp.load(no_dist=True)``).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import dcp_explorer  # noqa: E402
from dcp_explorer.layout import parse_mesh  # noqa: E402
from dcp_explorer.plan import simulate_load  # noqa: E402
from dcp_explorer.verify import FIELDS, Scenario, VerifyReport, compare_rows, verify_many  # noqa: E402

#: Target placements for ``mixed`` on 3 ranks: uneven splits and empty shards on the target
#: (replicated [4, 4] S(0) -> 2,2,0; extra.list.0 [6, 2] S(1) -> 1,1,0), read from a
#: 4-rank save that itself has empty chunks (tiny_rows, token_ids); the rest stays plain.
MIXED_RULES: dict[str, Any] = {
    "model.row_sharded": "S(0)",  # 10 rows saved 3,3,3,1 -> 4,4,2
    "model.col_sharded": "S(1)",  # 13 cols saved 4,4,4,1 -> 5,5,3
    "model.tiny_rows": "S(0)",  # saved with an empty chunk at (3, 0)
    "model.grid": "S(1)",  # saved as a 2x2 grid, loaded as column blocks
    "model.replicated": "S(0)",  # 4 rows over 3 ranks: 2,2,0 (empty shard)
    "model.embed_bf16": "S(1)",  # 4 cols over 3: 2,2,0 (empty shard)
    "model.token_ids": "S(0)",  # 9 over 3 (saved 3,3,3,0)
    "extra.list.0": "S(1)",  # [6, 2] -> cols 1,1,0 (empty shard)
    "model.mask": "S(1)",  # bool [6, 5] -> 2,2,1
}

#: ``mixed`` on a 2x2 mesh with uneven _StridedShard (what FSDP2 over TP produces), 2-D grids
#: and replicate-then-shard layouts.
MIXED_2D_RULES: dict[str, Any] = {
    "model.embed_bf16": ["SS(0,2)", "S(0)"],  # 11 rows: uneven strided
    "model.token_ids": ["SS(0,2)", "S(0)"],  # 9 rows
    "model.row_sharded": ["S(0)", "S(1)"],
    "model.col_sharded": ["R", "S(1)"],
    "model.grid": ["S(1)", "S(0)"],
    "model.tiny_rows": ["S(0)", "S(0)"],  # 3 rows over 4 (nested): 1,1,1,0
    "extra.list.0": ["R", "SS(0,2)"],
}

#: name -> (sample, target mesh, placements, preset): what each scenario checks.
SCENARIOS: dict[str, tuple[str, str, Any, str | None]] = {
    # FSDP resharding down: each target rank reads two saved chunks per tensor
    "llama_fsdp_ws4 -> 2 fsdp": ("llama_fsdp_ws4", "2", None, "fsdp"),
    # uneven resharding: 251 rows saved 63,63,63,62 loaded as 84,84,83 (chunks straddle ranks)
    "llama_fsdp_ws4 -> 3 fsdp": ("llama_fsdp_ws4", "3", None, "fsdp"),
    # resharding up: 4 ranks each read part of one of 2 saved chunks
    "llama_fsdp_ws2 -> 4 fsdp": ("llama_fsdp_ws2", "4", None, "fsdp"),
    # 1-D save -> 2-D FSDP x TP load: _StridedShard colwise, (S0, S1) rowwise, 2-D sweep
    "llama_fsdp_ws4 -> dp=2,tp=2 fsdp_tp": ("llama_fsdp_ws4", "dp=2,tp=2", None, "fsdp_tp"),
    # 2-D strided save (non-monotonic chunk rows) -> 1-D FSDP on 4 ranks
    "llama_fsdp_tp_2x2 -> 4 fsdp": ("llama_fsdp_tp_2x2", "4", None, "fsdp"),
    # same, on 2 ranks: a rank's rows come from chunks saved by non-adjacent ranks
    "llama_fsdp_tp_2x2 -> 2 fsdp": ("llama_fsdp_tp_2x2", "2", None, "fsdp"),
    # same layout back: strided chunks read one to one
    "llama_fsdp_tp_2x2 -> dp=2,tp=2 fsdp_tp": ("llama_fsdp_tp_2x2", "dp=2,tp=2", None, "fsdp_tp"),
    # uneven dims, empty shards on both sides, bf16/int64/bool, 0-d, nested lists, bytes items
    "mixed -> 3 rules": ("mixed", "3", MIXED_RULES, None),
    # uneven _StridedShard targets built with DTensor.from_local(shape=, stride=)
    "mixed -> dp=2,tp=2 strided rules": ("mixed", "dp=2,tp=2", MIXED_2D_RULES, None),
    # Hugging Face reader: flat keys (sorted fully), one chunk per tensor
    "hf_rank0 -> 3 fsdp": ("hf_rank0", "3", None, "fsdp"),
    # Hugging Face distributed shards: chunk indices follow the directory listing
    "hf_distributed -> 3 fsdp": ("hf_distributed", "3", None, "fsdp"),
    # zstd-compressed items: same plan as uncompressed
    "mixed_zstd -> 2 fsdp": ("mixed_zstd", "2", None, "fsdp"),
    # HSDP: replicate over one mesh dim, shard over the other
    "llama_fsdp_ws1 -> rep=2,shard=2 hsdp": ("llama_fsdp_ws1", "rep=2,shard=2", None, "hsdp"),
    # use_collectives=False: no .metadata, torch plans rank r against __{r}.metadata only; on 2 ranks
    # each rank reads only part of its shard (what its own saving rank wrote), on 4 all of it
    "mixed_per_rank -> 2 fsdp": ("mixed_per_rank", "2", None, "fsdp"),
    "mixed_per_rank -> 4 rules": ("mixed_per_rank", "4", MIXED_RULES, None),
}


@pytest.fixture(scope="module")
def reports(samples: dict[str, pathlib.Path]) -> dict[str, VerifyReport]:
    """Every scenario, verified in one run of 4 worker processes (~15 s on 2 cores)."""
    todo = dict(SCENARIOS)
    scs = [Scenario(str(samples[s]), mesh, pl, preset) for s, mesh, pl, preset in todo.values()]
    # a broken scenario must give per-rank errors, not a hang, and not stop the others
    scs.append(Scenario(str(samples["mixed"].parent / "no-such-checkpoint"), "2"))
    got = verify_many(scs, nproc=4, timeout=240)
    return {**dict(zip(todo, got[:-1], strict=True)), "missing checkpoint": got[-1]}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_real_load_matches_simulation(name: str, reports: dict[str, VerifyReport],
                                      samples: dict[str, pathlib.Path]) -> None:  # fmt: skip
    sample, mesh, placements, preset = SCENARIOS[name]
    rep = reports[name]
    assert rep.world_size == parse_mesh(mesh).size
    assert not any(rep.errors), rep.summary()
    assert rep.ok, rep.summary()
    assert rep.recorded == rep.simulated
    assert all(n > 0 for n in rep.recorded)
    # the plan's summary table counts the same ReadItems as the materialised rows
    plan = simulate_load(dcp_explorer.open(samples[sample]), mesh, placements, preset=preset)
    assert plan.ok
    assert plan.per_rank["read_items"].tolist() == list(rep.recorded)


def test_per_rank_metadata_checkpoint(
    samples: dict[str, pathlib.Path], reports: dict[str, VerifyReport]
) -> None:
    """torch plans each rank against its own ``__r.metadata``: on 2 ranks, rank r reads only what saving
    rank r wrote -- part of its shard, silently; the simulation says so, and its ReadItems are torch's."""
    for name in ("mixed_per_rank -> 2 fsdp", "mixed_per_rank -> 4 rules"):
        rep = reports[name]
        assert not any(rep.errors), rep.summary()
        assert rep.ok, rep.summary()
    ck = dcp_explorer.open(samples["mixed_per_rank"])
    two = simulate_load(ck, 2, preset="fsdp")
    assert two.ok
    partial = [p for p in two.problems if p.kind == "partial_load"]
    assert partial and all(p.severity == "warning" for p in partial)
    # a rank without its own __r.metadata: torch finds no metadata and fails
    eight = simulate_load(ck, 8, preset="fsdp")
    assert not eight.ok and any(
        p.kind == "per_rank_metadata" and p.severity == "error" for p in eight.problems
    )


def test_broken_scenario_reports_errors(reports: dict[str, VerifyReport]) -> None:
    rep = reports["missing checkpoint"]
    assert not rep.ok
    assert len(rep.errors) == 2 and all(rep.errors)
    assert "no-such-checkpoint" in rep.errors[0]
    assert "ERROR" in rep.summary() and rep.summary().endswith("MISMATCH")


def test_command_line(samples: dict[str, pathlib.Path]) -> None:
    """``python -m dcp_explorer.verify`` without torchrun spawns its workers and exits 0 on a match."""
    rules = json.dumps({"model.*": "S(0)", "extra.list.0": "S(1)"})
    proc = subprocess.run(
        [sys.executable, "-m", "dcp_explorer.verify", str(samples["mixed_zstd"]), "--mesh", "dp=2",
         "--placements", rules, "--timeout", "120"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "OK"
    assert [ln.split(":")[0].strip() for ln in lines[1:-1]] == ["rank 0", "rank 1"]
    assert all(": OK (" in ln for ln in lines[1:-1])


def test_scenarios_exercise_what_they_claim(samples: dict[str, pathlib.Path]) -> None:
    """Empty target shards, multi-chunk reads and strided layouts really occur in the scenarios."""
    mixed = simulate_load(dcp_explorer.open(samples["mixed"]), "3", MIXED_RULES)
    empty = {p.fqn for p in mixed.problems if p.kind == "empty_shard"}
    assert {"model.replicated", "model.embed_bf16", "extra.list.0"} <= empty
    reads = mixed.reads
    assert (reads[reads.fqn == "model.col_sharded"].groupby("rank").size() > 1).all()
    tp = simulate_load(dcp_explorer.open(samples["llama_fsdp_ws4"]), "dp=2,tp=2", preset="fsdp_tp")
    r = tp.reads_for(1)
    w1 = r[r.fqn == "model.layers.0.feed_forward.w1.weight"]
    assert w1.dest_offset.iloc[0] == (95, 0)  # (SS(0,2), S(0)) at coordinate (0, 1)
    hf = dcp_explorer.open(samples["hf_distributed"])
    assert hf.index.chunk_start[-1] > len(hf.index.fqns)  # several chunks per tensor


def test_compare_rows_reports_differences() -> None:
    a = [("x", "tensor", (0,), (0,), (0,), 0, (0,), (3,)), ("y", "bytes", None, (0,), None, None, (0,), (0,))]
    b = [("x", "tensor", (0,), (0,), (0,), 1, (0,), (3,))]
    diffs, n = compare_rows(a, b)
    assert n == 2
    assert "storage_chunk recorded 0 simulated 1" in diffs[0]
    assert diffs[1].startswith("row 1: only recorded")
    assert compare_rows(a, a) == ([], 0)
    assert len(FIELDS) == len(a[0])


# ------------------------------------------------------------------------------------------
# will it load? the simulator's messages are torch's
# ------------------------------------------------------------------------------------------
def _torch_error(path: pathlib.Path, sd: dict[str, Any], strict: bool = True) -> str | None:
    """The message of the exception a real ``dcp.load(no_dist=True)`` raises (None: it loads)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(
            sd, checkpoint_id=path, no_dist=True, planner=DefaultLoadPlanner(allow_partial_load=not strict)
        )
    except CheckpointException as ex:
        (failure,) = ex.failures.values()
        exc = failure[0] if isinstance(failure, tuple) else failure
        return str(exc)
    return None


def _errors(plan: Any) -> list[str]:
    return [p.reason for p in plan.problems if p.severity == "error"]


def _wrong_state_dicts() -> dict[str, dict[str, Any]]:
    """One problem each, in a state dict that is otherwise right (llama_fsdp_ws2)."""
    good = {"norm.weight": torch.empty(72), "output.weight": torch.empty(251, 72)}
    return {
        "missing key": {"model": {**good, "layers.2.attention.wq.weight": torch.empty(72, 72)}},
        "wrong shape": {"model": {**good, "tok_embeddings.weight": torch.empty(250, 72)}},
        "prefix mismatch": {"model": {"_orig_mod.norm.weight": torch.empty(72), **good}},
        "tensor saved, object loaded": {"model": {**good, "layers.0.ffn_norm.weight": 0.5}},
    }


@pytest.mark.parametrize("case", list(_wrong_state_dicts()))
def test_simulated_error_is_torchs(case: str, samples: dict[str, pathlib.Path]) -> None:
    path = samples["llama_fsdp_ws2"]
    sd = _wrong_state_dicts()[case]
    plan = simulate_load(dcp_explorer.open(path), state_dict=sd)
    expected = _torch_error(path, sd)
    assert expected is not None, "torch loaded it"
    assert _errors(plan) == [expected]
    assert not plan.ok


def test_all_problems_at_once(samples: dict[str, pathlib.Path]) -> None:
    """torch stops at the first problem (flattening order); the simulator lists all, same first."""
    path = samples["llama_fsdp_ws2"]
    merged: dict[str, Any] = {"model": {}}
    for sd in _wrong_state_dicts().values():
        merged["model"].update(sd["model"])
    merged["optim"] = {"state": {"norm.weight": {"exp_avg": torch.empty(71)}}}
    plan = simulate_load(dcp_explorer.open(path), state_dict=merged)
    errors = _errors(plan)
    assert errors[0] == _torch_error(path, merged)
    singles = {_torch_error(path, sd) for sd in _wrong_state_dicts().values()}
    singles.add(_torch_error(path, {"optim": merged["optim"]}))
    assert set(errors) == singles and len(errors) == len(singles)


def test_partial_load_skips_missing_keys(samples: dict[str, pathlib.Path]) -> None:
    """strict=False (allow_partial_load): torch loads; the simulator has warnings, no errors."""
    path = samples["llama_fsdp_ws2"]
    sd = {"model": {"_orig_mod.norm.weight": torch.empty(72), "norm.weight": torch.empty(72),
                    "layers.9.ffn_norm.weight": torch.empty(72)}}  # fmt: skip
    assert _torch_error(path, sd, strict=False) is None
    plan = simulate_load(dcp_explorer.open(path), state_dict=sd, strict=False)
    assert plan.ok
    assert [p.fqn for p in plan.problems if p.kind == "missing_key"] == [
        "model._orig_mod.norm.weight", "model.layers.9.ffn_norm.weight"]  # fmt: skip
    # and the read the simulator predicts for the one real key is torch's (whole tensor, 2 chunks)
    rows = plan.reads_for(0)
    assert rows.fqn.tolist() == ["model.norm.weight", "model.norm.weight"]
