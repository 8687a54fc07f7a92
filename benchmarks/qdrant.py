"""The gallery index in Qdrant's local mode against the in-process torch index; prints a table, writes JSON.

python benchmarks/qdrant.py [--checkpoint C] [--photos 2000,10000] [--queries 30] [--prefetch 100,500] [--json FILE]
Real region embeddings of Flickr8k photos (the checkpoint, default the app's, over the cached features of
every photo; a model with a global term is queried with it, as the app does); sizes past the dataset's
8,091 photos are filled with copies of its photos whose region order is shuffled (a copy scores like
its original: this measures time, not accuracy). Queries are dev captions. Per size: push time (batches
of 64 upserts), median query time of the torch index, of Qdrant's exact MaxSim and of the two-stage query
(prefetch by the global vector, MaxSim rerank), and recall@10 of each Qdrant query against the torch index's exact top 10. These are
qdrant-client local-mode figures (pure Python, one process): a Qdrant server computes the same
scores in Rust, and was not run here.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chan.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from chan.data import DEFAULT_DATA, open_dataset  # noqa: E402
from chan.encoding import encode_table  # noqa: E402
from chan.features import table_for  # noqa: E402
from chan.pair import encode_query  # noqa: E402
from chan.qdrant_index import QdrantGallery  # noqa: E402
from chan.search import PUSH_BATCH  # noqa: E402


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def region_embeddings(model, settings, n: int) -> tuple[list[str], torch.Tensor]:
    """n photos' (n, K, D) fp16 embeddings: every Flickr8k photo, then shuffled-region copies up to n."""
    dataset = open_dataset(DEFAULT_DATA)
    table = table_for(dataset, settings)
    ids = table.photo_ids[:n]
    parts = [encode_table(model, table, ids[s : s + 512]).embeddings.half()
             for s in tqdm(range(0, len(ids), 512), desc="encode", unit="batch")]
    emb = torch.cat(parts)
    g = torch.Generator().manual_seed(0)
    while len(ids) < n:  # copies, each with its regions in another order
        take = min(n - len(ids), len(emb))
        copies = emb[:take, torch.randperm(emb.shape[1], generator=g)]
        ids, emb = ids + [f"copy{len(ids) + i}-{pid}" for i, pid in enumerate(ids[:take])], torch.cat([emb, copies])
    return ids, emb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="default: the app's")
    p.add_argument("--photos", type=_sizes, default=[2000, 10000], help="gallery sizes (default: 2000,10000)")
    p.add_argument("--queries", type=int, default=30, help="dev captions queried (default: %(default)s)")
    p.add_argument("--prefetch", type=_sizes, default=[100, 500], help="two-stage candidates (default: 100,500)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/qdrant.json"))
    args = p.parse_args()
    logging.disable(logging.WARNING)
    model, settings, _ = load_checkpoint(args.checkpoint)
    ids, emb = region_embeddings(model, settings, max(args.photos))
    dev = open_dataset(DEFAULT_DATA).split("dev")
    queries = []
    for c in dev.captions[:: max(1, len(dev.captions) // args.queries)][: args.queries]:
        e, m, _ = encode_query(model, c.text)
        queries.append((e, m))
    rows = []
    for n in args.photos:
        index, mask = emb[:n].float(), torch.ones(n, emb.shape[1], dtype=torch.bool)
        exact, torch_ms = [], []
        for e, m in queries:
            start = time.perf_counter()
            top = model.scores(index, mask, e, m)[:, 0].topk(10).indices.tolist()
            torch_ms.append(1000 * (time.perf_counter() - start))
            exact.append({ids[i] for i in top})
        row = {"photos": n, "torch_query_ms": median(torch_ms)}
        with tempfile.TemporaryDirectory() as folder, QdrantGallery.open(folder, "bench", "benchmark", emb.shape[-1]) as q:
            start = time.perf_counter()
            for s in tqdm(range(0, n, PUSH_BATCH), desc=f"push {n}", unit="batch"):
                q.push(ids[s : min(n, s + PUSH_BATCH)], emb[s : min(n, s + PUSH_BATCH)])
            row["push_s"] = time.perf_counter() - start
            for prefetch in [None, *args.prefetch]:
                times, found = [], 0
                for (e, m), truth in zip(queries, exact):
                    start = time.perf_counter()
                    hits = q.search(e[0][m[0]], 10, prefetch, model.config.global_weight)
                    times.append(1000 * (time.perf_counter() - start))
                    found += len(truth & {pid for pid, _ in hits})
                name = "exact" if prefetch is None else f"prefetch{prefetch}"
                row[f"{name}_ms"], row[f"{name}_recall10"] = median(times), found / (10 * len(queries))
        rows.append(row)
    print(f"\nqdrant-client local mode vs the in-process torch index; {len(queries)} dev captions; median ms per query")
    head = f"{'photos':>7}{'push s':>9}{'torch ms':>10}{'exact ms':>10}{'R@10':>6}"
    head += "".join(f"{'pf' + str(pf) + ' ms':>12}{'R@10':>6}" for pf in args.prefetch)
    print(head)
    for r in rows:
        line = f"{r['photos']:>7}{r['push_s']:>9.1f}{r['torch_query_ms']:>10.1f}{r['exact_ms']:>10.1f}{r['exact_recall10']:>6.2f}"
        line += "".join(f"{r[f'prefetch{pf}_ms']:>12.1f}{r[f'prefetch{pf}_recall10']:>6.2f}" for pf in args.prefetch)
        print(line)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
