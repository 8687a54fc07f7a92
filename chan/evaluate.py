"""Encode a split and score every caption against every photo, then report the protocol's metrics."""
from __future__ import annotations

from pathlib import Path

import torch

from .data import CAPTIONS_PER_PHOTO, Dataset, DatasetError, open_dataset
from .encoding import encode_captions, encode_table
from .features import RegionTable, table_for
from .metrics import recall_metrics
from .model import CHAN
from .similarity import global_scores

COCO_5K = 5000  # a split this size is also reported with the 5-fold 1K protocol


def protocol_pairs(dataset: Dataset) -> tuple[list[str], list[str], torch.Tensor]:
    """Photos with captions, their first 5 captions, and each caption's photo index."""
    by_photo = dataset.captions_by_photo()
    ids = [p.id for p in dataset.photos if by_photo[p.id]]
    if not ids:
        raise DatasetError(f"{dataset.root}: no captions to evaluate against (a plain image folder has none)")
    texts, owner = [], []
    for i, pid in enumerate(ids):
        caps = by_photo[pid][:CAPTIONS_PER_PHOTO]
        texts += caps
        owner += [i] * len(caps)
    return ids, texts, torch.tensor(owner)


@torch.no_grad()
def split_score_parts(model: CHAN, dataset: Dataset, table: RegionTable,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every caption of `dataset` against every photo: the model's scores (N, M), the global term alone (N, M: the
    cosine of the mean region and the mean word embedding) and each caption's photo index; one encoding for both."""
    model.eval()
    ids, texts, owner = protocol_pairs(dataset)
    images = encode_table(model, table, ids)
    captions = encode_captions(model, texts, progress=progress)
    scores = model.scores(images.embeddings, images.mask, captions.embeddings, captions.mask)
    term = global_scores(images.embeddings, images.mask, captions.embeddings, captions.mask)
    return scores.cpu(), term.cpu(), owner


def split_scores(model: CHAN, dataset: Dataset, table: RegionTable, progress: bool = False,
                 global_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption of `dataset` against every photo: scores (N, M) and each caption's photo index.

    `global_weight` w adds w x the cosine of the mean region and the mean word embedding (a global term
    beside the model's own score, read without retraining)."""
    scores, term, owner = split_score_parts(model, dataset, table, progress)
    return (scores + global_weight * term if global_weight else scores), owner


def evaluate(model: CHAN, dataset: Dataset, table: RegionTable, progress: bool = False) -> dict[str, float]:
    """R@K both ways, RSUM and ranks of `model` on `dataset`."""
    return recall_metrics(*split_scores(model, dataset, table, progress))


def open_split(data: Path, split: str | None) -> tuple[Dataset, str | None]:
    dataset = open_dataset(data)
    split = split or dataset.default_split()
    return dataset.split(split), split


def checkpoint_scores(checkpoint: Path, dataset: Dataset, similarity: str | None = None,
                      device: torch.device | str = "cpu", global_weight: float = 0.0,
                      detector_precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of one checkpoint on a dataset split (optionally with another similarity than it was trained with,
    a global term beside it, or its regions made with another detector precision)."""
    from .checkpoint import load_checkpoint, with_detector_precision

    model, settings, _ = load_checkpoint(checkpoint)
    settings = with_detector_precision(settings, detector_precision)
    model.config.similarity = similarity or model.config.similarity
    return split_scores(model.to(device), dataset, table_for(dataset, settings, device=device), progress=True,
                        global_weight=global_weight)


def ensemble_scores(checkpoints: list[Path], dataset: Dataset, similarity: str | None = None,
                    device: torch.device | str = "cpu", global_weight: float = 0.0,
                    detector_precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean score of several checkpoints (the authors' eval_ensemble), and each caption's photo index."""
    return mean_scores([checkpoint_scores(c, dataset, similarity, device, global_weight, detector_precision)
                        for c in checkpoints])


def mean_scores(runs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, owner) of several checkpoints on the same split -> their mean score, and the shared owner."""
    return sum(s for s, _ in runs) / len(runs), runs[0][1]
