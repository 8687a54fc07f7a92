"""Region features for any photo: detector proposals (+ grid cells), RoIAlign over an EfficientNet-Lite map.

Each photo gives K regions. Default: YOLOv3-tiny boxes at several input sizes (or at one chosen from
the photo's size), ranked by objectness, class-agnostic NMS, up to K distinct boxes, grid cells (2x2,
3x3, ...) only to fill what is left; no whole-photo region. The first settings (`LEGACY`) put the whole photo first and
took up to 20 confident COCO detections. A region's feature is the RoIAlign-pooled backbone map
plus its normalised geometry (x1, y1, x2, y2, area), and, with `class_evidence`, what the detector saw
in it (its confidence in each of the 80 COCO classes, objectness x class probability, then objectness; zeros for
grid cells). The backbone's trunk output is kept per
photo as well, so that a model can tune the backbone's tail (`chan.backbone`).
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models import EfficientNet_B0_Weights
from torchvision.ops import nms

from .backbone import BACKBONE_CHANNELS, BackboneTail, load_backbone, pool_regions, run_trunk
from .detector import YoloV3Tiny
from .region_settings import CLASS_EVIDENCE_DIMS, RegionSettings
from .runtime import RUNTIMES, OnnxModule


@dataclass
class Regions:
    """The regions of one photo, in the photo's own pixel coordinates."""

    boxes: np.ndarray | None  # (K, 4) x1 y1 x2 y2, float32; None for precomputed features
    features: np.ndarray  # (K, F) float32
    labels: list[str]
    scores: np.ndarray  # (K,) detector confidence or classifier probability
    detected: np.ndarray  # (K,) bool: from the detector (else whole photo or grid cell)
    stage_map: np.ndarray | None = None  # (C, h, w) fp16 backbone trunk output, for models that tune the tail


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


GRID_PLACES = {2: [["top left", "top right"], ["bottom left", "bottom right"]],
               3: [["top left", "top centre", "top right"], ["middle left", "centre", "middle right"],
                   ["bottom left", "bottom centre", "bottom right"]]}


def _place(box, width: float, height: float) -> str:
    """Where a box's centre lies, in words: 'top left', 'centre', 'bottom right' (thirds of width x height)."""
    row = ("top", "middle", "bottom")[min(2, max(0, int((box[1] + box[3]) / 2 / height * 3)))]
    col = ("left", "centre", "right")[min(2, max(0, int((box[0] + box[2]) / 2 / width * 3)))]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def region_names(regions: Regions) -> list[str]:
    """Names a person reads and tells apart: 'dog 87%' for a detection ('dog? 0.4%' for a weak proposal: a box the
    detector thinks holds something, with little idea what), 'whole photo', '3x3 grid, top left' for a grid cell.
    Detections that would share a name get where they lie ('person 64%, top left'), then a number if still alike."""
    if regions.boxes is None:  # precomputed features: whatever labels they came with (usually none)
        return list(regions.labels)
    unit = regions.features[:, BACKBONE_CHANNELS : BACKBONE_CHANNELS + 4]
    names = []
    for box, label, score, detected in zip(unit, regions.labels, regions.scores, regions.detected):
        if detected:
            if not label:  # a box with no class, as bottom-up-attention files give them
                names.append("box")
            else:
                names.append(f"{label} {score:.0%}" if score >= 0.1 else f"{label}? {score:.1%}")
            continue
        n = max(1, round(1 / max(float(box[2] - box[0]), 1e-6)))
        if n == 1:
            names.append("whole photo")
            continue
        row, col = min(n - 1, int(box[1] * n + 0.5)), min(n - 1, int(box[0] * n + 0.5))
        place = GRID_PLACES[n][row][col] if n in GRID_PLACES else f"row {row + 1}, column {col + 1}"
        names.append(f"{n}x{n} grid, {place}")
    seen = Counter(names)
    extent = np.maximum(regions.boxes[:, 2:].max(0), 1e-6)  # the photo's size, as far as its regions show it
    names = [f"{name}, {_place(box, *extent)}" if detected and seen[name] > 1 else name
             for name, box, detected in zip(names, regions.boxes, regions.detected)]
    total, count = Counter(names), Counter()
    for k, name in enumerate(names):
        if total[name] > 1:
            count[name] += 1
            names[k] = f"{name} ({count[name]})"
    return names


@contextmanager
def _timed(into: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    into[name] = into.get(name, 0.0) + time.perf_counter() - start


class _Trunk(nn.Module):
    """The backbone's frozen trunk as extraction runs it: images in [-1, 1] -> the tail's input map."""

    def __init__(self, backbone: nn.Module, split: int):
        super().__init__()
        self.backbone, self.split = backbone, split

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return run_trunk(self.backbone, images, self.split)


class RegionExtractor:
    """Photos in, `Regions` out (always on the CPU, whatever device computed them); deterministic, batched.

    The runtime runs the detector and the backbone: `"onnx"` (ONNX Runtime, the default on the CPU)
    or `"torch"` (eager PyTorch on `device`, the default on a GPU). Both give the same regions up to
    float rounding (`benchmarks/extraction.py` compares them).
    """

    def __init__(self, settings: RegionSettings = RegionSettings(), runtime: str | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        runtime = runtime or ("onnx" if self.device.type == "cpu" else "torch")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
        if runtime == "onnx" and self.device.type != "cpu":
            raise ValueError("the onnx runtime runs on the CPU here; use runtime='torch' on a GPU")
        if settings.detector_precision == "int8" and runtime != "onnx":
            raise ValueError("the int8 detector runs by ONNX Runtime on the CPU: use runtime='onnx', or "
                             "detector_precision='fp32'")
        self.settings, self.runtime = settings, runtime
        self.detector = YoloV3Tiny(conf=settings.detector_conf, iou=settings.detector_iou).to(self.device)
        self.backbone = load_backbone(settings.backbone).to(self.device)
        self.split = settings.tail_start or len(self.backbone._blocks)
        self.trunk = _Trunk(self.backbone, self.split).eval()
        self.tail = BackboneTail(self.backbone, self.split).eval()  # the frozen one: its map gives the stored features
        if runtime == "onnx":
            sizes = [self.detector.input_size] if settings.proposals == "detections" else settings.all_detector_sizes()
            self.detector.use_onnx_runtime(sizes, int8=settings.detector_precision == "int8")
            example = torch.zeros(1, 3, settings.image_size, settings.image_size)
            with torch.no_grad():
                stage_example = self.trunk(example)
            name = f"{settings.backbone}-{settings.image_size}-{self.split}"
            self.trunk = OnnxModule(self.trunk, example, f"{name}-trunk")
            self.tail = OnnxModule(self.tail, stage_example, f"{name}-tail")
        self.stage_seconds: dict[str, float] | None = None  # set to {} to have each stage's time summed into it

    def _stage(self, name: str):
        """Time a stage into `stage_seconds` when it is being collected (benchmarks/extraction.py)."""
        return _timed(self.stage_seconds, name) if self.stage_seconds is not None else nullcontext()

    @cached_property
    def label_names(self) -> list[str]:
        """COCO classes (detector) followed by ImageNet classes (backbone); labels index this list."""
        return self.detector.class_names + list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])

    @staticmethod
    def _tensor(photo: Image.Image, size: int) -> torch.Tensor:
        array = np.asarray(photo.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def _detections(self, photos: list[Image.Image]) -> list[tuple[torch.Tensor, ...]]:
        """Per photo: boxes as fractions of the photo, confidences, COCO class ids, and (objectness proposals) the
        class evidence ((n, 81): the detector's confidence in each of its 80 classes, objectness x class probability,
        then objectness); at most K (or K - 1) boxes."""
        s = self.settings
        limit = min(s.max_detections, s.num_regions - int(s.whole_photo))
        if s.proposals == "detections":
            with self._stage("resize"):
                det_in = torch.stack([self._tensor(p, self.detector.input_size) for p in photos]).to(self.device)
            with self._stage("detector"):  # its confidence threshold and NMS included
                return [(b.cpu() / self.detector.input_size, sc.cpu(), c.cpu(), None)
                        for b, sc, c in self.detector(det_in, max_det=limit)]
        groups: dict[tuple[int, ...], list[int]] = {}  # detector input sizes -> the photos that take them
        for i, photo in enumerate(photos):
            groups.setdefault(s.detector_passes(*photo.size), []).append(i)
        per_photo: list = [None] * len(photos)
        for sizes, members in groups.items():
            with self._stage("resize"):
                inputs = [torch.stack([self._tensor(photos[i], size) for i in members]).to(self.device) for size in sizes]
            with self._stage("detector"):
                per_size = [self.detector.proposals(x, s.min_objectness) for x in inputs]
            for i, found in zip(members, zip(*per_size)):
                per_photo[i] = found
        out = []
        with self._stage("nms"):
            for found in per_photo:
                boxes, objectness, class_probs = (torch.cat(parts) for parts in zip(*found))
                class_prob, classes = class_probs.max(1)
                area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                keep = torch.nonzero(area >= s.min_box_area).flatten()
                keep = keep[nms(boxes[keep], objectness[keep], s.detector_iou)][:limit]
                evidence = torch.cat([class_probs * objectness[:, None], objectness[:, None]], 1)[keep].cpu()
                out.append((boxes[keep].cpu(), (objectness * class_prob)[keep].cpu(), classes[keep].cpu(), evidence))
        return out

    @staticmethod
    def _run(module, x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        return out[0] if isinstance(out, list) else out  # an OnnxModule returns its outputs as a list

    @torch.no_grad()
    def __call__(self, photos: list[Image.Image], frozen_features: bool = True) -> list[Regions]:
        """Regions of each RGB photo (use `chan.photos.load_photo` to open files).

        `frozen_features=False` skips the frozen tail, about half the backbone's time: the features' backbone
        channels stay zero and grid cells unlabelled. Only for a model that tunes the tail, which recomputes them
        from `stage_map` (the demo's uploads).
        """
        s = self.settings
        if not frozen_features and not s.tail_start:
            raise ValueError("frozen_features=False needs settings that keep the trunk map (tail_start)")
        if not photos:
            return []
        detections = self._detections(photos)
        with self._stage("resize"):
            net_in = torch.stack([self._tensor(p, s.image_size) for p in photos])
        with self._stage("backbone"):
            stage = self._run(self.trunk, ((net_in - 0.5) / 0.5).to(self.device))
            fmap = self._run(self.tail, stage) if frozen_features else None

        unit_boxes = []
        for boxes, *_ in detections:
            whole = [(0.0, 0.0, 1.0, 1.0)] if s.whole_photo else []
            rest = s.num_regions - len(whole) - len(boxes)
            unit_boxes.append(torch.tensor(whole + boxes.tolist() + grid_boxes(1, 1, rest), dtype=torch.float32))
        unit_boxes = torch.stack(unit_boxes)
        if frozen_features:
            with self._stage("roi_align"):
                pooled = pool_regions(fmap, unit_boxes.to(fmap.device), s.roi_size)
            with self._stage("classify"):  # ImageNet labels for the grid cells
                probs = self.backbone._fc(pooled.to(self.device)).softmax(-1).cpu()
            pooled = pooled.cpu()
        else:
            pooled = torch.zeros(len(photos), s.num_regions, BACKBONE_CHANNELS)
            probs = torch.zeros(len(photos), s.num_regions, 1)  # grid cells: score 0, no label
        stage = stage.cpu()
        n_coco = len(self.detector.class_names)

        out = []
        for i, (photo, (_, det_scores, det_classes, det_evidence)) in enumerate(zip(photos, detections)):
            W, H = photo.size
            first, n_det = int(s.whole_photo), len(det_scores)
            cls_prob, cls_idx = probs[i].max(-1)
            label_idx = torch.cat([n_coco + cls_idx[:first], det_classes, n_coco + cls_idx[first + n_det :]])
            score = torch.cat([cls_prob[:first], det_scores, cls_prob[first + n_det :]])
            norm = unit_boxes[i]
            area = ((norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1]))[:, None]
            detected = np.zeros(s.num_regions, dtype=bool)
            detected[first : first + n_det] = True
            labels = [self.label_names[j] if frozen_features or d else "" for j, d in zip(label_idx.tolist(), detected)]
            parts = [pooled[i], norm, area]
            if s.class_evidence:  # the whole photo and grid cells: no detector evidence
                evidence = torch.zeros(s.num_regions, CLASS_EVIDENCE_DIMS)
                evidence[first : first + n_det] = det_evidence
                parts.append(evidence)
            out.append(
                Regions(
                    boxes=(norm * torch.tensor([W, H, W, H])).numpy(),
                    features=torch.cat(parts, 1).numpy(),
                    labels=labels,
                    scores=score.numpy().astype(np.float32),
                    detected=detected,
                    stage_map=stage[i].half().numpy() if s.tail_start else None,
                )
            )
        return out
