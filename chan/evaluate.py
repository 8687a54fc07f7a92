"""Encode a split and score every caption against every photo, then report the protocol's metrics."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .data import Dataset, DatasetError, open_dataset
from .features import RegionTable, table_for
from .metrics import format_metrics, recall_metrics
from .model import CHAN

CAPTIONS_PER_PHOTO = 5


@dataclass
class EncodedImages:
    embeddings: torch.Tensor  # (N, K, D)
    mask: torch.Tensor  # (N, K)


@dataclass
class EncodedCaptions:
    embeddings: torch.Tensor  # (M, L, D), zero-padded
    mask: torch.Tensor  # (M, L)


@torch.no_grad()
def encode_images(model: CHAN, table: RegionTable, ids: list[str], batch: int = 256) -> EncodedImages:
    rows = table.rows(ids)
    out = [model.encode_images(table.features[rows[s : s + batch]])[0] for s in range(0, len(rows), batch)]
    emb = torch.cat(out)
    return EncodedImages(emb, torch.ones(emb.shape[:2], dtype=torch.bool))


@torch.no_grad()
def encode_captions(model: CHAN, texts: list[str], batch: int = 256, progress: bool = False) -> EncodedCaptions:
    parts = []
    for s in tqdm(range(0, len(texts), batch), desc="captions", disable=not progress, leave=False):
        emb, mask, _ = model.encode_texts(texts[s : s + batch])
        parts.append((emb, mask))
    L = max(e.shape[1] for e, _ in parts)
    emb = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[1])) for e, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1])) for _, m in parts])
    return EncodedCaptions(emb, mask)


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
def evaluate(model: CHAN, dataset: Dataset, table: RegionTable, progress: bool = False) -> dict[str, float]:
    """Every caption of `dataset` against every photo: R@K both ways, RSUM, ranks."""
    model.eval()
    ids, texts, owner = protocol_pairs(dataset)
    images = encode_images(model, table, ids)
    captions = encode_captions(model, texts, progress=progress)
    scores = model.scores(images.embeddings, images.mask, captions.embeddings, captions.mask)
    return recall_metrics(scores, owner)


def _evaluate_checkpoint(checkpoint: Path, data: Path, split: str | None,
                         similarity: str | None = None) -> tuple[dict, Dataset, str | None]:
    from .checkpoint import load_checkpoint

    model, settings, _ = load_checkpoint(checkpoint)
    model.config.similarity = similarity or model.config.similarity
    dataset = open_dataset(data)
    split = split or dataset.default_split()
    dataset = dataset.split(split)
    return evaluate(model, dataset, table_for(dataset, settings), progress=True), dataset, split


def evaluate_command(checkpoint: Path | None, data: Path, split: str | None, json_path: Path | None,
                     similarity: str | None = None) -> dict:
    """Evaluate a checkpoint (default: the app's); `similarity` scores it with another similarity than trained."""
    from .checkpoint import DEFAULT_CHECKPOINT

    metrics, dataset, split = _evaluate_checkpoint(checkpoint or DEFAULT_CHECKPOINT, data, split, similarity)
    print(f"{len(protocol_pairs(dataset)[0])} photos, {len(dataset.captions)} captions, split {split or '(all photos)'}")
    print(format_metrics(metrics))
    if json_path:
        Path(json_path).write_text(json.dumps(metrics, indent=2))
    return metrics


def table_command(checkpoints: list[Path], data: Path, split: str | None) -> str:
    """A markdown accuracy table, one row per checkpoint (its file name and model description)."""
    from .checkpoint import read_metadata

    lines = ["| model | similarity | text | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in checkpoints:
        config = read_metadata(path)["config"]
        m, _, _ = _evaluate_checkpoint(path, data, split)
        cells = [m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
        lines.append(f"| {Path(path).stem} | {config['similarity']} ({config['pooling']}) | {config['text_encoder']} | "
                     + " | ".join(f"{c:.1f}" for c in cells) + f" | {m['rsum']:.1f} |")
    table = "\n".join(lines)
    print(table)
    return table
