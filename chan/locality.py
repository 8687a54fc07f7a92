"""Where words hard-align: every caption of a split against its own photo (`python -m chan alignments`).

A word's region is its argmax over the photo's regions (the hard assignment). Regions are the
whole photo (legacy settings), a detector box, or a grid cell. Special tokens and punctuation
are left out; stopwords are counted apart from content words; word pieces count as tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .backbone import BACKBONE_CHANNELS
from .data import Dataset
from .encoding import encode_captions, encode_table
from .evaluate import protocol_pairs
from .features import RegionTable
from .metrics import recall_metrics
from .model import CHAN, SPECIAL_TOKENS
from .region_settings import RegionSettings

STOPWORDS = frozenset(
    "a an the and or but of in on at to from by with without for into onto over under near as is are was were be "
    "been being it its this that these those there their his her he she they them who which while one two some "
    "s 's".split()
)
KINDS = ("whole_photo", "detection", "grid")


def word_kind(word: str) -> str | None:
    """'content', 'stopword', or None for special tokens and punctuation."""
    if word in SPECIAL_TOKENS or not any(ch.isalnum() for ch in word):
        return None
    return "stopword" if word.lower() in STOPWORDS else "content"


def region_kinds(table: RegionTable, rows: torch.Tensor, settings) -> torch.Tensor:
    """(N, K) index into KINDS for each region of these photos."""
    kinds = torch.where(table.detected[rows], 1, 2)
    if isinstance(settings, RegionSettings) and settings.whole_photo:
        kinds[:, 0] = 0
    return kinds


@torch.no_grad()
def alignment_locality(model: CHAN, settings, dataset: Dataset, table: RegionTable, batch: int = 256) -> dict:
    """Shares of content words (and stopwords) aligned to each kind of region, distinct regions per caption,
    the chosen box's area as a fraction of the photo, and the split's RSUM."""
    model.eval()
    ids, texts, owner = protocol_pairs(dataset)
    images = encode_table(model, table, ids).embeddings
    captions = encode_captions(model, texts, batch)
    rows = table.rows(ids)
    kinds = region_kinds(table, rows, settings)
    has_area = isinstance(settings, RegionSettings)
    areas = table.features[rows][..., BACKBONE_CHANNELS + 4].float() if has_area else None
    counts = {(w, k): 0 for w in ("content", "stopword") for k in KINDS}
    distinct, area_sum = [], 0.0
    for s in range(0, len(texts), batch):
        emb, mask, words = captions.embeddings[s : s + batch], captions.mask[s : s + batch], captions.words[s : s + batch]
        photos = owner[s : s + batch]
        chosen = torch.einsum("bld,bkd->blk", emb, images[photos.to(images.device)]).argmax(-1).cpu()
        for i, caption_words in enumerate(words):
            picks = chosen[i][mask[i].cpu()].tolist()
            real = set()
            for word, region in zip(caption_words, picks):
                category = word_kind(word)
                if category is None:
                    continue
                real.add(region)
                counts[category, KINDS[int(kinds[photos[i], region])]] += 1
                if category == "content" and has_area:
                    area_sum += float(areas[photos[i], region])
            distinct.append(len(real))
    n_content = sum(counts["content", k] for k in KINDS)
    n_stop = sum(counts["stopword", k] for k in KINDS)
    out = {f"{k}_share": counts["content", k] / max(1, n_content) for k in KINDS}
    out |= {f"stopword_{k}_share": counts["stopword", k] / max(1, n_stop) for k in KINDS}
    out |= {
        "distinct_regions_per_caption": sum(distinct) / max(1, len(distinct)),
        "mean_chosen_area": area_sum / max(1, n_content) if has_area else None,
        "content_words": n_content, "stopwords": n_stop, "captions": len(texts), "photos": len(ids),
        "rsum": recall_metrics(model.scores(images, torch.ones(images.shape[:2], dtype=torch.bool, device=images.device),
                                            captions.embeddings,
                                            captions.mask), owner)["rsum"],
    }
    return out


def alignments_command(checkpoint: Path | None, data: Path, split: str | None, json_path: Path | None,
                       device: torch.device | str = "cpu") -> dict:
    """Locality of a checkpoint's hard alignments (default: the app's checkpoint, the test split)."""
    from .checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from .evaluate import open_split
    from .features import table_for

    dataset, split = open_split(data, split)
    model, settings, _ = load_checkpoint(checkpoint or DEFAULT_CHECKPOINT)
    result = alignment_locality(model.to(device), settings, dataset, table_for(dataset, settings, device=device))
    print(f"{result['captions']} captions of split {split or '(all photos)'}, each with its own photo")
    print("content words on: " + ", ".join(f"{k.replace('_', ' ')} {result[f'{k}_share']:.1%}" for k in KINDS))
    print("stopwords on:     " + ", ".join(f"{k.replace('_', ' ')} {result[f'stopword_{k}_share']:.1%}" for k in KINDS))
    area = result["mean_chosen_area"]
    print(f"distinct regions per caption {result['distinct_regions_per_caption']:.2f}; "
          f"mean chosen area {'n/a (no boxes)' if area is None else f'{area:.1%} of the photo'}; RSUM {result['rsum']:.1f}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
