"""--device everywhere, and many processes: device selection, a 2-process gloo training and a sharded extraction."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from chan.__main__ import main
from chan.checkpoint import load_checkpoint
from chan.data import open_dataset
from chan.device import DeviceError, resolve_device
from chan.distributed import World
from chan.features import extract, load_table
from chan.region_settings import RegionSettings
from chan.train import TrainConfig, train
from tests.conftest import make_flickr_subset

no_gpu = not torch.cuda.is_available()


def test_auto_takes_the_cpu_without_a_gpu_and_cuda_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="no CUDA GPU.*use --device cpu or auto"):
            resolve_device(name)
    for name in ("tpu", "cuda:x", "mps"):
        with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(name)


def test_a_command_given_a_missing_gpu_exits_with_the_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_shards_split_any_count_in_order():
    for n in (0, 1, 7, 128):
        for size in (1, 2, 3):
            parts = [World(r, size).shard(n) for r in range(size)]
            assert [i for s in parts for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, size: int, port: int, job: str, kwargs: dict) -> None:
    """One torchrun-like process: the environment torchrun sets, one thread, then the job."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from chan.distributed import join

    if job == "train":
        train(TrainConfig(**kwargs))
    else:
        world, device = join("cpu")
        data = kwargs.pop("data")
        extract(open_dataset(data).split("test"), world=world, device=device, **kwargs)
    torch.distributed.destroy_process_group()


def _spawn(job: str, kwargs: dict, size: int = 2) -> None:
    mp.spawn(_as_rank, args=(size, _free_port(), job, kwargs), nprocs=size, join=True)


def test_two_gloo_processes_train_like_one_with_the_same_global_batch(tmp_path, flickr8k):
    data = make_flickr_subset(tmp_path / "data", flickr8k, 48, 16)
    config = dict(data=data, batch_size=24, epochs=2, lr_step=10, seed=5)
    torch.set_num_threads(1)
    one = train(TrainConfig(out=tmp_path / "one.safetensors", **config))["history"]
    _spawn("train", dict(out=tmp_path / "two.safetensors", **config))
    two = json.loads((tmp_path / "two.history.json").read_text())
    assert [h["epoch"] for h in two] == [1, 2]
    for a, b in zip(one, two):  # the same global batches; only dropout inside the tuned text layers differs
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05), (one, two)
    model, _, info = load_checkpoint(tmp_path / "two.safetensors")  # saved once, by rank 0, from the CPU
    assert info["epoch"] in (1, 2) and next(model.parameters()).device.type == "cpu"


def test_sharded_extraction_gives_the_single_process_cache(tmp_path, flickr8k):
    data = make_flickr_subset(tmp_path / "data", flickr8k, 0, 0, 10)
    settings = RegionSettings()
    single = extract(open_dataset(data).split("test"), tmp_path / "one.safetensors", settings, batch_size=4, progress=False)
    _spawn("extract", dict(data=data, out=tmp_path / "two.safetensors", settings=settings, batch_size=4, progress=False,
                           shard_size=3))
    sharded = load_table(tmp_path / "two.safetensors", settings)
    assert sorted(sharded.photo_ids) == sorted(single.photo_ids)
    rows = sharded.rows(single.photo_ids)
    np.testing.assert_allclose(sharded.boxes[rows].numpy(), single.boxes.numpy(), atol=1e-2)
    np.testing.assert_allclose(sharded.features[rows].float().numpy(), single.features.float().numpy(), atol=2e-3)
    assert not (tmp_path / "two.safetensors.parts").exists()


@pytest.mark.skipif(no_gpu, reason="needs a CUDA GPU")
def test_on_a_gpu_the_regions_and_scores_match_the_cpu(flickr8k):
    from chan.checkpoint import DEFAULT_CHECKPOINT
    from chan.encoding import encode_captions
    from chan.photos import load_photo
    from chan.regions import RegionExtractor

    photos = [load_photo(p.path) for p in open_dataset(flickr8k).split("test").photos[:4]]
    cpu, gpu = RegionExtractor(runtime="torch")(photos), RegionExtractor(device="cuda")(photos)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a.features, b.features, atol=1e-2)
    model = load_checkpoint(DEFAULT_CHECKPOINT)[0]
    texts = ["a dog runs on the grass", "two children play in the water"]
    on_cpu = encode_captions(model, texts).embeddings
    on_gpu = encode_captions(model.to("cuda"), texts).embeddings.cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3)
