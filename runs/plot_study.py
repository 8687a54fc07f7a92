"""The region study's two figures: dev RSUM per epoch for each arm, and where words align.

python runs/plot_study.py --arm "label=run.history.json" ... --locality "label=alignments.json" ... --out runs/region-study
writes <out>-dev-rsum.png and <out>-locality.png. Histories come from `python -m chan train`,
locality files from `python -m chan alignments --json`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

KINDS = (("whole_photo", "whole photo", "#d62728"), ("detection", "detector box", "#2ca02c"), ("grid", "grid cell", "#7f7f7f"))


def _pairs(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        label, _, path = v.rpartition("=")
        if not label:
            raise SystemExit(f"expected LABEL=PATH, got {v!r}")
        out.append((label, Path(path)))
    return out


def plot_dev_rsum(arms: list[tuple[str, Path]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.get_cmap("tab20").colors  # more arms than the default cycle's 10 colours
    for i, (label, history) in enumerate(arms):
        rows = json.loads(history.read_text())
        style = ("o-", "s--", "^:")[i // 20 % 3]  # past 20 arms the colours repeat: another marker and line
        ax.plot([r["epoch"] for r in rows], [r["rsum"] for r in rows], style, label=label,
                color=colours[(2 * i) % 20 + (2 * i) // 20 % 2])
    ax.set(xlabel="epoch", ylabel="dev RSUM (Flickr8k, 1,000 photos)", title="Region study: dev RSUM per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes (tight_layout would shrink them)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_locality(files: list[tuple[str, Path]], path: Path) -> None:
    results = [(label, json.loads(p.read_text())) for label, p in files]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.9 * len(results)))
    for row, (label, r) in enumerate(results):
        left = 0.0
        for key, name, colour in KINDS:
            share = r[f"{key}_share"]
            ax.barh(row, share, left=left, color=colour, label=name if row == 0 else None)
            if share > 0.06:
                ax.text(left + share / 2, row, f"{share:.0%}", ha="center", va="center", color="white", fontsize=9)
            left += share
        area = r["mean_chosen_area"]
        ax.text(1.02, row, f"{r['distinct_regions_per_caption']:.1f} regions/caption\n"
                           f"chosen area {area:.0%}" if area is not None else "", va="center", fontsize=8)
    ax.set_yticks(range(len(results)), [label for label, _ in results])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set(xlabel="share of content words (each caption with its own photo)", title="Where words hard-align")
    ax.legend(ncol=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.12))  # tight_layout would shrink the bars
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", default=[], help="LABEL=history.json, one per arm")
    p.add_argument("--locality", action="append", default=[], help="LABEL=alignments.json, one per model")
    p.add_argument("--out", type=Path, default=Path("runs/region-study"), help="path prefix of the figures")
    args = p.parse_args()
    if args.arm:
        plot_dev_rsum(_pairs(args.arm), Path(f"{args.out}-dev-rsum.png"))
    if args.locality:
        plot_locality(_pairs(args.locality), Path(f"{args.out}-locality.png"))


if __name__ == "__main__":
    main()
