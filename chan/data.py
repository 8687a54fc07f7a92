"""Captioned photo collections: the Flickr8k and COCO layouts, or a plain image folder.

`open_dataset(path)` recognises the layout and returns one `Dataset` type whatever it is.
Real-world quirks (orphan captions, photos in no split, duplicates, bad bytes) are counted
in `Dataset.quirks` and logged once, never fatal.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import butd

log = logging.getLogger(__name__)

# The Flickr8k copy beside the project root (../shared), the default dataset of every command.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"
CAPTIONS_PER_PHOTO = 5  # Flickr and COCO: the protocol scores each photo's first 5 captions
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUTS = (
    "Flickr8k (Flickr8k_text/Flickr8k.token.txt + split lists + Flicker8k_Dataset/)",
    "COCO captions (annotations/captions_<split>.json beside the <split>/ image folder)",
    "precomputed features (<split>_ims.npy and <split>_caps.txt, as SCAN and CHAN release them)",
    "bottom-up-attention TSV files (*.tsv, *.tsv.N), with the photos beside them if you have them",
    "a plain folder of images (no captions)",
)


class DatasetError(ValueError):
    """The folder is not a dataset layout we can read."""


@dataclass(frozen=True)
class Photo:
    id: str  # file name relative to the image folder; unique within a dataset
    path: Path | None  # None: a precomputed-feature folder holds no photo files
    split: str | None


@dataclass(frozen=True)
class Caption:
    text: str
    photo_id: str


@dataclass
class Dataset:
    root: Path
    layout: str
    photos: list[Photo]
    captions: list[Caption]
    quirks: Counter = field(default_factory=Counter)
    features: dict[str, Path] = field(default_factory=dict)  # split -> <split>_ims.npy; or name -> a TSV file

    @property
    def splits(self) -> list[str]:
        return sorted({p.split for p in self.photos if p.split is not None})

    def split(self, name: str | None) -> "Dataset":
        """The photos of one split and their captions; None keeps every photo."""
        if name is None:
            return self
        if name not in self.splits:
            raise DatasetError(f"{self.root}: no split {name!r}; this dataset has {self.splits or 'no splits'}")
        photos = [p for p in self.photos if p.split == name]
        ids = {p.id for p in photos}
        captions = [c for c in self.captions if c.photo_id in ids]
        return Dataset(self.root, self.layout, photos, captions, Counter(self.quirks), self.features)

    def default_split(self) -> str | None:
        """`test` where the dataset has one, otherwise every photo (None)."""
        return "test" if "test" in self.splits else None

    def captions_by_photo(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {p.id: [] for p in self.photos}
        for c in self.captions:
            out[c.photo_id].append(c.text)
        return out

    def summary(self) -> str:
        """Photos and captions per split, then each quirk with its count."""
        lines = [f"{self.root} ({self.layout}): {len(self.photos)} photos, {len(self.captions)} captions"]
        per_photo = Counter(c.photo_id for c in self.captions)
        for name in self.splits + ([None] if any(p.split is None for p in self.photos) else []):
            ids = [p.id for p in self.photos if p.split == name]
            n_caps = sum(per_photo[i] for i in ids)
            lines.append(f"  {name or '(no split)':<12} {len(ids):>7} photos {n_caps:>8} captions")
        for quirk, n in sorted(self.quirks.items()):
            lines.append(f"  quirk: {quirk}: {n}")
        return "\n".join(lines)


def read_text(path: Path, quirks: Counter) -> list[str]:
    """Lines of a text file; undecodable bytes are replaced and counted."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    bad = sum("\ufffd" in line for line in lines)
    if bad:
        quirks[f"lines with undecodable bytes in {path.name} (replaced)"] += bad
    return lines


def _clean_captions(pairs: list[tuple[str, str]], known: set[str], quirks: Counter) -> list[Caption]:
    """Drop empty captions and those whose photo is missing; count duplicates (kept)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for photo_id, text in pairs:
        text = " ".join(text.split())
        if photo_id not in known:
            quirks["captions whose photo is missing (dropped)"] += 1
        elif not text:
            quirks["empty captions (dropped)"] += 1
        else:
            key = (photo_id, text.lower())
            if key in seen:
                quirks["duplicate captions of the same photo (kept)"] += 1
            seen.add(key)
            out.append(Caption(text, photo_id))
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_flickr8k(root: Path) -> Dataset:
    text_dir, image_dir = root / "Flickr8k_text", root / "Flicker8k_Dataset"
    quirks: Counter = Counter()
    files = {p.name: p for p in _image_files(image_dir)}
    split_of: dict[str, str] = {}
    lists = {split: text_dir / f"Flickr_8k.{split}Images.txt" for split in ("train", "dev", "test")}
    lists = {split: path for split, path in lists.items() if path.exists()}  # a gallery may hold only the test split
    if not lists:
        quirks["no split list (Flickr_8k.<split>Images.txt)"] += 1
    for split, list_file in lists.items():
        for name in read_text(list_file, quirks):
            name = name.strip()
            if not name:
                continue
            if name not in files:
                quirks["photos in a split list whose file is missing"] += 1
            split_of[name] = split
    photos = [Photo(name, path, split_of.get(name)) for name, path in sorted(files.items())]
    no_split = sum(p.split is None for p in photos)
    if no_split:
        quirks["photos in no split"] += no_split
    pairs = []
    for line in read_text(text_dir / "Flickr8k.token.txt", quirks):
        if not line.strip():
            continue
        key, _, text = line.partition("\t")
        pairs.append((key.rsplit("#", 1)[0], text))
    captions = _clean_captions(pairs, set(files), quirks)
    return Dataset(root, "flickr8k", photos, captions, quirks)


def _read_coco(root: Path) -> Dataset:
    quirks: Counter = Counter()
    photos: list[Photo] = []
    pairs: list[tuple[str, str]] = []
    for ann_file in sorted((root / "annotations").glob("captions_*.json")):
        split = ann_file.stem.removeprefix("captions_")
        image_dir = root / split
        try:
            ann = json.loads(ann_file.read_bytes().decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{ann_file}: not valid JSON ({e})") from e
        name_of = {}
        for image in ann.get("images", []):
            path = image_dir / image["file_name"]
            if path.is_file():
                name_of[image["id"]] = f"{split}/{image['file_name']}"
                photos.append(Photo(name_of[image["id"]], path, split))
            else:
                quirks["photos in the annotations whose file is missing"] += 1
        for a in ann.get("annotations", []):
            pairs.append((name_of.get(a["image_id"], f"missing:{a['image_id']}"), a.get("caption") or ""))
    captions = _clean_captions(pairs, {p.id for p in photos}, quirks)
    return Dataset(root, "coco", photos, captions, quirks)


def _read_folder(root: Path) -> Dataset:
    photos = [Photo(str(p.relative_to(root)), p, None) for p in _image_files(root)]
    return Dataset(root, "folder", photos, [], Counter())


def _feature_shape(path: Path) -> tuple[int, ...]:
    try:
        return np.load(path, mmap_mode="r").shape
    except (ValueError, OSError) as e:
        raise DatasetError(f"{path}: not a readable .npy array ({e})") from e


def row_step(rows: int, captions: int, path: Path) -> int:
    """1 when there is one row per image, 5 when each image's row is repeated for each caption."""
    if captions == CAPTIONS_PER_PHOTO * rows:
        return 1
    if captions == rows and rows % CAPTIONS_PER_PHOTO == 0:
        return CAPTIONS_PER_PHOTO
    raise DatasetError(f"{path}: {rows} feature rows for {captions} captions; expected {CAPTIONS_PER_PHOTO} captions "
                       "per image (or one repeated row per caption)")


def _read_precomputed(root: Path) -> Dataset:
    """The layout SCAN and CHAN release: `<split>_ims.npy` (N, K, F) float32 and `<split>_caps.txt`, 5 captions an
    image in image order (some copies repeat each row once per caption: read as one photo per 5 rows, as the
    authors' loader does). Every split with both files; no photo files or boxes; photos are named `<split>/<row>`."""
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
        step = row_step(shape[0], len(texts), ims)
        n_photos = shape[0] // step
        photos += [Photo(f"{split}/{i}", None, split) for i in range(n_photos)]
        captions += [Caption(t, f"{split}/{i // CAPTIONS_PER_PHOTO}") for i, t in enumerate(texts)]
        quirks["empty captions (kept in place)"] += sum(not t for t in texts)
        features[split] = ims
    if not features:
        raise DatasetError(f"{root}: no <split>_ims.npy with its <split>_caps.txt")
    quirks = Counter({k: v for k, v in quirks.items() if v})
    return Dataset(root, "precomputed", photos, captions, quirks, features)


def _photo_files_by_id(root: Path) -> dict[str, Path]:
    """Image files under `root` by the ids a TSV may use: the file's stem ('1000092795'), and the number its
    stem ends with ('COCO_val2014_000000391895' -> '391895')."""
    out: dict[str, Path] = {}
    for path in _image_files(root):
        out.setdefault(path.stem, path)
        digits = re.search(r"(\d+)$", path.stem)
        if digits:
            out.setdefault(str(int(digits.group(1))), path)
    return out


def _read_butd(root: Path) -> Dataset:
    """Bottom-up-attention TSV files: one photo per image id (photo files found beside them by name), no captions."""
    quirks: Counter = Counter()
    files = {path.name: path for path in butd.tsv_files(root)}
    by_id = _photo_files_by_id(root)
    photos: dict[str, Photo] = {}
    for path in files.values():
        def malformed(number: int, why: str, name: str = path.name) -> None:
            quirks[f"malformed rows in {name} (skipped)"] += 1
            log.warning("%s line %d: %s; skipped", name, number, why)

        for row in butd.rows(path, malformed):
            if row.image_id in photos:
                quirks["image ids listed twice (the first row is kept)"] += 1
                continue
            key = str(int(row.image_id)) if row.image_id.isdigit() else row.image_id
            photos[row.image_id] = Photo(row.image_id, by_id.get(row.image_id) or by_id.get(key), None)
    if not photos:
        raise DatasetError(f"{root}: no usable row in {', '.join(files)}")
    missing = sum(p.path is None for p in photos.values())
    if missing:
        quirks["images with no photo file beside the TSV (no photo or boxes to draw)"] += missing
    return Dataset(root, "butd-tsv", list(photos.values()), [], quirks, files)


def open_dataset(path: str | Path) -> Dataset:
    """Recognise the layout at `path` and read it; quirks are logged once."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder. Accepted layouts: " + "; ".join(LAYOUTS))
    if (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file() and (root / "Flicker8k_Dataset").is_dir():
        dataset = _read_flickr8k(root)
    elif list((root / "annotations").glob("captions_*.json")):
        dataset = _read_coco(root)
    elif list(root.glob("*_ims.npy")):
        dataset = _read_precomputed(root)
    elif butd.tsv_files(root):
        dataset = _read_butd(root)
    elif _image_files(root):
        dataset = _read_folder(root)
    else:
        raise DatasetError(f"{root}: no dataset recognised. Accepted layouts: " + "; ".join(LAYOUTS))
    for quirk, n in sorted(dataset.quirks.items()):
        log.warning("%s: %s: %d", root, quirk, n)
    return dataset
