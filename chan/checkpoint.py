"""The one checkpoint format: trainable tensors (fp16) in safetensors, everything else as JSON metadata.

Metadata: the model config (with the BiGRU vocabulary), the region-extractor settings, the
base text model's package and version, and free-form training info. Frozen base weights are
not stored: they come from the pip-installed package named in the file. Loading never unpickles.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import CHAN, ModelConfig, base_model_provenance
from .regions import PrecomputedSettings, RegionSettings, settings_from_key

FORMAT = "chan-checkpoint-1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "chan-bert-flickr8k.safetensors"
# the default checkpoint's SCAN twin: the same regions and recipe, soft attention (the demo's comparison)
DEFAULT_COMPARISON = Path(__file__).resolve().parents[1] / "runs" / "scan-proposals-tuned.safetensors"


class CheckpointError(ValueError):
    """A file that is not a usable CHAN checkpoint."""


def save_checkpoint(model: CHAN, regions: RegionSettings | PrecomputedSettings, path: Path, info: dict | None = None,
                    dtype: torch.dtype = torch.float16) -> None:
    """Write the trainable tensors (fp16 by default; imports keep fp32 to reproduce scores exactly)."""
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.trainable_state().items()}
    meta = {
        "format": FORMAT,
        "config": json.dumps(model.describe()),
        "regions": regions.key(),
        "base_model": json.dumps(base_model_provenance(model.config)),
        "info": json.dumps(info or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_metadata(path: Path) -> dict:
    """The JSON metadata of a checkpoint (config, regions, base_model, info), without building the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a CHAN checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    return {k: json.loads(meta[k]) if k != "regions" else meta[k] for k in ("config", "regions", "base_model", "info")}


def load_checkpoint(path: Path) -> tuple[CHAN, RegionSettings | PrecomputedSettings, dict]:
    """Rebuild the model on CPU; returns (model in eval mode, region settings, training info)."""
    meta = read_metadata(path)
    config = ModelConfig(**meta["config"])
    regions = settings_from_key(meta["regions"])
    try:
        model = CHAN(config)
    except OSError as e:  # transformers could not find the base text model
        raise CheckpointError(f"{path}: its base text model {config.bert_model!r} could not be loaded ({e})") from e
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: tensor data is damaged ({e})") from e
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
