"""A gallery indexed in the background answers on the photos it has, says so, skips unreadable photos,
and ends equal to a gallery built at once; a second model can be compared side by side."""
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from app.handlers import Handlers, rank_change
from chan.checkpoint import DEFAULT_CHECKPOINT, DEFAULT_COMPARISON, read_metadata
from chan.data import open_dataset
from chan.gallery import INDEX_CHUNK, Comparison, Gallery, QueryError, index_in_background
from chan.photos import PhotoError
from tests.conftest import make_flickr_subset

QUERY = "a dog runs on the grass"


def test_search_runs_on_the_photos_indexed_so_far_and_ends_equal_to_a_full_build(gallery, tmp_path):
    g = Gallery(DEFAULT_CHECKPOINT, gallery.dataset, progress=False, index_now=False)
    g.cache_path = tmp_path / "index.safetensors"  # not the fixture's cached index: build it again
    with pytest.raises(QueryError, match="No photo is indexed yet"):
        g.search_images(QUERY)
    first_chunk, resume = threading.Event(), threading.Event()
    add = g._add

    def add_then_pause(*args):
        add(*args)
        if not first_chunk.is_set():
            first_chunk.set()
            resume.wait(60)

    g._add = add_then_pause
    thread = index_in_background(g)
    assert first_chunk.wait(120)
    hits, notes, _ = g.search_images(QUERY, 5)
    indexed = {p.id for p in g.photos}
    assert len(indexed) == INDEX_CHUNK < len(gallery.photos)
    assert {h.photo_id for h in hits} <= indexed
    assert f"the {INDEX_CHUNK} photos indexed so far, of {len(gallery.photos)}" in notes[-1]
    assert f"{INDEX_CHUNK} of {len(gallery.photos)} photos" in g.progress.describe()
    resume.set()
    thread.join(120)
    assert g.progress.finished and g.cache_path.is_file()
    hits, notes, _ = g.search_images(QUERY, 10)
    expected, _, _ = gallery.search_images(QUERY, 10)
    assert not any("indexed so far" in n for n in notes)
    assert [h.photo_id for h in hits] == [h.photo_id for h in expected]
    assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-3)


def test_unreadable_photos_are_skipped_and_counted(tmp_path, flickr8k):
    root = make_flickr_subset(tmp_path / "f", flickr8k, 0, 0, 4)
    broken = sorted((root / "Flicker8k_Dataset").iterdir())[1]
    broken.unlink()
    broken.write_bytes(b"not a jpeg at all")
    g = Gallery(DEFAULT_CHECKPOINT, open_dataset(root).split("test"), progress=False)
    assert g.progress.finished and g.progress.skipped == 1 and len(g.photos) == 3
    assert "1 unreadable photos skipped" in g.progress.describe()
    assert len(g.search_images(QUERY, 10)[0]) == 3
    with pytest.raises(PhotoError, match="not an image"):  # the handlers show it as a message
        g.photo_regions(photo_id=broken.name)


def test_rank_change_marks():
    assert rank_change(1, 1, "CHAN", 12) == "= CHAN"
    assert rank_change(2, 5, "CHAN", 12) == "▲3 (CHAN #5)"
    assert rank_change(6, 1, "CHAN", 12) == "▼5 (CHAN #1)"
    assert rank_change(3, None, "CHAN", 12) == "not in CHAN's top 12"


def test_the_default_comparison_is_the_default_checkpoints_scan_twin():
    """Trained the same way but for the similarity, on the same region settings: one extraction serves both. Each
    scores with the global term's weight chosen on dev by the same sweep, from the same trained weight."""
    main, twin = read_metadata(DEFAULT_CHECKPOINT), read_metadata(DEFAULT_COMPARISON)
    assert twin["regions"] == main["regions"]
    differing = {k for k in main["config"].keys() | twin["config"].keys() if main["config"].get(k) != twin["config"].get(k)}
    assert differing <= {"similarity", "global_weight"} and twin["config"]["similarity"] == "soft"
    own = ("similarity", "out", "init")  # a continued run starts from its own model's earlier epochs
    trained = {k: v for k, v in main["info"]["train"].items() if k not in own}
    assert trained == {k: v for k, v in twin["info"]["train"].items() if k not in own}
    main_init, twin_init = (Path(meta["info"]["train"]["init"]).name for meta in (main, twin))
    assert twin_init == main_init.replace("chan-", "scan-", 1), (main_init, twin_init)
    for meta in (main, twin):
        choice = meta["info"]["global_weight_choice"]
        assert choice["trained_with"] == float(trained["global_weight"]) and choice["chosen_on"] == "dev"
        assert meta["config"]["global_weight"] == choice["chosen"]
        assert choice["rsum_by_weight"].keys() == main["info"]["global_weight_choice"]["rsum_by_weight"].keys()


def test_a_second_model_is_compared_side_by_side(gallery):
    scan = Gallery(DEFAULT_COMPARISON, gallery.dataset, progress=False)
    assert scan.model_name == "SCAN" and gallery.model_name == "CHAN"
    h = Handlers(gallery, comparisons=[Comparison.loaded(scan)])
    main_items, main_ids, _ = h.search_images(QUERY, 8)
    items, status = h.compare_images(QUERY, 8, scan.label)
    assert len(items) == 8 and "SCAN" in status and "soft attention" in status
    scan_ids = [hit.photo_id for hit in scan.search_images(QUERY, 8)[0]]
    for rank, ((_, label), pid) in enumerate(zip(items, scan_ids), 1):
        main_rank = main_ids.index(pid) + 1 if pid in main_ids else None
        assert label.startswith(f"#{rank} {rank_change(rank, main_rank, 'CHAN', 8)} · ") and label.endswith(" (SCAN)")
    assert all(" (CHAN) · " in label for _, label in main_items)
    assert h.compare_images(QUERY, 8, "none") == ([], "")
    assert "Choose a model to compare with" in h.compare_images(QUERY, 8, "../etc/passwd")[-1]
    pending = Comparison.of(DEFAULT_COMPARISON)  # named from its metadata, not loaded yet (the main index comes first)
    assert pending.label == scan.label and pending.gallery is None
    waiting = Handlers(gallery, comparisons=[pending])
    assert "loaded after the main model's gallery is indexed" in waiting.compare_images(QUERY, 8, pending.label)[-1]


def test_an_uploaded_photo_is_extracted_once_per_content(gallery, tmp_path, monkeypatch):
    from chan import gallery as gallery_module

    source = gallery.photo_path(gallery.photos[0].id)
    first, copy, other, third = (tmp_path / f"{name}.jpg" for name in "abcd")
    first.write_bytes(source.read_bytes())
    copy.write_bytes(source.read_bytes())  # the same photo uploaded again under another name
    other.write_bytes(gallery.photo_path(gallery.photos[1].id).read_bytes())
    third.write_bytes(gallery.photo_path(gallery.photos[2].id).read_bytes())
    calls = []
    extractor = gallery.extractor
    monkeypatch.setattr(type(gallery), "extractor",
                        property(lambda self: lambda images, **kw: calls.append(kw) or extractor(images, **kw)))
    a = gallery.photo_regions(first)
    assert gallery.photo_regions(copy) is a and len(calls) == 1
    assert calls[0] == {"frozen_features": False}  # the default model tunes the tail: the frozen one is skipped
    assert gallery.photo_regions(other) is not a and len(calls) == 2
    monkeypatch.setattr(gallery_module, "UPLOADS_REMEMBERED", 1)  # the oldest upload is forgotten past the bound
    gallery.photo_regions(third)
    assert len(calls) == 3 and len(gallery._uploads) == 1
    gallery.photo_regions(first)
    assert len(calls) == 4
    with pytest.raises(PhotoError, match="no such file"):
        gallery.photo_regions(tmp_path / "missing.jpg")


def test_an_upload_without_the_frozen_tail_is_embedded_as_with_it(gallery):
    """A model that tunes the tail recomputes region features from the trunk map: skipping the extractor's frozen
    tail (as uploads do) changes no embedding, only leaves the stored backbone channels and grid labels empty."""
    import numpy as np
    import torch

    from chan.backbone import BACKBONE_CHANNELS
    from chan.pair import region_embeddings
    from chan.photos import load_photo

    photo = load_photo(gallery.photo_path(gallery.photos[3].id))
    full = gallery.extractor([photo])[0]
    light = gallery.extractor([photo], frozen_features=False)[0]
    assert full.features[:, :BACKBONE_CHANNELS].any() and not light.features[:, :BACKBONE_CHANNELS].any()
    np.testing.assert_array_equal(light.features[:, BACKBONE_CHANNELS:], full.features[:, BACKBONE_CHANNELS:])
    np.testing.assert_array_equal(light.stage_map, full.stage_map)
    np.testing.assert_array_equal(light.boxes, full.boxes)
    assert [x for x, d in zip(light.labels, light.detected) if d] == [x for x, d in zip(full.labels, full.detected) if d]
    assert all(x == "" for x, d in zip(light.labels, light.detected) if not d)
    with torch.no_grad():
        assert torch.allclose(region_embeddings(gallery.model, light), region_embeddings(gallery.model, full), atol=1e-6)


@pytest.mark.parametrize("similarity,global_weight", [("hard", 0.0), ("soft", 0.0), ("global", 0.0), ("hard", 0.3)])
def test_captions_scored_from_packed_words_match_the_padded_scorer(gallery, similarity, global_weight, monkeypatch):
    import torch

    from chan.pair import region_embeddings

    index = gallery.index
    if similarity != "hard":  # a gallery keeps bfloat16 (where bf16 is native) only for the hard scorer
        index = replace(index, region_embeddings=index.region_embeddings.float(), caption_words=index.caption_words.float())
    monkeypatch.setattr(gallery.model.config, "similarity", similarity)
    monkeypatch.setattr(gallery.model.config, "global_weight", global_weight)  # a model trained with a global term
    image = region_embeddings(gallery.model, gallery.photo_regions(photo_id=gallery.photos[2].id))[None]
    words, mask = index.padded_captions(torch.arange(len(index.caption_texts)))
    assert int(mask.sum()) == len(index.caption_words) and words.shape[1] == int(index.caption_lengths.max())
    with torch.no_grad():
        expected = gallery.model.scores(image, torch.ones(image.shape[:2], dtype=torch.bool), words, mask)[0].float()
        got = index.caption_scores(gallery.model, image, chunk=7)  # chunks of mixed lengths
    # where bf16 is native the index is bfloat16, and the packed product rounds the photo's regions to it too
    assert torch.allclose(got, expected, atol=1e-4 if index.caption_words.dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("global_weight", [0.0, 0.3])
def test_photo_scores_match_the_models_scores(gallery, global_weight, monkeypatch):
    """A search scores the index as model.scores does, the global term from the photos' mean regions kept once."""
    import torch

    monkeypatch.setattr(gallery.model.config, "global_weight", global_weight)
    index = gallery.index
    with torch.no_grad():
        emb, mask, _ = gallery.model.encode_texts(["a dog runs through the grass", "two children play on a beach"])
        expected = gallery.model.scores(index.region_embeddings, index.region_mask, emb, mask).float()
        got = index.photo_scores(gallery.model, emb, mask)
    assert got.shape == (len(index.photos), 2)
    assert torch.allclose(got, expected, atol=1e-4 if index.region_embeddings.dtype == torch.float32 else 2e-2)


def test_a_gallery_with_another_detector_precision_keeps_an_index_of_its_own(gallery):
    """The int8 detector's regions are other regions: another region cache and another index; fp32 asked of an
    fp32 checkpoint is the checkpoint's own and keeps its index."""
    own = Gallery(DEFAULT_CHECKPOINT, gallery.dataset, progress=False, index_now=False)
    same = Gallery(DEFAULT_CHECKPOINT, gallery.dataset, progress=False, index_now=False, detector_precision="fp32")
    int8 = Gallery(DEFAULT_CHECKPOINT, gallery.dataset, progress=False, index_now=False, detector_precision="int8")
    assert same.cache_path == own.cache_path != int8.cache_path
    assert int8.settings == replace(own.settings, detector_precision="int8") and int8.other_regions
    assert "regions by the int8 detector (trained on fp32)" in int8.describe() and "detector" not in own.describe()
