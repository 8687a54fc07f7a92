"""CHAN efficiency benchmarks: hard alignment vs soft attention, vs a plain matmul, at scale, end to end.

python benchmarks/run.py [--quick] [--json benchmarks/results.json]
Every figure is the median of repeated runs after a warm-up; every ratio is taken within the run.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chan.similarity import hard_scores, soft_scores  # noqa: E402

from chan.data import DEFAULT_DATA  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1).to(dtype)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row))


def bench_similarity(N: int, K: int, L: int, D: int, M: int, repeats: int) -> dict:
    """Pairs/s of hard vs soft on identical tensors, and hard's FLOP rate vs a plain matmul."""
    images, captions = unit(N, K, D), unit(M, L, D)
    imask, cmask = torch.ones(N, K, dtype=torch.bool), torch.ones(M, L, dtype=torch.bool)
    hard = median_seconds(lambda: hard_scores(images, imask, captions, cmask), repeats)
    soft = median_seconds(lambda: soft_scores(images, imask, captions, cmask), repeats)
    a, b = captions.reshape(M * L, D), images.reshape(N * K, D).T.contiguous()
    matmul = median_seconds(lambda: a @ b, repeats)
    flops = 2.0 * M * L * N * K * D
    out = {"hard_pairs_per_s": N * M / hard, "soft_pairs_per_s": N * M / soft, "hard_over_soft": soft / hard,
           "hard_gflops": flops / hard / 1e9, "matmul_gflops": flops / matmul / 1e9, "hard_fraction_of_matmul": matmul / hard}
    table(f"1-2. Similarity, N={N} photos x K={K} regions, {M} captions x L={L} words, D={D}",
          ["scorer", "pairs/s", "GFLOP/s", "note"],
          [["CHAN hard", out["hard_pairs_per_s"], out["hard_gflops"], f"{out['hard_over_soft']:.2f}x soft (goal >= 5x)"],
           ["SCAN soft", out["soft_pairs_per_s"], "", ""],
           ["plain matmul", "", out["matmul_gflops"], f"hard reaches {100 * out['hard_fraction_of_matmul']:.0f}% (goal >= 70%)"]])
    return out


def bench_scale(sizes: list[int], K: int, L: int, D: int, repeats: int) -> list[dict]:
    """One caption against synthetic galleries: latency, and memory per photo (fp32 and fp16)."""
    rows, out = [], []
    query, qmask = unit(1, L, D), torch.ones(1, L, dtype=torch.bool)
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            images = unit(n, K, D, dtype=dtype)
            imask = torch.ones(n, K, dtype=torch.bool)
            q = query.to(dtype)
            seconds = median_seconds(lambda: hard_scores(images, imask, q, qmask)[:, 0].topk(12), repeats)
            per_photo_kb = images.element_size() * K * D / 1024
            out.append({"photos": n, "dtype": str(dtype).split(".")[-1], "ms": seconds * 1000, "kb_per_photo": per_photo_kb})
            rows.append([n, out[-1]["dtype"], seconds * 1000, per_photo_kb])
    table(f"3. Caption -> images, exact search (K={K}, L={L}, D={D}); goal at 100k: <= 1000 ms, <= 40 KB/photo",
          ["photos", "dtype", "median ms", "KB per photo"], rows)
    return out


def bench_regions(repeats: int, data: Path) -> dict:
    from chan.data import open_dataset
    from chan.photos import load_photo
    from chan.regions import RegionExtractor

    photos = [load_photo(p.path) for p in open_dataset(data).split("test").photos[:8]]
    extractor = RegionExtractor()
    single = median_seconds(lambda: extractor(photos[:1]), repeats)
    batch = median_seconds(lambda: extractor(photos[:4]), max(1, repeats // 2))
    out = {"single_photo_ms": single * 1000, "photos_per_s_batch4": 4 / batch}
    table("4. Region extraction (YOLOv3-tiny + EfficientNet-Lite0 @ 320 px)", ["measure", "value"],
          [["single-photo latency (ms)", out["single_photo_ms"]], ["photos/s, batches of 4", out["photos_per_s_batch4"]]])
    return out


def bench_evaluation(data: Path) -> dict:
    from chan.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from chan.data import open_dataset
    from chan.evaluate import evaluate
    from chan.features import table_for

    model, settings, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    dataset = open_dataset(data)
    test = dataset.split("test")
    features = table_for(dataset, settings)
    start = time.perf_counter()
    metrics = evaluate(model, test, features)
    seconds = time.perf_counter() - start
    table("5. Full Flickr8k 1K test evaluation (5,000 captions x 1,000 photos, cached regions); goal <= 60 s",
          ["seconds", "RSUM"], [[seconds, metrics["rsum"]]])
    return {"seconds": seconds, "rsum": metrics["rsum"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, galleries up to 10k, no full evaluation")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    args = p.parse_args()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    results = {"similarity": bench_similarity(1000, 36, 12, 512, 16, repeats),
               "scale": bench_scale([1000, 10000] if args.quick else [1000, 10000, 100000], 36, 12, 512, repeats),
               "regions": bench_regions(repeats, args.data)}
    if not args.quick:
        results["evaluation"] = bench_evaluation(args.data)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
