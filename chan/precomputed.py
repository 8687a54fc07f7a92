"""Precomputed region features in the layout SCAN and CHAN release: `<split>_ims.npy` + `<split>_caps.txt`.

`<split>_ims.npy` is (N, K, F) float32 (bottom-up-attention: K = 36, F = 2048) and `<split>_caps.txt`
holds 5 captions per image, in image order. Some copies repeat each image row once per caption
(as many rows as captions); those are read as one photo per 5 rows, as the authors' loader does.
There are no photo files and no boxes: photos are named `<split>/<row>`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .data import Caption, Dataset, DatasetError, Photo, read_text
from .features import CacheError, RegionTable
from .regions import PrecomputedSettings, RegionSettings

CAPTIONS_PER_IMAGE = 5


def _feature_shape(path: Path) -> tuple[int, ...]:
    try:
        return np.load(path, mmap_mode="r").shape
    except (ValueError, OSError) as e:
        raise DatasetError(f"{path}: not a readable .npy array ({e})") from e


def _row_step(rows: int, captions: int, path: Path) -> int:
    """1 when there is one row per image, 5 when each image's row is repeated for each caption."""
    if captions == CAPTIONS_PER_IMAGE * rows:
        return 1
    if captions == rows and rows % CAPTIONS_PER_IMAGE == 0:
        return CAPTIONS_PER_IMAGE
    raise DatasetError(f"{path}: {rows} feature rows for {captions} captions; expected {CAPTIONS_PER_IMAGE} captions "
                       "per image (or one repeated row per caption)")


def read_precomputed(root: Path) -> Dataset:
    """Every split that has both files; caption i describes photo i // 5 of its split."""
    quirks: Counter = Counter()
    photos, captions, features = [], [], {}
    for ims in sorted(root.glob("*_ims.npy")):
        split = ims.name.removesuffix("_ims.npy")
        caps_file = root / f"{split}_caps.txt"
        if not caps_file.is_file():
            quirks[f"{ims.name} without {caps_file.name} (ignored)"] += 1
            continue
        shape = _feature_shape(ims)
        if len(shape) != 3:
            raise DatasetError(f"{ims}: shape {shape}; expected (images, regions, feature dims)")
        texts = [" ".join(line.split()) for line in read_text(caps_file, quirks)]
        step = _row_step(shape[0], len(texts), ims)
        n_photos = shape[0] // step
        photos += [Photo(f"{split}/{i}", None, split) for i in range(n_photos)]
        captions += [Caption(t, f"{split}/{i // CAPTIONS_PER_IMAGE}") for i, t in enumerate(texts)]
        quirks["empty captions (kept in place)"] += sum(not t for t in texts)
        features[split] = ims
    if not features:
        raise DatasetError(f"{root}: no <split>_ims.npy with its <split>_caps.txt")
    quirks = Counter({k: v for k, v in quirks.items() if v})
    return Dataset(root, "precomputed", photos, captions, quirks, features)


def precomputed_table(dataset: Dataset, settings: RegionSettings | PrecomputedSettings) -> RegionTable:
    """The features of the dataset's photos (float32, read from the .npy files), checked against the model's."""
    if dataset.layout != "precomputed":
        raise CacheError(
            f"This model reads precomputed {settings.feature_dim}-d region features ({getattr(settings, 'source', '')}), "
            f"which cannot be computed from the photos of {dataset.root} here. Give a folder with "
            "<split>_ims.npy and <split>_caps.txt instead.")
    ids = [p.id for p in dataset.photos]
    parts = []
    for split in dict.fromkeys(p.split for p in dataset.photos):
        array = np.load(dataset.features[split], mmap_mode="r")
        n_caps = sum(c.photo_id.startswith(f"{split}/") for c in dataset.captions)
        step = _row_step(array.shape[0], n_caps, dataset.features[split]) if n_caps else 1
        rows = [int(p.id.split("/")[1]) * step for p in dataset.photos if p.split == split]
        parts.append(torch.from_numpy(np.ascontiguousarray(array[rows], dtype=np.float32)))
    features = torch.cat(parts)
    if not isinstance(settings, PrecomputedSettings) or settings.feature_dim != features.shape[-1]:
        raise CacheError(
            f"{dataset.root} holds precomputed {features.shape[-1]}-d region features; this model reads "
            f"{settings.feature_dim}-d {'precomputed features' if isinstance(settings, PrecomputedSettings) else 'regions extracted from photos'}. "
            "Use a checkpoint made for these features (python -m chan import-official), or a folder of photos.")
    N, K = features.shape[:2]
    return RegionTable(
        photo_ids=ids, features=features, boxes=None, scores=torch.zeros(N, K), label_ids=torch.zeros(N, K, dtype=torch.int16),
        detected=torch.zeros(N, K, dtype=torch.bool), label_names=[""], settings_key=settings.key(),
    )
