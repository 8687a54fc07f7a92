"""Caches never go stale: edited captions, added captions, replaced photos and damaged files give fresh results."""
import os
import time

import pytest
import torch

from chan.checkpoint import DEFAULT_CHECKPOINT
from chan.data import open_dataset
from chan.features import default_cache_path, table_for
from chan.gallery import Gallery
from chan.region_settings import LEGACY_SETTINGS
from tests.conftest import make_flickr_subset


def _captions_file(root):
    return root / "Flickr8k_text" / "Flickr8k.token.txt"


def _gallery(root):
    return Gallery(DEFAULT_CHECKPOINT, open_dataset(root).split("dev"), progress=False)


def test_gallery_index_follows_caption_edits_and_additions(tmp_path, flickr8k):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 0, 4)
    before = _gallery(root)
    lines = _captions_file(root).read_text().splitlines()
    name = lines[0].split("\t")[0].split("#")[0]
    lines[0] = f"{lines[0].split(chr(9))[0]}\tzebras grazing on a snowy mountain"
    lines.append(f"{name}#5\ta purple submarine")
    _captions_file(root).write_text("\n".join(lines) + "\n")
    after = _gallery(root)
    assert after.cache_path != before.cache_path
    assert "zebras grazing on a snowy mountain" in after.caption_texts and len(after.caption_texts) == len(before.caption_texts) + 1
    fresh = after.model.encode_texts(["zebras grazing on a snowy mountain"])
    row = after.caption_texts.index("zebras grazing on a snowy mountain")
    words, mask = after.index.padded_captions(torch.tensor([row]))
    assert torch.allclose(words[0][mask[0]].float(), fresh[0][0][fresh[1][0]], atol=1e-2)  # bf16 where native


def test_a_replaced_photo_is_extracted_again(tmp_path, flickr8k):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 0, 3)
    dataset = open_dataset(root)
    first = table_for(dataset, LEGACY_SETTINGS, progress=False)
    a, b = dataset.photos[0], dataset.photos[1]
    before_a = first.features[first.index[a.id]].clone()
    time.sleep(0.01)
    os.unlink(a.path)
    os.symlink(os.readlink(b.path), a.path)  # photo a's file now holds photo b
    again = table_for(open_dataset(root), LEGACY_SETTINGS, progress=False)
    now_a, now_b = again.features[again.index[a.id]], again.features[again.index[b.id]]
    assert not torch.equal(now_a, before_a)
    assert torch.equal(now_a, now_b)


def test_a_photo_copied_again_keeps_its_features(tmp_path, flickr8k, monkeypatch):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 0, 2)
    table_for(open_dataset(root), LEGACY_SETTINGS, progress=False)
    for photo in open_dataset(root).photos:  # a dataset copied or mounted again: the same bytes, new file times
        data = photo.path.read_bytes()
        photo.path.unlink()
        photo.path.write_bytes(data)
        os.utime(photo.path, (1, 1))
    monkeypatch.setattr("chan.features.extract", lambda *a, **k: pytest.fail("the features were extracted again"))
    assert len(table_for(open_dataset(root), LEGACY_SETTINGS, progress=False).photo_ids) == 2


def test_a_truncated_cache_is_rebuilt_with_a_warning(tmp_path, flickr8k, caplog):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 0, 2)
    dataset = open_dataset(root)
    first = table_for(dataset, LEGACY_SETTINGS, progress=False)
    expected = {i: first.features[first.index[i]].clone() for i in first.photo_ids}
    path = default_cache_path(dataset, LEGACY_SETTINGS)
    cut = path.with_name("cut.tmp")  # a file cut short by a crash: a new file, as a killed writer leaves it
    cut.write_bytes(path.read_bytes()[:5000])
    cut.replace(path)
    caplog.set_level("WARNING")
    again = table_for(dataset, LEGACY_SETTINGS, progress=False)
    assert "extracting the features again" in caplog.text
    assert sorted(again.photo_ids) == sorted(expected)
    assert all(torch.equal(again.features[again.index[i]], expected[i]) for i in expected)
