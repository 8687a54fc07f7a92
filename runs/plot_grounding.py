"""The grounding figure: each row of the pointing game, before against after, on the same photos.

python runs/plot_grounding.py --run "before=grounding-before.json" --run "after=grounding-after.json" --out runs/grounding.png
Each JSON comes from `python -m chan grounding --json`; rows are drawn as pairs of bars (pointing, and IoU >= 0.5).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROWS = (("hard", "CHAN's hard alignment"), ("soft", "SCAN twin's attention argmax"), ("whole_photo", "whole photo"),
        ("largest", "largest region"), ("most_confident", "most confident box"),
        ("label_match", "detector's label match"), ("random", "random region"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=JSON", help="a grounding JSON, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Pointing game on COCO dev photos (words that name a category in their photo)")
    args = parser.parse_args()
    runs = []
    for value in args.run:
        label, _, path = value.rpartition("=")
        if not label:
            raise SystemExit(f"expected LABEL=JSON, got {value!r}")
        runs.append((label, json.loads(Path(path).read_text())))
    rows = [(key, name) for key, name in ROWS if all(f"{key}_pointing" in r for _, r in runs)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(rows) + 1.8), sharey=True)
    height = 0.8 / len(runs)
    colours = plt.get_cmap("tab10").colors
    for ax, metric, title in zip(axes, ("pointing", "iou50"), ("pointing (box centre on the object)", "IoU >= 0.5")):
        for i, (label, result) in enumerate(runs):
            ys = [len(rows) - 1 - r + (len(runs) - 1 - i) * height - 0.4 + height / 2 for r in range(len(rows))]
            values = [result[f"{key}_{metric}"] for key, _ in rows]
            ax.barh(ys, values, height, label=f"{label} ({result['words']} words)", color=colours[i])
            for y, v in zip(ys, values):
                ax.text(v + 0.01, y, f"{v:.2f}", va="center", fontsize=7)
        ax.set(xlim=(0, 1.08), title=title)
        ax.set_yticks(range(len(rows)), [name for _, name in reversed(rows)])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(runs))
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
