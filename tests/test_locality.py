import json

import torch

from chan.__main__ import main
from chan.data import open_dataset
from chan.encoding import encode_table
from chan.evaluate import protocol_pairs
from chan.features import table_for
from chan.locality import alignment_locality, word_kind
from chan.model import CHAN, ModelConfig
from chan.region_settings import LEGACY_SETTINGS, RegionSettings
from chan.similarity import align


def test_word_kinds():
    assert word_kind("[CLS]") is None and word_kind(".") is None and word_kind("<end>") is None
    assert word_kind("the") == "stopword" and word_kind("dog") == "content" and word_kind("##s") == "content"


def _naive(model, dataset, table, settings):
    """Shares by a per-caption loop over `align`, the inspector's own function."""
    ids, texts, owner = protocol_pairs(dataset)
    images = encode_table(model, table, ids).embeddings
    rows = table.rows(ids)
    counts = {"whole_photo": 0, "detection": 0, "grid": 0}
    for text, o in zip(texts, owner.tolist()):
        with torch.no_grad():
            emb, mask, words = model.encode_texts([text])
        chosen = align(images[o], emb[0][mask[0]]).chosen
        for word, k in zip(words[0], chosen.tolist()):
            if word_kind(word) == "content":
                kind = "whole_photo" if settings.whole_photo and k == 0 else "detection" if table.detected[rows[o], k] else "grid"
                counts[kind] += 1
    total = sum(counts.values())
    return {f"{k}_share": v / total for k, v in counts.items()}


def test_locality_matches_a_per_caption_loop(small_flickr):
    dataset = open_dataset(small_flickr)
    dev = dataset.split("dev")
    for settings, pooled in ((RegionSettings(), "content"), (LEGACY_SETTINGS, "all")):
        torch.manual_seed(0)
        model = CHAN(ModelConfig(pooled_tokens=pooled)).eval()
        table = table_for(dataset, settings)
        result = alignment_locality(model, settings, dev, table)
        expected = _naive(model, dev, table, settings)
        for key, value in expected.items():
            assert abs(result[key] - value) < 1e-9, (key, result[key], value)
        assert result["captions"] == 500 and 1 <= result["distinct_regions_per_caption"] <= 36
        assert 0 < result["mean_chosen_area"] <= 1
        if not settings.whole_photo:
            assert result["whole_photo_share"] == 0


def test_alignments_command_writes_flat_json(small_flickr, tmp_path, capsys):
    torch.manual_seed(0)
    from chan.checkpoint import save_checkpoint

    checkpoint = tmp_path / "c.safetensors"
    save_checkpoint(CHAN(ModelConfig(pooled_tokens="content")), RegionSettings(), checkpoint)
    out = tmp_path / "a.json"
    assert main(["alignments", "--checkpoint", str(checkpoint), "--data", str(small_flickr), "--split", "dev",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"whole_photo_share", "detection_share", "grid_share", "distinct_regions_per_caption",
            "mean_chosen_area", "rsum", "stopword_grid_share"} <= set(result)
    assert all(not isinstance(v, (dict, list)) for v in result.values())
    assert abs(result["whole_photo_share"] + result["detection_share"] + result["grid_share"] - 1) < 1e-9
    assert "500 captions of split dev" in capsys.readouterr().out
