import io

import numpy as np
import pytest
from PIL import Image

from chan.data import open_dataset
from chan.photos import PhotoError, load_photo
from chan.regions import RegionSettings, grid_boxes


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
        assert len(r.labels) == K and all(isinstance(l, str) and l for l in r.labels)
        assert np.all(r.boxes[:, 0] >= 0) and np.all(r.boxes[:, 1] >= 0)
        assert np.all(r.boxes[:, 2] <= W + 1e-3) and np.all(r.boxes[:, 3] <= H + 1e-3)
        assert np.all(r.boxes[:, 2] > r.boxes[:, 0]) and np.all(r.boxes[:, 3] > r.boxes[:, 1])
        assert np.allclose(r.boxes[0], [0, 0, W, H])
        assert np.isfinite(r.features).all()
        np.testing.assert_array_equal(r.features, r2.features)
        np.testing.assert_array_equal(r.boxes, r2.boxes)
        assert r.labels == r2.labels


@pytest.mark.parametrize("words,label", [(("dog", "dogs"), "dog"), (("man", "men", "woman", "person", "people"), "person")])
def test_detector_finds_what_the_captions_name(extractor, test_split, words, label):
    photos = _photos_where(test_split, words, 12)
    regions = extractor([load_photo(p.path) for p in photos])
    found = [label in [l for l, d in zip(r.labels, r.detected) if d] for r in regions]
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
