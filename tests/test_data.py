import json

import pytest

from chan.__main__ import main
from chan.data import DatasetError, open_dataset


def test_flickr8k_counts_and_quirks(flickr8k):
    ds = open_dataset(flickr8k)
    assert ds.layout == "flickr8k"
    assert len(ds.photos) == 8091
    assert len(ds.captions) == 40455
    assert {s: len(ds.split(s).photos) for s in ds.splits} == {"train": 6000, "dev": 1000, "test": 1000}
    assert len(ds.split("test").captions) == 5000
    assert ds.quirks["captions whose photo is missing (dropped)"] == 5
    assert ds.quirks["photos in no split"] == 91
    assert ds.default_split() == "test"
    assert not any(c.photo_id.endswith(".jpg.1") for c in ds.captions)


def test_unknown_split_names_the_choices(flickr8k):
    with pytest.raises(DatasetError, match="train"):
        open_dataset(flickr8k).split("val")


def test_info_command(flickr8k, capsys):
    assert main(["info", "--data", str(flickr8k)]) == 0
    out = capsys.readouterr().out
    assert "8091 photos, 40455 captions" in out
    assert "photos in no split: 91" in out


def _png(path, size=(8, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def test_coco_layout(tmp_path):
    _png(tmp_path / "val2017" / "000001.png")
    _png(tmp_path / "val2017" / "000002.png")
    ann = {
        "images": [{"id": 1, "file_name": "000001.png"}, {"id": 2, "file_name": "000002.png"},
                   {"id": 3, "file_name": "gone.png"}],
        "annotations": [{"image_id": 1, "caption": "A red square."}, {"image_id": 1, "caption": "a red  square."},
                        {"image_id": 2, "caption": "   "}, {"image_id": 2, "caption": "Another red square"},
                        {"image_id": 3, "caption": "orphan"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    ds = open_dataset(tmp_path)
    assert ds.layout == "coco"
    assert ds.splits == ["val2017"]
    assert [p.id for p in ds.photos] == ["val2017/000001.png", "val2017/000002.png"]
    assert len(ds.captions) == 3
    assert ds.quirks["duplicate captions of the same photo (kept)"] == 1
    assert ds.quirks["empty captions (dropped)"] == 1
    assert ds.quirks["captions whose photo is missing (dropped)"] == 1
    assert ds.quirks["photos in the annotations whose file is missing"] == 1
    assert ds.default_split() is None


def test_plain_folder(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert ds.layout == "folder"
    assert sorted(p.id for p in ds.photos) == ["a.png", "sub/b.jpg"]
    assert ds.captions == [] and ds.splits == []


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, flickr8k):
    from tests.conftest import make_flickr_subset

    root = make_flickr_subset(tmp_path / "f", flickr8k, 2, 1)
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    name = (root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()[0]
    token.write_bytes(token.read_bytes() + f"{name}#5\tA caf\xe9 \xff dog\n".encode("latin-1"))
    ds = open_dataset(root)
    assert ds.quirks["lines with undecodable bytes in Flickr8k.token.txt (replaced)"] == 1
    assert any("caf\ufffd" in c.text for c in ds.captions)


def test_unrecognised_layout_names_path_and_layouts(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path)
    assert str(tmp_path) in str(e.value) and "Flickr8k" in str(e.value) and "COCO" in str(e.value)
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset(tmp_path / "nope")
