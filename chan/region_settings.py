"""What makes a photo's regions: the extractor settings that key every feature cache and travel in every checkpoint.

Kept apart from `chan.regions`, so that reading a checkpoint or a cache imports no detector or backbone code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .backbone import BACKBONE_CHANNELS

GEOMETRY_DIMS = 5
CLASS_EVIDENCE_DIMS = 81  # the detector's confidence in each of its 80 COCO classes (objectness x class probability), objectness
DETECTOR_SIZINGS = ("fixed", "photo")
DETECTOR_PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class RegionSettings:
    """Everything that changes the regions of a photo; a feature cache is keyed by it."""

    num_regions: int = 36
    backbone: str = "efficientnet-lite0"
    image_size: int = 320  # backbone input side: photos are resized to a square
    roi_size: int = 2  # RoIAlign output side, averaged into one vector
    max_detections: int = 36
    detector_conf: float = 0.2  # "detections" proposals: class confidence threshold
    detector_iou: float = 0.45
    whole_photo: bool = False  # the whole photo as region 0
    proposals: str = "objectness"  # objectness: ranked boxes at several sizes; detections: confident COCO boxes
    detector_sizes: tuple[int, ...] = (288, 416)
    min_objectness: float = 0.001  # low: up to K distinct boxes, as bottom-up attention keeps
    min_box_area: float = 0.01  # fraction of the photo: smaller boxes are below the map's resolution
    tail_start: int = 14  # backbone block whose input map is cached for tuning; 0: none kept
    # fixed: a detector pass at every size in detector_sizes; photo: one pass at the photo's short side (down to a
    # multiple of 32) within their range, so that a small photo is not upsampled past the smallest size
    detector_sizing: str = "fixed"
    # fp32, or int8: the detector's convolutions quantized (ONNX Runtime only; `chan.detector_int8`)
    detector_precision: str = "fp32"
    # each region's feature ends with what the detector saw in it: its confidence in each of the 80 COCO classes
    # (objectness x class probability) and objectness (zeros for grid cells); objectness proposals only
    class_evidence: bool = False

    def __post_init__(self):
        if self.detector_sizing not in DETECTOR_SIZINGS:
            raise ValueError(f"detector_sizing {self.detector_sizing!r}: 'fixed' or 'photo'")
        if self.detector_precision not in DETECTOR_PRECISIONS:
            raise ValueError(f"detector_precision {self.detector_precision!r}: one of {', '.join(DETECTOR_PRECISIONS)}")
        if not self.detector_sizes or any(s <= 0 or s % 32 for s in self.detector_sizes):
            raise ValueError(f"detector_sizes {self.detector_sizes}: positive multiples of 32 (the detector's stride)")
        if self.class_evidence and self.proposals != "objectness":
            raise ValueError("class_evidence needs the objectness proposals")

    @property
    def feature_dim(self) -> int:
        return BACKBONE_CHANNELS + GEOMETRY_DIMS + (CLASS_EVIDENCE_DIMS if self.class_evidence else 0)

    def detector_passes(self, width: int, height: int) -> tuple[int, ...]:
        """The detector's input sizes for a photo of this many pixels."""
        if self.detector_sizing == "fixed":
            return self.detector_sizes
        low, high = min(self.detector_sizes), max(self.detector_sizes)
        return (min(high, max(low, min(width, height) // 32 * 32)),)

    def all_detector_sizes(self) -> tuple[int, ...]:
        """Every input size the detector may run at under these settings."""
        if self.detector_sizing == "fixed":
            return self.detector_sizes
        return tuple(range(min(self.detector_sizes), max(self.detector_sizes) + 1, 32))

    def key(self) -> str:
        values = asdict(self)
        for name, default in ADDED_LATER.items():  # keys written before these fields existed stay as they were
            if values[name] == default:
                del values[name]
        return json.dumps(values, sort_keys=True)


# Fields added after caches and checkpoints were written: left out of a key while they hold these values.
ADDED_LATER = {"detector_sizing": "fixed", "detector_precision": "fp32", "class_evidence": False}


# Values of the first settings, for keys written before these fields existed.
LEGACY = {"max_detections": 20, "whole_photo": True, "proposals": "detections", "detector_sizes": (416,),
          "min_objectness": 0.0, "min_box_area": 0.0, "tail_start": 0}
LEGACY_SETTINGS = RegionSettings(**LEGACY)


@dataclass(frozen=True)
class PrecomputedSettings:
    """Region features computed elsewhere (e.g. the authors' bottom-up-attention files): nothing to extract here."""

    feature_dim: int = 2048
    num_regions: int = 36
    source: str = "precomputed <split>_ims.npy"

    def key(self) -> str:
        return json.dumps({"precomputed": True, **asdict(self)}, sort_keys=True)


def settings_from_key(key: str) -> RegionSettings | PrecomputedSettings:
    """The settings a checkpoint or feature file was made with, from their JSON key."""
    values = json.loads(key)
    if values.pop("precomputed", False):
        return PrecomputedSettings(**values)
    values = {**LEGACY, **values} if "proposals" not in values else values
    return RegionSettings(**{**values, "detector_sizes": tuple(values["detector_sizes"])})
