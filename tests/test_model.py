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
