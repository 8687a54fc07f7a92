"""The InfoNCE temperature that best fits a checkpoint's scores, on dev batches like training's.

python runs/fit_temperature.py --checkpoint runs/chan-lite2-text6.safetensors
scores every dev caption against every dev photo once, then, for each temperature, the mean InfoNCE
(chan.loss.contrastive_loss) over the same random batches of caption-photo pairs; the lowest is the
temperature at which the model's scores, as they are, read best as a softmax over a batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chan.checkpoint import load_checkpoint  # noqa: E402
from chan.data import DEFAULT_DATA  # noqa: E402
from chan.evaluate import open_split, split_scores  # noqa: E402
from chan.features import table_for  # noqa: E402
from chan.loss import contrastive_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--temperatures", default="0.01,0.02,0.03,0.04,0.05,0.07,0.1")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    dataset, split = open_split(a.data, "dev")
    model, settings, _ = load_checkpoint(a.checkpoint)
    scores, owner = split_scores(model, dataset, table_for(dataset, settings), progress=True)  # (photos, captions)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(owner), generator=g)[: a.batch_size] for _ in range(a.batches)]
    print(f"| temperature | mean InfoNCE per pair and direction ({a.batches} {split} batches of {a.batch_size}) |\n|---|---|")
    # [i, j]: the photo of pair i against the caption of pair j; taken once, read at every temperature
    matrices = [(scores[owner[idx]][:, idx], owner[idx][:, None] == owner[idx][None, :]) for idx in batches]
    costs = {}
    for t in (float(x) for x in a.temperatures.split(",")):
        costs[t] = sum(contrastive_loss(m, same, t).item() / (2 * len(m)) for m, same in matrices) / len(matrices)
        print(f"| {t:g} | {costs[t]:.3f} |")
    print(f"best fit: {min(costs, key=costs.get):g}")


if __name__ == "__main__":
    main()
