"""Server-side latency of the demo's actions on the default gallery; prints a table, writes JSON.

python benchmarks/app_latency.py [--checkpoint PATH] [--gallery DIR] [--detector-precision fp32|int8|auto] [--repeats N]
                                [--json FILE]
Each figure is the median of N runs after one warm-up. The warm start is the time to open the
dataset and load the cached gallery index (run once before so that the cache exists).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it: photo work runs in a thread of its own
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.handlers import Handlers  # noqa: E402
from benchmarks.run import median_seconds  # noqa: E402
from chan.__main__ import add_detector_precision_override  # noqa: E402
from chan.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from chan.gallery import DEFAULT_GALLERY, open_gallery  # noqa: E402
from chan.regions import RegionExtractor  # noqa: E402

QUERIES = ["a black dog runs through the snow", "two children play on the beach", "a man rides a bike",
           "a girl in a pink dress", "people walk down a busy city street"]
TARGETS_MS = {"caption -> images": 100, "image -> captions (upload, torch extraction)": 80, "image -> captions (upload)": 80,
              "image -> captions (the same upload again)": 80, "regions of a new photo (ONNX Runtime)": 40,
              "caption ranking, regions in hand": None, "inspector (gallery photo)": 300, "warm start": 15000}


def median_ms(fn, repeats: int) -> float:
    return 1000 * median_seconds(fn, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--gallery", type=Path, default=DEFAULT_GALLERY)
    add_detector_precision_override(p, auto=True)  # as app.py takes it
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, default=Path("benchmarks/app_latency.json"))
    args = p.parse_args()
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    gallery = open_gallery(args.gallery, args.checkpoint, progress=False, detector_precision=args.detector_precision)
    results = {"warm start": (time.perf_counter() - start) * 1000}
    h = Handlers(gallery)
    queries = iter(QUERIES * (args.repeats + 1))
    results["caption -> images"] = median_ms(lambda: gallery.search_images(next(queries), 12), args.repeats)
    # every timed upload is a photo not seen before: the app keeps the regions of its latest uploads
    uploads = [str(p.path) for p in gallery.photos[: 3 * (args.repeats + 1)]]
    photos = iter(uploads)
    if gallery.settings.detector_precision == "fp32":  # the baseline, in the same run (int8 runs by ONNX Runtime only)
        gallery._extractor = RegionExtractor(gallery.settings, runtime="torch")
        results["image -> captions (upload, torch extraction)"] = median_ms(
            lambda: h.rank_captions(next(photos), "a dog\na cat", ""), args.repeats)
    else:  # the rows below take the same photos as an fp32 run's
        for _ in range(args.repeats + 1):
            next(photos)
    gallery._extractor = RegionExtractor(gallery.settings)  # what the app runs: ONNX Runtime
    results["image -> captions (upload)"] = median_ms(lambda: h.rank_captions(next(photos), "a dog\na cat", ""),
                                                      args.repeats)
    again = uploads[2 * (args.repeats + 1) - 1]  # the latest upload above: its regions are kept
    results["image -> captions (the same upload again)"] = median_ms(lambda: h.rank_captions(again, "a dog\na cat", ""),
                                                                     args.repeats)
    # the upload's two halves: extraction, then ranking the gallery's captions and two of your own
    results["regions of a new photo (ONNX Runtime)"] = median_ms(lambda: gallery.photo_regions(next(photos)), args.repeats)
    regions = gallery.photo_regions(again)
    results["caption ranking, regions in hand"] = median_ms(lambda: gallery.rank_captions(regions, ["a dog", "a cat"]),
                                                            args.repeats)
    pid = gallery.photos[1].id
    results["inspector (gallery photo)"] = median_ms(lambda: h.align(None, QUERIES[0], pid), args.repeats)
    print(f"{'action':<44}{'median ms':>12}{'target ms':>12}  met")
    for name, ms in results.items():
        target = TARGETS_MS[name]
        met = "" if target is None else "yes" if ms <= target else "NO"
        print(f"{name:<44}{ms:>12.1f}{target if target is not None else '-':>12}  {met}")
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
