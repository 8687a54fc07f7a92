"""Region extraction as a Ray Data map over shards of photos, on a local Ray or a cluster's.

Each worker builds one `RegionExtractor` and turns a shard of photo paths into the bytes of a feature
file; the calling process writes those files as the in-process extraction does. The workers need this
project importable and the photos at the same paths (shared storage on a cluster).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .data import Photo
from .region_settings import RegionSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class _ShardExtractor:
    """A Ray Data actor: one extractor for its lifetime, one shard of photos per call."""

    def __init__(self, settings: RegionSettings, batch_size: int):
        from .regions import RegionExtractor

        self.extractor, self.batch_size = RegionExtractor(settings), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from .features import extract_shard

        photos = [Photo(str(i), Path(p), "") for i, p in zip(batch["id"], batch["path"])]
        ids, data, skipped = extract_shard(self.extractor, photos, self.batch_size)
        return {"ids": [list(ids)], "data": [data], "skipped": [skipped]}


def extract_on_ray(shards: list[list[Photo]], settings: RegionSettings, batch_size: int,
                   address: str = "local", workers: int | None = None) -> Iterator[tuple[list[str], bytes, int]]:
    """Each shard's (ids read, feature-file bytes, photos skipped), in the order the cluster finishes them.

    `address` "local" starts a Ray on this machine; anything else is the address of a running cluster
    ("auto" or "ray://host:10001").
    """
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)  # our progress bar says how far it is
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}}
        ray.init(address=None if address == "local" else address, runtime_env=env, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    rows = [{"id": p.id, "path": str(p.path)} for shard in shards for p in shard]
    workers = workers or max(1, min(len(shards), int(ray.available_resources().get("CPU", 1))))
    dataset = ray.data.from_items(rows, override_num_blocks=len(shards)).map_batches(
        _ShardExtractor, fn_constructor_kwargs={"settings": settings, "batch_size": batch_size},
        batch_size=len(shards[0]), concurrency=workers, num_cpus=1)
    for row in dataset.iter_rows():
        yield list(row["ids"]), bytes(row["data"]), int(row["skipped"])
