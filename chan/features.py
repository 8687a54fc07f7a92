"""A compact, resumable on-disk cache of region features for a whole dataset.

One safetensors file: features fp16 (N, K, F), boxes, scores, label ids, detector flags, and
(when the settings keep it) the backbone trunk's output map per photo (N, C, h, w); the metadata
holds the photo ids, their files' size and time, and the extractor settings. A file made with other settings is
refused, never silently reused. Extraction writes shards beside the file as it goes, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import butd, store
from .data import Dataset, Photo, row_step
from .distributed import World
from .photos import PhotoError, load_photo
from .region_settings import PrecomputedSettings, RegionSettings
from .regions import RegionExtractor, Regions

log = logging.getLogger(__name__)
FORMAT = "chan-regions-1"
CACHE_DIR = store.CACHE_DIR


class FeatureMismatchError(ValueError):
    """A model that cannot read this dataset's features (precomputed ones for a photo model, or the reverse)."""


class CacheError(store.StoreError):
    """A feature file that cannot be used with these settings."""


@dataclass
class RegionTable:
    """Region features of many photos, indexed by photo id."""

    photo_ids: list[str]
    features: torch.Tensor  # (N, K, F) fp16 (fp32 for precomputed files)
    boxes: torch.Tensor | None  # (N, K, 4) fp32; None for precomputed features
    scores: torch.Tensor  # (N, K) fp16
    label_ids: torch.Tensor  # (N, K) int16
    detected: torch.Tensor  # (N, K) bool
    label_names: list[str]
    settings_key: str
    maps: torch.Tensor | None = None  # (N, C, h, w) fp16 trunk output, for models that tune the backbone's tail
    photo_stats: dict[str, list] | None = None  # photo id -> [size, digest] of the file it was extracted from

    def __post_init__(self) -> None:
        self.index = {pid: i for i, pid in enumerate(self.photo_ids)}

    def rows(self, ids: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[i] for i in ids], dtype=torch.long)

    def model_inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the image encoder reads for these rows: region features, and trunk maps where they are kept."""
        return self.features[rows], None if self.maps is None else self.maps[rows]

    def regions(self, photo_id: str) -> Regions:
        i = self.index[photo_id]
        return Regions(
            boxes=None if self.boxes is None else self.boxes[i].numpy(),
            features=self.features[i].float().numpy(),
            labels=[self.label_names[j] for j in self.label_ids[i].tolist()],
            scores=self.scores[i].float().numpy(),
            detected=self.detected[i].numpy(),
            stage_map=None if self.maps is None else self.maps[i].numpy(),
        )


def default_cache_path(dataset: Dataset, settings: RegionSettings) -> Path:
    """Where the features of a dataset under these settings live by default."""
    digest = hashlib.sha1(f"{dataset.root.resolve()}|{settings.key()}".encode()).hexdigest()[:12]
    return CACHE_DIR / f"regions-{dataset.root.name}-{digest}.safetensors"


def photo_stat(path: Path) -> list:
    """What identifies a photo file's content: its size and a BLAKE2b digest of its bytes.

    Not its modification time: a dataset copied or mounted again keeps its features. Within one process a
    file is read once while its size and time stay put (the gallery's index key, the cache check and the
    extraction all ask).
    """
    st = Path(path).stat()
    return list(_content_stat(str(path), st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=1 << 18)
def _content_stat(path: str, size: int, mtime_ns: int) -> tuple[int, str]:
    data = Path(path).read_bytes()
    return len(data), hashlib.blake2b(data, digest_size=16).hexdigest()


def _pack(ids: list[str], regions: list[Regions], extractor: RegionExtractor, stats: list[list[int]]) -> tuple[dict, dict]:
    index = {name: i for i, name in enumerate(extractor.label_names)}
    tensors = {
        "features": torch.from_numpy(np.stack([r.features for r in regions])).half(),
        "boxes": torch.from_numpy(np.stack([r.boxes for r in regions])).float(),
        "scores": torch.from_numpy(np.stack([r.scores for r in regions])).half(),
        "label_ids": torch.tensor([[index[label] for label in r.labels] for r in regions], dtype=torch.int16),
        "detected": torch.from_numpy(np.stack([r.detected for r in regions])).to(torch.uint8),
    }
    if regions[0].stage_map is not None:
        tensors["maps"] = torch.from_numpy(np.stack([r.stage_map for r in regions])).half()
    meta = {"settings": extractor.settings.key(), "photo_ids": json.dumps(ids),
            "label_names": json.dumps(extractor.label_names), "photo_stats": json.dumps(stats)}
    return tensors, meta


def _read(path: Path) -> tuple[dict, dict]:
    return store.read(path, FORMAT, "CHAN region-feature file", error=CacheError)


def load_table(path: Path, settings: RegionSettings | None = None) -> RegionTable:
    """Read a feature file; with `settings`, refuse one made with other settings."""
    tensors, meta = _read(path)
    if settings is not None and meta["settings"] != settings.key():
        raise CacheError(
            f"{path} was made with other extractor settings:\n  file: {meta['settings']}\n  want: {settings.key()}\n"
            "Use another --out path, or delete the file to re-extract."
        )
    return RegionTable(
        photo_ids=json.loads(meta["photo_ids"]), features=tensors["features"], boxes=tensors["boxes"],
        scores=tensors["scores"], label_ids=tensors["label_ids"], detected=tensors["detected"].bool(),
        label_names=json.loads(meta["label_names"]), settings_key=meta["settings"], maps=tensors.get("maps"),
        photo_stats=dict(zip(json.loads(meta["photo_ids"]), json.loads(meta["photo_stats"]))) if "photo_stats" in meta else None,
    )


def _write(tensors: dict, meta: dict, path: Path) -> None:
    store.write(path, tensors, meta, FORMAT)


def _drop_photos(path: Path, drop: set[str]) -> None:
    """Rewrite a feature file without these photos (their files changed since they were extracted)."""
    tensors, meta = _read(path)
    ids = json.loads(meta["photo_ids"])
    keep = torch.tensor([i for i, pid in enumerate(ids) if pid not in drop], dtype=torch.long)
    meta["photo_ids"] = json.dumps([ids[i] for i in keep.tolist()])
    if "photo_stats" in meta:
        meta["photo_stats"] = json.dumps([json.loads(meta["photo_stats"])[i] for i in keep.tolist()])
    _write({k: v[keep] for k, v in tensors.items()}, meta, path)


def _merge(parts: list[Path], out: Path) -> None:
    loaded = [_read(p) for p in parts]
    tensors = {k: torch.cat([t[k] for t, _ in loaded]) for k in loaded[0][0]}
    meta = dict(loaded[0][1])
    meta["photo_ids"] = json.dumps([i for _, m in loaded for i in json.loads(m["photo_ids"])])
    if all("photo_stats" in m for _, m in loaded):
        meta["photo_stats"] = json.dumps([st for _, m in loaded for st in json.loads(m["photo_stats"])])
    else:
        meta.pop("photo_stats", None)
    _write(tensors, meta, out)


def extract_shard(extractor: RegionExtractor, photos: list[Photo], batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> tuple[list[str], bytes, int]:
    """Extract these photos: the ids read, the feature file of them (bytes), and how many could not be decoded;
    `on_batch(n)` hears of each batch of n photos done."""
    ids, regions, stats, skipped = [], [], [], 0
    for b in range(0, len(photos), batch_size):
        images = []
        for photo in photos[b : b + batch_size]:
            try:
                images.append(load_photo(photo.path))
                ids.append(photo.id)
                stats.append(photo_stat(photo.path))
            except PhotoError as e:
                skipped += 1
                log.warning("%s: skipped: %s", photo.path, e)
        regions += extractor(images)
        if on_batch:
            on_batch(len(photos[b : b + batch_size]))
    return ids, store.dumps(*_pack(ids, regions, extractor, stats), FORMAT) if ids else b"", skipped


def extract(
    dataset: Dataset,
    out: Path,
    settings: RegionSettings = RegionSettings(),
    batch_size: int = 4,
    shard_size: int = 256,
    extractor: RegionExtractor | None = None,
    progress: bool = True,
    redo: set[str] | None = None,
    on_shard: Callable[[list[str], dict[str, torch.Tensor], int], None] | None = None,
    device: torch.device | str = "cpu",
    world: World = World(),
    ray: str | None = None,
) -> RegionTable:
    """Region features of every photo of `dataset` into `out`, reusing what `out` already holds (except `redo`).

    `on_shard(ids, tensors, skipped)` hears about each shard as soon as it is written, with the shard's tensors
    as the cache holds them (`features`, and `maps` where kept; empty when no photo of the shard could be read).
    Under torchrun, each process extracts its part of the missing photos into the same resumable folder of
    shards, and the first one merges them. With `ray` ("local" or a cluster's address), Ray Data extracts the
    shards on that cluster's workers; this process writes them into the same folder.
    """
    out = Path(out)
    parts_dir = out.with_name(out.name + ".parts")
    if world.main:
        out.parent.mkdir(parents=True, exist_ok=True)
        parts_dir.mkdir(exist_ok=True)
        if out.exists():
            load_table(out, settings)  # refuses a file made with other settings
            if redo:
                _drop_photos(out, redo)
            shutil.move(str(out), parts_dir / "00000-previous.safetensors")
    world.barrier()
    done: set[str] = set()
    for part in sorted(parts_dir.glob("*.safetensors")):
        try:
            _, meta = _read(part)
        except CacheError as e:  # a shard cut short by a crash: extract its photos again
            log.warning("%s; its photos are extracted again", e)
            part.unlink()
            continue
        if meta["settings"] != settings.key():
            raise CacheError(f"{part}: left by an extraction with other settings; delete {parts_dir}")
        done.update(json.loads(meta["photo_ids"]))
    todo = [p for p in dataset.photos if p.id not in done]
    todo = todo[world.shard(len(todo))]
    shards = [todo[s : s + shard_size] for s in range(0, len(todo), shard_size)]
    if shards:
        bar = tqdm(total=len(todo), desc="regions", unit="photo", disable=not progress)
        if ray is not None:
            from .ray_extract import extract_on_ray

            results = extract_on_ray(shards, settings, batch_size, address=ray)
        else:
            extractor = extractor or RegionExtractor(settings, device=device)
            results = (extract_shard(extractor, shard, batch_size, bar.update) for shard in shards)
        failures = 0
        for ids, data, skipped in results:
            if ids:
                number = 1 + max((int(p.name[:5]) for p in parts_dir.glob("*.safetensors")), default=0)
                rank = f"-{world.rank}" if world.size > 1 else ""  # processes never write the same file
                store.write_bytes(parts_dir / f"{number:05d}{rank}.safetensors", data)
            failures += skipped
            if ray is not None:  # Ray reports a shard at a time; in process, the bar moves batch by batch
                bar.update(len(ids) + skipped)
            if on_shard:
                on_shard(ids, store.loads(data) if ids else {}, skipped)
        bar.close()
        if failures:
            log.warning("%d photos could not be decoded and were skipped", failures)
    world.barrier()
    if world.main:
        parts = sorted(parts_dir.glob("*.safetensors"))
        if not parts:
            raise CacheError(f"no photo of {dataset.root} could be decoded")
        if len(parts) == 1:
            parts[0].replace(out)  # one part is already the whole file: no rewrite
        else:
            _merge(parts, out)
        shutil.rmtree(parts_dir)
    world.barrier()
    return load_table(out, settings)


def precomputed_table(dataset: Dataset, settings: RegionSettings | PrecomputedSettings) -> RegionTable:
    """The features of the dataset's photos (float32, read from the .npy files), checked against the model's."""
    if dataset.layout != "precomputed":
        raise FeatureMismatchError(
            f"This model reads precomputed {settings.feature_dim}-d region features ({getattr(settings, 'source', '')}), "
            f"which cannot be computed from the photos of {dataset.root} here. Give a folder with "
            "<split>_ims.npy and <split>_caps.txt instead.")
    ids = [p.id for p in dataset.photos]
    parts = []
    for split in dict.fromkeys(p.split for p in dataset.photos):
        array = np.load(dataset.features[split], mmap_mode="r")
        n_caps = sum(c.photo_id.startswith(f"{split}/") for c in dataset.captions)
        step = row_step(array.shape[0], n_caps, dataset.features[split]) if n_caps else 1
        rows = [int(p.id.split("/")[1]) * step for p in dataset.photos if p.split == split]
        parts.append(torch.from_numpy(np.ascontiguousarray(array[rows], dtype=np.float32)))
    features = torch.cat(parts)
    if not isinstance(settings, PrecomputedSettings) or settings.feature_dim != features.shape[-1]:
        raise FeatureMismatchError(
            f"{dataset.root} holds precomputed {features.shape[-1]}-d region features; this model reads "
            f"{settings.feature_dim}-d {'precomputed features' if isinstance(settings, PrecomputedSettings) else 'regions extracted from photos'}. "
            "Use a checkpoint made for these features (python -m chan import-official), or a folder of photos.")
    N, K = features.shape[:2]
    return RegionTable(
        photo_ids=ids, features=features, boxes=None, scores=torch.zeros(N, K), label_ids=torch.zeros(N, K, dtype=torch.int16),
        detected=torch.zeros(N, K, dtype=torch.bool), label_names=[""], settings_key=settings.key(),
    )


def butd_table(dataset: Dataset, settings: RegionSettings | PrecomputedSettings) -> RegionTable:
    """The features and boxes of a bottom-up-attention TSV gallery (float32), boxes scaled to the photo files found."""
    wanted = {p.id: p for p in dataset.photos}
    found: dict[str, butd.Row] = {}
    for path in dataset.features.values():
        for row in butd.rows(path, lambda number, why: None):  # malformed rows were counted when the folder was read
            if row.image_id in wanted:
                found.setdefault(row.image_id, row)
    ids = [i for i in wanted if i in found]
    counts = {found[i].boxes.shape[0] for i in ids}
    if len(counts) > 1:
        raise FeatureMismatchError(f"{dataset.root}: rows hold {min(counts)} to {max(counts)} boxes; the gallery needs "
                                   "the same number for every image (the fixed-36 extraction)")
    features = torch.from_numpy(np.stack([found[i].features for i in ids]))
    if not isinstance(settings, PrecomputedSettings) or settings.feature_dim != features.shape[-1]:
        raise FeatureMismatchError(
            f"{dataset.root} holds {features.shape[-1]}-d bottom-up-attention features; this model reads "
            f"{settings.feature_dim}-d {'precomputed features' if isinstance(settings, PrecomputedSettings) else 'regions extracted from photos'}. "
            "Use a checkpoint made for these features (python -m chan import-official).")
    boxes = []
    for i in ids:
        row, path = found[i], wanted[i].path
        w, h = Image.open(path).size if path else (row.width, row.height)  # the header only
        boxes.append(row.boxes * np.array([w / row.width, h / row.height] * 2, dtype=np.float32))
    N, K = features.shape[:2]
    return RegionTable(
        photo_ids=ids, features=features, boxes=torch.from_numpy(np.stack(boxes)), scores=torch.zeros(N, K),
        label_ids=torch.zeros(N, K, dtype=torch.int16), detected=torch.ones(N, K, dtype=torch.bool), label_names=[""],
        settings_key=settings.key(),
    )


def table_for(dataset: Dataset, settings: RegionSettings | PrecomputedSettings, path: Path | None = None,
              progress: bool = True, **extract_options) -> RegionTable:
    """The cached features of `dataset`, extracting whatever photos are missing (or a precomputed folder's).

    `extract_options` go to `extract` (shard size, a shared extractor, a shard callback).
    """
    if dataset.layout == "butd-tsv":
        return butd_table(dataset, settings)
    if dataset.layout == "precomputed" or isinstance(settings, PrecomputedSettings):
        return precomputed_table(dataset, settings)
    default = path is None
    path = Path(path) if path else default_cache_path(dataset, settings)
    changed: set[str] = set()
    if path.exists():
        try:
            table = load_table(path, settings)
        except CacheError as e:
            if not default:
                raise
            log.warning("%s; extracting the features again", e)  # our own cache file, damaged: rebuild it
            path.unlink()
        else:
            # files replaced since their extraction (caches written before stats were kept are trusted)
            stats = table.photo_stats or {}
            changed = {p.id for p in dataset.photos if p.id in stats and p.path and stats[p.id] != photo_stat(p.path)}
            if not changed and all(p.id in table.index for p in dataset.photos):
                return table
            if changed:
                log.info("%d photos changed since their regions were extracted: extracting them again", len(changed))
    return extract(dataset, path, settings, progress=progress, redo=changed, **extract_options)
