"""Rows of the TSV files that Anderson et al.'s bottom-up-attention extractor writes (the features SCAN and
CHAN are trained on): `image_id, image_w, image_h, num_boxes, boxes, features`, tab-separated, with the boxes
(num_boxes x 4: x1 y1 x2 y2 in image pixels) and features (num_boxes x F) base64-encoded float32."""
from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
TSV_NAME = re.compile(r".*\.tsv(\.\d+)?$")  # split files are named <name>.tsv.0, .tsv.1, ...
log = logging.getLogger(__name__)


class TsvError(ValueError):
    """A row that cannot be used as it stands (its box and feature counts disagree)."""


@dataclass(frozen=True)
class Row:
    number: int  # 1-based line number in its file
    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32, pixels of a width x height image
    features: np.ndarray  # (K, F) float32


def tsv_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and TSV_NAME.match(p.name))


def rows(path: Path, malformed: Callable[[int, str], None]) -> Iterator[Row]:
    """Every usable row; a malformed one is reported to `malformed(line number, why)` and skipped, while a row
    whose box count disagrees with its feature count is refused (TsvError): it is a file of another layout."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip(b"\r\n").split(b"\t")
            try:
                if len(fields) != len(FIELDS):
                    raise ValueError(f"{len(fields)} fields, expected {len(FIELDS)} ({', '.join(FIELDS)})")
                image_id = fields[0].decode("utf-8").strip()
                width, height, k = int(fields[1]), int(fields[2]), int(fields[3])
                boxes = np.frombuffer(base64.b64decode(fields[4], validate=True), dtype=np.float32)
                features = np.frombuffer(base64.b64decode(fields[5], validate=True), dtype=np.float32)
                if not image_id or width <= 0 or height <= 0 or k <= 0:
                    raise ValueError("an empty id, or a size or box count that is not positive")
            except (ValueError, binascii.Error, UnicodeDecodeError) as e:  # binascii.Error: bad base64
                malformed(number, str(e))
                continue
            if boxes.size != 4 * k or features.size % k:
                raise TsvError(f"{path} line {number} (image {image_id}): num_boxes is {k}, but the row holds "
                               f"{boxes.size / 4:g} boxes and {features.size} feature values; a row must hold "
                               "num_boxes boxes and num_boxes feature vectors")
            yield Row(number, image_id, width, height, boxes.reshape(k, 4), features.reshape(k, -1))
