"""The demo's handlers and figures, and every api_name through gradio_client."""
import io
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from app import figures
from app.handlers import Handlers
from chan.checkpoint import DEFAULT_CHECKPOINT
from chan.device import bf16_pays
from chan.encoding import encode_table
from tests.conftest import plot_traces


@pytest.fixture(scope="module")
def handlers(gallery, tmp_path_factory):
    # test files stand in for uploads: they live under pytest's temporary folder
    return Handlers(gallery, upload_folder=tmp_path_factory.getbasetemp())


def _file(tmp_path, name, image, fmt="PNG"):
    path = tmp_path / name
    image.save(path, fmt)
    return str(path)


def test_batched_searches_answer_each_query_as_alone(handlers):
    queries = ["a dog runs on the grass", "   ", "two children play on the beach", "a man rides a bike", "?!"]
    items, ids, status = handlers.search_batch(queries, [5, 5, float("nan"), 3, 4])
    for i, k in ((0, 5), (3, 3)):
        alone = handlers.search_images(queries[i], k)
        assert ids[i] == alone.photo_ids and [label for _, label in items[i]] == [label for _, label in alone.items]
    assert ids[1] is None and "Type a caption" in status[1]
    assert ids[2] is None and "whole number" in status[2]
    assert ids[4] is None and "reads no words" in status[4]


def test_search_returns_ranked_photos(handlers, gallery):
    items, ids, status = handlers.search_images("a dog runs on the grass", 5)
    assert len(items) == 5 and len(ids) == 5
    scores = [float(label.split(" · ")[1].removesuffix(" (CHAN)")) for _, label in items]
    assert scores == sorted(scores, reverse=True)
    assert items[0][1].startswith("#1 ·") and "ms" in status
    assert all(i in gallery.photo_index for i in ids)


def test_search_finds_a_photo_by_its_own_caption(gallery):
    hits = [gallery.search_images(c.text, 10)[0] for c in gallery.dataset.captions[:50:5]]
    found = sum(c.photo_id in [h.photo_id for h in hit] for c, hit in zip(gallery.dataset.captions[:50:5], hits))
    assert found >= 5  # R@10 of at least 50% on a 100-photo gallery; chance is 10%


def test_search_scores_from_the_served_gallery_match_fp32(gallery):
    # bfloat16 where the CPU computes it natively, float32 where it is emulated
    assert gallery.region_embeddings.dtype == (torch.bfloat16 if bf16_pays(gallery.device) else torch.float32)
    hits, _, _ = gallery.search_images("a dog runs on the grass", 5)
    with torch.no_grad():
        emb, mask, _ = gallery.model.encode_texts(["a dog runs on the grass"])
        fp32 = encode_table(gallery.model, gallery.table, [p.id for p in gallery.photos]).embeddings
        exact = gallery.model.scores(fp32, gallery.region_mask, emb, mask)[:, 0]
    for hit in hits:
        assert hit.score == pytest.approx(float(exact[gallery.photo_index[hit.photo_id]]), abs=0.01)
    assert hits[0].score >= float(exact.max()) - 0.01


@pytest.mark.parametrize("query,message", [("", "Type a caption"), ("   \n ", "Type a caption"),
                                           ("x" * 3000, "characters long")])
def test_bad_queries_get_a_message(handlers, query, message):
    items, ids, status = handlers.search_images(query)
    assert items is None and message in status


@pytest.mark.parametrize("query", [" ".join(["dog"] * 500), "🐶🐕 dans la neige", "狗在雪地里奔跑", "qzxv blorptang"])
def test_odd_queries_still_search(handlers, query):
    items, _, status = handlers.search_images(query, 3)
    assert len(items) == 3 and "⚠️ Something went wrong" not in status


def test_long_and_unknown_queries_are_flagged(handlers):
    assert "first 64 tokens" in handlers.search_images(" ".join(["dog"] * 500))[2]
    assert "vocabulary" in handlers.search_images("🐶🐕")[2] or "unknown" in handlers.search_images("🐶🐕")[2]


def test_rank_captions_for_a_gallery_photo_puts_its_own_captions_high(handlers, gallery):
    photo = gallery.photos[0]
    rows, drawn, status = handlers.rank_captions(None, "a completely unrelated spreadsheet\n", photo.id)
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert any(r[3] == "your caption" for r in rows)
    assert sum(r[2].startswith("★") for r in rows[:10]) >= 1
    assert isinstance(drawn, Image.Image) and "detected regions" in status


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "RGB"])
def test_rank_captions_for_uploads_of_any_mode(handlers, tmp_path, gallery, mode):
    source = Image.open(gallery.photos[1].path).convert(mode)
    path = _file(tmp_path, f"u.{'jpg' if mode == 'CMYK' else 'png'}", source, "JPEG" if mode == "CMYK" else "PNG")
    rows, drawn, status = handlers.rank_captions(path, "", "")
    assert len(rows) == 20 and drawn is not None


def test_bad_uploads_get_a_message(handlers, tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("I am not a picture")
    assert "not an image" in handlers.rank_captions(str(text), "", "")[2]
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:400])
    assert "corrupt" in handlers.rank_captions(str(tmp_path / "cut.jpg"), "", "")[2]
    assert "Upload a photo" in handlers.rank_captions(None, "", "")[2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = _file(tmp_path, "big.png", Image.new("RGB", (100, 100)))
    assert "too large" in handlers.rank_captions(big, "", "")[2]


@pytest.mark.parametrize("weight", [0.0, 0.1])
def test_the_inspector_shows_a_global_term_where_the_model_has_one(handlers, gallery, weight, monkeypatch):
    monkeypatch.setattr(gallery.model.config, "global_weight", weight)
    r = handlers.align(None, "a dog on the grass", gallery.photos[2].id)
    a, bars = r.state.pair.alignment, plot_traces(r.contributions)[0]
    assert len(bars.y) == len(r.words) + (1 if weight else 0) and (a.global_term != 0) == bool(weight)
    assert np.isclose(sum(bars.x), a.score, atol=1e-4)  # the words' shares and the term make the score
    assert ("global term" in r.status) == bool(weight) and ("words' part of the score" in r.status) == bool(weight)


def test_align_figures_mark_the_chosen_regions(handlers, gallery):
    photo = gallery.photos[2]
    hard, soft, bars, drawn, words, state, status = handlers.align(None, "a dog on the grass", photo.id)
    a = state.pair.alignment
    L, K = a.cosine.shape
    assert len(words) == L and K == len(gallery.table.regions(photo.id).labels)
    grey, kept, rings = plot_traces(hard)
    assert np.asarray(grey.z).shape == (L, K)
    kept_z = np.asarray(kept.z, dtype=float)
    assert (~np.isnan(kept_z)).sum() == L  # one kept cell per word, all others eliminated
    assert list(np.nanargmax(kept_z, 1)) == list(a.chosen)
    assert list(rings.x) == [f"r{k} {state.pair.region_labels[k]}" for k in a.chosen]
    assert np.allclose(np.asarray(plot_traces(soft)[0].z).sum(1), 1.0, atol=1e-4)
    assert np.isclose(sum(plot_traces(bars)[0].x), a.score, atol=1e-4)
    assert drawn.size[0] > 0 and "eliminated" in status
    one = Handlers.draw_alignment(state, words[1])
    assert one.size == drawn.size


def test_align_of_an_uploaded_photo(handlers, tmp_path, gallery):
    path = _file(tmp_path, "g.png", Image.open(gallery.photos[3].path).convert("L"))
    out = handlers.align(path, "people in a park", "")
    assert out[0] is not None and out[3] is not None


def test_draw_boxes_colours_regions():
    photo = Image.new("RGB", (100, 80), "white")
    drawn = figures.draw_boxes(photo, np.array([[10, 10, 50, 50]]), ["dog"], ["#ff0000"])
    assert drawn.size == (320, 256)  # small photos are scaled up to 320 px
    assert drawn.getpixel((33, 100)) == (255, 0, 0)  # the left edge of the box, scaled x3.2


def test_api_endpoints_through_gradio_client(gallery, tmp_path):
    from gradio_client import Client, handle_file

    from app.ui import build_demo, launch

    demo = build_demo(gallery)
    launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        gallery_out, status = client.predict("a man on a bike", 4, api_name="/search_images")
        assert len(gallery_out) == 4 and "ms" in status
        photo = _file(tmp_path, "p.jpg", Image.open(gallery.photos[0].path), "JPEG")
        rows, drawn, status = client.predict(handle_file(photo), "my own caption", "", api_name="/rank_captions")
        assert len(rows["data"]) == 21 and "ranked" in status
        *_, words, status = client.predict(handle_file(photo), "a dog", "", api_name="/align")
        assert "Hard-alignment score (CHAN)" in status and words == ["0:a", "1:dog"]  # content words only
        empty = client.predict("   ", 4, api_name="/search_images")
        assert "Type a caption" in empty[-1]
        not_an_image = tmp_path / "notes.png"
        not_an_image.write_text("plain text")
        assert "not an image" in client.predict(handle_file(str(not_an_image)), "", "", api_name="/rank_captions")[-1]
        assert "not an image" in client.predict(handle_file(str(not_an_image)), "a dog", "", api_name="/align")[-1]
    finally:
        demo.close()


def test_a_plain_image_folder_is_a_gallery(tmp_path, gallery):
    from chan.gallery import open_gallery

    for p in gallery.photos[:4]:
        Image.open(p.path).save(tmp_path / p.id)
    folder_gallery = open_gallery(tmp_path, DEFAULT_CHECKPOINT, progress=False)
    h = Handlers(folder_gallery)
    items, _, status = h.search_images("a dog", 3)
    assert len(items) == 3
    rows, _, _ = h.rank_captions(None, "a dog\na street", folder_gallery.photos[0].id)
    assert [r[3] for r in rows] == ["your caption", "your caption"]


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a POSIX feature")
def test_photo_work_runs_in_one_thread_at_a_lower_cpu_priority(handlers, gallery):
    from app.priority import PHOTO_WORK_NICENESS, in_photo_lane

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    where = in_photo_lane(lambda: (threading.current_thread().name, niceness()))
    name, nice = where()
    assert name.startswith("photo-work") and nice == min(19, niceness() + PHOTO_WORK_NICENESS)
    assert where()[0] == name  # always the same thread

    @in_photo_lane
    def fails():
        raise ValueError("raised in the lane")

    with pytest.raises(ValueError, match="raised in the lane"):
        fails()  # the caller gets the exception, and a handler turns it into its message
    assert in_photo_lane(where)()[0] == name  # photo work calling photo work runs at once (no deadlock)
    assert handlers.align(None, "a dog", gallery.photos[0].id).hard is not None
