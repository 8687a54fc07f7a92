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


@dataclass
class EncodedQueries:
    """Several clients' captions encoded at once: the readable ones as one batch, an error for each of the others."""

    embeddings: torch.Tensor  # (B, L, D) for the readable captions, in input order
    mask: torch.Tensor  # (B, L): the pooled tokens
    words: list[list[str]]  # each readable caption's pooled tokens
    rows: list[int]  # the input position of each readable caption
    errors: dict[int, QueryError]  # input position -> why that caption cannot be searched


def encode_queries(model: CHAN, texts: list) -> EncodedQueries:
    """Clients' captions encoded in one call of the text encoder; unreadable ones get the message a user sees."""
    cleaned, errors = {}, {}
    for i, text in enumerate(texts):
        try:
            text = clean_text(text)
            if len(text) > MAX_QUERY_CHARS:
                raise QueryError(f"That query is {len(text)} characters long; keep it under {MAX_QUERY_CHARS}.")
            cleaned[i] = text
        except QueryError as e:
            errors[i] = e
    if not cleaned:
        return EncodedQueries(torch.zeros(0, 1, model.config.embed_dim), torch.zeros(0, 1, dtype=torch.bool), [], [], errors)
    with torch.no_grad():
        emb, mask, words = model.encode_texts(list(cleaned.values()))
    keep = []
    for j, (i, ws) in enumerate(zip(cleaned, words)):
        if ws:
            keep.append(j)
        else:
            errors[i] = QueryError("The model reads no words in that text (only punctuation or symbols); type a caption.")
    rows = list(cleaned)
    return EncodedQueries(emb[keep], mask[keep], [words[j] for j in keep], [rows[j] for j in keep], errors)


def encode_query(model: CHAN, text: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A client's caption encoded: word embeddings (1, L, D), the pooled tokens' mask, and those tokens."""
    q = encode_queries(model, [text])
    if q.errors:
        raise q.errors[0]
    return q.embeddings, q.mask, q.words[0]


@torch.no_grad()
def region_embeddings(model: CHAN, regions: Regions) -> torch.Tensor:
    """One photo's region embeddings (K, D)."""
    maps = None if regions.stage_map is None else torch.from_numpy(regions.stage_map)[None]
    return model.encode_images(torch.from_numpy(regions.features)[None], maps=maps)[0][0]


def word_spans(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Whole words and the positions of their pieces: ['skate', '##board'] -> [('skateboard', [0, 1])]."""
    out: list[tuple[str, list[int]]] = []
    for i, token in enumerate(tokens):
        if token.startswith("##") and out:
            out[-1] = (out[-1][0] + token[2:], out[-1][1] + [i])
        else:
            out.append((token.removeprefix("##"), [i]))
    return out


def whole_words(tokens: list[str]) -> list[str]:
    """For each token, the word it is part of: word pieces ('skate', '##board') are joined ('skateboard')."""
    return [word for word, pieces in word_spans(tokens) for _ in pieces]


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
        a = align(region_embeddings(model, regions).cpu(), emb[0][mask[0]].cpu(), model.config.pooling,
                  model.config.global_weight)
    return PairAlignment(words, region_names(regions), regions.boxes, a)
