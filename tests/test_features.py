import json

import pytest
import torch

from chan.__main__ import main
from chan.data import open_dataset
from chan.features import CacheError, extract, load_table
from chan.region_settings import RegionSettings
from tests.conftest import make_flickr_subset


def test_extract_is_resumable_and_keyed_by_settings(tmp_path, flickr8k, extractor):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 5, 3)
    ds = open_dataset(root)
    out = tmp_path / "feat.safetensors"
    # an "interrupted" run: only the train split, as leftover shards
    first = extract(ds.split("train"), out, extractor=extractor, shard_size=2, progress=False)
    assert first.features.dtype == torch.float16 and len(first.photo_ids) == 5
    table = extract(ds, out, extractor=extractor, progress=False)
    assert sorted(table.photo_ids) == sorted(p.id for p in ds.photos)
    pid = first.photo_ids[0]
    assert torch.equal(table.features[table.index[pid]], first.features[first.index[pid]])
    with pytest.raises(CacheError, match="other extractor settings"):
        load_table(out, RegionSettings(num_regions=12))
    with pytest.raises(CacheError, match="other extractor settings"):
        extract(ds, out, RegionSettings(image_size=224), extractor=extractor, progress=False)


def test_extract_skips_undecodable_photos(tmp_path, flickr8k, extractor):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 2, 0)
    bad = root / "Flicker8k_Dataset" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out = extract(open_dataset(root), tmp_path / "x.safetensors", extractor=extractor, progress=False)
    assert "broken.jpg" not in out.index and len(out.photo_ids) == 2


def test_corrupt_feature_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CacheError, match="not a readable"):
        load_table(bad)


def test_extract_command(tmp_path, flickr8k, capsys):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 0, 2)
    out = tmp_path / "cli.safetensors"
    assert main(["extract", "--data", str(root), "--split", "dev", "--out", str(out), "--regions", "8"]) == 0
    assert "2 photos x 8 regions" in capsys.readouterr().out
    table = load_table(out)
    assert json.loads(table.settings_key)["num_regions"] == 8


class _Counting:
    """An extractor that counts the photos it sees, and dies (like a killed run) after `die_after` photos."""

    def __init__(self, inner, die_after=None):
        self.inner, self.die_after, self.seen = inner, die_after, 0
        self.settings, self.label_names = inner.settings, inner.label_names

    def __call__(self, photos):
        if self.die_after is not None and self.seen + len(photos) > self.die_after:
            raise KeyboardInterrupt
        self.seen += len(photos)
        return self.inner(photos)


def test_an_interrupted_extraction_resumes_with_the_remaining_photos(tmp_path, flickr8k, extractor):
    ds = open_dataset(make_flickr_subset(tmp_path / "f", flickr8k, 7, 0))
    out = tmp_path / "feat.safetensors"
    dying = _Counting(extractor, die_after=4)
    with pytest.raises(KeyboardInterrupt):
        extract(ds, out, extractor=dying, batch_size=2, shard_size=2, progress=False)
    parts = sorted((tmp_path / "feat.safetensors.parts").glob("*.safetensors"))
    assert len(parts) == 2 and not out.exists()  # two shards of 2 photos were written before the "kill"
    parts[-1].write_bytes(parts[-1].read_bytes()[:3000])  # and the last one was cut short
    resumed = _Counting(extractor)
    table = extract(ds, out, extractor=resumed, batch_size=2, shard_size=2, progress=False)
    assert resumed.seen == 7 - 2  # only the photos of the intact shard were not extracted again
    assert sorted(table.photo_ids) == sorted(p.id for p in ds.photos)
    whole = extract(ds, tmp_path / "whole.safetensors", extractor=extractor, batch_size=2, shard_size=2, progress=False)
    assert all(torch.equal(table.features[table.index[i]], whole.features[whole.index[i]]) for i in whole.photo_ids)
