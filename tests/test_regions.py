import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from chan.backbone import pool_regions
from chan.data import open_dataset
from chan.detector_int8 import quantized_detector
from chan.photos import PhotoError, load_photo
from chan.region_settings import LEGACY_SETTINGS, RegionSettings, settings_from_key
from chan.regions import RegionExtractor, grid_boxes


def _photos_where(ds, words, n):
    """The first n test photos whose five captions all mention one of `words`."""
    by_photo = ds.captions_by_photo()
    hits = [p for p in ds.photos if by_photo[p.id] and all(any(w in c.lower().split() for w in words) for c in by_photo[p.id])]
    return hits[:n]


@pytest.fixture(scope="module")
def test_split(flickr8k):
    return open_dataset(flickr8k).split("test")


def test_regions_on_real_photos(extractor, test_split):
    photos = [load_photo(p.path) for p in test_split.photos[:6]]
    first = extractor(photos)
    again = extractor(photos)
    K = RegionSettings().num_regions
    for photo, r, r2 in zip(photos, first, again):
        W, H = photo.size
        assert r.boxes.shape == (K, 4) and r.features.shape == (K, RegionSettings().feature_dim)
        assert len(r.labels) == K and all(isinstance(name, str) and name for name in r.labels)
        assert np.all(r.boxes[:, 0] >= 0) and np.all(r.boxes[:, 1] >= 0)
        assert np.all(r.boxes[:, 2] <= W + 1e-3) and np.all(r.boxes[:, 3] <= H + 1e-3)
        assert np.all(r.boxes[:, 2] > r.boxes[:, 0]) and np.all(r.boxes[:, 3] > r.boxes[:, 1])
        assert np.isfinite(r.features).all() and r.stage_map.shape == (192, 10, 10)
        np.testing.assert_array_equal(r.features, r2.features)
        np.testing.assert_array_equal(r.boxes, r2.boxes)
        assert r.labels == r2.labels


def test_proposals_are_distinct_large_enough_and_many(extractor, test_split):
    s = RegionSettings()
    photos = [load_photo(p.path) for p in test_split.photos[:8]]
    counts = []
    for photo, r in zip(photos, extractor(photos)):
        W, H = photo.size
        det = torch.from_numpy(r.boxes[r.detected])
        counts.append(len(det))
        iou = box_iou(det, det) - torch.eye(len(det))
        assert float(iou.max()) <= s.detector_iou + 1e-5
        areas = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]) / (W * H)
        assert float(areas.min()) >= s.min_box_area - 1e-5
        assert r.detected[: len(det)].all(), "proposals come first, grid cells only fill what is left"
    assert np.median(counts) >= 24, counts


def test_onnx_runtime_gives_the_regions_of_eager_torch(extractor, test_split, caplog):
    """The default runtime (ONNX Runtime) against eager PyTorch: the same boxes and labels, features within float
    rounding; a second extractor reuses the exported networks instead of exporting them again."""
    assert extractor.runtime == "onnx"
    photos = [load_photo(p.path) for p in test_split.photos[:8]]
    reference = RegionExtractor(runtime="torch")(photos)
    for r, ref in zip(extractor(photos), reference):
        np.testing.assert_allclose(r.boxes, ref.boxes, atol=1e-2)
        assert r.labels == ref.labels
        np.testing.assert_allclose(r.features, ref.features, atol=1e-3)
        np.testing.assert_allclose(r.stage_map.astype(np.float32), ref.stage_map.astype(np.float32), atol=0.05, rtol=1e-2)
    caplog.set_level("INFO")
    RegionExtractor()(photos[:1])  # each detector size's session is made at its first use
    assert "exporting" not in caplog.text
    with pytest.raises(ValueError, match="unknown runtime"):
        RegionExtractor(runtime="tensorrt")


def test_legacy_regions_put_the_whole_photo_first(test_split):
    photos = [load_photo(p.path) for p in test_split.photos[:2]]
    for photo, r in zip(photos, RegionExtractor(LEGACY_SETTINGS)(photos)):
        W, H = photo.size
        assert np.allclose(r.boxes[0], [0, 0, W, H]) and not r.detected[0]
        assert r.detected.sum() <= 20 and r.stage_map is None
    with pytest.raises(ValueError, match="tail_start"):  # no trunk map kept: the frozen tail cannot be skipped
        RegionExtractor(LEGACY_SETTINGS)(photos, frozen_features=False)


def test_settings_keys_written_before_the_proposals_read_as_legacy():
    old = {"num_regions": 36, "backbone": "efficientnet-lite0", "image_size": 320, "roi_size": 2,
           "max_detections": 20, "detector_conf": 0.2, "detector_iou": 0.45}
    assert settings_from_key(json.dumps(old)) == LEGACY_SETTINGS
    assert settings_from_key(RegionSettings().key()) == RegionSettings()
    assert settings_from_key(LEGACY_SETTINGS.key()) == LEGACY_SETTINGS


def test_detector_size_from_the_photo_stays_within_the_range():
    fixed, photo = RegionSettings(), RegionSettings(detector_sizing="photo", detector_sizes=(224, 416))
    assert fixed.detector_passes(224, 224) == fixed.detector_passes(2000, 1500) == (288, 416)
    assert photo.detector_passes(224, 224) == (224,)
    assert photo.detector_passes(500, 375) == (352,)  # the short side, down to the detector's stride
    assert photo.detector_passes(100, 60) == (224,) and photo.detector_passes(3000, 2000) == (416,)
    assert photo.all_detector_sizes() == (224, 256, 288, 320, 352, 384, 416)
    with pytest.raises(ValueError, match="multiples of 32"):
        RegionSettings(detector_sizes=(300,))
    with pytest.raises(ValueError, match="'fixed' or 'photo'"):
        RegionSettings(detector_sizing="auto")


def test_keys_of_settings_made_before_detector_sizing_are_unchanged():
    """Caches and checkpoints keyed before the field existed keep their key; the new choice gets a key of its own."""
    assert "detector_sizing" not in RegionSettings().key()
    assert json.loads(RegionSettings().key()) == json.loads(RegionSettings(detector_sizing="fixed").key())
    photo = RegionSettings(detector_sizing="photo", detector_sizes=(224, 416))
    assert json.loads(photo.key())["detector_sizing"] == "photo" and settings_from_key(photo.key()) == photo


def test_an_int8_detector_is_keyed_apart_and_finds_most_of_the_float_boxes(test_split, tmp_path):
    """int8 regions get a cache key of their own (fp32 keys stay as they were); the detector is quantized from the
    shipped ranges alone, and on real photos it finds most boxes the float detector finds."""
    assert "detector_precision" not in RegionSettings().key()
    settings = RegionSettings(detector_sizing="photo", detector_sizes=(224, 416), detector_precision="int8")
    assert json.loads(settings.key())["detector_precision"] == "int8" and settings_from_key(settings.key()) == settings
    with pytest.raises(ValueError, match="one of fp32, int8"):
        RegionSettings(detector_precision="fp16")
    with pytest.raises(ValueError, match="ONNX Runtime"):
        RegionExtractor(settings, runtime="torch")
    photos = [load_photo(p.path) for p in test_split.photos[:8]]
    exact = RegionExtractor(RegionSettings(detector_sizing="photo", detector_sizes=(224, 416)))(photos)
    quantized = RegionExtractor(settings)(photos)
    found = total = 0
    for a, b in zip(exact, quantized):
        iou = box_iou(torch.from_numpy(a.boxes[a.detected]), torch.from_numpy(b.boxes[b.detected]))
        found, total = found + int((iou.max(1).values >= 0.7).sum()), total + len(iou)
    assert total > 50 and found / total > 0.5  # 75% of the default regions' boxes on 64 gallery photos
    with pytest.raises(FileNotFoundError, match="activation ranges are missing"):
        quantized_detector(tmp_path / "yolo.onnx", tmp_path / "missing.json")


def test_photos_of_other_sizes_in_one_batch_get_their_own_detector_pass(test_split):
    """With the detector size chosen per photo, a batch mixing sizes gives each photo the regions it gets alone."""
    extractor = RegionExtractor(RegionSettings(detector_sizing="photo", detector_sizes=(224, 416)))
    small = load_photo(test_split.photos[0].path)  # Flickr8k's photos here are 224 x 224
    big = small.resize((500, 375))
    together = extractor([big, small])
    for photo, r in zip([big, small], together):
        alone = extractor([photo])[0]
        np.testing.assert_allclose(r.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(r.features, alone.features, atol=1e-4)
    assert sorted(size for size, session in extractor.detector.sessions.items() if session is not None) == [224, 352]


def test_pool_regions_maps_photo_fractions_onto_the_map():
    # a 10x8 map whose value is the column index in channel 0 and the row index in channel 1
    fmap = torch.stack([torch.arange(10.0).expand(8, 10), torch.arange(8.0)[:, None].expand(8, 10)])[None]
    box = torch.tensor([[[0.2, 0.25, 0.6, 0.75]]])  # columns 2..6, rows 2..6 of the map, in map coordinates
    pooled = pool_regions(fmap, box)[0, 0]
    # aligned RoIAlign samples symmetrically inside the box; cell i is centred on i + 0.5, so the mean is centre - 0.5
    assert pooled.tolist() == pytest.approx([3.5, 3.5], abs=1e-5)
    wrong_scale = pool_regions(fmap, box * 0.5)[0, 0]
    assert abs(float(wrong_scale[0]) - 3.5) > 1


@pytest.mark.parametrize("words,label", [(("dog", "dogs"), "dog"), (("man", "men", "woman", "person", "people"), "person")])
def test_detector_finds_what_the_captions_name(extractor, test_split, words, label):
    photos = _photos_where(test_split, words, 12)
    regions = extractor([load_photo(p.path) for p in photos])
    found = [label in [name for name, d in zip(r.labels, r.detected) if d] for r in regions]
    assert sum(found) >= len(photos) // 2, found


def test_grid_fills_to_count():
    boxes = grid_boxes(100, 50, 30)
    assert len(boxes) == 30
    assert boxes[0] == (0.0, 0.0, 50.0, 25.0)


def _encode(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1), (10, 20, 30)),
        Image.new("L", (64, 48), 128),
        Image.new("RGBA", (64, 48), (255, 0, 0, 0)),
        Image.new("CMYK", (64, 48), (0, 255, 255, 0)),
        Image.fromarray(np.full((40, 30), 40000, dtype=np.uint16)),
        Image.new("P", (20, 20)),
    ],
    ids=["1x1", "grayscale", "rgba", "cmyk", "16bit", "palette"],
)
def test_odd_photos_are_handled(extractor, image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    photo = load_photo(_encode(image, fmt))
    assert photo.mode == "RGB" and photo.size == image.size
    r = extractor([photo])[0]
    assert np.isfinite(r.features).all() and len(r.labels) == RegionSettings().num_regions


def test_transparent_is_white_and_16bit_keeps_its_level():
    assert load_photo(_encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    level = load_photo(_encode(Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)))).getpixel((0, 0))
    assert 120 <= level[0] <= 135


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    assert load_photo(buf.getvalue()).size == (20, 60)


def test_corrupt_and_non_images_are_refused(tmp_path):
    with pytest.raises(PhotoError, match="not an image"):
        load_photo(b"hello, I am text")
    truncated = _encode(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")[:300]
    with pytest.raises(PhotoError, match="corrupt or truncated"):
        load_photo(truncated)
    with pytest.raises(PhotoError, match="no such file"):
        load_photo(tmp_path / "missing.jpg")


def test_decompression_bomb_is_refused(monkeypatch):
    data = _encode(Image.new("L", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 2 - 1)
    with pytest.raises(PhotoError, match="too large"):
        load_photo(data)


def test_region_names_say_what_and_where(test_split):
    photos = [load_photo(p.path) for p in test_split.photos[:2]]
    r = RegionExtractor(LEGACY_SETTINGS)(photos)[0]
    from chan.regions import region_names

    names = region_names(r)
    assert names[0] == "whole photo"
    n_det = int(r.detected.sum())
    assert all(re.match(r".+ \d+%", name) for name in names[1 : 1 + n_det])
    assert len(set(names)) == len(names)  # a viewer tells every region apart
    assert names[1 + n_det : 1 + n_det + 4] == ["2x2 grid, top left", "2x2 grid, top right", "2x2 grid, bottom left",
                                               "2x2 grid, bottom right"]
