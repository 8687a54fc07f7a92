"""Batched encoding for evaluation and serving: many photos of a feature table, many captions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from .features import RegionTable
from .model import CHAN


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
def encode_table(model: CHAN, table: RegionTable, ids: list[str], batch: int = 256) -> EncodedImages:
    """The region embeddings of these photos of a feature table, a batch at a time."""
    rows = table.rows(ids)
    out = []
    for s in range(0, len(rows), batch):
        part = rows[s : s + batch]
        features, maps = table.model_inputs(part)
        out.append(model.encode_images(features, maps=maps)[0])
    emb = torch.cat(out)
    return EncodedImages(emb, torch.ones(emb.shape[:2], dtype=torch.bool))


@torch.no_grad()
def encode_captions(model: CHAN, texts: list[str], batch: int = 256, progress: bool = False) -> EncodedCaptions:
    """The word embeddings of many captions, a batch at a time, padded to the longest."""
    parts = []
    for s in tqdm(range(0, len(texts), batch), desc="captions", disable=not progress, leave=False):
        parts.append(model.encode_texts(texts[s : s + batch]))
    L = max(e.shape[1] for e, _, _ in parts)
    emb = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[1])) for e, _, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1])) for _, m, _ in parts])
    return EncodedCaptions(emb, mask, [w for _, _, words in parts for w in words])
