"""What a gallery query reads: the photos indexed so far with their region and caption embeddings.

An index is immutable: indexing in the background builds a larger one and swaps it in whole, so
a query always sees one consistent set of photos. The finished index is cached on disk.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from . import store
from .data import Photo
from .similarity import best_region_cosines, global_vectors

FORMAT = "chan-gallery-2"


class IndexCacheError(store.StoreError):
    """A cached index that cannot be used: foreign, damaged or for other photos."""


@dataclass(frozen=True)
class GalleryIndex:
    photos: tuple[Photo, ...]
    region_embeddings: torch.Tensor  # (N, K, D), in the dtype the scorer runs in
    first_caption: tuple[str, ...]  # each photo's first caption ("" if it has none)
    caption_texts: tuple[str, ...]  # every caption of the indexed photos, photo by photo
    caption_photo: torch.Tensor  # (M,) the photo (row of `photos`) each caption describes
    caption_words: torch.Tensor  # (W, D) pooled word embeddings, caption after caption (no padding), regions' dtype
    caption_lengths: torch.Tensor  # (M,) each caption's count of pooled words

    @classmethod
    def empty(cls, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> "GalleryIndex":
        """An index of no photo, whose tensors live on `device` (where the model scores)."""
        return cls((), torch.zeros(0, 1, dim, dtype=dtype, device=device), (), (),
                   torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dim, dtype=dtype, device=device),
                   torch.zeros(0, dtype=torch.long, device=device))

    @cached_property
    def caption_starts(self) -> torch.Tensor:
        """(M,) where each caption's words begin in `caption_words`."""
        return torch.cumsum(self.caption_lengths, 0) - self.caption_lengths

    @cached_property
    def word_caption(self) -> torch.Tensor:
        """(W,) the caption each row of `caption_words` belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.caption_lengths), device=self.caption_lengths.device),
                                       self.caption_lengths)

    @cached_property
    def caption_centres(self) -> torch.Tensor:
        """(M, D) each caption's mean pooled word, L2-normalised (the global term's caption side), float32."""
        sums = torch.zeros(len(self.caption_lengths), self.caption_words.shape[-1], device=self.caption_words.device)
        sums.index_add_(0, self.word_caption, self.caption_words.float())
        return F.normalize(sums / self.caption_lengths.clamp(min=1)[:, None], dim=-1)

    def padded_captions(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions `rows` as the scorers take them: words (m, L, D) zero-padded to the longest, and their mask."""
        lengths, starts = self.caption_lengths[rows], self.caption_starts[rows]
        positions = torch.arange(max(1, int(lengths.max()) if len(lengths) else 1), device=lengths.device)
        mask = positions[None] < lengths[:, None]
        if not len(self.caption_words):  # no caption has a pooled word
            return self.caption_words.new_zeros(*mask.shape, self.caption_words.shape[-1]), mask
        picked = (starts[:, None] + positions[None]).clamp(max=len(self.caption_words) - 1)  # padding reads any row...
        return self.caption_words[picked] * mask[..., None].to(self.caption_words.dtype), mask  # ...and is zeroed

    def caption_scores(self, model, image: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """One photo's regions (1, K, D) against every caption: (M,) float32 scores by the model's similarity.

        CHAN with mean pooling scores all the words in one product (a word's best region, then each caption's
        mean); other similarities take captions of similar length `chunk` at a time, padded from the packed words.
        """
        M = len(self.caption_lengths)
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        if model.config.similarity == "hard" and model.config.pooling == "mean":
            best = best_region_cosines(image.to(self.caption_words.dtype), image_mask, self.caption_words,
                                       runtime=model.cosine_runtime)[:, 0].float()
            sums = torch.zeros(M, device=best.device).index_add_(0, self.word_caption, best)
            scores = sums / self.caption_lengths.clamp(min=1)
            if model.config.global_weight:  # the global term, as model.scores adds it
                scores += model.config.global_weight * (self.caption_centres @ global_vectors(image.float(), image_mask)[0])
            return scores
        out = torch.empty(M, device=image.device)
        order = torch.argsort(self.caption_lengths, stable=True)
        for start in range(0, M, chunk):
            rows = order[start : start + chunk]
            words, mask = self.padded_captions(rows)
            out[rows] = model.scores(image, image_mask, words, mask)[0].float()
        return out

    @cached_property
    def region_centres(self) -> torch.Tensor:
        """(N, D) each photo's mean region, L2-normalised (the global term's photo side), float32."""
        return global_vectors(self.region_embeddings.float(), self.region_mask)

    def photo_scores(self, model, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """(N, M) every indexed photo against these captions' (M, L, D) words by `model.scores`; the global term,
        where the model has one, from the photos' mean regions computed once."""
        return model.scores(self.region_embeddings, self.region_mask, words, word_mask, image_globals=self.region_centres)

    @cached_property
    def photo_index(self) -> dict[str, int]:
        return {p.id: i for i, p in enumerate(self.photos)}

    @cached_property
    def region_mask(self) -> torch.Tensor:
        return torch.ones(self.region_embeddings.shape[:2], dtype=torch.bool, device=self.region_embeddings.device)

    def extended(self, photos: list[Photo], regions: torch.Tensor, captions: list[list[str]],
                 words: torch.Tensor, lengths: torch.Tensor) -> "GalleryIndex":
        """This index plus `photos`: their region embeddings, their captions (one list a photo), and those captions'
        pooled word embeddings, flat (sum of `lengths`, D) caption after caption, with each caption's word count."""
        texts = [t for caps in captions for t in caps]
        owner = [len(self.photos) + i for i, caps in enumerate(captions) for _ in caps]
        dtype, device = self.region_embeddings.dtype, self.region_embeddings.device
        before = (self.region_embeddings if len(self.photos)
                  else torch.zeros((0, *regions.shape[1:]), dtype=dtype, device=device))
        return GalleryIndex(
            self.photos + tuple(photos),
            torch.cat([before, regions.to(device, dtype)]),
            self.first_caption + tuple(caps[0] if caps else "" for caps in captions),
            self.caption_texts + tuple(texts),
            torch.cat([self.caption_photo, torch.tensor(owner, dtype=torch.long, device=device)]),
            torch.cat([self.caption_words, words.to(device, dtype)]),
            torch.cat([self.caption_lengths, lengths.to(device, torch.long)]),
        )

    def save(self, path: Path) -> None:
        tensors = {"regions": self.region_embeddings.half(), "caption_lengths": self.caption_lengths,
                   "caption_words": self.caption_words.half()}
        tensors = {k: v.cpu() for k, v in tensors.items()}  # a cache is device-free
        store.write(path, tensors, {"photo_ids": json.dumps([p.id for p in self.photos])}, FORMAT)

    @classmethod
    def load(cls, path: Path, photos: dict[str, Photo], captions_by_photo: dict[str, list[str]],
             dtype: torch.dtype, device: torch.device | str = "cpu") -> "GalleryIndex":
        """The index cached at `path`, over these photos and captions (its key vouches that they are the ones it was built from)."""
        t, meta = store.read(path, FORMAT, "gallery index of this version", error=IndexCacheError)
        ids = json.loads(meta["photo_ids"])
        if any(i not in photos for i in ids) or len(ids) != len(t["regions"]):
            raise IndexCacheError(f"{path}: made for other photos")
        captions = [captions_by_photo[i] for i in ids]
        lengths = t["caption_lengths"]
        if sum(map(len, captions)) != len(lengths) or int(lengths.sum()) != len(t["caption_words"]):
            raise IndexCacheError(f"{path}: made for other captions")
        regions = t["regions"]
        return cls.empty(regions.shape[-1], dtype, device).extended([photos[i] for i in ids], regions, captions,
                                                            t["caption_words"], lengths)


@dataclass
class IndexProgress:
    """How far the background indexing has come; read by the page while it grows."""

    total: int
    done: int = 0
    skipped: int = 0  # photos that could not be read: left out, counted, never fatal
    finished: bool = False
    failed: str | None = None
    started: float = field(default_factory=time.monotonic)

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if self.finished or self.done < 1 or elapsed <= 0:
            return None
        return max(0.0, (self.total - self.done - self.skipped) * elapsed / self.done)

    def describe(self) -> str:
        skipped = f" · {self.skipped} unreadable photos skipped" if self.skipped else ""
        if self.failed:
            return f"⚠️ Indexing stopped: {self.failed}. Search covers the {self.done:,} photos indexed before that{skipped}."
        if self.finished:
            return f"Gallery indexed: {self.done:,} photos{skipped}."
        eta = self.eta_s()
        left = "estimating the time left" if eta is None else f"about {_duration(eta)} left"
        return (f"Indexing the gallery: {self.done:,} of {self.total:,} photos ({left}){skipped}. "
                "Search and the inspector work on the photos indexed so far.")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
