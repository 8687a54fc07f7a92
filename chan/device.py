"""Which device to run on: `--device auto|cpu|cuda|cuda:N`, and bf16 autocast where it pays."""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device that this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes the first GPU when CUDA is available, else the CPU; `cuda` without a GPU is refused, clearly."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: give {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"unsupported device {name!r}: give {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: this machine has no CUDA GPU that torch can use "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    return device


@lru_cache
def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast speeds `device` up: on a GPU, and on CPUs whose oneDNN runs bf16 natively (AVX-512,
    AMX). On others (AVX2 only) bf16 products are emulated and several times slower than fp32."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@lru_cache
def int8_pays() -> bool:
    """Whether this CPU multiplies int8 natively (VNNI: AVX-512 VNNI, AVX-VNNI or AMX), where ONNX Runtime's int8
    convolutions are fast and never saturate; elsewhere (AVX2 only) they may saturate. Read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on a GPU (precision `auto` or `bf16`); nothing on the CPU, or with precision `fp32`."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def add_device_option(parser) -> None:
    """`--device` as every command that runs a model takes it."""
    parser.add_argument("--device", default="auto",
                        help=f"{DEVICE_CHOICES}; auto: the first CUDA GPU when there is one, else the CPU (default: auto)")
