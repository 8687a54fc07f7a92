"""Bottom-up-attention TSV galleries: rows read back exactly, boxes scaled to the photo files, bad rows counted."""
import numpy as np
import pytest
import torch
from PIL import Image

from chan.data import open_dataset
from chan.features import FeatureMismatchError, table_for
from chan.region_settings import PrecomputedSettings, RegionSettings
from tests.conftest import butd_line

K, F = 3, 8


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = 200 + 10 * i, 100 + 5 * i
        x1, y1 = rng.uniform(0, w / 2, K), rng.uniform(0, h / 2, K)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, K), y1 + rng.uniform(1, h / 2, K)], 1).astype(np.float32)
        out.append((str(1000 + i), w, h, boxes, rng.standard_normal((K, F)).astype(np.float32)))
    return out


def test_rows_are_read_back_exactly_and_boxes_follow_the_photo_files(tmp_path):
    rows = _rows(4)
    (tmp_path / "gallery.tsv.0").write_text("\n".join(butd_line(*r) for r in rows[:3]) + "\n")
    (tmp_path / "gallery.tsv.1").write_text(butd_line(*rows[3]) + "\n")
    Image.new("RGB", (100, 50), "white").save(tmp_path / "1000.jpg")  # a Flickr name, half the TSV's 200 x 100
    Image.new("RGB", (210, 105), "white").save(tmp_path / "COCO_val2014_000000001001.jpg")  # a COCO name, same size
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "butd-tsv" and [p.id for p in dataset.photos] == ["1000", "1001", "1002", "1003"]
    assert dataset.photos[0].path.name == "1000.jpg" and dataset.photos[1].path.name.startswith("COCO_")
    assert dataset.photos[2].path is None and not dataset.captions
    table = table_for(dataset, PrecomputedSettings(feature_dim=F, num_regions=K))
    for i, (_, _, _, boxes, features) in enumerate(rows):
        assert torch.equal(table.features[i], torch.from_numpy(features))
    assert torch.allclose(table.boxes[0], torch.from_numpy(rows[0][3]) * 0.5)  # scaled to the 100 x 50 photo
    assert torch.equal(table.boxes[1], torch.from_numpy(rows[1][3]))
    assert torch.equal(table.boxes[2], torch.from_numpy(rows[2][3]))  # no photo: the TSV's own pixels
    with pytest.raises(FeatureMismatchError, match="regions extracted from photos"):
        table_for(dataset, RegionSettings())
    with pytest.raises(FeatureMismatchError, match="holds 8-d"):
        table_for(dataset, PrecomputedSettings(feature_dim=2048, num_regions=K))


def test_malformed_rows_are_counted_and_skipped_with_their_line(tmp_path, caplog):
    good = [butd_line(*r) for r in _rows(3)]
    not_base64 = good[0].split("\t")
    not_base64[0], not_base64[5] = "1101", "!!not*base64"
    bad = ["1100\t200\t100\t3", "\t".join(not_base64), "1102\twide\t100\t3\tAAAA\tAAAA"]
    (tmp_path / "g.tsv").write_text("\n".join([good[0], bad[0], good[1], bad[1], bad[2], good[2]]) + "\n")
    caplog.set_level("WARNING")
    dataset = open_dataset(tmp_path)
    assert [p.id for p in dataset.photos] == ["1000", "1001", "1002"]
    assert dataset.quirks["malformed rows in g.tsv (skipped)"] == 3
    assert "g.tsv line 2: 4 fields, expected 6" in caplog.text
    assert "g.tsv line 4:" in caplog.text and "g.tsv line 5:" in caplog.text


def test_a_box_count_that_disagrees_with_the_features_is_refused(tmp_path):
    image_id, w, h, boxes, features = _rows(1)[0]
    line = butd_line(image_id, w, h, boxes, features).split("\t")
    line[3] = "2"  # num_boxes says 2, the row holds 3
    (tmp_path / "g.tsv").write_text("\t".join(line) + "\n")
    with pytest.raises(ValueError, match="line 1 .image 1000.: num_boxes is 2, but the row holds 3 boxes"):
        open_dataset(tmp_path)
