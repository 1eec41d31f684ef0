"""Docs that run: every code block of the README, and every docstring example of the package.

Markdown files (``README.md``, and ``docs/architecture.md`` when it exists) are cut into fenced
code blocks. The convention, visible in the Markdown source:

- ```` ```python ```` blocks run in order in one fresh namespace per file, in a subprocess whose
  working directory is a temporary folder (``HOME`` unchanged, so the cached sample checkpoints
  are used; ``MPLBACKEND=Agg``);
- ```` ```bash ```` blocks run one by one with ``bash -euo pipefail`` in a temporary folder (the
  ``dcp-explorer`` command lines on the samples);
- a block right after an HTML comment ``<!-- skip: REASON -->`` (a reason is required) is not run
  -- for what CI cannot do here: install packages, run the test suite itself, reach a real
  ``s3://`` bucket, start ``torchrun``;
- blocks without a language, or ``text``, are listings (directory trees, output), not code; any
  other language fails the test, so nothing is silently left out.

A failure names the file, the block number and the Markdown line (tracebacks show the Markdown
line itself). Docstring examples of every module of ``dcp_explorer`` run through
:class:`doctest.DocTestFinder` in one subprocess (``ELLIPSIS``, ``NORMALIZE_WHITESPACE``); examples
marked ``# doctest: +SKIP`` are counted and must say why in the docstring.

This file is also the runner the subprocesses execute (``python tests/test_readme.py python|doctest``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "architecture.md"]
PYTHON = ("python", "py", "python3")
SHELL = ("bash", "sh", "shell")
LISTING = ("", "text")
TIMEOUT = 300  # s per subprocess

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    file: str
    """The Markdown file's name, for messages."""
    number: int
    """1-based position among the file's fenced blocks."""
    lang: str
    """The info string's first word, lower case (``""`` when none)."""
    line: int
    """1-based line of the block's first code line."""
    code: str
    """The code, without the fences."""
    skip: str | None
    """The reason of a ``<!-- skip: REASON -->`` comment on the last non-blank line before the fence."""

    @property
    def where(self) -> str:
        return f"{self.file} block {self.number} ({self.lang or 'no language'}, line {self.line})"


def extract_blocks(text: str, file: str = "<markdown>") -> list[Block]:
    """The fenced code blocks of Markdown ``text``, in order.

    Raises
    ------
    ValueError
        A fence is never closed, or a skip comment gives no reason.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        sm = _SKIP.match(prev)
        if sm and not sm["reason"]:
            raise ValueError(f"{file} line {i}: a skip comment must give a reason: <!-- skip: REASON -->")
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and set(lines[i].strip()) == {fence[0]}
        ):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{file} line {start}: the code block opened here is never closed")
        i += 1
        blocks.append(Block(file, len(blocks) + 1, m["info"].lower(), start + 1, "\n".join(body) + "\n",
                            sm["reason"] if sm else None))  # fmt: skip
    return blocks


# ------------------------------------------------------------------------------------------------
# running python blocks (in a subprocess: ``python tests/test_readme.py python < blocks.json``)
# ------------------------------------------------------------------------------------------------
def _exec_blocks(blocks: list[dict], text: str) -> int:
    """Run python blocks in one namespace; on an error print where and the traceback, return 1."""
    import linecache
    import traceback

    ns: dict = {"__name__": "__main__"}
    for b in blocks:
        name = b["file"]
        # tracebacks then show the Markdown line itself
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        src = "\n" * (b["line"] - 1) + b["code"]  # line numbers are the Markdown file's
        try:
            exec(compile(src, name, "exec"), ns)
        except BaseException:  # report everything, SystemExit included
            print(f"FAILED: {b['where']}", file=sys.stderr)
            traceback.print_exc()
            return 1
        finally:
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close("all")
    return 0


def _env() -> dict[str, str]:
    """The subprocesses' environment: this checkout first on the path, matplotlib without a display."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    # `python` and `dcp-explorer` in shell blocks: this interpreter's
    bin_path = [os.path.dirname(sys.executable), *filter(None, [os.environ.get("PATH")])]
    return dict(
        os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(path), PATH=os.pathsep.join(bin_path)
    )


def run_python(blocks: list[Block], text: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``blocks`` (python) in order in one namespace, in a fresh interpreter in ``cwd``."""
    payload = json.dumps(
        {"text": text, "blocks": [dict(dataclasses.asdict(b), where=b.where) for b in blocks]}
    )
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "python"], input=payload,
                          capture_output=True, text=True, cwd=cwd, env=_env(), timeout=TIMEOUT)  # fmt: skip


def run_shell(block: Block, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one shell block with ``bash -euo pipefail`` in ``cwd``."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], capture_output=True, text=True,
                          cwd=cwd, env=_env(), timeout=TIMEOUT)  # fmt: skip


def _failure(what: str, proc: subprocess.CompletedProcess[str]) -> str:
    return f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-3000:]}"


# ------------------------------------------------------------------------------------------------
# docstring examples (in a subprocess: ``python tests/test_readme.py doctest``)
# ------------------------------------------------------------------------------------------------
def _run_doctests(package: str = "dcp_explorer") -> int:
    """Run every docstring example of ``package``'s modules; print a JSON report, return 1 on failures."""
    import doctest
    import importlib
    import io
    import pkgutil

    pkg = importlib.import_module(package)
    names = [package] + sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, package + "."))
    finder = doctest.DocTestFinder(exclude_empty=True)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    report: dict = {"modules": {}, "failed": 0, "attempted": 0, "skipped": 0, "output": ""}
    for name in names:
        mod = importlib.import_module(name)
        out = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=flags)
        tests = [t for t in finder.find(mod, name) if t.examples]
        skipped = sum(1 for t in tests for ex in t.examples if ex.options.get(doctest.SKIP))
        for t in sorted(tests, key=lambda t: t.name):
            runner.run(t, out=out.write)
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close("all")
        tried, failed = runner.tries, runner.failures  # tries exclude skipped ones; summarize() would print
        report["modules"][name] = {"attempted": tried, "failed": failed, "skipped": skipped}
        report["failed"] += failed
        report["attempted"] += tried
        report["skipped"] += skipped
        report["output"] += out.getvalue()
    print(json.dumps(report))
    return 1 if report["failed"] else 0


# ------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------
def _docs() -> list[Path]:
    return [p for p in DOCS if p.exists()]


def _blocks(path: Path) -> list[Block]:
    return extract_blocks(path.read_text(encoding="utf-8"), path.name)


def _shell_params() -> list:
    return [pytest.param(p, b, id=f"{p.name}-block{b.number}") for p in _docs() for b in _blocks(p)
            if b.lang in SHELL and b.skip is None]  # fmt: skip


@pytest.mark.parametrize("path", _docs(), ids=lambda p: p.name)
def test_every_block_is_run_or_marked(path: Path) -> None:
    """Each block is python or shell (run), a listing, or skipped with a reason; the README has code."""
    blocks = _blocks(path)
    unknown = [b.where for b in blocks if b.lang not in PYTHON + SHELL + LISTING and b.skip is None]
    assert not unknown, f"blocks in a language the test cannot run (mark them <!-- skip: why -->): {unknown}"
    if path.name == "README.md":
        run = [b for b in blocks if b.skip is None and b.lang in PYTHON + SHELL]
        assert sum(b.lang in PYTHON for b in run) >= 5 and sum(b.lang in SHELL for b in run) >= 1
        skipped = [b for b in blocks if b.skip is not None]
        # the two fresh-machine commands (install + lab, the test suite) and the real-S3 example
        assert len(skipped) <= 4, [f"{b.where}: {b.skip}" for b in skipped]


def _with_python() -> list[Path]:
    """The docs with python blocks to run (the README always: test_every_block_is_run_or_marked)."""
    return [p for p in _docs() if any(b.lang in PYTHON and b.skip is None for b in _blocks(p))]


@pytest.mark.parametrize("path", _with_python(), ids=lambda p: p.name)
def test_python_blocks_run(path: Path, samples, tmp_path: Path) -> None:
    blocks = [b for b in _blocks(path) if b.lang in PYTHON and b.skip is None]
    proc = run_python(blocks, path.read_text(encoding="utf-8"), tmp_path)
    assert proc.returncode == 0, _failure(f"{path.name}: the python blocks", proc)


@pytest.mark.parametrize(("path", "block"), _shell_params())
def test_shell_blocks_run(path: Path, block: Block, samples, tmp_path: Path) -> None:
    proc = run_shell(block, tmp_path)
    assert proc.returncode == 0, _failure(block.where, proc)


def test_docstring_examples_run(samples, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "doctest"], capture_output=True,
                          text=True, cwd=tmp_path, env=_env(), timeout=TIMEOUT)  # fmt: skip
    assert proc.stdout.strip(), _failure("the doctest runner", proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failed"] == 0, f"{report['failed']} docstring examples failed:\n{report['output'][-8000:]}"
    assert proc.returncode == 0, _failure("the doctest runner", proc)
    # the examples of the public face run, not only exist
    for mod in ("dcp_explorer", "dcp_explorer.checkpoint", "dcp_explorer.diff", "dcp_explorer.quant"):
        assert report["modules"][mod]["attempted"] > 0, (mod, report["modules"][mod])
    assert report["skipped"] <= 6, f"{report['skipped']} examples are skipped: {report['modules']}"


def test_pictures_come_from_the_script(tmp_path: Path) -> None:
    """Every picture the README shows is one docs/make_figures.py writes, and the script runs."""
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "make_figures.py")
    assert spec is not None and spec.loader is not None
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    made = {f"{name}.png" for name in mf.FIGURES} | set(mf.SHOTS)
    refs = re.findall(
        r"(?:\]\(|src=\")(docs/images/[^)\s\"]+)", (ROOT / "README.md").read_text(encoding="utf-8")
    )
    assert len(refs) >= 6
    for ref in refs:
        assert Path(ref).name in made, f"{ref} is not made by docs/make_figures.py"
        assert (ROOT / ref).is_file(), f"{ref} is missing: run python docs/make_figures.py"
        assert (ROOT / ref).stat().st_size <= mf.MAX_BYTES, ref
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "make_figures.py"), "--only", *mf.FIGURES,
                           "--out", str(tmp_path)], capture_output=True, text=True, env=_env(),
                          timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, _failure("docs/make_figures.py", proc)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{n}.png" for n in mf.FIGURES)


# ---- the machinery can fail ---------------------------------------------------------------------
TINY = textwrap.dedent(
    """\
    # Title

    ```python
    x = 1
    ```

    Some text.

    <!-- skip: needs an S3 bucket -->
    ```python
    raise RuntimeError("skipped blocks are not run")
    ```

    ```bash
    test "$(echo hi)" = hi
    ```

    ````python
    y = x + 1
    assert y == 3, "a failing README block"
    ````

    ```
    a/listing
    ```
    """
)


def test_extractor_finds_blocks_lines_and_skips() -> None:
    blocks = extract_blocks(TINY, "TINY.md")
    assert [(b.number, b.lang, b.line, b.skip) for b in blocks] == [
        (1, "python", 4, None),
        (2, "python", 11, "needs an S3 bucket"),
        (3, "bash", 15, None),
        (4, "python", 19, None),
        (5, "", 24, None),
    ]
    assert blocks[3].code == 'y = x + 1\nassert y == 3, "a failing README block"\n'
    with pytest.raises(ValueError, match="never closed"):
        extract_blocks("```python\nx = 1\n")
    with pytest.raises(ValueError, match="reason"):
        extract_blocks("<!-- skip: -->\n```python\nx = 1\n```\n")


def test_a_failing_block_fails_with_its_number_and_line(tmp_path: Path) -> None:
    blocks = [b for b in extract_blocks(TINY, "TINY.md") if b.lang in PYTHON and b.skip is None]
    proc = run_python(blocks, TINY, tmp_path)
    assert proc.returncode == 1
    assert "FAILED: TINY.md block 4 (python, line 19)" in proc.stderr
    assert 'File "TINY.md", line 20' in proc.stderr  # the Markdown line of the failing statement
    assert 'assert y == 3, "a failing README block"' in proc.stderr  # shown from the Markdown
    assert "a failing README block" in proc.stderr
    assert "skipped blocks are not run" not in proc.stderr
    shell = [b for b in extract_blocks(TINY, "TINY.md") if b.lang in SHELL]
    assert run_shell(shell[0], tmp_path).returncode == 0
    bad = dataclasses.replace(shell[0], code="dcp-explorer info /no/such/checkpoint\n")
    proc = run_shell(bad, tmp_path)
    assert proc.returncode != 0 and "/no/such/checkpoint" in proc.stderr


def test_a_failing_docstring_example_is_reported(tmp_path: Path) -> None:
    pkg = tmp_path / "tiny_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""\n>>> 1 + 1\n2\n"""\n')
    (pkg / "bad.py").write_text(
        'def f():\n    """\n    >>> 1 + 1\n    3\n    >>> open("/no/such/file")  # doctest: +SKIP\n    """\n'
    )
    env = dict(_env(), PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "doctest", "tiny_pkg"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1
    assert (report["attempted"], report["failed"], report["skipped"]) == (2, 1, 1)
    assert "tiny_pkg.bad.f" in report["output"] and "Expected:\n    3\nGot:\n    2" in report["output"]


if __name__ == "__main__":
    if sys.argv[1:] == ["python"]:
        data = json.load(sys.stdin)
        sys.exit(_exec_blocks(data["blocks"], data["text"]))
    if sys.argv[1:2] == ["doctest"]:
        sys.exit(_run_doctests(*sys.argv[2:3]))
    sys.exit(f"usage: {sys.argv[0]} python | doctest [PACKAGE]")
