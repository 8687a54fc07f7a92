"""One image-caption pair, aligned, as plain data for every renderer: the inspector's Plotly heatmaps and the
paper figure's matplotlib (`chan.figure`) read the same words, region names and boxes from here."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np
import torch

from .model import CHAN, SPECIAL_TOKENS
from .regions import Regions, region_names
from .similarity import Alignment, align

MAX_QUERY_CHARS = 2000
PALETTE = [  # a word's colour, the same in every renderer
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075",
]


def word_colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


class QueryError(ValueError):
    """Input the gallery cannot score; the message is shown to the user as is."""


def clean_text(text) -> str:
    """A client's caption as plain text: invisible format characters dropped, spaces collapsed; refused if empty."""
    if not isinstance(text, (str, type(None))):
        raise QueryError("A caption must be text.")
    text = text or ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError("That text holds characters that are not valid Unicode (a lone surrogate); retype it.") from None
    text = " ".join("".join(ch for ch in text if unicodedata.category(ch) != "Cf").split())
    if not text:
        raise QueryError("Type a caption, e.g. “a dog runs on the beach”.")
    return text


def encode_query(model: CHAN, text: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A client's caption encoded: word embeddings (1, L, D), the pooled tokens' mask, and those tokens."""
    text = clean_text(text)
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"That query is {len(text)} characters long; keep it under {MAX_QUERY_CHARS}.")
    with torch.no_grad():
        emb, mask, words = model.encode_texts([text])
    if not words[0]:
        raise QueryError("The model reads no words in that text (only punctuation or symbols); type a caption.")
    return emb, mask, words[0]


@torch.no_grad()
def region_embeddings(model: CHAN, regions: Regions) -> torch.Tensor:
    """One photo's region embeddings (K, D)."""
    maps = None if regions.stage_map is None else torch.from_numpy(regions.stage_map)[None]
    return model.encode_images(torch.from_numpy(regions.features)[None], maps=maps)[0][0]


def whole_words(tokens: list[str]) -> list[str]:
    """For each token, the word it is part of: word pieces ('skate', '##board') are joined ('skateboard')."""
    out, start = list(tokens), 0
    for i, t in enumerate(tokens + [""]):
        if not t.startswith("##"):
            word = "".join(p.removeprefix("##") for p in tokens[start:i])
            out[start:i] = [word] * (i - start)
            start = i
    return out


def word_names(tokens: list[str]) -> list[str]:
    """Unique row names, one per scored token: '2:dog'; a piece with its word, '3:skateboard[##board]';
    special tokens marked, '0:[CLS] (special)'."""
    names = []
    for i, (token, word) in enumerate(zip(tokens, whole_words(tokens))):
        if token in SPECIAL_TOKENS:
            names.append(f"{i}:{token} (special)")
        else:
            names.append(f"{i}:{token}" if word == token else f"{i}:{word}[{token}]")
    return names


def axis_region_names(labels: list[str]) -> list[str]:
    """Unique axis names: 'r3 dog 87%' (just 'r3' for unlabelled precomputed regions)."""
    return [f"r{k} {label}".strip() for k, label in enumerate(labels)]


@dataclass
class PairAlignment:
    words: list[str]  # the tokens the score pools over
    region_labels: list[str]  # 'dog 87%', '3x3 grid, top left', ...
    boxes: np.ndarray | None  # (K, 4) photo pixels; None for precomputed features
    alignment: Alignment

    @property
    def row_names(self) -> list[str]:
        return word_names(self.words)

    @property
    def column_names(self) -> list[str]:
        return axis_region_names(self.region_labels)


def align_pair(model: CHAN, regions: Regions, caption: str) -> PairAlignment:
    """Which region each token of `caption` hard-aligned to, and the soft attention it replaces."""
    emb, mask, words = encode_query(model, caption)
    with torch.no_grad():
        a = align(region_embeddings(model, regions).cpu(), emb[0][mask[0]].cpu(), model.config.pooling)
    return PairAlignment(words, region_names(regions), regions.boxes, a)
