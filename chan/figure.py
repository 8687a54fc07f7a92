"""Word-region alignment figures for papers (matplotlib; vector where the format allows).

The same plain data as the demo's inspector (`chan.pair.PairAlignment`): the photo with each word's
chosen region boxed in the word's colour, the caption in those colours, the hard-alignment matrix with
the eliminated cells greyed out, and the soft attention it replaces; optionally the caption's top
photos in a row. `alignment_figure` returns the Figure for notebooks; `figure_command` is the CLI.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no display
from matplotlib.patches import Rectangle
from PIL import Image

from .pair import PairAlignment, word_colour

FORMATS = (".pdf", ".svg", ".png")


@dataclass
class TopPhoto:
    photo: Image.Image | None  # None: a precomputed gallery has no photo file
    photo_id: str
    rank: int
    score: float


def _draw_photo(ax, photo: Image.Image | None, pair: PairAlignment) -> None:
    ax.set_axis_off()
    if photo is None or pair.boxes is None:
        ax.text(0.5, 0.5, "no photo file\n(precomputed features)", ha="center", va="center", fontsize=9)
        return
    ax.imshow(photo)
    a = pair.alignment
    for i, k in enumerate(a.chosen.tolist()):
        x1, y1, x2, y2 = pair.boxes[k].tolist()
        inset = 1.5 * (i % 3)  # words that chose the same region stay visible side by side
        ax.add_patch(Rectangle((x1 + inset, y1 + inset), x2 - x1 - 2 * inset, y2 - y1 - 2 * inset, fill=False,
                               edgecolor=word_colour(i), linewidth=2))


def _draw_caption(ax, pair: PairAlignment) -> None:
    """The scored tokens in their colours, each with the region it chose."""
    ax.set_axis_off()
    a = pair.alignment
    lines = [(name, f"r{k} {pair.region_labels[k]}".strip()) for name, k in zip(pair.row_names, a.chosen.tolist())]
    step = min(0.09, 0.9 / max(len(lines), 1))
    ax.text(0, 1, f"hard-alignment score {a.score:.3f} · soft-attention score {a.soft_score:.3f}"
            + (f" (each with a global term of {a.global_term:.3f})" if a.global_term else ""), fontsize=9,
            va="top", transform=ax.transAxes)
    for i, (name, region) in enumerate(lines):
        y = 0.92 - i * step
        ax.text(0, y, name.split(":", 1)[1], color=word_colour(i), fontsize=10, fontweight="bold", va="top",
                transform=ax.transAxes)
        ax.text(0.45, y, f"→ {region}", fontsize=8, va="top", transform=ax.transAxes)


def _matrix_axes(ax, pair: PairAlignment, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(len(pair.words)), [n.split(":", 1)[1] for n in pair.row_names], fontsize=8)
    ax.set_xticks(range(len(pair.region_labels)), pair.column_names, rotation=90, fontsize=5)
    for i, tick in enumerate(ax.get_yticklabels()):
        tick.set_color(word_colour(i))


def _draw_hard(ax, pair: PairAlignment) -> None:
    a = pair.alignment
    kept = np.ma.masked_all(a.cosine.shape)
    rows = np.arange(len(a.chosen))
    kept[rows, a.chosen] = a.cosine[rows, a.chosen]
    ax.imshow(a.cosine, cmap="Greys", alpha=0.35, aspect="auto")  # eliminated alignments, greyed
    ax.imshow(kept, cmap="Reds", vmin=float(a.cosine.min()), vmax=float(a.cosine.max()), aspect="auto")
    for i, k in enumerate(a.chosen.tolist()):
        ax.add_patch(Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=word_colour(i), linewidth=1.5))
    _matrix_axes(ax, pair, "CHAN hard alignment (grey: eliminated)")


def _draw_soft(ax, pair: PairAlignment) -> None:
    ax.imshow(pair.alignment.soft_attention, cmap="viridis", aspect="auto")
    _matrix_axes(ax, pair, "soft cross-attention it replaces (SCAN)")


def alignment_figure(pair: PairAlignment, photo: Image.Image | None, caption: str,
                     top: list[TopPhoto] | None = None) -> Figure:
    """The figure for one pair (and, with `top`, the caption's best photos in a row below)."""
    n_words, n_top = len(pair.words), len(top or [])
    matrix_h = max(2.0, 0.22 * n_words + 1.6)
    heights = [3.2, matrix_h] + ([2.0] if n_top else [])
    fig = Figure(figsize=(12, sum(heights) + 0.6), layout="constrained")
    fig.suptitle(f"“{caption}”", fontsize=11)
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    photo_ax, caption_ax = fig.add_subplot(grid[0, 0], label="photo"), fig.add_subplot(grid[0, 1], label="caption")
    hard_ax, soft_ax = fig.add_subplot(grid[1, 0], label="hard"), fig.add_subplot(grid[1, 1], label="soft")
    _draw_photo(photo_ax, photo, pair)
    _draw_caption(caption_ax, pair)
    _draw_hard(hard_ax, pair)
    _draw_soft(soft_ax, pair)
    if n_top:
        row = grid[2, :].subgridspec(1, n_top)
        for j, t in enumerate(top):
            ax = fig.add_subplot(row[0, j], label=f"top{j + 1}")
            ax.set_axis_off()
            if t.photo is not None:
                ax.imshow(t.photo)
            ax.set_title(f"#{t.rank} · {t.score:.3f}\n{t.photo_id}", fontsize=7)
    return fig


def figure_command(caption: str, out: Path, checkpoint: Path, photo: Path | None = None, gallery: Path | None = None,
                   photo_id: str | None = None, split: str | None = None, top: int = 0) -> Figure:
    """Align `caption` with a photo file or a gallery photo, draw the figure, save it to `out` (.pdf, .svg, .png)."""
    from .checkpoint import load_checkpoint
    from .gallery import open_gallery
    from .pair import QueryError, align_pair
    from .photos import load_photo
    from .regions import RegionExtractor

    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise QueryError(f"{out}: give a file name ending in {', '.join(FORMATS)}")
    if top and gallery is None:
        raise QueryError("--top ranks a gallery's photos: give --gallery too")
    if gallery is not None:
        g = open_gallery(gallery, checkpoint, split, index_now=top > 0)
        if photo is None and photo_id not in g.all_photos:
            raise QueryError(f"{gallery}: no photo {photo_id!r} in this gallery (split {split or 'default'})")
        regions = g.photo_regions(photo, photo_id if photo is None else None)
        pair, path = g.align(regions, caption), photo or g.photo_path(photo_id)
        best = []
        if top:
            hits, _, _ = g.search_images(caption, top)
            best = [TopPhoto(load_photo(h.path) if h.path else None, h.photo_id, h.rank, h.score) for h in hits]
    else:
        if photo is None:
            raise QueryError("give --photo, or --gallery with --photo-id")
        model, settings, _ = load_checkpoint(checkpoint)
        regions = RegionExtractor(settings)([load_photo(photo)])[0]
        pair, path, best = align_pair(model, regions, caption), photo, []
    fig = alignment_figure(pair, load_photo(path) if path else None, caption, best)
    save_figure(fig, out)
    return fig


def save_figure(fig: Figure, out: Path) -> None:
    """Save with text kept as text (editable, searchable in .svg; TrueType fonts in .pdf)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        fig.savefig(out, dpi=200)
