"""Where region extraction spends its time, with each runtime: decoding, resizing, the detector, NMS, the backbone.

python benchmarks/extraction.py [--photos 64] [--batch-sizes 1 8] [--runtimes torch onnx] [--data DIR]
                                [--detector-sizing photo --detector-sizes 224,416 --image-size 256]
                                [--detector-precision int8] [--json FILE]
Photos come from the bundled gallery (224 x 224), or from --data's test split (photos at their own size).
The regions are the default checkpoint's settings. For each runtime and batch size, after one warm-up
batch, every stage's seconds are summed over all photos; the table gives photos/s, ms per photo, the
speed-up over the first runtime and each stage's share. A second table checks that the runtimes give
the same regions: photos whose boxes differ, and the largest difference of a feature and of a trunk-map
value. Region options that differ from the default checkpoint's add a candidate: the last runtime with
those settings, timed in the same run, and how many of the default's detector boxes it still finds.
Prints tables, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from chan.__main__ import add_detector_options  # noqa: E402
from chan.checkpoint import DEFAULT_CHECKPOINT, read_metadata  # noqa: E402
from chan.data import open_dataset  # noqa: E402
from chan.gallery import DEFAULT_GALLERY  # noqa: E402
from chan.photos import load_photo  # noqa: E402
from chan.region_settings import settings_from_key  # noqa: E402
from chan.regions import RegionExtractor  # noqa: E402
from chan.runtime import RUNTIMES  # noqa: E402

STAGES = ("decode", "resize", "detector", "nms", "backbone", "roi_align", "classify", "other")


def profile(extractor: RegionExtractor, paths: list[Path], batch: int) -> dict[str, float]:
    """Seconds per stage, summed over `paths` in batches of `batch` (after one warm-up batch)."""
    extractor([load_photo(p) for p in paths[:batch]])
    seconds = {"decode": 0.0}
    extractor.stage_seconds = seconds
    start = time.perf_counter()
    for s in range(0, len(paths), batch):
        t = time.perf_counter()
        photos = [load_photo(p) for p in paths[s : s + batch]]
        seconds["decode"] += time.perf_counter() - t
        extractor(photos)
    total = time.perf_counter() - start
    extractor.stage_seconds = None
    seconds["other"] = total - sum(seconds.values())
    return {"total": total, **seconds}


def compare(a: list, b: list) -> dict[str, float]:
    """How far two runtimes' regions of the same photos differ."""
    same = [(x, y) for x, y in zip(a, b) if np.allclose(x.boxes, y.boxes, atol=1e-2)]
    return {"photos": len(a), "other_boxes": len(a) - len(same),
            "feature_max_diff": max((float(np.abs(x.features - y.features).max()) for x, y in same), default=0.0),
            "trunk_map_max_diff": max((float(np.abs(x.stage_map.astype(np.float32) - y.stage_map.astype(np.float32)).max())
                                       for x, y in same if x.stage_map is not None), default=0.0)}


def boxes_found(base: list, other: list, iou: float = 0.7) -> float:
    """The share of `base`'s detector boxes that `other` has too (a box of the same photo at IoU >= `iou`)."""
    found = total = 0
    for a, b in zip(base, other):
        boxes_a, boxes_b = torch.from_numpy(a.boxes[a.detected]), torch.from_numpy(b.boxes[b.detected])
        total += len(boxes_a)
        if len(boxes_a) and len(boxes_b):
            found += int((box_iou(boxes_a, boxes_b).max(1).values >= iou).sum())
    return found / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES)[::-1], help="the first is the baseline")
    p.add_argument("--data", type=Path, default=None, help="photos from this dataset's test split (default: the gallery)")
    p.add_argument("--image-size", type=int, default=None, help="candidate: the backbone's input side")
    add_detector_options(p)
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("extraction.json"))
    args = p.parse_args()
    source = open_dataset(args.data).split("test") if args.data else open_dataset(DEFAULT_GALLERY)
    paths = [ph.path for ph in source.photos[: args.photos]]
    settings = settings_from_key(read_metadata(DEFAULT_CHECKPOINT)["regions"])
    candidate = replace(settings, image_size=args.image_size or settings.image_size,
                        detector_sizing=args.detector_sizing, detector_sizes=args.detector_sizes,
                        detector_precision=args.detector_precision)
    extractors = {runtime: RegionExtractor(settings, runtime=runtime) for runtime in args.runtimes}
    if candidate != settings:
        extractors["candidate"] = RegionExtractor(candidate, runtime=args.runtimes[-1])
    print(f"{len(paths)} photos ({args.data or 'the bundled gallery'}), {torch.get_num_threads()} threads, the default "
          f"checkpoint's region settings" + (f"; candidate ({args.runtimes[-1]}): {candidate}" if candidate != settings else "")
          + "\n")
    print("| runtime | batch | photos/s | ms per photo | speed-up | " + " | ".join(STAGES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(STAGES))
    results: dict = {}
    for batch in args.batch_sizes:
        for runtime, extractor in extractors.items():
            r = profile(extractor, paths, batch)
            results.setdefault(runtime, {})[batch] = r
            # the candidate against the default settings on its runtime, the runtimes against the first
            baseline = results[args.runtimes[-1] if runtime == "candidate" else args.runtimes[0]][batch]["total"]
            shares = " | ".join(f"{100 * r.get(stage, 0.0) / r['total']:.0f}%" for stage in STAGES)
            print(f"| {runtime} | {batch} | {len(paths) / r['total']:.1f} | {1000 * r['total'] / len(paths):.0f} | "
                  f"{baseline / r['total']:.2f}x | {shares} |")
    photos = [load_photo(p) for p in paths] if len(extractors) > 1 else []  # the regions are compared, if any two
    regions = {runtime: [r for s in range(0, len(photos), 8) for r in extractor(photos[s : s + 8])]
               for runtime, extractor in extractors.items()}
    first = args.runtimes[0]
    if len(args.runtimes) > 1:
        print("\n| runtimes | photos | photos with other boxes | largest feature difference | largest trunk-map difference |")
        print("|---|---|---|---|---|")
        for runtime in args.runtimes[1:]:
            c = results["same_regions_" + runtime] = compare(regions[first], regions[runtime])
            print(f"| {first} vs {runtime} | {c['photos']} | {c['other_boxes']} | {c['feature_max_diff']:.1e} | "
                  f"{c['trunk_map_max_diff']:.1e} |")
    if "candidate" in regions:
        default, new = regions[args.runtimes[-1]], regions["candidate"]
        c = results["candidate_regions"] = {
            "settings": candidate.key(), "default_boxes_per_photo": float(np.mean([r.detected.sum() for r in default])),
            "boxes_per_photo": float(np.mean([r.detected.sum() for r in new])), "default_boxes_found": boxes_found(default, new)}
        print("\n| regions | detector boxes per photo | the default's boxes found (IoU >= 0.7) |\n|---|---|---|")
        print(f"| default | {c['default_boxes_per_photo']:.1f} | 100% |")
        print(f"| candidate | {c['boxes_per_photo']:.1f} | {100 * c['default_boxes_found']:.0f}% |")
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
