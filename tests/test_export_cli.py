"""Export (streaming safetensors, sharded + index, torch.save) and the command line, against torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import dcp_explorer
from dcp_explorer.cli import main

warnings.filterwarnings("ignore", category=UserWarning)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1)


def _files(d) -> dict[str, tuple[int, int]]:
    return {
        f: (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
        for f in os.listdir(d)
    }


@pytest.mark.parametrize("shard_mib", [None, 0.1])
def test_export_safetensors_loads_in_safetensors_and_torch_hf_reader(samples, tmp_path, shard_mib):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    src = dcp_explorer.open(samples["llama_fsdp_tp_2x2"])
    before = _files(samples["llama_fsdp_tp_2x2"])
    kw = {} if shard_mib is None else {"max_shard_size": int(shard_mib * (1 << 20))}
    files = src.export(
        "model.*", tmp_path / "out", dtype="bfloat16", rename={"model.": ""}, progress=False, **kw
    )
    assert _files(samples["llama_fsdp_tp_2x2"]) == before  # nothing written into the source
    names = sorted(p.name for p in files)
    if shard_mib is None:
        assert names == ["model.safetensors"]
    else:
        assert "model.safetensors.index.json" in names and len(names) > 2
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}
    # safetensors' own loader
    loaded = {}
    for p in files:
        if p.suffix == ".safetensors":
            loaded.update(load_file(p))
    want = {f[len("model.") :]: src.load(f).to(torch.bfloat16) for f in src.fqns if f.startswith("model.")}
    assert set(loaded) == set(want)
    for k, v in want.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(_bits(loaded[k]), _bits(v)), k
    # torch's HuggingFaceStorageReader
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in want.items()}
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(str(tmp_path / "out")), no_dist=True)
    for k, v in want.items():
        assert torch.equal(_bits(sd[k]), _bits(v)), k


def test_export_torch_save_round_trips_bytes_entries(samples, tmp_path):
    src = dcp_explorer.open(samples["mixed"])
    out = tmp_path / "mixed.pt"
    src.export("*", out, format="torch", progress=False)
    got = torch.load(out, weights_only=True)
    assert set(got) == set(src.fqns)
    for k in src.fqns:
        ref = src.load(k)
        if isinstance(ref, torch.Tensor):
            assert got[k].dtype == ref.dtype and torch.equal(_bits(got[k]), _bits(ref)), k
        else:
            assert got[k] == ref, k


def test_export_refuses_to_write_inside_the_checkpoint(samples):
    src = dcp_explorer.open(samples["mixed"])
    with pytest.raises(dcp_explorer.DcpExplorerError, match="inside the checkpoint"):
        src.export("model.*", os.path.join(samples["mixed"], "sub"))
    assert not os.path.exists(os.path.join(samples["mixed"], "sub"))


def test_export_rename_collision_is_an_error(samples, tmp_path):
    src = dcp_explorer.open(samples["mixed"])
    with pytest.raises(dcp_explorer.DcpExplorerError, match="rename maps both"):
        src.export(["model.plain", "model.mask"], tmp_path / "x", rename=lambda f: "same")


def test_export_dequantizes_fp8(samples, tmp_path):
    from safetensors.torch import load_file

    src = dcp_explorer.open(samples["fp8_block"])
    q = [src.fqns[e] for e in src.index.quant]
    src.export(q, tmp_path / "deq", progress=False)
    got = load_file(tmp_path / "deq" / "model.safetensors")
    for name in q:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], src.load(name))


def test_cli_info_json_and_text(samples, capsys):
    assert main(["info", str(samples["llama_fsdp_ws2"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ck = dcp_explorer.open(samples["llama_fsdp_ws2"])
    assert out["num_chunks"] == len(ck.chunks) and len(out["tensors"]) == len(ck.tensors)
    assert main(["info", str(samples["fp8_block"])]) == 0
    text = capsys.readouterr().out
    assert "hf_quantized" in text and "[fp8_block]" in text


def test_cli_load_prints_stats_that_match_torch(samples, capsys):
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    path = str(samples["llama_fsdp_ws4"])
    fqn = "model.layers.1.feed_forward.w2.weight"
    assert main(["load", path, fqn, "--slice", "3:9, ::2", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    ref = _load_state_dict_from_keys({fqn}, checkpoint_id=path)["model"]["layers.1.feed_forward.w2.weight"][
        3:9, ::2
    ]
    assert st["shape"] == list(ref.shape)
    assert st["min"] == pytest.approx(ref.min().item()) and st["max"] == pytest.approx(ref.max().item())
    assert st["mean"] == pytest.approx(ref.double().mean().item()) and st["nan"] == 0
    assert main(["load", path, "optim.param_groups.0.betas"]) == 0
    assert "(0.9, 0.999)" in capsys.readouterr().out


def test_cli_export_and_plan(samples, tmp_path, capsys):
    path = str(samples["llama_fsdp_ws4"])
    assert main(["export", path, "--select", "model.norm.weight", "--to", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["plan", path, "--mesh", "dp=2,tp=2", "--preset", "fsdp_tp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = dcp_explorer.simulate_load(path, "dp=2,tp=2", preset="fsdp_tp")
    assert out["totals"]["read_items"] == plan.totals()["read_items"] == int(plan.per_rank.read_items.sum())
    assert (
        main(["plan", path, "--mesh", "3", "--preset", "fsdp", "--csv", str(tmp_path / "r.csv"), "--reads"])
        == 0
    )
    import pandas as pd

    assert (
        len(pd.read_csv(tmp_path / "r.csv"))
        == dcp_explorer.simulate_load(path, 3, preset="fsdp").totals()["read_items"]
    )


def test_cli_errors_exit_2_and_name_the_file(tmp_path, capsys):
    (tmp_path / "junk.txt").write_text("hello")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "Looked for" in err


def test_cli_entry_point_runs(samples):
    r = subprocess.run([sys.executable, "-m", "dcp_explorer.cli", "info", str(samples["mixed"])],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "tensors" in r.stdout
