"""The detector's labels as a prior on regions: what each region's class evidence adds to its embedding.

A checkpoint trained on regions without class evidence gains input columns for the detector's 80 class
probabilities and objectness (`RegionSettings.class_evidence`). Column c starts as `scale` x the model's own text
embedding of class c's name, so a region the detector calls "dog" moves towards the words the text encoder puts near
"dog" (the label-embedding prior of MAF, Wang et al., EMNLP 2020). Nothing maps words to classes by hand: a word
gains from a region's label only as far as the text encoder already puts it near that label's name. The objectness
column starts at zero. Every other weight is copied, so at scale 0 the scores are the checkpoint's own.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .grounding import COCO_CATEGORIES
from .model import CHAN
from .region_settings import CLASS_EVIDENCE_DIMS, RegionSettings


@torch.no_grad()
def class_name_embeddings(model: CHAN, names: tuple[str, ...] = COCO_CATEGORIES) -> torch.Tensor:
    """(C, D) the text encoder's embedding of each class name: the mean of its pooled tokens, L2-normalised."""
    model.eval()
    emb, mask, _ = model.encode_texts(list(names))
    m = mask.unsqueeze(-1).to(emb.dtype)
    return torch.nn.functional.normalize((emb * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


@torch.no_grad()
def region_scale(model: CHAN, features: torch.Tensor, maps: torch.Tensor | None) -> float:
    """The mean norm of the image encoder's linear output over these regions: the unit a prior's scale is read in."""
    encoder = model.image_encoder
    return float(encoder.fc(encoder.region_features(features, maps)).norm(dim=-1).mean())


@torch.no_grad()
def with_label_prior(model: CHAN, settings: RegionSettings, scale: float,
                     unit: float = 1.0) -> tuple[CHAN, RegionSettings]:
    """A copy of `model` that reads class evidence, its new columns set to scale x unit x the class names' embeddings."""
    if not isinstance(settings, RegionSettings) or settings.class_evidence or settings.proposals != "objectness":
        raise ValueError("the label prior extends a checkpoint on objectness proposals without class evidence")
    new_settings = replace(settings, class_evidence=True)
    config = replace(model.config, feature_dim=new_settings.feature_dim)
    out = CHAN(config).to(model.device)
    out.load_state_dict({k: v for k, v in model.state_dict().items() if k != "image_encoder.fc.weight"}, strict=False)
    weight = torch.zeros(config.embed_dim, config.feature_dim, device=model.device)
    old = model.image_encoder.fc.weight
    weight[:, : old.shape[1]] = old
    names = class_name_embeddings(model)  # (80, D)
    weight[:, old.shape[1] : old.shape[1] + len(names)] = scale * unit * names.T
    assert old.shape[1] + CLASS_EVIDENCE_DIMS == config.feature_dim
    out.image_encoder.fc.weight.copy_(weight)
    return out, new_settings


def label_prior_command(checkpoint: Path, out: Path, data: Path, grounding_data: Path | None, scales: list[float],
                        min_rsum_drop: float, device: torch.device | str = "cpu", scale: float | None = None) -> dict:
    """Sweep the prior's scale: Flickr8k dev RSUM and COCO dev pointing for each; write the copy the rule picks.

    The rule: the highest dev pointing among the scales whose dev RSUM is within `min_rsum_drop` of scale 0's.
    With `scale`, no sweep: the copy gets that scale (e.g. the one chosen for a model's twin).
    """
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import open_dataset
    from .evaluate import split_scores
    from .features import table_for
    from .grounding import pointing_game, read_instances
    from .metrics import recall_metrics

    base, settings, info = load_checkpoint(checkpoint)
    base = base.to(device)
    new_settings = replace(settings, class_evidence=True)
    dev = open_dataset(data).split("dev")
    dev_table = table_for(dev, new_settings, device=device)
    sample = torch.arange(min(256, len(dev_table.photo_ids)))
    features, maps = dev_table.model_inputs(sample)
    unit = region_scale(base, features[..., : settings.feature_dim], maps)
    if scale is not None:
        model, _ = with_label_prior(base, settings, scale, unit)
        choice = {"chosen": scale, "unit": unit, "rule": "given", "from": str(checkpoint)}
        dev_metrics = recall_metrics(*split_scores(model, dev, dev_table))
        save_checkpoint(model, new_settings, out, {**info, "dev": dev_metrics, "label_prior": choice})
        print(f"scale {scale:g} (unit {unit:.3f}); wrote {out}")
        return choice
    if grounding_data is None:
        raise ValueError("give --grounding-data (a COCO-layout dev folder) to sweep the scale, or --scale")
    coco = open_dataset(grounding_data)
    coco_split = coco.splits[0]
    coco = coco.split(coco_split)
    truth = read_instances(coco, coco_split)
    coco_table = table_for(coco, new_settings, device=device)
    rows, dev_metrics = {}, {}
    for scale in sorted({0.0, *scales}):  # scale 0: the checkpoint's own scores, the floor's reference
        model, _ = with_label_prior(base, settings, scale, unit)
        dev_metrics[scale] = recall_metrics(*split_scores(model, dev, dev_table))
        grounding = pointing_game(model, coco_table, coco, truth)
        rows[scale] = {"rsum": dev_metrics[scale]["rsum"], "pointing": grounding["hard_pointing"],
                       "iou50": grounding["hard_iou50"]}
        print(f"scale {scale:g}: dev RSUM {rows[scale]['rsum']:.1f}, dev pointing {rows[scale]['pointing']:.3f}, "
              f"IoU >= 0.5 {rows[scale]['iou50']:.3f}", flush=True)
    floor = rows[0.0]["rsum"] - min_rsum_drop
    allowed = [s for s in scales if rows[s]["rsum"] >= floor]
    chosen = max(allowed, key=lambda s: rows[s]["pointing"])
    model, _ = with_label_prior(base, settings, chosen, unit)
    choice = {"chosen": chosen, "unit": unit, "rule": f"best dev pointing with dev RSUM >= scale 0's - {min_rsum_drop:g}",
              "by_scale": {f"{s:g}": r for s, r in rows.items()}, "from": str(checkpoint)}
    save_checkpoint(model, new_settings, out, {**info, "dev": dev_metrics[chosen], "label_prior": choice})
    print(f"chosen scale {chosen:g}; wrote {out}")
    return choice
