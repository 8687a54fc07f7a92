"""The served gallery: region and caption embeddings encoded once, cached on disk, queried fast.

The index is keyed by the checkpoint's bytes and the gallery's photo list, so it is rebuilt
only when either changes. Everything returned is plain data (ids, paths, arrays, labels).
"""
from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .checkpoint import load_checkpoint
from .model import MAX_TOKENS
from .data import Dataset, open_dataset
from .evaluate import encode_captions, encode_images
from .features import CACHE_DIR, save_atomic, table_for
from .photos import load_photo
from .regions import PrecomputedSettings, RegionExtractor, Regions, region_names
from .similarity import Alignment, align

MAX_QUERY_CHARS = 2000
log = logging.getLogger(__name__)


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
class Hit:
    rank: int
    score: float
    photo_id: str
    path: str  # "" when the gallery holds precomputed features without photo files
    caption: str  # the photo's first caption ("" in a plain folder)


@dataclass
class RankedCaption:
    rank: int
    score: float
    text: str
    source: str  # "yours", or the gallery photo the caption describes
    matches_photo: bool  # one of this photo's own gallery captions


@dataclass
class PairAlignment:
    words: list[str]
    region_labels: list[str]
    boxes: np.ndarray | None  # (K, 4) photo pixels; None for precomputed features
    alignment: Alignment


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Gallery:
    """A checkpoint plus a dataset of photos (and captions, if it has any), ready to query."""

    def __init__(self, checkpoint: Path, dataset: Dataset, progress: bool = True):
        self.model, self.settings, self.info = load_checkpoint(checkpoint)
        self.dataset = dataset
        self.table = table_for(dataset, self.settings, progress=progress)
        self.photos = [p for p in dataset.photos if p.id in self.table.index]
        self.photo_index = {p.id: i for i, p in enumerate(self.photos)}
        by_photo = dataset.captions_by_photo()
        self.first_caption = [by_photo[p.id][0] if by_photo[p.id] else "" for p in self.photos]
        captions = [c for c in dataset.captions if c.photo_id in self.photo_index]
        self.caption_texts = [c.text for c in captions]
        self.caption_photo = torch.tensor([self.photo_index[c.photo_id] for c in captions], dtype=torch.long)
        self.cache_path = CACHE_DIR / f"gallery-{self._index_key(Path(checkpoint), captions)}.safetensors"
        self._load_or_build()
        self._extractor: RegionExtractor | None = None

    def _index_key(self, checkpoint: Path, captions: list) -> str:
        """What the index is computed from: the checkpoint's bytes, each photo's id and region-cache stats, the captions."""
        h = hashlib.sha1(f"{_file_digest(checkpoint)}|{self.dataset.root.resolve()}".encode())
        stats = self.table.photo_stats or {}
        for p in self.photos:
            h.update(f"{p.id}|{stats.get(p.id)}\n".encode())
        for c in captions:
            h.update(f"{c.photo_id}\t{c.text}\n".encode())
        return h.hexdigest()[:16]

    def _load_or_build(self) -> None:
        t = None
        if self.cache_path.exists():
            try:
                t = load_file(str(self.cache_path))
            except Exception as e:  # safetensors raises several types for a damaged file
                log.warning("%s is damaged (%s); encoding the gallery again", self.cache_path, e)
        if t is not None:
            self.regions, lengths = t["regions"].float(), t["caption_lengths"]
            flat = t["caption_words"].float()
        else:
            self.regions = encode_images(self.model, self.table, [p.id for p in self.photos]).embeddings
            if self.caption_texts:
                enc = encode_captions(self.model, self.caption_texts, progress=True)
                lengths = enc.mask.sum(1)
                flat = enc.embeddings[enc.mask]
            else:
                lengths, flat = torch.zeros(0, dtype=torch.long), torch.zeros(0, self.regions.shape[-1])
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic({"regions": self.regions.half(), "caption_lengths": lengths, "caption_words": flat.half()}, {},
                        self.cache_path)
        if self.model.config.similarity == "hard":  # the hard scorer runs in the gallery's dtype: half the memory
            self.regions = self.regions.bfloat16()
        L = int(lengths.max()) if len(lengths) else 1
        self.caption_mask = torch.arange(L)[None] < lengths[:, None]
        self.caption_words = torch.zeros(len(lengths), L, flat.shape[-1])
        self.caption_words[self.caption_mask] = flat
        self.region_mask = torch.ones(self.regions.shape[:2], dtype=torch.bool)

    @property
    def precomputed(self) -> bool:
        """Region features read from precomputed files: no photos to show, no boxes, no uploads."""
        return isinstance(self.settings, PrecomputedSettings)

    @property
    def extractor(self) -> RegionExtractor:
        if self._extractor is None:
            self._extractor = RegionExtractor(self.settings)
        return self._extractor

    def _encode_query(self, text: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        text = clean_text(text)
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"That query is {len(text)} characters long; keep it under {MAX_QUERY_CHARS}.")
        with torch.no_grad():
            emb, mask, words = self.model.encode_texts([text])
        if not words[0]:
            raise QueryError("The model reads no words in that text (only punctuation or symbols); type a caption.")
        return emb, mask, words[0]

    def _was_truncated(self, text: str) -> bool:
        return self.model.config.text_encoder == "bert" and int(self.model.text_encoder.tokenize([text])[1].sum()) >= MAX_TOKENS

    def query_notes(self, words: list[str], truncated: bool = False) -> list[str]:
        """Warnings a user should see about how their text was read."""
        notes = []
        unknown = {"[UNK]", "<unk>"}
        content = [w for w in words if w not in {"[CLS]", "[SEP]", "<start>", "<end>"}]
        if content and all(w in unknown for w in content):
            notes.append("None of these words is in the model's vocabulary; the ranking is close to arbitrary.")
        elif any(w in unknown for w in content):
            notes.append("Some words are unknown to the model and were read as ‘unknown’.")
        if truncated:
            notes.append(f"The query is long: only its first {MAX_TOKENS} tokens were used.")
        return notes

    def search_images(self, text: str, k: int = 12) -> tuple[list[Hit], list[str], float]:
        """Top-k photos for a caption; returns hits, notes about the query, and milliseconds taken."""
        start = time.perf_counter()
        emb, mask, words = self._encode_query(text)
        with torch.no_grad():
            scores = self.model.scores(self.regions, self.region_mask, emb, mask)[:, 0]
        top = scores.topk(min(k, len(scores)))
        hits = [
            Hit(r + 1, float(s), self.photos[i].id, str(self.photos[i].path or ""), self.first_caption[i])
            for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))
        ]
        return hits, self.query_notes(words, self._was_truncated(clean_text(text))), (time.perf_counter() - start) * 1000

    def photo_regions(self, photo: str | Path | None = None, photo_id: str | None = None) -> Regions:
        """Regions of a gallery photo (cached) or of any photo file (extracted now)."""
        if photo_id and photo_id in self.table.index:
            return self.table.regions(photo_id)
        if photo is None:
            if photo_id:
                raise QueryError(f"No gallery photo has the id {photo_id[:100]!r}.")
            raise QueryError("Upload a photo or pick one from the gallery first.")
        if self.precomputed:
            raise QueryError("This model reads precomputed region features (the authors' bottom-up-attention files), "
                             "which cannot be computed for a new photo here: pick a gallery photo instead.")
        return self.extractor([load_photo(photo)])[0]

    def _region_embeddings(self, regions: Regions) -> torch.Tensor:
        with torch.no_grad():
            maps = None if regions.stage_map is None else torch.from_numpy(regions.stage_map)[None]
            return self.model.encode_images(torch.from_numpy(regions.features)[None], maps=maps)[0][0]

    def rank_captions(self, regions: Regions, own: list[str] | None = None, photo_id: str | None = None,
                      limit: int = 20) -> list[RankedCaption]:
        """Gallery captions and your own, ranked for one photo's regions."""
        own = [clean_text(t) for t in (own or []) if t.strip()]
        image = self._region_embeddings(regions)[None]
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool)
        with torch.no_grad():
            gallery_scores = self.model.scores(image, image_mask, self.caption_words, self.caption_mask)[0] if self.caption_texts else torch.zeros(0)
            own_scores = [torch.zeros(0)]
            for s in range(0, len(own), 32):  # bounded batches, whatever the count
                emb, mask, _ = self.model.encode_texts(own[s : s + 32])
                own_scores.append(self.model.scores(image, image_mask, emb, mask)[0])
            own_scores = torch.cat(own_scores)
        target = self.photo_index.get(photo_id or "", -1)
        entries = [(float(s), own[i], "yours", False) for i, s in enumerate(own_scores.tolist())]
        top = gallery_scores.topk(min(limit, len(gallery_scores)))
        for s, j in zip(top.values.tolist(), top.indices.tolist()):
            owner = int(self.caption_photo[j])
            entries.append((s, self.caption_texts[j], self.photos[owner].id, owner == target))
        entries.sort(key=lambda e: -e[0])
        return [RankedCaption(r + 1, *e) for r, e in enumerate(entries)]

    def align(self, regions: Regions, caption: str) -> PairAlignment:
        """Which region each word of `caption` hard-aligned to, and the soft attention it replaces."""
        emb, mask, words = self._encode_query(caption)
        with torch.no_grad():
            a = align(self._region_embeddings(regions), emb[0][mask[0]], self.model.config.pooling)
        return PairAlignment(words, region_names(regions), regions.boxes, a)

    def describe(self) -> str:
        info = self.info or {}
        dev = info.get("dev", {})
        return (f"{len(self.photos)} photos, {len(self.caption_texts)} captions · model: "
                f"{self.model.config.text_encoder} + {self.model.config.similarity} alignment"
                + (f" · dev RSUM {dev['rsum']:.1f}" if "rsum" in dev else "")
                + (f" · imported from {info['imported_from']}" if "imported_from" in info else "")
                + (" · precomputed region features: no photo files, regions named by index" if self.precomputed else ""))



def open_gallery(folder: Path, checkpoint: Path, split: str | None = None, progress: bool = True) -> Gallery:
    """A dataset folder's split (default: test where there is one, else every photo) as a gallery."""
    dataset = open_dataset(folder)
    return Gallery(checkpoint, dataset.split(split or dataset.default_split()), progress=progress)
