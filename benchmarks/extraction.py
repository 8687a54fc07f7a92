"""Where region extraction spends its time: decoding, resizing, the detector, NMS, the backbone, RoIAlign.

python benchmarks/extraction.py [--photos 64] [--batch-sizes 1 8] [--json FILE]
Photos come from the bundled gallery. For each batch size, after one warm-up batch, every stage's
seconds are summed over all photos; the table gives ms per photo and each stage's share. Prints a
table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from chan.data import open_dataset  # noqa: E402
from chan.gallery import DEFAULT_GALLERY  # noqa: E402
from chan.photos import load_photo  # noqa: E402
from chan.regions import RegionExtractor  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("extraction.json"))
    args = p.parse_args()
    paths = [ph.path for ph in open_dataset(DEFAULT_GALLERY).photos[: args.photos]]
    extractor = RegionExtractor()
    print(f"{len(paths)} photos of the bundled gallery, {torch.get_num_threads()} threads, default region settings\n")
    print("| batch | photos/s | ms per photo | " + " | ".join(STAGES) + " |")
    print("|---|---|---|" + "---|" * len(STAGES))
    results = {}
    for batch in args.batch_sizes:
        r = profile(extractor, paths, batch)
        results[batch] = r
        per_photo = 1000 * r["total"] / len(paths)
        shares = " | ".join(f"{100 * r.get(stage, 0.0) / r['total']:.0f}%" for stage in STAGES)
        print(f"| {batch} | {len(paths) / r['total']:.1f} | {per_photo:.0f} | {shares} |")
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
