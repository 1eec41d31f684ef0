#!/usr/bin/env bash
# Rehearse offline what mybinder (repo2docker) does with binder/, then run the notebooks there.
#
#   bash binder/check.sh            # from anywhere; prints each step, its time, and a verdict
#
# What repo2docker does (`jupyter-repo2docker --no-build --debug .` prints its Dockerfile):
# copy the repository into $HOME (= the repo dir), pick Python from binder/runtime.txt, run
# `pip install --no-cache-dir -r binder/requirements.txt` from the repo root (so `.` there is
# a regular, non-editable install of this package), then `chmod +x binder/postBuild` and run
# `./binder/postBuild`. What this script does instead, without docker and without internet:
#   1. copy the files git would clone (tracked + untracked-not-ignored; no build/, no .so)
#      into a temporary folder, as repo2docker copies the repository;
#   2. a fresh venv with the Python runtime.txt names (found on PATH or under pyenv; else the
#      current python3, and it says so). repo2docker's Python is a conda env holding jupyterlab
#      and ipywidgets already; here pip installs them, which is stricter;
#   3. pip install -r binder/requirements.txt from the copy's root. Its `--extra-index-url`
#      (the PyTorch CPU index) is used when download.pytorch.org answers; when it does not (no
#      internet here, only package registries), the line is dropped from the copy and pip takes
#      torch==2.13.0 from this machine's own pip configuration (`pip config list`: find-links
#      with the CPU wheel). Force either way with BINDER_CHECK_EXTRA_INDEX=use|skip (default
#      auto). The script then checks that the torch it got is a CPU build;
#   4. ./binder/postBuild with HOME set to a fresh folder (mybinder's HOME is /home/jovyan);
#   5. `jupyter labextension list` in the venv must show the ipywidgets front end
#      (@jupyter-widgets/jupyterlab-manager, enabled, OK);
#   6. every notebook in notebooks/ runs top to bottom with nbclient, in a python3 kernel of
#      the venv, from the notebooks folder (where JupyterLab starts it); a cell appended to each
#      checks that dcp_explorer came from the venv's site-packages (not an editable checkout)
#      and that the notebooks reused postBuild's samples instead of writing new ones.
#
# Environment: BINDER_CHECK_PYTHON (interpreter to use), BINDER_CHECK_EXTRA_INDEX (auto|use|
# skip), BINDER_CHECK_DIR (work folder; default a new temporary one), BINDER_CHECK_KEEP=1 (keep
# it), BINDER_CHECK_CELL_TIMEOUT (seconds per cell, default 300).
# Exit code 0 when every step passed. Takes about 1.5 minutes on an idle 2-core machine (3-4 on a
# busy one), most of it the install; .ci/run runs it, and tests/test_binder.py checks the same
# files statically in a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
step_start=$SECONDS
TIMES=()
step() {  # step NAME: close the previous step's timer, announce the next
    if [ -n "${STEP:-}" ]; then TIMES+=("$(printf '%5ds  %s' $((SECONDS - step_start)) "$STEP")"); fi
    STEP="$1"
    step_start=$SECONDS
    printf '\n==> [%4ds] %s\n' $((SECONDS - START)) "$STEP"
}
fail() {
    echo "binder check FAILED: $*" >&2
    exit 1
}

WORK="${BINDER_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/binder-check.XXXXXX")}"
mkdir -p "$WORK"
cleanup() {
    if [ "${BINDER_CHECK_KEEP:-0}" = 1 ]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------
step "copy the repository as a clone would have it"
REPO="$WORK/repo"
mkdir -p "$REPO"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) |
        tar -xf - -C "$REPO"
else
    (cd "$ROOT" && tar --exclude=.git --exclude=build --exclude='*.egg-info' --exclude='*.so' -cf - .) |
        tar -xf - -C "$REPO"
fi
for f in binder/requirements.txt binder/runtime.txt binder/postBuild; do
    [ -f "$REPO/$f" ] || fail "$f is missing"
done
echo "$(find "$REPO" -type f | wc -l) files in $REPO"

# ------------------------------------------------------------------------------------------------
step "a fresh venv with the Python of binder/runtime.txt"
want="$(sed -n 's/^python-\([0-9][0-9.]*\).*/\1/p' "$REPO/binder/runtime.txt" | head -n1)"
[ -n "$want" ] || fail "binder/runtime.txt does not say python-X.Y: $(cat "$REPO/binder/runtime.txt")"
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
PY="${BINDER_CHECK_PYTHON:-}"
if [ -z "$PY" ]; then
    cands=("python$want")
    if command -v pyenv >/dev/null 2>&1; then
        for d in "$(pyenv root)/versions/$want".*; do cands+=("$d/bin/python"); done
    fi
    for c in "${cands[@]}"; do
        if [ "$(pyver "$c")" = "$want" ]; then
            PY="$(command -v "$c")"
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    PY="$(command -v python3)"
    echo "NOTE: runtime.txt asks for Python $want, which is not on this machine:" \
        "using $("$PY" --version 2>&1) ($PY) instead"
fi
echo "runtime.txt: python-$want -> $("$PY" --version 2>&1) at $PY"
VENV="$WORK/venv"
"$PY" -m venv "$VENV"
# repo2docker's base env has a recent pip (25.x): use a recent one too, not the venv's bundled one
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "$("$VENV/bin/python" -m pip --version)"

# ------------------------------------------------------------------------------------------------
step "pip install -r binder/requirements.txt (from the repository root, as repo2docker)"
extra="$(sed -n 's/^--extra-index-url[= ][[:space:]]*//p' "$REPO/binder/requirements.txt" | head -n1)"
mode="${BINDER_CHECK_EXTRA_INDEX:-auto}"
if [ -n "$extra" ] && [ "$mode" = auto ]; then
    if "$VENV/bin/python" - "$extra" <<'EOF'; then mode=use; else mode=skip; fi
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=10).close()
except Exception as e:  # noqa: BLE001
    print(f"{sys.argv[1]} is not reachable here ({type(e).__name__}: {e})")
    sys.exit(1)
print(f"{sys.argv[1]} is reachable")
EOF
fi
if [ -n "$extra" ] && [ "$mode" = skip ]; then
    # without this, pip retries the unreachable index for every package (minutes of back-off)
    grep -v '^--extra-index-url' "$ROOT/binder/requirements.txt" >"$REPO/binder/requirements.txt"
    echo "dropped '--extra-index-url $extra' from the copy; torch comes from this machine's pip config:"
    "$VENV/bin/python" -m pip config list | sed 's/^/    /'
fi
set +e
(cd "$REPO" && PYTHONPATH="" "$VENV/bin/python" -m pip install -r binder/requirements.txt 2>&1) |
    grep -v -e '^Requirement already satisfied' -e "^WARNING: Location 'file:"
rc="${PIPESTATUS[0]}"
set -e
[ "$rc" = 0 ] || fail "pip install -r binder/requirements.txt exited with $rc"
"$VENV/bin/python" -m pip check || fail "pip check found broken requirements"
# the CPU build of torch, as the extra index line asks (a CUDA build would be several GB on mybinder)
torch_info="$(cd "$WORK" && "$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
echo "torch in the venv: $torch_info"
case "$torch_info" in
*" None") ;;
*)
    if [ "$mode" = skip ]; then
        echo "WARNING: a CUDA build of torch came from this machine's index (the CPU index was skipped)"
    else
        fail "a CUDA build of torch was installed: $torch_info"
    fi
    ;;
esac
SITE="$(cd "$WORK" && "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
PKG="$(cd "$WORK" && "$VENV/bin/python" -c 'import dcp_explorer, os; print(os.path.dirname(dcp_explorer.__file__))')"
case "$PKG" in
"$SITE"/*) echo "dcp_explorer installed non-editable at $PKG" ;;
*) fail "dcp_explorer imports from $PKG, not from the venv's site-packages ($SITE)" ;;
esac

# ------------------------------------------------------------------------------------------------
# what mybinder's user sees: a fresh HOME, the venv first on PATH, nothing of this session's
unset PYTHONPATH DCP_EXPLORER_SAMPLES DCP_EXPLORER_CACHE JUPYTER_PATH JUPYTER_CONFIG_DIR JUPYTER_DATA_DIR \
    JUPYTER_RUNTIME_DIR JUPYTERLAB_SETTINGS_DIR JUPYTERLAB_WORKSPACES_DIR VIRTUAL_ENV MPLBACKEND || true
export HOME="$WORK/home"
mkdir -p "$HOME"
export PATH="$VENV/bin:$PATH"

step "./binder/postBuild (HOME=$HOME)"
(cd "$REPO" && chmod +x binder/postBuild && ./binder/postBuild)
SAMPLES="$HOME/.cache/dcp_explorer/samples"
[ -d "$SAMPLES" ] || fail "postBuild wrote no samples under $SAMPLES"
echo "samples: $(find "$SAMPLES" -mindepth 2 -maxdepth 2 -type d | wc -l) folders, $(du -sh "$SAMPLES" | cut -f1)"
sleep 1 # a distinct mtime for files written after this point
touch "$WORK/after-postBuild"

# ------------------------------------------------------------------------------------------------
step "jupyter labextension list (the ipywidgets front end comes with the wheels)"
exts="$(cd "$REPO" && jupyter labextension list 2>&1)"
echo "$exts" | sed 's/^/    /'
echo "$exts" | grep -E '@jupyter-widgets/jupyterlab-manager.*enabled.*OK' >/dev/null ||
    fail "jupyter labextension list does not show @jupyter-widgets/jupyterlab-manager enabled and OK"
echo "JupyterLab $(jupyter lab --version)"

# ------------------------------------------------------------------------------------------------
step "run every notebook in a python3 kernel of the venv (nbclient)"
(cd "$REPO" && BINDER_CHECK_VENV="$VENV" BINDER_CHECK_SITE="$SITE" python - "${BINDER_CHECK_CELL_TIMEOUT:-300}" <<'EOF')
import pathlib
import sys
import time

import nbclient
import nbformat

# appended to each notebook: where did the kernel and the package come from? (runs in the kernel)
CHECK = """
import os, sys
import dcp_explorer
_venv, _site = os.environ["BINDER_CHECK_VENV"], os.environ["BINDER_CHECK_SITE"]
assert os.path.realpath(sys.prefix) == os.path.realpath(_venv), f"kernel runs in {sys.prefix}, not {_venv}"
assert os.path.realpath(dcp_explorer.__file__).startswith(os.path.realpath(_site) + os.sep), (
    f"dcp_explorer imported from {dcp_explorer.__file__}, not from {_site}")
print("binder-check: kernel", sys.executable, "| dcp_explorer", dcp_explorer.__version__, "from",
      os.path.dirname(dcp_explorer.__file__), "| cwd", os.getcwd())
"""

timeout = int(sys.argv[1])
nbs = sorted(pathlib.Path("notebooks").glob("*.ipynb"))
if not nbs:
    sys.exit("no notebooks in notebooks/")
total = time.perf_counter()
for path in nbs:
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout, iopub_timeout=60,
                                     raise_on_iopub_timeout=True,
                                     resources={"metadata": {"path": str(path.parent.resolve())}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except Exception as e:  # noqa: BLE001 - report which notebook, then fail
        print(f"FAILED {path.name} after {time.perf_counter() - t0:.0f} s:\n{str(e)[-4000:]}")
        sys.exit(1)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    if errors:
        sys.exit(f"{path.name}: {errors[0].ename}: {errors[0].evalue}")
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    print(f"ok {path.name} in {time.perf_counter() - t0:.1f} s -- {last}")
print(f"{len(nbs)} notebooks ran in {time.perf_counter() - total:.0f} s")
EOF
newer="$(find "$SAMPLES" -type f -newer "$WORK/after-postBuild" | head -n 5)"
if [ -n "$newer" ]; then
    fail "the notebooks wrote samples again instead of using postBuild's, e.g.: $newer"
fi
echo "the notebooks used the samples postBuild wrote (nothing new under $SAMPLES)"

STEP_DONE="$STEP"
TIMES+=("$(printf '%5ds  %s' $((SECONDS - step_start)) "$STEP_DONE")")
echo
echo "binder check passed in $((SECONDS - START)) s:"
printf '  %s\n' "${TIMES[@]}"
