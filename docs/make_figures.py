"""Regenerate the README's pictures, ``docs/images/*.png``, from the real sample checkpoints.

Nothing here is drawn by hand: the figures are the library's own pictures
(:mod:`dcp_explorer.viz`, :mod:`dcp_explorer.viz_quant`, :meth:`CheckpointDiff.block_map`) of the
sample checkpoints (:mod:`dcp_explorer.samples`, real multi-process ``dcp.save`` runs, cached in
``~/.cache/dcp_explorer/samples``), and the widget pictures are the screenshots the browser test
(``tests/test_browser.py``) takes of the notebooks running in JupyterLab in Chromium::

    python docs/make_figures.py                     # figures + the latest browser screenshots
    python docs/make_figures.py --run-browser-test  # run tests/test_browser.py first (~3 min)
    python docs/make_figures.py --only chunk_map    # some of them

Screenshots are copied from ``test-artifacts/browser/`` when that folder holds them (a previous
``python -m pytest`` run); otherwise the committed ones are kept. Every PNG is downscaled and
palette-quantized (Pillow, which matplotlib requires) so each stays under 200 KB; the script fails
if one does not, or if all of them together pass 1.5 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"
SCREENSHOTS = ROOT / "test-artifacts" / "browser"

MAX_BYTES = 200_000  # per PNG
MAX_TOTAL = 1_500_000  # all PNGs in docs/images
DPI = 90
WIDTH = 820  # px: about the width of a README on GitHub

#: README picture <- browser-test screenshot, and the height (px, before downscaling) to keep
SHOTS: dict[str, tuple[str, int | None]] = {
    "screenshot_browser.png": ("01_browse_checkpoint-widget0-changed.png", None),
    "screenshot_reshard.png": ("02_simulate_resharding-widget0-changed.png", None),
    "screenshot_quant.png": ("03_quantized_tensors-widget1.png", None),
    "screenshot_diff.png": ("04_diff_checkpoints-widget0-changed.png", None),
}


# ------------------------------------------------------------------------------------------------
# figures: each returns a matplotlib Figure drawn by the library from a sample checkpoint
# ------------------------------------------------------------------------------------------------
def fig_chunk_map() -> Any:
    """How FSDP x TP cut two weights of ``llama_fsdp_tp_2x2`` into chunks, coloured by saving rank."""
    import matplotlib.pyplot as plt

    import dcp_explorer as dx
    from dcp_explorer import viz
    from dcp_explorer.samples import sample_path

    ckpt = dx.open(sample_path("llama_fsdp_tp_2x2"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    viz.plot_chunk_map(ckpt, "model.layers.0.feed_forward.w1.weight", ax=axes[0])
    viz.plot_chunk_map(ckpt, "model.layers.0.attention.wo.weight", ax=axes[1])
    return fig


def fig_reshard() -> Any:
    """``llama_fsdp_ws4`` (FSDP on 4 ranks) loaded on a 3 x 2 FSDP x TP mesh: overlay and traffic."""
    import matplotlib.pyplot as plt

    import dcp_explorer as dx
    from dcp_explorer import viz
    from dcp_explorer.samples import sample_path

    plan = dx.simulate_load(sample_path("llama_fsdp_ws4"), "dp_shard=3,tp=2", preset="fsdp_tp")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained", width_ratios=(1.35, 1))
    viz.plot_reshard_overlay(plan, "model.layers.0.feed_forward.w1.weight", ax=axes[0])
    viz.plot_traffic(plan, ax=axes[1])
    axes[0].set_title(
        "w1 [190, 72]: saved chunks (fill) vs the ranks of dp_shard=3,tp=2 (dashed)", fontsize=9
    )
    return fig


def fig_rank_bytes() -> Any:
    """Bytes each rank of that 3 x 2 mesh needs vs reads (read amplification)."""
    import matplotlib.pyplot as plt

    import dcp_explorer as dx
    from dcp_explorer import viz
    from dcp_explorer.samples import sample_path

    plan = dx.simulate_load(sample_path("llama_fsdp_ws4"), "dp_shard=3,tp=2", preset="fsdp_tp")
    fig, ax = plt.subplots(figsize=(7, 2.8), layout="constrained")
    viz.plot_rank_bytes(plan, ax=ax)
    return fig


def fig_quant() -> Any:
    """A damaged copy of ``fp8_block`` (one block scale zero, one NaN): the bad blocks show red."""
    import json

    import matplotlib.pyplot as plt
    from safetensors.torch import load_file, save_file

    import dcp_explorer as dx
    from dcp_explorer import viz_quant
    from dcp_explorer.quant import block_stats
    from dcp_explorer.samples import sample_path

    with tempfile.TemporaryDirectory(prefix="dcpx_figures_") as tmp:
        # the corrupted copy of notebook 03
        bad_dir = Path(tmp) / "fp8_corrupted"
        shutil.copytree(sample_path("fp8_block"), bad_dir)
        weight_map = json.loads((bad_dir / "model.safetensors.index.json").read_text())["weight_map"]
        victim = "model.layers.0.self_attn.q_proj.weight"
        file = bad_dir / weight_map[victim + "_scale_inv"]
        tensors = load_file(file)
        tensors[victim + "_scale_inv"][1, 0] = 0.0
        tensors[victim + "_scale_inv"][2, 1] = float("nan")
        save_file(tensors, file, metadata={"format": "pt"})
        st = block_stats(dx.open(bad_dir, cache=False), victim)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    viz_quant.plot_quant_scales(st, ax=axes[0])
    viz_quant.plot_quant_dynamic_range(st, ax=axes[1])
    for ax in axes:
        ax.set_xticks(range(st.scale.shape[1]))
        ax.set_yticks(range(st.scale.shape[0]))
    return fig


def fig_diff() -> Any:
    """Where an edited copy of ``llama_fsdp_ws1`` differs: |a - b| per 8 x 8 tile of one weight."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch.distributed.checkpoint as dcp

    import dcp_explorer as dx
    from dcp_explorer.samples import sample_path

    base = dx.open(sample_path("llama_fsdp_ws1"))
    fqn = "model.layers.0.feed_forward.w1.weight"
    sd = base.load("model.layers.0.*", progress=False)
    sd[fqn][40:56, 16:40] *= 1.5  # the edit of notebook 04, on a block of w1
    sd[fqn][150, 60] += 1.0
    with tempfile.TemporaryDirectory(prefix="dcpx_figures_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no process group is running: intended
        dcp.save(sd, checkpoint_id=str(Path(tmp) / "edited"), no_dist=True)
        d = dx.diff(base, Path(tmp) / "edited", select="model.layers.0.*", progress=False)
        m = d.block_map(fqn, block=8)
    fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    im = ax.imshow(np.ma.masked_equal(m.T, 0), cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_facecolor("#d9d9d9")
    fig.colorbar(im, ax=ax, label="max |a - b| per 8x8 tile")
    n = int((m > 0).sum())
    ax.set(
        title=f"{fqn}: {n} of {m.size} tiles differ (grey: identical)",
        xlabel="row tile (dim 0 / 8)",
        ylabel="column tile (dim 1 / 8)",
    )
    ax.title.set_fontsize(9)
    return fig


FIGURES: dict[str, Callable[[], Any]] = {
    "chunk_map": fig_chunk_map,
    "reshard": fig_reshard,
    "rank_bytes": fig_rank_bytes,
    "quant": fig_quant,
    "diff": fig_diff,
}


# ------------------------------------------------------------------------------------------------
# writing small PNGs
# ------------------------------------------------------------------------------------------------
def _shrink(path: Path, *, width: int | None = None, crop_height: int | None = None) -> None:
    """Crop, downscale to ``width`` and palette-quantize a PNG in place (Pillow)."""
    from PIL import Image

    with Image.open(path) as im:
        img = im.convert("RGB")
    if crop_height is not None and img.height > crop_height:
        img = img.crop((0, 0, img.width, crop_height))
    if width is not None and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, optimize=True)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    _shrink(path)


def copy_screenshot(src: Path, dst: Path, crop_height: int | None) -> None:
    shutil.copyfile(src, dst)
    _shrink(dst, width=WIDTH, crop_height=crop_height)


def run_browser_test() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py"]
    print("$ python", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=[*FIGURES, "screenshots"], help="regenerate only these")
    ap.add_argument("--run-browser-test", action="store_true", help="run tests/test_browser.py first")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where (default {OUT.relative_to(ROOT)})")
    a = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    a.out.mkdir(parents=True, exist_ok=True)
    wanted = a.only or [*FIGURES, "screenshots"]

    for name in wanted:
        if name in FIGURES:
            path = a.out / f"{name}.png"
            save_figure(FIGURES[name](), path)
            print(
                f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size:,} B"
            )

    if "screenshots" in wanted:
        if a.run_browser_test:
            run_browser_test()
        for dst_name, (src_name, crop) in SHOTS.items():
            src, dst = SCREENSHOTS / src_name, a.out / dst_name
            if not src.exists():
                print(f"{dst_name}: no {src.relative_to(ROOT)} (run with --run-browser-test); kept as is")
                continue
            copy_screenshot(src, dst, crop)
            print(f"{dst.relative_to(ROOT) if dst.is_relative_to(ROOT) else dst}: {dst.stat().st_size:,} B "
                  f"(from {src.relative_to(ROOT)})")  # fmt: skip

    sizes = {p.name: p.stat().st_size for p in sorted(a.out.glob("*.png"))}
    big = {n: s for n, s in sizes.items() if s > MAX_BYTES}
    total = sum(sizes.values())
    print(f"{len(sizes)} PNGs, {total:,} B in all")
    if big or total > MAX_TOTAL:
        print(f"too large: {big or ''} (limit {MAX_BYTES:,} B each, {MAX_TOTAL:,} B in all)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
