"""Publication figures: one per photo source and format, each file readable, with the words and regions of align()."""
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from chan.__main__ import main
from chan.checkpoint import DEFAULT_CHECKPOINT
from chan.figure import alignment_figure, save_figure
from chan.photos import load_photo

CAPTION = "a brown dog runs on the green grass"


def _axes(fig, label):
    return next(ax for ax in fig.axes if ax.get_label() == label)


@pytest.mark.parametrize("source", ["gallery photo", "uploaded photo"])
@pytest.mark.parametrize("suffix", [".pdf", ".svg", ".png"])
def test_a_figure_in_each_format_holds_the_words_and_regions_of_align(gallery, tmp_path, source, suffix):
    path = gallery.photos[3].path
    if source == "gallery photo":
        regions = gallery.photo_regions(photo_id=gallery.photos[3].id)
    else:
        path = tmp_path / "upload.jpg"
        Image.open(gallery.photos[3].path).rotate(90, expand=True).save(path)  # another photo, extracted now
        regions = gallery.photo_regions(path)
    pair = gallery.align(regions, CAPTION)
    fig = alignment_figure(pair, load_photo(path), CAPTION)
    rows = [name.split(":", 1)[1] for name in pair.row_names]
    for label in ("hard", "soft"):
        ax = _axes(fig, label)
        assert [t.get_text() for t in ax.get_yticklabels()] == rows
        assert [t.get_text() for t in ax.get_xticklabels()] == pair.column_names
    # the photo panel boxes each word's chosen region in the word's colour
    boxes = [p for p in _axes(fig, "photo").patches]
    assert len(boxes) == len(pair.words)
    out = tmp_path / f"fig{suffix}"
    save_figure(fig, out)
    data = out.read_bytes()
    if suffix == ".png":
        assert Image.open(out).size[0] > 1000
    elif suffix == ".pdf":
        assert data.startswith(b"%PDF") and b"%%EOF" in data[-1024:]
    else:
        texts = {el.text for el in ET.parse(out).iter() if el.tag.endswith("text") and el.text}
        assert set(rows) <= texts  # text stays text, so the words are in the file


def test_the_command_draws_a_gallery_photo_with_its_top_photos(gallery, tmp_path, capsys):
    out = tmp_path / "top.png"
    code = main(["figure", "--caption", CAPTION, "--gallery", str(gallery.dataset.root), "--photo-id", gallery.photos[0].id,
                 "--top", "3", "--out", str(out), "--checkpoint", str(DEFAULT_CHECKPOINT)])
    assert code == 0 and Image.open(out).size[1] > 1000 and "wrote" in capsys.readouterr().out


def test_the_command_refuses_bad_requests(gallery, tmp_path, capsys):
    root = str(gallery.dataset.root)
    assert main(["figure", "--caption", CAPTION, "--photo-id", "x.jpg", "--out", str(tmp_path / "f.png")]) == 2
    assert main(["figure", "--caption", CAPTION, "--gallery", root, "--photo-id", "nope.jpg",
                 "--out", str(tmp_path / "f.png")]) == 2
    assert main(["figure", "--caption", CAPTION, "--photo", str(gallery.photos[0].path), "--out", str(tmp_path / "f.gif")]) == 2
    err = capsys.readouterr().err
    assert "--gallery" in err and "no photo 'nope.jpg'" in err and ".pdf, .svg, .png" in err
