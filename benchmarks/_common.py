"""What the benchmarks share: a measurement in a fresh process, a warm page cache, peak RSS.

Each ``bench_*.py`` runs every measured step in a fresh interpreter (:func:`run`) whose code starts
with :data:`PRELUDE`, so it reports its own peak RSS (:func:`peak_rss`) and the bytes its read
syscalls returned (:func:`rchar`) as one JSON line; :func:`measure` interleaves rounds of several
steps and keeps the fastest run of each. Inputs are read once beforehand (:func:`warm`), so every
step finds them in the page cache, and built once into a cache directory (:func:`build_once`).

A measured process imports this module (the benchmarks folder is on its ``PYTHONPATH``), so only
modules Python has loaded at start-up anyway are imported at its top: the others are imported in
the functions that need them, and a step's peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

HERE = Path(__file__).resolve().parent

#: The first lines of a measured step's code (``python -c``): the helpers below, warnings silenced.
PRELUDE = """
import json, os, sys, time, warnings
warnings.simplefilter("ignore")
from _common import peak_rss, rchar
"""


def peak_rss() -> int:
    """Peak RSS of this process in bytes: ``VmHWM``, which (unlike ``ru_maxrss``) a process started by
    fork+exec does not inherit from its parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def rchar() -> int:
    """Bytes returned by this process's read syscalls so far (page-cache hits included)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return -1


def warm(*dirs: Path) -> int:
    """Read every file of ``dirs`` once (the page cache is then warm); returns the bytes read."""
    total = 0
    buf = bytearray(16 << 20)
    for d in dirs:
        for p in sorted(d.iterdir()):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while k := f.readinto(buf):
                        total += k
    return total


def run_json(
    cmd: list[str],
    *,
    env: Mapping[str, str] | None = None,
    what: str = "benchmark step",
    stderr: bool = False,
) -> Any:
    """Run ``cmd`` in a fresh process and return the JSON object on the last line of its output.

    The process gets ``env`` (default: this one's) with this checkout and the benchmarks folder first
    on ``PYTHONPATH``. With ``stderr=True`` its standard error goes to ours as it runs (progress);
    otherwise it is captured and shown only when the process fails, which exits this one.
    """
    import subprocess

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None if stderr else subprocess.PIPE,
                         text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{what} failed (exit {out.returncode})" + ("" if stderr else f":\n{out.stderr}"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(code: str, *args: str, env: Mapping[str, str] | None = None, what: str = "benchmark step") -> Any:
    """``python -c code *args`` in a fresh process (see :func:`run_json`): the JSON it printed last."""
    return run_json([sys.executable, "-c", code, *args], env=env, what=what)


def measure(
    steps: Mapping[str, tuple[str, ...]], repeat: int, env: Mapping[str, str] | None = None
) -> dict[str, dict]:
    """Each step (name -> ``(code, *args)`` for :func:`run`) ``repeat`` times, a fresh process per run.

    Rounds are interleaved (so a burst of load from other processes on the machine hits every step
    alike); the fastest run of each step is kept, with every run's time (``all_seconds``) and the
    highest peak RSS (``peak_rss``).
    """
    runs: dict[str, list[dict]] = {k: [] for k in steps}
    for _ in range(repeat):
        for name, (code, *args) in steps.items():
            runs[name].append(run(code, *args, env=env))
    out = {}
    for name, rs in runs.items():
        r = dict(min(rs, key=lambda r: r["seconds"]))
        r["all_seconds"] = [x["seconds"] for x in rs]
        r["peak_rss"] = max(x["peak_rss"] for x in rs)
        out[name] = r
    return out


def fmt_runs(r: dict) -> str:
    """A measured step's run times, ``"0.512/0.498/0.503 (median 0.503)"``."""
    import statistics

    return (
        "/".join(f"{s:.3f}" for s in r["all_seconds"])
        + f" (median {statistics.median(r['all_seconds']):.3f})"
    )


def torch_version() -> str:
    """The installed torch's version (without importing it): part of the cache key of what it built."""
    from importlib.metadata import version

    return version("torch")


def build_once(d: Path, code: str, *args: object, what: str = "building the checkpoint") -> Path:
    """The directory ``d``, built by ``python -c code TMP *args`` unless it is there already.

    ``code`` writes into the empty directory ``TMP`` (next to ``d``) and prints a JSON line last, kept
    as ``TMP/keys.json``; ``TMP`` is then renamed to ``d``, so a build cut short is never mistaken for
    a finished one (``d/keys.json`` marks it).
    """
    if not (d / "keys.json").exists():
        import shutil

        tmp = d.parent / f".{d.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t = time.perf_counter()
        keys = run(code, str(tmp), *map(str, args), what=what)
        (tmp / "keys.json").write_text(json.dumps(keys))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        print(f"built {d} in {time.perf_counter() - t:.1f} s")
    return d
