"""The one checkpoint format: trainable tensors (fp16) in safetensors, everything else as JSON metadata.

Metadata: the model config (with the BiGRU vocabulary), the region-extractor settings, the
base text model's package and version, and free-form training info. Frozen base weights are
not stored: they come from the pip-installed package named in the file. Loading never unpickles.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from . import store
from .device import int8_pays
from .model import CHAN, ModelConfig, base_model_provenance
from .region_settings import PrecomputedSettings, RegionSettings, settings_from_key

FORMAT = "chan-checkpoint-1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "chan-bert-flickr8k.safetensors"
# the default checkpoint's SCAN twin: the same regions and recipe, soft attention (the demo's comparison); both score
# with the global term's weight that `python -m chan global-weight` chose for each on dev
DEFAULT_COMPARISON = Path(__file__).resolve().parents[1] / "checkpoints" / "scan-bert-flickr8k.safetensors"


class CheckpointError(store.StoreError):
    """A file that is not a usable CHAN checkpoint."""


def save_checkpoint(model: CHAN, region_settings: RegionSettings | PrecomputedSettings, path: Path, info: dict | None = None,
                    dtype: torch.dtype = torch.float16) -> None:
    """Write the trainable tensors (fp16 by default; imports keep fp32 to reproduce scores exactly), from the CPU
    whatever device the model is on, so that a checkpoint opens anywhere."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.trainable_state().items()}
    meta = {
        "config": json.dumps(model.describe()),
        "regions": region_settings.key(),
        "base_model": json.dumps(base_model_provenance(model.config)),
        "info": json.dumps(info or {}),
    }
    store.write(path, tensors, meta, FORMAT)


def write_copy(path: Path, out: Path, config_changes: dict, info: dict) -> None:
    """Copy a checkpoint with its tensors as stored (fp16, or an import's fp32), these config fields changed, and
    another info."""
    tensors, meta = store.read(path, FORMAT, "CHAN checkpoint", error=CheckpointError)
    config = {**json.loads(meta["config"]), **config_changes}
    store.write(out, tensors, {**meta, "config": json.dumps(config), "info": json.dumps(info)}, FORMAT)


def _parsed(meta: dict[str, str]) -> dict:
    return {k: json.loads(meta[k]) if k != "regions" else meta[k] for k in ("config", "regions", "base_model", "info")}


def read_metadata(path: Path) -> dict:
    """The JSON metadata of a checkpoint (config, regions, base_model, info), without building the model."""
    return _parsed(store.read(path, FORMAT, "CHAN checkpoint", tensors=False, error=CheckpointError)[1])


def with_detector_precision(settings: RegionSettings | PrecomputedSettings, precision: str | None,
                            device: torch.device | str = "cpu") -> RegionSettings | PrecomputedSettings:
    """A checkpoint's region settings with their detector in another precision (None: as they are). `auto`: int8
    where it is fast and safe (regions extracted on a CPU with VNNI, `chan.device.int8_pays`), else as they are."""
    if precision == "auto":
        cpu = torch.device(device).type == "cpu"
        precision = "int8" if isinstance(settings, RegionSettings) and cpu and int8_pays() else None
    if precision is None or precision == getattr(settings, "detector_precision", None):
        return settings
    if not isinstance(settings, RegionSettings):
        raise CheckpointError("this checkpoint reads precomputed region features: it has no detector to run in "
                              f"{precision}")
    return replace(settings, detector_precision=precision)


def load_checkpoint(path: Path) -> tuple[CHAN, RegionSettings | PrecomputedSettings, dict]:
    """Rebuild the model on CPU; returns (model in eval mode, region settings, training info)."""
    tensors, meta = store.read(path, FORMAT, "CHAN checkpoint", error=CheckpointError)  # opened once
    meta = _parsed(meta)
    config = ModelConfig(**meta["config"])
    regions = settings_from_key(meta["regions"])
    try:
        model = CHAN(config)
    except OSError as e:  # transformers could not find the base text model
        raise CheckpointError(f"{path}: its base text model {config.bert_model!r} could not be loaded ({e})") from e
    expected = set(model.trainable_state())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"{path}: tensors do not match the model it describes (missing {missing[:5]}, unexpected {extra[:5]})")
    state = model.state_dict()
    for k, v in tensors.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model wants {tuple(state[k].shape)}")
        state[k] = v.to(state[k].dtype)
    model.load_state_dict(state)
    return model.eval(), regions, meta["info"]
