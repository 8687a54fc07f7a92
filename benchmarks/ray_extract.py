"""Region extraction on a local Ray (Ray Data, one worker a CPU) against the in-process path; prints a table.

python benchmarks/ray_extract.py [--photos 128] [--shard 32]
The first photos of the bundled gallery, default region settings, each run into a fresh feature
file; wall-clock times include Ray's start and each worker's loading of the networks (the cost a
short job pays), and the in-process run includes its extractor's loading too.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chan.checkpoint import DEFAULT_CHECKPOINT, read_metadata  # noqa: E402
from chan.data import open_dataset  # noqa: E402
from chan.features import extract  # noqa: E402
from chan.gallery import DEFAULT_GALLERY  # noqa: E402
from chan.region_settings import settings_from_key  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=128)
    p.add_argument("--shard", type=int, default=32, help="photos per shard (Ray: per task) (default: %(default)s)")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    settings = settings_from_key(read_metadata(DEFAULT_CHECKPOINT)["regions"])
    dataset = open_dataset(DEFAULT_GALLERY)
    dataset = replace(dataset, photos=dataset.photos[: args.photos])
    rows = []
    for name, ray in (("in process (ONNX Runtime)", None), ("local Ray, Ray Data", "local")):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            table = extract(dataset, Path(folder) / "f.safetensors", settings, shard_size=args.shard, progress=False, ray=ray)
            seconds = time.perf_counter() - start
        rows.append((name, len(table.photo_ids), seconds))
    print(f"{'path':<28}{'photos':>8}{'wall s':>9}{'photos/s':>10}")
    for name, n, seconds in rows:
        print(f"{name:<28}{n:>8}{seconds:>9.1f}{n / seconds:>10.2f}")


if __name__ == "__main__":
    main()
