"""binder/: the files mybinder (repo2docker) builds the repository from, checked statically.

The full rehearsal -- a fresh venv from ``binder/requirements.txt``, ``postBuild``, the four
notebooks run in that venv -- is ``bash binder/check.sh`` (about 1.5 minutes; ``.ci/run`` runs
it). These tests check what it relies on, in a second and with precise messages: the CPU build of
the pinned torch, the repository itself installed, a Python that ``requires-python`` accepts, and
a ``postBuild`` that is executable and only calls commands this package has.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcp_explorer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _pin(lines: list[str], name: str) -> str | None:
    for line in lines:
        m = re.fullmatch(rf"{name}\s*==\s*([\w.+]+)", line)
        if m:
            return m.group(1)
    return None


def test_binder_uses_a_folder_with_the_three_files():
    # with binder/, repo2docker ignores configuration at the root: everything must be here
    assert {p.name for p in BINDER.iterdir()} >= {"requirements.txt", "runtime.txt", "postBuild"}


def test_requirements_pin_the_cpu_torch_and_install_the_repository():
    lines = _requirement_lines(BINDER / "requirements.txt")
    assert f"--extra-index-url {CPU_INDEX}" in lines, (
        "the CPU index (the default Linux wheel pulls CUDA, GBs)"
    )
    torch = _pin(lines, "torch")
    assert torch == "2.13.0", lines
    # the same torch as CI and a fresh machine install (requirements.txt at the root)
    assert _pin(_requirement_lines(ROOT / "requirements.txt"), "torch") == torch
    # ...and one the package accepts, so pip installs no second build of it
    dep = next(d for d in _pyproject()["project"]["dependencies"] if re.match(r"torch\b", d))
    from packaging.requirements import Requirement

    assert Requirement(dep).specifier.contains(torch), (dep, torch)
    # mybinder does not install the repository by itself: `.` (non-editable, as in the image)
    assert "." in lines, "binder/requirements.txt must install the repository ('.')"
    assert not any(line.startswith(("-e", "--editable")) for line in lines)
    assert lines.index(f"--extra-index-url {CPU_INDEX}") < lines.index(f"torch=={torch}")


def test_runtime_is_a_python_the_package_accepts():
    text = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-(\d+)\.(\d+)", text)
    assert m, f"runtime.txt must say python-X.Y, not {text!r}"
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert spec.contains(f"{m.group(1)}.{m.group(2)}"), (text, str(spec))
    # the torch wheel this machine's pip takes (and CI tests against) is built for 3.11
    assert text == "python-3.11"


def test_postbuild_is_executable_and_only_calls_our_commands():
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK), "postBuild must be executable (git mode 100755)"
    text = post.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(post)], check=True)
    scripts = set(_pyproject()["project"]["scripts"])
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.fullmatch(r"set( [-+][a-z]+)+( pipefail)?", line):
            continue
        words = shlex.split(line)
        assert words[0] in scripts, f"postBuild calls {words[0]!r}, not a command of this package"
        commands.append(words)
    assert commands, "postBuild runs nothing"
    parser = build_parser()
    for words in commands:
        try:
            args = parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"postBuild runs {shlex.join(words)!r}: not a subcommand/option dcp-explorer has")
        assert callable(args.func)
    assert ["dcp-explorer", "samples"] in commands  # the notebooks then open instantly


def test_git_records_postbuild_as_executable():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-s", "binder/postBuild"], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    if not out:
        pytest.skip("binder/postBuild is not committed yet")
    assert out.split()[0] == "100755", out


def test_check_script_is_there_and_parses():
    check = BINDER / "check.sh"
    assert os.access(check, os.X_OK)
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(check)], check=True)
