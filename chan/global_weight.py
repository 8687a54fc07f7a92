"""The global term's serving weight, chosen on a dev split (`python -m chan global-weight`).

A model's score is its similarity plus w x the cosine of the mean region and the mean word (the global
term). Training fixes w; the best w to rank with can differ. The words' alignments do not depend on w,
so it is one number read off dev RSUM, with the encodings computed once, and written into a copy of the
checkpoint: its tensors as they were, its config scoring with the chosen w, its info saying how it was chosen.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint, write_copy
from .evaluate import open_split, split_score_parts
from .features import table_for
from .metrics import format_metrics, markdown_cells, recall_metrics

DEFAULT_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
MAX_WEIGHTS = 100


def sweep(scores: torch.Tensor, term: torch.Tensor, owner: torch.Tensor, trained_weight: float,
          weights: list[float]) -> dict[float, dict[str, float]]:
    """The metrics at each weight w, from the model's scores (with its trained weight) and the global term alone."""
    return {w: recall_metrics(scores + (w - trained_weight) * term, owner) for w in weights}


def best_weight(metrics: dict[float, dict[str, float]], trained_weight: float) -> float:
    """The weight with the highest RSUM; among equals, the one nearest the trained weight."""
    return max(metrics, key=lambda w: (metrics[w]["rsum"], -abs(w - trained_weight)))


def check_weights(weights: list[float]) -> list[float]:
    if not weights or len(weights) > MAX_WEIGHTS:
        raise ValueError(f"give 1 to {MAX_WEIGHTS} weights (got {len(weights)})")
    if any(not 0 <= w <= 100 for w in weights):  # also refuses nan
        raise ValueError(f"weights must lie between 0 and 100 (got {weights})")
    return sorted(set(weights))


def global_weight_command(checkpoint: Path, out: Path, data: Path, split: str, weights: list[float],
                          device: torch.device | str = "cpu") -> float:
    """Sweep the weight on `split`, print its RSUM at each, and write `out`: `checkpoint` scoring with the best."""
    if split == "test":
        raise ValueError("the serving weight is chosen on dev (--split dev): choosing it on test would bias every "
                         "test figure read with it")
    weights = check_weights(weights)
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--out {out} is the checkpoint it reads: write the reweighted copy elsewhere")
    dataset, split = open_split(data, split)
    model, settings, info = load_checkpoint(checkpoint)
    trained = model.config.global_weight
    scores, term, owner = split_score_parts(model.to(device), dataset, table_for(dataset, settings, device=device),
                                            progress=True)
    metrics = sweep(scores, term, owner, trained, weights)
    chosen = best_weight(metrics, trained)
    print(f"{scores.shape[0]} photos, {scores.shape[1]} captions, split {split}; the checkpoint scores with w = {trained:g}")
    print("| w | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |\n|---|---|---|---|---|---|---|---|")
    for w, m in metrics.items():
        print(f"| {w:g}{' (chosen)' if w == chosen else ''} | {markdown_cells(m)} |")
    print(f"chosen w = {chosen:g}: {format_metrics(metrics[chosen])}")

    previous = info.get("global_weight_choice", {})
    info = {**info, "dev": metrics[chosen], "global_weight_choice": {
        "trained_with": previous.get("trained_with", trained), "chosen_on": split, "chosen": chosen,
        "rsum_by_weight": {f"{w:g}": m["rsum"] for w, m in metrics.items()}}}
    write_copy(checkpoint, out, {"global_weight": chosen}, info)
    print(f"wrote {out}: scores with w = {chosen:g} (dev RSUM {metrics[chosen]['rsum']:.1f})")
    return chosen
