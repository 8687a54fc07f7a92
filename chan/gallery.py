"""The served gallery: region and caption embeddings encoded once, cached on disk, queried fast.

The index is keyed by the checkpoint's bytes, each photo file and the captions, so it is rebuilt
only when one of them changes; it can grow in the background while queries run on the photos
indexed so far. Everything returned is plain data (ids, paths, arrays, labels).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_checkpoint, read_metadata, with_detector_precision
from .data import Dataset, open_dataset
from .device import bf16_pays
from .encoding import encode_captions
from .features import CACHE_DIR, RegionTable, photo_stat, table_for
from .gallery_index import GalleryIndex, IndexCacheError, IndexProgress
from .model import MAX_TOKENS
from .pair import PairAlignment, QueryError, align_pair, clean_text, encode_queries, region_embeddings
from .photos import load_photo
from .qdrant_index import QdrantGallery, QdrantIndexError, check_model
from .region_settings import PrecomputedSettings
from .regions import RegionExtractor, Regions
from .store import file_digest

MODEL_NAMES = {"hard": "CHAN", "soft": "SCAN", "global": "global"}  # by the similarity a model ranks with
UPLOADS_REMEMBERED = 32  # uploaded photos whose regions are kept (by content), so ranking then inspecting extracts once
INDEX_CHUNK = 32  # photos per step of the gallery's indexing: the page's progress moves this often
DEFAULT_GALLERY = Path(__file__).resolve().parents[1] / "assets" / "gallery"
log = logging.getLogger(__name__)


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


class Gallery:
    """A checkpoint plus a dataset of photos (and captions, if it has any), ready to query.

    The index is built in the constructor, or, with `index_now=False`, later by `index_in_background`
    while queries already run on the photos indexed so far (`progress` says how far it has come).
    """

    def __init__(self, checkpoint: Path, dataset: Dataset, progress: bool = True, index_now: bool = True,
                 device: torch.device | str = "cpu", detector_precision: str | None = None):
        self.model, settings, self.info = load_checkpoint(checkpoint)
        self.settings = with_detector_precision(settings, detector_precision, device)  # None: the checkpoint's regions
        self.trained_settings = settings
        self.device = torch.device(device)
        self.model.to(self.device)
        self.model.serve_with_onnx()  # on the CPU: queries and captions encoded, and photos scored, by ONNX Runtime
        self.checkpoint = Path(checkpoint)
        self.name = self.checkpoint.name.removesuffix(".safetensors")
        self.dataset = dataset
        self.all_photos = {p.id: p for p in dataset.photos}
        self.captions_by_photo = dataset.captions_by_photo()
        # the hard scorer runs in bfloat16 where bf16 is native (half the memory, faster); float32 elsewhere
        dtype = torch.bfloat16 if self.model.config.similarity == "hard" and bf16_pays(self.device) else torch.float32
        self.index = GalleryIndex.empty(self.model.config.embed_dim, dtype, self.device)
        self.table: RegionTable | None = None
        self.progress = IndexProgress(total=len(dataset.photos))
        self.cache_path = CACHE_DIR / f"gallery-{self._index_key(Path(checkpoint))}.safetensors"
        self._show_bars = progress
        self._extractor: RegionExtractor | None = None
        self._extractor_lock = threading.Lock()
        self._uploads: OrderedDict[tuple, Regions] = OrderedDict()  # photo_stat -> regions, least recent first
        self._uploads_lock = threading.Lock()
        self.remote: QdrantGallery | None = None  # set by use_qdrant: searches then run there
        self.prefetch: int | None = None
        self.remote_photos = 0
        if index_now:
            self._build()

    # what queries read: the current index (swapped whole as it grows)
    photos = property(lambda self: self.index.photos)
    photo_index = property(lambda self: self.index.photo_index)
    region_embeddings = property(lambda self: self.index.region_embeddings)
    region_mask = property(lambda self: self.index.region_mask)
    first_caption = property(lambda self: self.index.first_caption)
    caption_texts = property(lambda self: self.index.caption_texts)
    caption_photo = property(lambda self: self.index.caption_photo)

    @property
    def model_name(self) -> str:
        """The method that ranks: CHAN (hard alignment), SCAN (soft attention) or the global baseline."""
        return MODEL_NAMES[self.model.config.similarity]

    @property
    def label(self) -> str:
        return model_label(self.model.config.similarity, self.name)

    @property
    def other_regions(self) -> bool:
        """Whether the checkpoint is read on regions other than those it was trained on (another detector precision)."""
        return self.settings != self.trained_settings

    def _index_key(self, checkpoint: Path) -> str:
        """What the index is computed from: the checkpoint's bytes, each photo file's content, the captions."""
        h = hashlib.sha1(f"{file_digest(checkpoint)}|{self.dataset.root.resolve()}".encode())
        if self.other_regions:  # the checkpoint read on regions other than its own
            h.update(self.settings.key().encode())
        for p in self.dataset.photos:
            h.update(f"{p.id}|{photo_stat(p.path) if p.path else None}\n".encode())
        for split, path in sorted(self.dataset.features.items()):  # precomputed features
            h.update(f"{split}|{photo_stat(path)}\n".encode())
        for c in self.dataset.captions:
            h.update(f"{c.photo_id}\t{c.text}\n".encode())
        return h.hexdigest()[:16]

    def _build_logged(self) -> None:
        try:
            self._build()
        except Exception as e:  # shown on the page; the photos indexed so far stay searchable
            log.exception("indexing the gallery failed")
            self.progress.failed = str(e)

    def _build(self) -> None:
        """Load the cached index, or encode every photo and caption (extracting regions as needed), then cache it."""
        if self.cache_path.exists():
            try:
                self.index = GalleryIndex.load(self.cache_path, self.all_photos, self.captions_by_photo,
                                               self.index.region_embeddings.dtype, self.device)
            except IndexCacheError as e:
                log.warning("%s; encoding the gallery again", e)
            else:
                self.progress.done = len(self.index.photos)
                self.progress.skipped = len(self.all_photos) - self.progress.done
                self.progress.finished = True
                self.table = table_for(self.dataset, self.settings, progress=self._show_bars)
                return
        table = table_for(self.dataset, self.settings, progress=self._show_bars, shard_size=INDEX_CHUNK,
                          extractor=self.extractor, on_shard=self._add_shard)
        rest = [p.id for p in self.dataset.photos if p.id in table.index and p.id not in self.index.photo_index]
        for s in tqdm(range(0, len(rest), INDEX_CHUNK), desc="gallery", unit="chunk", disable=not self._show_bars or not rest):
            self._add(rest[s : s + INDEX_CHUNK], *table.model_inputs(table.rows(rest[s : s + INDEX_CHUNK])))
        self.table = table
        self.progress.skipped = len(self.all_photos) - len(self.index.photos)
        self.index.save(self.cache_path)
        self.progress.finished = True

    def _add_shard(self, ids: list[str], shard: dict[str, torch.Tensor], skipped: int) -> None:
        self.progress.skipped += skipped
        if ids:
            self._add(ids, shard["features"], shard.get("maps"))

    @torch.no_grad()
    def _add(self, ids: list[str], features: torch.Tensor, maps: torch.Tensor | None) -> None:
        """Encode these photos (cached fp16 features) and their captions, then swap in the larger index."""
        regions = self.model.encode_images(features, maps=maps)[0].half()  # fp16 as the cache keeps them
        captions = [self.captions_by_photo[i] for i in ids]
        texts = [t for caps in captions for t in caps]
        if texts:
            enc = encode_captions(self.model, texts)
            words, lengths = enc.embeddings[enc.mask].half(), enc.mask.sum(1)
        else:
            words, lengths = torch.zeros(0, regions.shape[-1]), torch.zeros(0, dtype=torch.long)
        self.index = self.index.extended([self.all_photos[i] for i in ids], regions, captions, words, lengths)
        self.progress.done += len(ids)

    def photo_path(self, photo_id: str) -> Path | None:
        """The file of a gallery photo (indexed yet or not); None for an unknown id or precomputed features."""
        photo = self.all_photos.get(photo_id)
        return photo.path if photo else None

    @property
    def precomputed(self) -> bool:
        """Region features read from precomputed files: no photos to show, no boxes, no uploads."""
        return isinstance(self.settings, PrecomputedSettings)

    @property
    def extractor(self) -> RegionExtractor | None:
        """One extractor for uploads and indexing alike (None for precomputed features)."""
        with self._extractor_lock:
            if self._extractor is None and not self.precomputed:
                self._extractor = RegionExtractor(self.settings, device=self.device)
        return self._extractor

    def _was_truncated(self, text: str) -> bool:
        return self.model.config.text_encoder == "bert" and int(self.model.text_encoder.tokenize([text])[1].sum()) >= MAX_TOKENS

    def query_notes(self, words: list[str], truncated: bool = False) -> list[str]:
        """Warnings a user should see about how their text was read."""
        notes = []
        encoder = self.model.text_encoder
        content = [w for w in words if w not in encoder.special_tokens]
        if content and all(w == encoder.unknown_token for w in content):
            notes.append("None of these words is in the model's vocabulary; the ranking is close to arbitrary.")
        elif encoder.unknown_token in content:
            notes.append("Some words are unknown to the model and were read as ‘unknown’.")
        if truncated:
            notes.append(f"The query is long: only its first {MAX_TOKENS} tokens were used.")
        return notes

    def _indexed(self) -> GalleryIndex:
        """The index as it stands, refused while it holds no photo yet."""
        index = self.index
        if not index.photos:
            if self.progress.failed or self.progress.finished:
                raise QueryError("This gallery has no photo that could be read, so there is nothing to search.")
            raise QueryError("No photo is indexed yet: indexing has just started. Try again in a few seconds.")
        return index

    def partial_note(self, index: GalleryIndex) -> list[str]:
        """What a user must know when an answer covers only part of the gallery."""
        if self.progress.finished or len(index.photos) >= len(self.all_photos):
            return []
        return [f"Indexing is still running: this covers the {len(index.photos):,} photos indexed so far, "
                f"of {len(self.all_photos):,}."]

    def use_qdrant(self, target: str, collection: str, prefetch: int | None = None) -> None:
        """Search this checkpoint's collection at `target` (a URL or a local folder) instead of the in-process index:
        exact MaxSim, or with `prefetch`, over that many candidates by the global vectors."""
        check_model(self.model)
        if prefetch is not None and not 1 <= prefetch <= 100_000:
            raise ValueError(f"prefetch {prefetch}: give a number of candidates from 1 to 100000")
        self.remote = QdrantGallery.open(target, collection, file_digest(self.checkpoint))
        self.prefetch = prefetch
        self.remote_photos = self.remote.count()

    def search_scope(self) -> str:
        """What a search ranks: the photos indexed here, or the Qdrant collection's."""
        if self.remote is None:
            return f"{len(self.photos)} photos"
        return f"{self.remote_photos:,} photos (Qdrant collection {self.remote.collection!r})"

    def _search_remote(self, emb: torch.Tensor, mask: torch.Tensor, k: int) -> list[Hit]:
        try:
            found = self.remote.search(emb[0][mask[0]], k, self.prefetch, self.model.config.global_weight)
        except QdrantIndexError as e:
            raise QueryError(f"The search engine did not answer; try again in a moment. ({e})") from e
        hits = []
        for photo_id, score in found:
            photo = self.all_photos.get(photo_id)  # a photo pushed from elsewhere is named, not shown
            hits.append(Hit(len(hits) + 1, score, photo_id, str(photo.path or "") if photo else "",
                            (self.captions_by_photo.get(photo_id) or [""])[0]))
        return hits

    def search_images(self, text: str, k: int = 12) -> tuple[list[Hit], list[str], float]:
        """Top-k photos for a caption; returns hits, notes about the query, and milliseconds taken."""
        result = self.search_many([text], [k])[0]
        if isinstance(result, QueryError):
            raise result
        return result

    def search_many(self, texts: list[str], ks: list[int]) -> list[tuple[list[Hit], list[str], float] | QueryError]:
        """`search_images` for several captions at once: one text-encoder call and one scoring call over the index
        (a QueryError in place of each caption that cannot be searched). Each answer's time is the whole call's."""
        start = time.perf_counter()
        q = encode_queries(self.model, texts)
        out: list = [q.errors.get(i) for i in range(len(texts))]
        notes = {i: self.query_notes(words, self._was_truncated(clean_text(texts[i]))) for i, words in zip(q.rows, q.words)}
        if self.remote is not None:  # one Qdrant query per caption
            for j, i in enumerate(q.rows):
                try:
                    out[i] = (self._search_remote(q.embeddings[j : j + 1], q.mask[j : j + 1], ks[i]), notes[i])
                except QueryError as e:
                    out[i] = e
        elif q.rows:
            try:
                index = self._indexed()
            except QueryError as e:
                return [out[i] or e for i in range(len(texts))]
            with torch.no_grad():
                scores = index.photo_scores(self.model, q.embeddings, q.mask).cpu()
            for j, i in enumerate(q.rows):
                top = scores[:, j].topk(min(ks[i], len(scores)))
                hits = [Hit(r + 1, float(s), index.photos[n].id, str(index.photos[n].path or ""), index.first_caption[n])
                        for r, (s, n) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]
                out[i] = (hits, notes[i] + self.partial_note(index))
        ms = (time.perf_counter() - start) * 1000
        return [o if isinstance(o, QueryError) else (*o, ms) for o in out]

    def photo_regions(self, photo: str | Path | None = None, photo_id: str | None = None) -> Regions:
        """Regions of a gallery photo (cached, or extracted now while indexing) or of any photo file (extracted now)."""
        table = self.table
        if table is None and self.precomputed and photo_id:  # nothing to extract: read the features now
            table = self.table = table_for(self.dataset, self.settings, progress=False)
        if photo_id and table is not None and photo_id in table.index:
            return table.regions(photo_id)
        if photo_id and self.photo_path(photo_id):
            photo = self.photo_path(photo_id)
        if photo is None:
            if photo_id in self.all_photos:  # precomputed features, still loading
                raise QueryError("This gallery's features are still loading; try again in a few seconds.")
            if photo_id:
                raise QueryError(f"No gallery photo has the id {photo_id[:100]!r}.")
            raise QueryError("Upload a photo or pick one from the gallery first.")
        if self.precomputed:
            raise QueryError("This model reads precomputed region features (the authors' bottom-up-attention files), "
                             "which cannot be computed for a new photo here: pick a gallery photo instead.")
        return self._upload_regions(Path(photo))

    def _upload_regions(self, photo: Path) -> Regions:
        """Regions of a photo file, extracted once per content while it stays among the latest uploads."""
        try:
            key = tuple(photo_stat(photo))
        except OSError:  # missing or unreadable: load_photo says so in the user's terms
            return self._extract(load_photo(photo))
        with self._uploads_lock:
            if key in self._uploads:
                self._uploads.move_to_end(key)
                return self._uploads[key]
        regions = self._extract(load_photo(photo))
        with self._uploads_lock:
            self._uploads[key] = regions
            while len(self._uploads) > UPLOADS_REMEMBERED:
                self._uploads.popitem(last=False)
        return regions

    def _extract(self, photo: Image.Image) -> Regions:
        """An upload's regions, as only this model reads them: one that tunes the tail skips the frozen one."""
        return self.extractor([photo], frozen_features=not self.model.config.tail_start)[0]

    def rank_captions(self, regions: Regions, own: list[str] | None = None, photo_id: str | None = None,
                      limit: int = 20) -> list[RankedCaption]:
        """Gallery captions and your own, ranked for one photo's regions."""
        own = [clean_text(t) for t in (own or []) if t.strip()]
        index = self.index
        image = region_embeddings(self.model, regions)[None]
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        with torch.no_grad():
            gallery_scores = index.caption_scores(self.model, image).cpu()
            own_scores = [torch.zeros(0)]
            for s in range(0, len(own), 32):  # bounded batches, whatever the count
                emb, mask, _ = self.model.encode_texts(own[s : s + 32])
                own_scores.append(self.model.scores(image, image_mask, emb, mask)[0].cpu())
            own_scores = torch.cat(own_scores)
        target = index.photo_index.get(photo_id or "", -1)
        entries = [(float(s), own[i], "yours", False) for i, s in enumerate(own_scores.tolist())]
        top = gallery_scores.topk(min(limit, len(gallery_scores)))
        for s, j in zip(top.values.tolist(), top.indices.tolist()):
            owner = int(index.caption_photo[j])
            entries.append((s, index.caption_texts[j], index.photos[owner].id, owner == target))
        entries.sort(key=lambda e: -e[0])
        return [RankedCaption(r + 1, *e) for r, e in enumerate(entries)]

    def align(self, regions: Regions, caption: str) -> PairAlignment:
        """Which region each word of `caption` hard-aligned to, and the soft attention it replaces."""
        return align_pair(self.model, regions, caption)

    def describe(self) -> str:
        info = self.info or {}
        dev = info.get("dev", {})
        grounding = info.get("grounding", {})
        return (f"{len(self.all_photos)} photos, {len(self.dataset.captions)} captions · model: "
                f"{self.model.config.text_encoder} + {self.model.config.similarity} alignment"
                + (f" · dev RSUM {dev['rsum']:.1f}" if "rsum" in dev else "")
                + (f" · words point at their object {grounding['hard_pointing']:.0%} of the time on COCO dev photos "
                   f"(box IoU ≥ 0.5: {grounding['hard_iou50']:.0%})" if "hard_pointing" in grounding else "")
                + (f" · imported from {info['imported_from']}" if "imported_from" in info else "")
                + (f" · regions by the {self.settings.detector_precision} detector (trained on "
                   f"{self.trained_settings.detector_precision})" if self.other_regions else "")
                + (" · bottom-up-attention TSV features and boxes" if self.dataset.layout == "butd-tsv"
                   else " · precomputed region features: no photo files, regions named by index" if self.precomputed
                   else ""))



def open_gallery(folder: Path, checkpoint: Path, split: str | None = None, progress: bool = True,
                 index_now: bool = True, device: torch.device | str = "cpu",
                 detector_precision: str | None = None) -> Gallery:
    """A dataset folder's split (default: test where there is one, else every photo) as a gallery."""
    dataset = open_dataset(folder)
    return Gallery(checkpoint, dataset.split(split or dataset.default_split()), progress=progress, index_now=index_now,
                   device=device, detector_precision=detector_precision)


def model_label(similarity: str, name: str) -> str:
    """How the page names a model: 'SCAN (scan-proposals-tuned)'."""
    return f"{MODEL_NAMES[similarity]} ({name})"


@dataclass
class Comparison:
    """A model shown beside the main one: named at once from its metadata, loaded and indexed after the main one."""

    label: str
    checkpoint: Path
    gallery: Gallery | None = None

    @classmethod
    def of(cls, checkpoint: Path) -> Comparison:
        meta = read_metadata(checkpoint)  # refuses a missing or foreign file now, not in the background
        return cls(model_label(meta["config"]["similarity"], Path(checkpoint).name.removesuffix(".safetensors")),
                   Path(checkpoint))

    @classmethod
    def loaded(cls, gallery: Gallery) -> Comparison:
        return cls(gallery.label, gallery.checkpoint, gallery)


def index_in_background(main: Gallery, comparisons: list[Comparison] = ()) -> threading.Thread:
    """Index the main gallery in a thread, then load and index each comparison on the same photos: models that
    share region settings then share one region extraction."""
    def run() -> None:
        main._build_logged()
        for c in comparisons:
            if c.gallery is None:
                try:
                    c.gallery = Gallery(c.checkpoint, main.dataset, progress=False, index_now=False, device=main.device,
                                        detector_precision=main.settings.detector_precision if main.other_regions else None)
                except Exception:
                    log.exception("loading %s failed", c.checkpoint)
                    continue
            c.gallery._build_logged()

    thread = threading.Thread(target=run, name="gallery-index", daemon=True)
    thread.start()
    return thread
