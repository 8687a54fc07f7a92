"""Batch losses on a score matrix: the bidirectional hinge triplet (VSE++) and the contrastive InfoNCE."""
from __future__ import annotations

import torch

LOSSES = ("triplet", "infonce")  # the names `train --loss` takes


def triplet_loss(scores: torch.Tensor, same_photo: torch.Tensor, margin: float, hardest: bool) -> torch.Tensor:
    """`scores[i, j]`: image of pair i vs caption of pair j; the diagonal holds the true pairs.

    `same_photo[i, j]` marks pairs that share a photo: those are never negatives. With
    `hardest`, only the hardest negative per pair counts (VSE++); otherwise all are summed.
    """
    positive = scores.diag()
    negatives = same_photo.to(scores.device) | torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    cost_caption = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(negatives, 0)
    cost_image = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(negatives, 0)
    if hardest:
        return cost_caption.amax(1).sum() + cost_image.amax(0).sum()
    return cost_caption.sum() + cost_image.sum()


def contrastive_loss(scores: torch.Tensor, same_photo: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE both ways, summed over the batch: each true pair against every negative in its row and its column.

    The same layout as `triplet_loss`; pairs sharing a photo are left out of each other's softmax.
    """
    others = same_photo.to(scores.device) & ~torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    logits = (scores / temperature).masked_fill(others, float("-inf"))
    target = torch.arange(len(scores), device=scores.device)
    return (torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            + torch.nn.functional.cross_entropy(logits.T, target, reduction="sum"))
