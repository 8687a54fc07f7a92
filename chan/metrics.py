"""The field's retrieval protocol: R@1/5/10 both ways, RSUM, median and mean rank.

Ranks are pessimistic: a tie with a wrong candidate counts against the right one, so a
model that scores everything alike gets no credit.
"""
from __future__ import annotations

import torch


def _rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-scoring target per row: 1 + wrong candidates scoring >= it."""
    best = scores.masked_fill(~target, float("-inf")).amax(1, keepdim=True)
    return 1 + ((scores >= best) & ~target).sum(1)


def recall_metrics(scores: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """`scores` (N images, M captions); `caption_image[j]` is the image index of caption j."""
    scores, caption_image = scores.float().cpu(), caption_image.cpu()
    truth = caption_image[None, :] == torch.arange(scores.shape[0])[:, None]  # (N, M)
    ranks = {"i2t": _rank(scores, truth), "t2i": _rank(scores.T, truth.T)}
    out: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in (1, 5, 10):
            out[f"{direction}_r{k}"] = 100.0 * (r <= k).float().mean().item()
        out[f"{direction}_medr"] = r.float().median().item()
        out[f"{direction}_meanr"] = r.float().mean().item()
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ranks for k in (1, 5, 10))
    return out


def fold_metrics(scores: torch.Tensor, caption_image: torch.Tensor, folds: int = 5) -> dict[str, float]:
    """The COCO 5-fold 1K protocol: metrics on consecutive blocks of N / folds images and their captions, averaged."""
    size = scores.shape[0] // folds
    per_fold = []
    for f in range(folds):
        lo, hi = f * size, (f + 1) * size
        keep = (caption_image >= lo) & (caption_image < hi)
        per_fold.append(recall_metrics(scores[lo:hi][:, keep], caption_image[keep] - lo))
    return {k: sum(m[k] for m in per_fold) / folds for k in per_fold[0]}


def markdown_cells(m: dict[str, float]) -> str:
    """R@1/5/10 both ways and RSUM as the cells of a markdown table row (no outer bars)."""
    return " | ".join(f"{m[f'{d}_r{k}']:.1f}" for d in ("i2t", "t2i") for k in (1, 5, 10)) + f" | {m['rsum']:.1f}"


def format_metrics(m: dict[str, float]) -> str:
    return (
        f"i2t R@1 {m['i2t_r1']:.1f} R@5 {m['i2t_r5']:.1f} R@10 {m['i2t_r10']:.1f} medr {m['i2t_medr']:.0f} meanr {m['i2t_meanr']:.1f} | "
        f"t2i R@1 {m['t2i_r1']:.1f} R@5 {m['t2i_r5']:.1f} R@10 {m['t2i_r10']:.1f} medr {m['t2i_medr']:.0f} meanr {m['t2i_meanr']:.1f} | "
        f"RSUM {m['rsum']:.1f}"
    )
