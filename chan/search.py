"""`python -m chan index` and `python -m chan search`: push a gallery to Qdrant, and rank its photos for a caption
with either backend (the in-process torch index or a Qdrant collection), as the same JSON."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .data import open_dataset
from .encoding import encode_table
from .features import table_for
from .gallery import Gallery
from .pair import encode_query
from .qdrant_index import QdrantGallery, check_model
from .store import file_digest

PUSH_BATCH = 64  # photos encoded and upserted at a time


def positive_count(text: str) -> int:
    """An argparse type: a whole number from 1 to 100,000."""
    value = int(text)
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"give a whole number from 1 to 100000, not {text}")
    return value


def add_qdrant_options(parser: argparse.ArgumentParser, push: bool = False, where: str = "") -> None:
    """--qdrant and --collection as `index`, `search` and app.py take them, and --prefetch for the queries."""
    parser.add_argument("--qdrant", required=push, default=None, metavar="URL_OR_PATH",
                        help="a Qdrant server or cluster (http://HOST:6333), or a local folder (qdrant-client's local "
                             "mode)" + ("" if push else ", searched instead of the in-process index") + where)
    parser.add_argument("--collection", default=None, help="collection name (default: chan-<gallery folder name>)")
    if not push:
        parser.add_argument("--prefetch", type=positive_count, default=None, metavar="N",
                            help="with --qdrant: two-stage search, MaxSim over the N photos nearest by the global "
                                 "vectors (default: exact MaxSim over every photo)")


def default_collection(gallery: Path) -> str:
    """`chan-<gallery folder name>`, in the characters a collection name may hold."""
    return "chan-" + re.sub(r"[^A-Za-z0-9_-]+", "-", Path(gallery).resolve().name).strip("-")


@torch.no_grad()
def index_command(gallery: Path, checkpoint: Path, target: str, collection: str | None = None,
                  split: str | None = None, device: torch.device | str = "cpu") -> dict:
    """Push every photo of the gallery not yet in the collection (extracting regions first where missing)."""
    model, settings, _ = load_checkpoint(checkpoint)
    check_model(model)
    model.to(device)
    dataset = open_dataset(gallery)
    dataset = dataset.split(split or dataset.default_split())
    collection = collection or default_collection(gallery)
    with QdrantGallery.open(target, collection, file_digest(checkpoint), dim=model.config.embed_dim) as remote:
        present = remote.present(p.id for p in dataset.photos)
        table = table_for(dataset, settings)  # extracted once and cached; unreadable photos are left out
        todo = [p.id for p in dataset.photos if p.id not in present and p.id in table.index]
        for start in tqdm(range(0, len(todo), PUSH_BATCH), desc="push", unit="batch", disable=not todo):
            ids = todo[start : start + PUSH_BATCH]
            remote.push(ids, encode_table(model, table, ids).embeddings.half())  # fp16, as the torch index keeps them
        summary = {"collection": collection, "target": target, "pushed": len(todo), "already_there": len(present),
                   "unreadable": sum(p.id not in table.index for p in dataset.photos), "points": remote.count()}
    print(f"{collection} at {target}: {summary['pushed']} photos pushed, {summary['already_there']} already there, "
          f"{summary['unreadable']} unreadable; {summary['points']} photos in the collection")
    return summary


def search_command(text: str, gallery: Path, checkpoint: Path, target: str | None = None, collection: str | None = None,
                   k: int = 10, prefetch: int | None = None, split: str | None = None, json_path: Path | None = None,
                   device: torch.device | str = "cpu") -> dict:
    """The top k photos for `text`, from the in-process index (default) or the Qdrant collection at `target`."""
    if target:
        model, _, _ = load_checkpoint(checkpoint)
        check_model(model)
        model.to(device)
        collection = collection or default_collection(gallery)
        emb, mask, _ = encode_query(model, text)
        with QdrantGallery.open(target, collection, file_digest(checkpoint)) as remote:
            found = remote.search(emb[0][mask[0]], k, prefetch, model.config.global_weight)
    else:
        dataset = open_dataset(gallery)
        g = Gallery(checkpoint, dataset.split(split or dataset.default_split()), device=device)
        found = [(h.photo_id, h.score) for h in g.search_images(text, k)[0]]
    result = {"query": text, "backend": "qdrant" if target else "torch",
              "hits": [{"rank": r + 1, "photo_id": pid, "score": round(score, 6)} for r, (pid, score) in enumerate(found)]}
    for h in result["hits"]:
        print(f"{h['rank']:>3}  {h['score']:.4f}  {h['photo_id']}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
