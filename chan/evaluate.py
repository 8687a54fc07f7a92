"""Encode a split and score every caption against every photo, then report the protocol's metrics."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .data import Dataset, DatasetError, open_dataset
from .features import RegionTable, table_for
from .metrics import fold_metrics, format_metrics, recall_metrics
from .model import CHAN

CAPTIONS_PER_PHOTO = 5
COCO_5K = 5000  # a split this size is also reported with the 5-fold 1K protocol


@dataclass
class EncodedImages:
    embeddings: torch.Tensor  # (N, K, D)
    mask: torch.Tensor  # (N, K)


@dataclass
class EncodedCaptions:
    embeddings: torch.Tensor  # (M, L, D), zero-padded
    mask: torch.Tensor  # (M, L): the pooled tokens
    words: list[list[str]]  # each caption's pooled tokens, in the order of the embeddings


@torch.no_grad()
def encode_images(model: CHAN, table: RegionTable, ids: list[str], batch: int = 256) -> EncodedImages:
    rows = table.rows(ids)
    out = []
    for s in range(0, len(rows), batch):
        part = rows[s : s + batch]
        out.append(model.encode_images(table.features[part], maps=None if table.maps is None else table.maps[part])[0])
    emb = torch.cat(out)
    return EncodedImages(emb, torch.ones(emb.shape[:2], dtype=torch.bool))


@torch.no_grad()
def encode_captions(model: CHAN, texts: list[str], batch: int = 256, progress: bool = False) -> EncodedCaptions:
    parts = []
    for s in tqdm(range(0, len(texts), batch), desc="captions", disable=not progress, leave=False):
        parts.append(model.encode_texts(texts[s : s + batch]))
    L = max(e.shape[1] for e, _, _ in parts)
    emb = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[1])) for e, _, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1])) for _, m, _ in parts])
    return EncodedCaptions(emb, mask, [w for _, _, words in parts for w in words])


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
def split_scores(model: CHAN, dataset: Dataset, table: RegionTable, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption of `dataset` against every photo: scores (N, M) and each caption's photo index."""
    model.eval()
    ids, texts, owner = protocol_pairs(dataset)
    images = encode_images(model, table, ids)
    captions = encode_captions(model, texts, progress=progress)
    return model.scores(images.embeddings, images.mask, captions.embeddings, captions.mask), owner


def evaluate(model: CHAN, dataset: Dataset, table: RegionTable, progress: bool = False) -> dict[str, float]:
    """R@K both ways, RSUM and ranks of `model` on `dataset`."""
    return recall_metrics(*split_scores(model, dataset, table, progress))


def open_split(data: Path, split: str | None) -> tuple[Dataset, str | None]:
    dataset = open_dataset(data)
    split = split or dataset.default_split()
    return dataset.split(split), split


def checkpoint_scores(checkpoint: Path, dataset: Dataset, similarity: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of one checkpoint on a dataset split (optionally with another similarity than it was trained with)."""
    from .checkpoint import load_checkpoint

    model, settings, _ = load_checkpoint(checkpoint)
    model.config.similarity = similarity or model.config.similarity
    return split_scores(model, dataset, table_for(dataset, settings), progress=True)


def ensemble_scores(checkpoints: list[Path], dataset: Dataset, similarity: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean score of several checkpoints (the authors' eval_ensemble), and each caption's photo index."""
    runs = [checkpoint_scores(c, dataset, similarity) for c in checkpoints]
    return sum(s for s, _ in runs) / len(runs), runs[0][1]


def evaluate_command(checkpoints: list[Path] | None, data: Path, split: str | None, json_path: Path | None,
                     similarity: str | None = None) -> dict:
    """Evaluate a checkpoint (default: the app's), or the mean score of several (an ensemble).

    A split of 5,000 photos (COCO 5K) is also reported with the 5-fold 1K protocol (keys `fold5_*`).
    """
    from .checkpoint import DEFAULT_CHECKPOINT

    dataset, split = open_split(data, split)
    checkpoints = checkpoints or [DEFAULT_CHECKPOINT]
    scores, owner = ensemble_scores(checkpoints, dataset, similarity)
    metrics = recall_metrics(scores, owner)
    print(f"{scores.shape[0]} photos, {scores.shape[1]} captions, split {split or '(all photos)'}"
          + (f", mean score of {len(checkpoints)} models" if len(checkpoints) > 1 else ""))
    if scores.shape[0] == COCO_5K:
        fold = fold_metrics(scores, owner)
        print("5-fold 1K (mean of the folds): " + format_metrics(fold))
        print("full 5K: " + format_metrics(metrics))
        metrics.update({f"fold5_{k}": v for k, v in fold.items()})
    else:
        print(format_metrics(metrics))
    if json_path:
        Path(json_path).write_text(json.dumps(metrics, indent=2))
    return metrics


def table_command(rows: list[str], data: Path, split: str | None) -> str:
    """A markdown accuracy table, one row per checkpoint (its file name and model description).

    A row written `a.safetensors+b.safetensors` scores the mean of those checkpoints (an ensemble).
    """
    from .checkpoint import read_metadata

    dataset, split = open_split(data, split)
    lines = ["| model | similarity | text | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        paths = [Path(p) for p in row.split("+")]
        configs = [read_metadata(p)["config"] for p in paths]
        m = recall_metrics(*ensemble_scores(paths, dataset))
        cells = [m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
        similarity = " + ".join(f"{c['similarity']} ({c['pooling']})" for c in configs)
        lines.append(f"| {' + '.join(p.stem for p in paths)} | {similarity} | {' + '.join(c['text_encoder'] for c in configs)} | "
                     + " | ".join(f"{c:.1f}" for c in cells) + f" | {m['rsum']:.1f} |")
    table = "\n".join(lines)
    print(table)
    return table
