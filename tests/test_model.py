import torch

from chan.data import open_dataset
from chan.features import table_for
from chan.model import CHAN, ModelConfig
from chan.region_settings import RegionSettings
from chan.train import FrozenCaptionStates, _delete_tokens


def test_tuned_tail_reproduces_the_extracted_features_before_training(small_flickr):
    """The model's tail over the cached trunk maps gives the features extraction stored (fp16 apart)."""
    dataset = open_dataset(small_flickr).split("dev")
    table = table_for(dataset, RegionSettings())
    model = CHAN(ModelConfig(tail_start=RegionSettings().tail_start)).eval()
    rows = table.rows([p.id for p in dataset.photos[:8]])
    stored = table.features[rows].float()
    with torch.no_grad():
        recomputed = model.image_encoder.region_features(table.features[rows], table.maps[rows])
    assert torch.allclose(recomputed, stored, atol=0.05, rtol=0.02), (recomputed - stored).abs().max()
    assert not torch.allclose(recomputed[:, :, :4], recomputed[:, :1, :4].expand_as(recomputed[:, :, :4]))


def test_served_tail_gives_the_pytorch_features_and_training_stays_in_pytorch(small_flickr):
    """Once served, the tuned tail runs by ONNX Runtime (one session per map shape) with the same region features up
    to float rounding; a model put back to training runs it in PyTorch, with gradients."""
    dataset = open_dataset(small_flickr).split("dev")
    table = table_for(dataset, RegionSettings())
    model = CHAN(ModelConfig(tail_start=RegionSettings().tail_start)).eval()
    rows = table.rows([p.id for p in dataset.photos[:4]])
    features, maps = table.features[rows], table.maps[rows]
    with torch.no_grad():
        eager = model.image_encoder.region_features(features, maps)
        model.serve_with_onnx()
        served = model.image_encoder.region_features(features, maps)
        one = model.image_encoder.region_features(features[:1], maps[:1])
    assert list(model.image_encoder.tail_sessions) == [tuple(maps.shape[1:])]
    assert torch.allclose(served, eager, atol=1e-4), (served - eager).abs().max()
    assert torch.allclose(one[0], served[0], atol=1e-5)
    assert model.train().image_encoder.region_features(features[:1], maps[:1]).requires_grad


def test_tail_needs_trunk_maps():
    model = CHAN(ModelConfig(tail_start=14))
    try:
        model.encode_images(torch.zeros(1, 36, 1285))
    except ValueError as e:
        assert "trunk maps" in str(e)
    else:
        raise AssertionError("features without maps were accepted by a model that tunes the tail")


def test_tail_is_stored_and_trains_with_frozen_batch_norm():
    model = CHAN(ModelConfig(tail_start=14)).train()
    stored = model.trainable_state()
    assert any(k.startswith("image_encoder.tail.") for k in stored)
    assert not any("running_mean" in k for k in stored)
    bns = [m for m in model.image_encoder.tail.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_precision_fp32_keeps_the_tail_out_of_bf16(monkeypatch):
    """Where bf16 pays, the tail trains under bf16 autocast, unless `tail_bf16` is off (`train --precision fp32`)."""
    monkeypatch.setattr("chan.model.bf16_pays", lambda device: True)  # as on a CPU with native bf16
    model = CHAN(ModelConfig(tail_start=14)).train()
    seen = []
    model.image_encoder.tail.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    maps, features = torch.randn(2, 192, 10, 10), torch.rand(2, 36, 1285)
    for bf16 in (True, False):
        model.image_encoder.tail_bf16 = bf16
        model.image_encoder.region_features(features, maps)
    assert seen == [torch.bfloat16, torch.float32]


def test_frozen_caption_states_give_the_full_forward():
    model = CHAN(ModelConfig()).eval()
    texts = ["a dog runs .", "two children play football on a green field near some tall trees", "snow"]
    frozen = FrozenCaptionStates(model, texts, chunk=2)
    idx = torch.tensor([2, 0, 1])
    ids, mask, states = frozen.batch(idx)
    with torch.no_grad():
        cached = model.text_encoder.tuned_forward(states, mask)
        full = model.text_encoder(ids, mask)
    assert torch.allclose(cached[mask], full[mask], atol=2e-3)
    dropped = _delete_tokens(mask, 1.0)
    lengths = mask.sum(1)
    assert dropped.sum(1).tolist() == [min(2, int(n)) for n in lengths]  # only the first and last stay


def test_content_pooling_leaves_out_special_tokens_and_punctuation():
    text = ["A dog, running: fast!"]
    content = CHAN(ModelConfig(pooled_tokens="content"))
    every = CHAN(ModelConfig(pooled_tokens="all"))
    _, mask, words = content.encode_texts(text)
    assert words == [["a", "dog", "running", "fast"]] and int(mask.sum()) == 4
    _, mask_all, words_all = every.encode_texts(text)
    assert words_all[0][0] == "[CLS]" and "," in words_all[0] and int(mask_all.sum()) == len(words_all[0])


def test_served_text_encoder_gives_the_pytorch_embeddings(tmp_path):
    """ONNX Runtime serves the trained text encoder: the same word embeddings, mask and words at any batch and length."""
    from chan.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from chan.runtime import OnnxTextEncoder

    model = load_checkpoint(DEFAULT_CHECKPOINT)[0].eval()
    texts = ["a black dog jumps over a log", "two children", "a girl in a pink dress, running down a grassy hill " * 3]
    with torch.no_grad():
        torch_out = model.encode_texts(texts)
        model.text_runtime = OnnxTextEncoder(model.text_encoder, cache_dir=tmp_path)
        served = model.encode_texts(texts)
        alone = model.encode_texts(texts[1:2])
    assert torch.equal(served[1], torch_out[1]) and served[2] == torch_out[2]
    assert torch.allclose(served[0][served[1]], torch_out[0][torch_out[1]], atol=1e-5)
    assert torch.allclose(alone[0][0], served[0][1, : alone[0].shape[1]], atol=1e-5)  # padding changes nothing
    exported = sorted(tmp_path.glob("*.onnx"))
    assert len(exported) == 1
    written = exported[0].stat().st_mtime_ns
    OnnxTextEncoder(model.text_encoder, cache_dir=tmp_path)  # the same weights: the cached file, no new export
    assert sorted(tmp_path.glob("*.onnx")) == exported and exported[0].stat().st_mtime_ns == written
