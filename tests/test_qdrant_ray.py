"""Past one machine: the gallery in Qdrant (local mode) against the in-process index, and extraction on Ray."""
from __future__ import annotations

import json

import pytest
import torch

from chan.__main__ import main
from chan.checkpoint import DEFAULT_CHECKPOINT
from chan.data import open_dataset
from chan.gallery import Gallery
from chan.pair import encode_query
from chan.qdrant_index import QdrantGallery, QdrantIndexError, connect
from chan.search import index_command
from chan.store import file_digest

OTHER_CHAN = DEFAULT_CHECKPOINT.parents[1] / "runs" / "chan-proposals-tuned.safetensors"


@pytest.fixture(scope="module")
def photos200(small_flickr):
    """The default checkpoint over the 200 train photos of `small_flickr`, indexed in process."""
    return Gallery(DEFAULT_CHECKPOINT, open_dataset(small_flickr).split("train"), progress=False)


@pytest.fixture(scope="module")
def pushed(photos200, small_flickr, tmp_path_factory) -> str:
    """Those photos pushed into a local-mode Qdrant folder, collection 't'."""
    target = str(tmp_path_factory.mktemp("qdrant"))
    summary = index_command(small_flickr, DEFAULT_CHECKPOINT, target, "t", split="train")
    assert summary["pushed"] == summary["points"] == 200
    return target


def _queries(gallery: Gallery, n: int) -> list[str]:
    return [c.text for c in gallery.dataset.captions[::41][:n]]


def _torch_top(gallery: Gallery, text: str, k: int) -> list[tuple[str, float]]:
    """The in-process index's ranking, scored in float32 (the served index may hold bfloat16)."""
    emb, mask, _ = encode_query(gallery.model, text)
    index = gallery.index
    scores = gallery.model.scores(index.region_embeddings.float(), index.region_mask, emb, mask)[:, 0]
    top = scores.topk(k)
    return [(index.photos[i].id, float(s)) for s, i in zip(top.values, top.indices)]


def _qdrant_top(gallery: Gallery, remote: QdrantGallery, text: str, k: int, prefetch=None) -> list[tuple[str, float]]:
    emb, mask, _ = encode_query(gallery.model, text)
    return remote.search(emb[0][mask[0]], k, prefetch, gallery.model.config.global_weight)


@pytest.mark.parametrize("global_weight", [0.0, 0.1, 2.0])
def test_qdrant_gives_the_torch_top10_and_scores(photos200, pushed, global_weight, monkeypatch):
    """MaxSim alone, and with a model's global term (a large weight too: its top 10 then leans on the global vectors)."""
    monkeypatch.setattr(photos200.model.config, "global_weight", global_weight)
    with QdrantGallery.open(pushed, "t", file_digest(DEFAULT_CHECKPOINT)) as remote:
        for text in _queries(photos200, 8):
            every = _torch_top(photos200, text, len(photos200.index.photos))
            expected, got, torch_score = every[:10], _qdrant_top(photos200, remote, text, 10), dict(every)
            # the photo at each rank is torch's, or one that ties with it within the two indexes' rounding
            assert len(got) == len(expected) and len({p for p, _ in got}) == len(got), text
            assert all(abs(torch_score[p] - s) < 1e-3 for (p, _), (_, s) in zip(got, expected)), text
            assert max(abs(a - b) for (_, a), (_, b) in zip(got, expected)) < 1e-3


def test_two_stage_recall_against_exact(photos200, pushed, capsys):
    with QdrantGallery.open(pushed, "t", file_digest(DEFAULT_CHECKPOINT)) as remote:
        recall = {}
        for prefetch in (20, 50, 200):
            found = 0
            for text in _queries(photos200, 20):
                exact = {p for p, _ in _qdrant_top(photos200, remote, text, 10)}
                found += len(exact & {p for p, _ in _qdrant_top(photos200, remote, text, 10, prefetch)})
            recall[prefetch] = found / 200
    with capsys.disabled():
        print(f"\ntwo-stage recall@10 against exact MaxSim, 200 photos, 20 captions: {recall}")
    assert recall[200] == 1.0  # prefetching every photo is the exact search
    assert 0.0 < recall[20] <= recall[50] <= 1.0


def test_push_again_resumes_and_adds_nothing(small_flickr, pushed):
    summary = index_command(small_flickr, DEFAULT_CHECKPOINT, pushed, "t", split="train")
    assert (summary["pushed"], summary["already_there"], summary["points"]) == (0, 200, 200)


def test_search_command_gives_the_same_json_from_both_backends(small_flickr, pushed, tmp_path):
    text = "a dog runs through the grass"
    args = ["search", text, "--gallery", str(small_flickr), "--split", "train", "--k", "5"]
    assert main([*args, "--json", str(tmp_path / "torch.json")]) == 0
    assert main([*args, "--qdrant", pushed, "--collection", "t", "--json", str(tmp_path / "qdrant.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("torch.json", "qdrant.json"))
    assert (a["backend"], b["backend"]) == ("torch", "qdrant")
    assert [h["photo_id"] for h in a["hits"]] == [h["photo_id"] for h in b["hits"]]
    assert [h["rank"] for h in b["hits"]] == [1, 2, 3, 4, 5] and set(b["hits"][0]) == {"rank", "photo_id", "score"}


def test_app_gallery_searches_on_qdrant(photos200, pushed):
    g = Gallery(DEFAULT_CHECKPOINT, photos200.dataset, progress=False, index_now=False)  # nothing indexed in process
    g.use_qdrant(pushed, "t")
    try:
        hits, _, _ = g.search_images("two children play on the beach", 5)
    finally:
        g.remote.close()
    assert [h.photo_id for h in hits] == [p for p, _ in _torch_top(photos200, "two children play on the beach", 5)]
    assert all(h.path for h in hits)
    assert g.search_scope() == "200 photos (Qdrant collection 't')"


def test_unreachable_server_is_named(capsys):
    with pytest.raises(QdrantIndexError, match=r"http://127\.0\.0\.1:9"):
        connect("http://127.0.0.1:9")
    assert main(["search", "a dog", "--qdrant", "http://127.0.0.1:9"]) == 2
    assert "cannot reach a Qdrant server at http://127.0.0.1:9" in capsys.readouterr().err


def test_another_checkpoint_is_refused(small_flickr, pushed):
    with pytest.raises(QdrantIndexError, match="another checkpoint"):
        QdrantGallery.open(pushed, "t", file_digest(OTHER_CHAN))
    with pytest.raises(QdrantIndexError, match="another checkpoint"):
        index_command(small_flickr, OTHER_CHAN, pushed, "t", split="train")
    with pytest.raises(QdrantIndexError, match="no collection 'missing'"):
        QdrantGallery.open(pushed, "missing", file_digest(DEFAULT_CHECKPOINT))


def test_scan_is_refused(small_flickr, tmp_path):
    from chan.checkpoint import DEFAULT_COMPARISON

    with pytest.raises(QdrantIndexError, match="hard alignment with mean pooling"):
        index_command(small_flickr, DEFAULT_COMPARISON, str(tmp_path / "q"), "t", split="train")


def test_ray_features_equal_in_process_features(small_flickr, tmp_path):
    from dataclasses import replace

    from chan.checkpoint import read_metadata
    from chan.features import extract
    from chan.region_settings import settings_from_key

    settings = settings_from_key(read_metadata(DEFAULT_CHECKPOINT)["regions"])
    dataset = open_dataset(small_flickr).split("dev")
    dataset = replace(dataset, photos=dataset.photos[:20])
    on_ray = extract(dataset, tmp_path / "ray.safetensors", settings, shard_size=10, progress=False, ray="local")
    here = extract(dataset, tmp_path / "here.safetensors", settings, shard_size=10, progress=False)
    assert sorted(on_ray.photo_ids) == sorted(here.photo_ids) and len(here.photo_ids) == 20
    a, b = on_ray.rows(here.photo_ids), here.rows(here.photo_ids)
    torch.testing.assert_close(on_ray.features[a].float(), here.features[b].float(), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(on_ray.maps[a].float(), here.maps[b].float(), atol=2e-3, rtol=1e-2)
    assert on_ray.photo_stats == here.photo_stats
