"""Command line: ``dcp-explorer info | plan | load | export | diff | samples | demo``.

Exit status: 0 on success, 2 on an error (the message names the file and the problem).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any, cast

from .errors import DcpExplorerError

__all__ = ["main"]


def _fmt_bytes(n: float) -> str:
    from .html import fmt_bytes

    return fmt_bytes(n)


def _info_text(ckpt: Any, top: int) -> str:
    s = ckpt.summary()
    lines = [
        f"{s['path']}",
        f"  format        {s['format']}",
        f"  tensors       {s['num_tensors']:,}   bytes items {s['num_bytes_items']:,}",
        f"  chunks        {s['num_chunks']:,}",
        f"  elements      {s['numel']:,}",
        f"  tensor bytes  {_fmt_bytes(s['tensor_bytes'])}",
        f"  files         {s['num_files']:,}   saving ranks {s['saving_ranks']:,}",
    ]
    if s["quantized"]:
        lines.append(f"  quantized     {s['quantized']:,} tensors")
    lines.append(
        "  dtypes        " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(s["dtypes"].items()))
    )
    if ckpt.open_seconds is not None:
        lines.append(
            f"  opened in     {ckpt.open_seconds:.2f} s" + (" (from cache)" if ckpt.from_cache else "")
        )
    t = ckpt.tensors
    if len(t):
        lines.append("")
        lines.append(f"  largest entries (of {len(t):,}):")
        big = t.sort_values("nbytes", ascending=False).head(top)
        w = max(len(f) for f in big["fqn"])
        for r in big.itertuples(index=False):
            shape = "x".join(map(str, r.shape)) if r.kind == "tensor" else "-"
            q = f" [{r.quant}]" if r.quant else ""
            lines.append(f"    {r.fqn:<{w}}  {r.kind:<6} {str(r.dtype or ''):<14} {shape:<16} "
                         f"{r.num_chunks:>6} chunks  {_fmt_bytes(r.nbytes):>10}{q}")  # fmt: skip
    for wmsg in s["warnings"]:
        lines.append(f"  warning: {wmsg}")
    return "\n".join(lines)


def _cmd_info(a: argparse.Namespace) -> int:
    from . import open as dx_open

    ckpt = dx_open(a.path, format=a.format, rank=a.rank, strict=not a.lenient, cache=not a.no_cache)
    if a.json:
        out = ckpt.summary()
        out["tensors"] = json.loads(ckpt.tensors.to_json(orient="records"))
        print(json.dumps(out, indent=2, default=str))
    else:
        print(_info_text(ckpt, a.top))
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from . import open as dx_open
    from .plan import simulate_load

    ckpt = dx_open(a.path, strict=not a.lenient)
    placements = json.loads(a.placements) if a.placements else None
    plan = simulate_load(ckpt, a.mesh, placements, preset=a.preset, strict=not a.partial)
    if a.csv:
        (plan.reads if a.reads else plan.per_rank).to_csv(a.csv, index=False)
    if a.json:
        out = {"totals": plan.totals(),
               "per_rank": json.loads(plan.per_rank.to_json(orient="records")),
               "per_file": json.loads(plan.per_file.to_json(orient="records")),
               "problems": [dataclasses.asdict(p) for p in plan.problems]}  # fmt: skip
        print(json.dumps(out, indent=2, default=str))
    else:
        t = plan.totals()
        print(f"{ckpt.path} -> mesh {t['mesh']} ({t['world_size']} ranks), reader {plan.reader}")
        print(f"  {'will load' if t['ok'] else 'WILL FAIL'}: {t['errors']} errors, {t['warnings']} warnings")
        print(f"  read items    {t['read_items']:,}")
        print(f"  bytes needed  {_fmt_bytes(t['bytes_needed'])}")
        print(f"  bytes read    {_fmt_bytes(t['bytes_read'])}  (x{t['amplification']:.2f})")
        pr = plan.per_rank
        worst = pr.sort_values("bytes_read", ascending=False).head(a.top)
        print(f"  busiest ranks (of {len(pr)}):")
        for r in worst.itertuples(index=False):
            # cast: pandas-stubs type a row's fields as any scalar; bytes_read is an int64 column
            print(f"    rank {r.rank:>5} {str(r.coordinate):<12} {r.read_items:>8,} items  "
                  f"{_fmt_bytes(cast(int, r.bytes_read)):>10} read  x{r.amplification:.2f}  {r.files_opened} files")  # fmt: skip
        for p in plan.problems:
            if p.severity != "info":
                print(f"  {p.severity}: {p.fqn}: {p.reason}")
    return 0 if plan.ok else 1


def _cmd_load(a: argparse.Namespace) -> int:
    from . import open as dx_open
    from .load import tensor_stats

    ckpt = dx_open(a.path)
    e = ckpt.index.entry_index(ckpt.tensor(a.fqn).fqn)
    if ckpt.index.kinds[e] == 1:
        obj = ckpt.load(a.fqn, trusted=False)
        print(json.dumps({"fqn": a.fqn, "kind": "bytes", "value": repr(obj)}, indent=None if a.json else 2))
        return 0
    t = ckpt.load(a.fqn, slices=a.slice, dequantize=not a.raw)
    st = tensor_stats(t)
    st["fqn"] = a.fqn
    st["bytes_read"] = ckpt.loader.stats.bytes_read
    if a.slice:
        st["slice"] = a.slice
    if a.json:
        print(json.dumps(st))
    else:
        print(f"{a.fqn}{'[' + a.slice + ']' if a.slice else ''}")
        for k in ("dtype", "shape", "numel", "min", "max", "mean", "std", "nan", "inf", "bytes_read"):
            if k in st:
                v = st[k]
                print(f"  {k:<10} {v:.6g}" if isinstance(v, float) else f"  {k:<10} {v}")
        if a.show:
            import torch

            torch.set_printoptions(threshold=200, edgeitems=3)
            print(t)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from . import open as dx_open

    ckpt = dx_open(a.path)
    rename = dict(r.split("=", 1) for r in a.rename) if a.rename else None
    files = ckpt.export(a.select, a.to, format=a.format, dtype=a.dtype, rename=rename,
                        max_shard_size=int(float(a.max_shard_size) * (1 << 30)))  # fmt: skip
    for f in files:
        print(f)
    return 0


def _cmd_diff(a: argparse.Namespace) -> int:
    from .diff import run_cli

    return run_cli(a)


def _cmd_samples(a: argparse.Namespace) -> int:
    from .samples import DESCRIPTIONS, make_samples

    paths = make_samples(a.out_dir, a.names or None, force=a.force)
    for name, p in paths.items():
        print(f"{name:<20} {p}   {DESCRIPTIONS.get(name, '')}")
    return 0


def find_notebooks() -> str | None:
    """The ``notebooks/`` folder: in the working directory, or beside the installed package (a clone)."""
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.path.join(os.getcwd(), "notebooks"), os.path.join(here, "notebooks")):
        if os.path.isdir(cand) and any(f.endswith(".ipynb") for f in os.listdir(cand)):
            return cand
    return None


def _cmd_lab(a: argparse.Namespace) -> int:
    import os
    import shutil
    import subprocess

    from .samples import make_samples

    paths = make_samples()
    print(f"{len(paths)} sample checkpoints ready in {next(iter(paths.values())).parent}")
    nb = a.notebooks or find_notebooks()
    if nb is None:
        print("dcp-explorer: error: no notebooks/ folder found (run from a clone of the repository, or pass "
              "--notebooks DIR)", file=sys.stderr)  # fmt: skip
        return 2
    exe = shutil.which("jupyter")
    if exe is None:
        print("dcp-explorer: error: jupyter is not installed (pip install jupyterlab)", file=sys.stderr)
        return 2
    cmd = [exe, "lab", f"--notebook-dir={nb}", f"--ServerApp.port={a.port}", f"--ServerApp.ip={a.ip}"]
    if a.no_browser:
        cmd.append("--no-browser")
    if getattr(os, "geteuid", lambda: 1)() == 0:  # JupyterLab refuses to run as root without it
        cmd.append("--allow-root")
    cmd += a.extra
    check = a.check or os.environ.get("CI", "").lower() == "true"
    if check:
        return _lab_check(cmd, nb)
    print("starting:", " ".join(cmd))
    if a.dry_run:
        return 0
    return subprocess.call(cmd)


def _lab_check(cmd: list[str], notebooks: str, timeout: float = 120.0) -> int:
    """Start JupyterLab headless on a free port, check it serves the notebooks and the lab page, stop it.

    What ``dcp-explorer lab`` does under CI (``CI=true``) or with ``--check``: a server that never
    ends cannot be a CI step, but whether it starts and serves the notebooks can.
    """
    import json
    import os
    import socket
    import subprocess
    import tempfile
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=os.path.join(tmp, "rt"), JUPYTER_CONFIG_DIR=os.path.join(tmp, "cfg"),
                   JUPYTERLAB_WORKSPACES_DIR=os.path.join(tmp, "ws"))  # fmt: skip
        cmd = [c for c in cmd if not c.startswith(("--ServerApp.port=", "--ServerApp.ip="))]
        cmd += [f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1", "--no-browser", "--ServerApp.token=",
                "--ServerApp.password=", "--ServerApp.open_browser=False"]  # fmt: skip
        print("checking:", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/api/contents", timeout=5) as r:
                        listing = json.load(r)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err = proc.stderr.read() if proc.stderr else ""
                        print(
                            f"dcp-explorer: error: JupyterLab did not start:\n{err[-2000:]}", file=sys.stderr
                        )
                        return 2
                    time.sleep(0.5)
            names = sorted(x["name"] for x in listing.get("content", []) if x["name"].endswith(".ipynb"))
            want = sorted(f for f in os.listdir(notebooks) if f.endswith(".ipynb"))
            with urllib.request.urlopen(f"{base}/lab", timeout=30) as r:
                page = r.read().decode("utf-8", "replace")
            ok = names == want and "jupyter" in page.lower()
            print(f"JupyterLab served {len(names)} notebooks at {base}/lab: {', '.join(names)}")
            return 0 if ok else 2
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cmd_demo(a: argparse.Namespace) -> int:
    from . import open as dx_open
    from .samples import make_samples

    paths = make_samples(a.out_dir)
    for name in a.show:
        print(f"== sample {name}")
        print(_info_text(dx_open(paths[name]), top=6))
        print()
    print(f"{len(paths)} sample checkpoints in {next(iter(paths.values())).parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    p = argparse.ArgumentParser(
        prog="dcp-explorer",
        description="Look inside PyTorch distributed checkpoints (DCP) and safetensors checkpoints.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"dcp-explorer {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    i = sub.add_parser("info", help="summary and largest tensors of a checkpoint (metadata only)")
    i.add_argument("path", help="checkpoint directory, .safetensors file, or fsspec URL")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--format", choices=["dcp", "safetensors"], help="force a reader")
    i.add_argument("--rank", type=int, help="per-rank DCP metadata: read only __RANK.metadata")
    i.add_argument("--top", type=int, default=15, help="how many of the largest entries to list")
    i.add_argument("--lenient", action="store_true", help="report missing/short data files as warnings")
    i.add_argument("--no-cache", action="store_true", help="do not use the parsed-metadata cache")
    i.set_defaults(func=_cmd_info)

    pl = sub.add_parser("plan", help="simulate dcp.load on a target mesh: what every rank reads")
    pl.add_argument("path", help="checkpoint directory or URL")
    pl.add_argument("--mesh", required=True, help="target mesh, e.g. dp=4,tp=2 or 8")
    pl.add_argument("--preset", choices=["fsdp", "hsdp", "fsdp_tp", "replicate"], help="placement preset")
    pl.add_argument("--placements", help='JSON rules, e.g. \'{"*.wq.weight": ["SS(0,2)", "S(0)"]}\'')
    pl.add_argument("--partial", action="store_true", help="allow_partial_load: missing keys are not errors")
    pl.add_argument(
        "--json", action="store_true", help="totals, per-rank and per-file tables and problems as JSON"
    )
    pl.add_argument(
        "--csv", help="write the per-rank table (or every ReadItem with --reads) to this CSV file"
    )
    pl.add_argument("--reads", action="store_true", help="with --csv: every ReadItem of every rank")
    pl.add_argument("--top", type=int, default=8, help="how many of the busiest ranks to list")
    pl.add_argument("--lenient", action="store_true", help="open with missing/short data files as warnings")
    pl.set_defaults(func=_cmd_plan)

    ld = sub.add_parser("load", help="load one tensor (or a slice) and print its statistics")
    ld.add_argument("path")
    ld.add_argument("fqn")
    ld.add_argument("--slice", help="e.g. '0:10, :' (numpy-style)")
    ld.add_argument("--raw", action="store_true", help="do not dequantize FP8/MXFP4")
    ld.add_argument("--show", action="store_true", help="also print the values (abbreviated)")
    ld.add_argument("--json", action="store_true")
    ld.set_defaults(func=_cmd_load)

    ex = sub.add_parser("export", help="write selected tensors as safetensors (or torch.save)")
    ex.add_argument("path")
    ex.add_argument("--select", nargs="+", default=["*"], help="fqns, globs or re:regex (default: all)")
    ex.add_argument("--to", required=True, help="output directory (safetensors) or file (torch)")
    ex.add_argument("--format", choices=["safetensors", "torch"], default="safetensors")
    ex.add_argument("--dtype", help="cast every tensor, e.g. bfloat16")
    ex.add_argument("--rename", nargs="*", help="prefix renames OLD=NEW, e.g. model.=")
    ex.add_argument("--max-shard-size", default="5", help="GiB per safetensors file (default 5)")
    ex.set_defaults(func=_cmd_export)

    from .diff import add_arguments as _diff_arguments

    df = sub.add_parser(
        "diff", help="compare two checkpoints (exit 0 equal within tolerance, 1 different, 2 error)"
    )
    _diff_arguments(df)
    df.set_defaults(func=_cmd_diff)

    s = sub.add_parser("samples", help="write the sample checkpoints (real multi-process torch saves)")
    s.add_argument("out_dir", nargs="?", default=None, help="where (default: the user cache)")
    s.add_argument("--names", nargs="*", help="only these samples")
    s.add_argument("--force", action="store_true", help="rewrite even if present")
    s.set_defaults(func=_cmd_samples)

    lb = sub.add_parser("lab", help="make the samples if missing and start JupyterLab on the notebooks")
    lb.add_argument("--notebooks", help="folder of notebooks (default: ./notebooks or the clone's)")
    lb.add_argument("--port", type=int, default=8888)
    lb.add_argument("--ip", default="127.0.0.1")
    lb.add_argument("--no-browser", action="store_true")
    lb.add_argument("--dry-run", action="store_true", help="make the samples and print the command only")
    lb.add_argument(
        "--check",
        action="store_true",
        help="start the server headless, check it serves the notebooks, stop (the default when CI=true)",
    )
    lb.add_argument("extra", nargs=argparse.REMAINDER, help="further arguments for jupyter lab")
    lb.set_defaults(func=_cmd_lab)

    d = sub.add_parser("demo", help="make the samples if missing and show a few of them")
    d.add_argument("--out-dir", default=None)
    d.add_argument("--show", nargs="*", default=["llama_fsdp_tp_2x2", "mixed", "fp8_block"])
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dcp-explorer``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DcpExplorerError as e:
        print(f"dcp-explorer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
