"""YOLOv3-tiny in int8 for ONNX Runtime: static quantization of the exported detector from shipped ranges.

The convolutions take per-channel int8 weights and uint8 activations (QDQ, ONNX Runtime's recommended CPU format);
each activation's range comes from `DETECTOR_INT8_RANGES`, which ONNX Runtime's MinMax calibration wrote once from
Flickr8k train photos at 416 px. So a quantized detector is made from the float model alone, with no photos, at any
input size, and cached beside it. On a CPU with VNNI (AVX-512 VNNI or AVX-VNNI) int8 products run natively; on an
AVX2-only CPU ONNX Runtime's int8 kernels may saturate, which changes more boxes.

python -m chan.detector_int8 [--data DIR] [--photos 64] [--out chan/yolov3-tiny-int8-ranges.json]
recomputes the ranges (only needed when the detector's weights or its export change).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path

DETECTOR_INT8_RANGES = Path(__file__).with_name("yolov3-tiny-int8-ranges.json")
CALIBRATION_SIZE = 416

log = logging.getLogger(__name__)


class _NoPreprocessingAdvice(logging.Filter):
    """quantize_static advises its model pre-processing on the root logger; the exported detector does without."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def _quantize(float_model: Path, out: Path, ranges: Path, reader=None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    advice = _NoPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_static(float_model, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["Conv"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibration_cache_path=ranges)
    finally:
        logging.getLogger().removeFilter(advice)


def quantized_detector(float_model: Path, ranges: Path = DETECTOR_INT8_RANGES) -> Path:
    """The int8 version of an exported detector (`<name>-int8-<ranges' digest>.onnx` beside it), made once."""
    if not ranges.is_file():
        raise FileNotFoundError(f"{ranges}: the int8 detector's activation ranges are missing "
                                "(python -m chan.detector_int8 writes them)")
    digest = hashlib.sha1(ranges.read_bytes()).hexdigest()[:12]
    out = float_model.with_name(f"{float_model.stem}-int8-{digest}.onnx")
    if not out.exists():
        log.info("quantizing %s to int8 (once; cached at %s)", float_model.name, out)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # processes quantizing at once never share it
        _quantize(float_model, tmp, ranges)
        tmp.replace(out)
    return out


def calibrate(photos: list, out: Path) -> None:
    """Write the activation ranges of the detector at `CALIBRATION_SIZE` px over these photos (PIL images)."""
    import tempfile

    import torch
    from onnxruntime.quantization import CalibrationDataReader

    from .detector import YoloV3Tiny
    from .regions import RegionExtractor
    from .runtime import OnnxModule

    detector = YoloV3Tiny()
    float_model = OnnxModule(detector.net, torch.zeros(1, 3, CALIBRATION_SIZE, CALIBRATION_SIZE),
                             f"yolov3-tiny-{CALIBRATION_SIZE}").path
    inputs = [{"input": RegionExtractor._tensor(p, CALIBRATION_SIZE)[None].numpy()} for p in photos]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feed = iter(inputs)

        def get_next(self):
            return next(self.feed, None)

    out.unlink(missing_ok=True)  # quantize_static reads an existing file instead of calibrating
    with tempfile.TemporaryDirectory() as folder:
        _quantize(float_model, Path(folder) / "int8.onnx", out, Reader())


def main() -> None:
    from .data import DEFAULT_DATA, open_dataset
    from .photos import load_photo

    p = argparse.ArgumentParser(description="Recompute the int8 detector's activation ranges from train photos.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--photos", type=int, default=64, help="the first N train photos (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DETECTOR_INT8_RANGES)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    photos = [load_photo(ph.path) for ph in open_dataset(args.data).split("train").photos[: args.photos]]
    calibrate(photos, args.out)
    print(f"wrote {args.out} ({len(photos)} train photos at {CALIBRATION_SIZE} px)")


if __name__ == "__main__":
    main()
