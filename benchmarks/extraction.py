"""Where region extraction spends its time, with each runtime: decoding, resizing, the detector, NMS, the backbone.

python benchmarks/extraction.py [--photos 64] [--batch-sizes 1 8] [--runtimes torch onnx] [--json FILE]
Photos come from the bundled gallery. For each runtime and batch size, after one warm-up batch, every
stage's seconds are summed over all photos; the table gives photos/s, ms per photo, the speed-up
over the first runtime and each stage's share. A second table checks that the runtimes give the same
regions: photos whose boxes differ, and the largest difference of a feature and of a trunk-map value.
Prints tables, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from chan.data import open_dataset  # noqa: E402
from chan.gallery import DEFAULT_GALLERY  # noqa: E402
from chan.photos import load_photo  # noqa: E402
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES)[::-1], help="the first is the baseline")
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("extraction.json"))
    args = p.parse_args()
    paths = [ph.path for ph in open_dataset(DEFAULT_GALLERY).photos[: args.photos]]
    extractors = {runtime: RegionExtractor(runtime=runtime) for runtime in args.runtimes}
    print(f"{len(paths)} photos of the bundled gallery, {torch.get_num_threads()} threads, default region settings\n")
    print("| runtime | batch | photos/s | ms per photo | speed-up | " + " | ".join(STAGES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(STAGES))
    results: dict = {}
    for batch in args.batch_sizes:
        for runtime, extractor in extractors.items():
            r = profile(extractor, paths, batch)
            results.setdefault(runtime, {})[batch] = r
            baseline = results[args.runtimes[0]][batch]["total"]
            shares = " | ".join(f"{100 * r.get(stage, 0.0) / r['total']:.0f}%" for stage in STAGES)
            print(f"| {runtime} | {batch} | {len(paths) / r['total']:.1f} | {1000 * r['total'] / len(paths):.0f} | "
                  f"{baseline / r['total']:.2f}x | {shares} |")
    if len(extractors) > 1:
        photos = [load_photo(p) for p in paths]
        regions = {runtime: [r for s in range(0, len(photos), 8) for r in extractor(photos[s : s + 8])]
                   for runtime, extractor in extractors.items()}
        first = args.runtimes[0]
        print("\n| runtimes | photos | photos with other boxes | largest feature difference | largest trunk-map difference |")
        print("|---|---|---|---|---|")
        for runtime in args.runtimes[1:]:
            c = results["same_regions_" + runtime] = compare(regions[first], regions[runtime])
            print(f"| {first} vs {runtime} | {c['photos']} | {c['other_boxes']} | {c['feature_max_diff']:.1e} | "
                  f"{c['trunk_map_max_diff']:.1e} |")
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
