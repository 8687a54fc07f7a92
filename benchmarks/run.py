"""CHAN efficiency benchmarks: hard alignment vs soft attention, vs a plain matmul, at scale, end to end.

python benchmarks/run.py [--quick] [--only SECTION ...] [--json benchmarks/results.json]
                         [--candidate-detector-sizing photo --candidate-detector-sizes 288,416 --candidate-image-size 320]
                         [--candidate-detector-precision int8]
Every figure is the median of repeated runs after a warm-up; every ratio is taken within the run.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chan.__main__ import detector_sizes
from chan.data import DEFAULT_DATA
from chan.region_settings import DETECTOR_PRECISIONS, DETECTOR_SIZINGS
from chan.similarity import hard_scores, soft_scores

SECTIONS = ["similarity", "scale", "regions", "evaluation"]
# issue 14's faster regions (the default candidate): one detector pass at the photo's short side, at least 288 px
FAST_REGIONS = {"detector_sizing": "photo", "detector_sizes": (288, 416), "image_size": 320, "detector_precision": "fp32"}


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit(n: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """n random unit vectors (or n stacks of them), made in slices so that 100k photos fit in memory once."""
    out = torch.empty(n, *shape, dtype=dtype)
    for s in range(0, n, 4096):
        out[s : s + 4096] = F.normalize(torch.randn(min(4096, n - s), *shape), dim=-1)
    return out


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row))


def hard_one_matmul(images, image_mask, captions, caption_mask):
    """The scorer before optimisation (for the before/after rows): all cosines in one product, masked, then max."""
    N, K, D = images.shape
    M, L, _ = captions.shape
    sims = (captions.reshape(M * L, D) @ images.reshape(N * K, D).T).view(M, L, N, K)
    best = sims.masked_fill(~image_mask.view(1, 1, N, K), -1e4).amax(-1)
    return ((best * caption_mask[:, :, None]).sum(1) / caption_mask.sum(1)[:, None]).T


def scan_as_published(images, captions):
    """SCAN t2i attention as the authors' code computes it: per caption, a weighted context of every word
    and image (leaky ReLU, L2 over words, softmax over regions x 9), then cosine to the word, mean."""
    out = []
    for cap in captions:
        attn = F.leaky_relu(images @ cap.T, 0.1)  # (N, K, L)
        attn = F.normalize(attn, dim=2)
        attn = torch.softmax(9.0 * attn.transpose(1, 2), dim=2)  # (N, L, K)
        context = F.normalize(attn @ images, dim=-1)  # (N, L, D)
        out.append(F.cosine_similarity(cap[None], context, dim=-1).mean(1))
    return torch.stack(out, 1)


def bench_similarity(N: int, K: int, L: int, D: int, M: int, repeats: int) -> dict:
    """Pairs/s of hard vs soft on identical tensors, and hard's FLOP rate vs a plain matmul."""
    images, captions = unit(N, K, D), unit(M, L, D)
    imask, cmask = torch.ones(N, K, dtype=torch.bool), torch.ones(M, L, dtype=torch.bool)
    t = {
        "hard": median_seconds(lambda: hard_scores(images, imask, captions, cmask), repeats),
        "hard_before": median_seconds(lambda: hard_one_matmul(images, imask, captions, cmask), repeats),
        "soft_gram": median_seconds(lambda: soft_scores(images, imask, captions, cmask), repeats),
        "soft_published": median_seconds(lambda: scan_as_published(images, captions), repeats),
    }
    a, b = captions.reshape(M * L, D), images.reshape(N * K, D).T.contiguous()
    matmul = median_seconds(lambda: a @ b, repeats)
    flops = 2.0 * M * L * N * K * D
    out = {f"{k}_pairs_per_s": N * M / v for k, v in t.items()}
    out.update({"hard_over_soft_gram": t["soft_gram"] / t["hard"], "hard_over_soft_published": t["soft_published"] / t["hard"],
                "hard_gflops": flops / t["hard"] / 1e9, "hard_before_gflops": flops / t["hard_before"] / 1e9,
                "matmul_gflops": flops / matmul / 1e9, "hard_fraction_of_matmul": matmul / t["hard"],
                "hard_before_fraction_of_matmul": matmul / t["hard_before"]})
    table(f"1-2. Similarity, N={N} photos x K={K} regions, {M} captions x L={L} words, D={D}, fp32 (goals: hard >= 5x soft, >= 70% of matmul)",
          ["scorer", "pairs/s", "GFLOP/s", "hard is ... x faster", "% of matmul"],
          [["CHAN hard (blocked matmul + max)", out["hard_pairs_per_s"], out["hard_gflops"], "", f"{100 * out['hard_fraction_of_matmul']:.0f}%"],
           ["CHAN hard, before (one matmul, mask, max)", out["hard_before_pairs_per_s"], out["hard_before_gflops"], "",
            f"{100 * out['hard_before_fraction_of_matmul']:.0f}%"],
           ["SCAN soft, as published (weighted contexts)", out["soft_published_pairs_per_s"], "", f"{out['hard_over_soft_published']:.1f}x", ""],
           ["SCAN soft, exact Gram-matrix form (chan.similarity)", out["soft_gram_pairs_per_s"], "", f"{out['hard_over_soft_gram']:.1f}x", ""],
           ["plain matmul of the same shapes", "", out["matmul_gflops"], "", "100%"]])
    return out


def bench_scale(sizes: list[int], K: int, L: int, D: int, repeats: int) -> list[dict]:
    """One caption against synthetic galleries: latency and memory per photo, fp32 and bf16, before and after."""
    rows, out = [], []
    query, qmask = unit(1, L, D), torch.ones(1, L, dtype=torch.bool)
    for n in sizes:
        imask = torch.ones(n, K, dtype=torch.bool)
        for dtype in (torch.float32, torch.bfloat16):
            images = unit(n, K, D, dtype=dtype)
            q = query.to(dtype)
            after = median_seconds(lambda: hard_scores(images, imask, q, qmask)[:, 0].topk(12), repeats)
            before = median_seconds(lambda: hard_one_matmul(images, imask, q, qmask)[:, 0].topk(12), repeats)
            per_photo_kb = images.element_size() * K * D / 1024
            name = str(dtype).split(".")[-1]
            out.append({"photos": n, "dtype": name, "ms": after * 1000, "ms_before": before * 1000, "kb_per_photo": per_photo_kb})
            rows.append([n, name, before * 1000, after * 1000, per_photo_kb])
            images = q = None  # free this gallery before the next one is made
    table(f"3. Caption -> images, exact search, one caption (K={K}, L={L}, D={D}); goal at 100k: <= 1000 ms, <= 40 KB/photo",
          ["photos", "dtype", "ms before", "ms after", "KB per photo"], rows)
    return out


def bench_regions(repeats: int, data: Path, fast_regions: dict) -> dict:
    """Region extraction with each runtime (single-photo latency, photos/s in batches of 8) and the encoders' throughput.

    The regions are the default checkpoint's; a last row times issue 14's faster candidate (`fast_regions`: region
    settings that replace the default's), whose regions differ and need a model trained on them."""
    from chan.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from chan.data import open_dataset
    from chan.photos import load_photo
    from chan.regions import RegionExtractor

    test = open_dataset(data).split("test")
    photos = [load_photo(p.path) for p in test.photos[:8]]
    model, settings, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    candidate = replace(settings, **fast_regions)
    out, rows, extractors = {}, [], {}
    # torch first: the baseline the speed-ups are measured against; then the app's runtime, then the candidate
    for name, runtime, regions in (("torch", "torch", settings), ("onnx", "onnx", settings),
                                   ("onnx, candidate regions", "onnx", candidate)):
        extractor = extractors[name] = RegionExtractor(regions, runtime=runtime)
        extractor(photos[:1])
        single = median_seconds(lambda: extractor(photos[:1]), repeats)
        batch = median_seconds(lambda: extractor(photos), max(1, repeats // 2))
        out[name] = r = {"single_photo_ms": single * 1000, "photos_per_s_batch8": len(photos) / batch}
        ratios = [f"{out[base]['single_photo_ms'] / r['single_photo_ms']:.2f}x / "
                  f"{r['photos_per_s_batch8'] / out[base]['photos_per_s_batch8']:.2f}x"
                  if base in out else "" for base in ("torch", "onnx")]
        rows.append([name, r["single_photo_ms"], r["photos_per_s_batch8"], *ratios])
    table("4a. Region extraction (the default checkpoint's regions; the candidate: "
          f"{', '.join(f'{k}={v}' for k, v in fast_regions.items())}); goals: <= 40 ms for one photo, "
          ">= 25 photos/s in batches", ["extractor", "one photo (ms)", "photos/s, batches of 8",
                                        "vs torch (one / batches)", "vs onnx (one / batches)"], rows)
    extractor = extractors["onnx"]  # the default checkpoint's regions, as the app extracts them
    texts = [c.text for c in test.captions[:256]]
    sample = extractor(photos[:1])[0]  # one photo's regions, as 256 photos (a model tuning the tail needs the maps)
    features = torch.from_numpy(sample.features)[None].expand(256, -1, -1)
    maps = torch.from_numpy(sample.stage_map).float()[None].expand(256, -1, -1, -1) if model.config.tail_start else None
    with torch.no_grad():
        text_s = median_seconds(lambda: model.encode_texts(texts), max(1, repeats // 2))
        image_s = median_seconds(lambda: model.encode_images(features, maps=maps), repeats)
    out |= {"text_encoder_captions_per_s": len(texts) / text_s, "image_encoder_photos_per_s": 256 / image_s}
    table("4b. Encoders", ["measure", "value"],
          [["text encoder (default checkpoint), captions/s in batches of 256", out["text_encoder_captions_per_s"]],
           ["image encoder (default checkpoint: the tuned tail over the trunk maps, then the projection), photos/s",
            out["image_encoder_photos_per_s"]]])
    return out


def bench_evaluation(data: Path) -> dict:
    """The full 1K-test evaluation end to end from cached regions, and the same scores from a bf16 gallery."""
    from chan.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from chan.data import open_dataset
    from chan.encoding import encode_captions, encode_table
    from chan.evaluate import protocol_pairs
    from chan.features import table_for
    from chan.metrics import recall_metrics

    start = time.perf_counter()
    model, settings, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    test = open_dataset(data).split("test")
    features = table_for(test, settings, progress=False)
    loaded = time.perf_counter()
    with torch.no_grad():
        ids, texts, owner = protocol_pairs(test)
        images = encode_table(model, features, ids)
        captions = encode_captions(model, texts)
        encoded = time.perf_counter()
        scores = model.scores(images.embeddings, images.mask, captions.embeddings, captions.mask)
        scored = time.perf_counter()
        metrics = recall_metrics(scores, owner)
        done = time.perf_counter()
        bf16 = recall_metrics(model.scores(images.embeddings.bfloat16(), images.mask, captions.embeddings, captions.mask), owner)
    out = {"seconds": done - start, "load_s": loaded - start, "encode_s": encoded - loaded, "score_s": scored - encoded,
           "metrics_s": done - scored, "rsum": metrics["rsum"], "rsum_bf16_gallery": bf16["rsum"]}
    table("5. Full Flickr8k 1K test evaluation (5,000 captions x 1,000 photos, cached regions); goal <= 60 s",
          ["total s", "load s", "encode s", "score s", "R@K s", "RSUM fp32", "RSUM bf16 gallery"],
          [[out["seconds"], out["load_s"], out["encode_s"], out["score_s"], out["metrics_s"], f"{out['rsum']:.2f}", f"{out['rsum_bf16_gallery']:.2f}"]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, galleries up to 10k, no full evaluation")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, metavar="SECTION",
                   help=f"run only these sections, of {', '.join(SECTIONS)} (default: all; --quick skips evaluation)")
    p.add_argument("--candidate-detector-sizing", choices=DETECTOR_SIZINGS, default=FAST_REGIONS["detector_sizing"],
                   help="regions: the faster candidate's detector sizing (default: %(default)s)")
    p.add_argument("--candidate-detector-sizes", type=detector_sizes, default=FAST_REGIONS["detector_sizes"], metavar="S,S",
                   help="regions: the candidate's detector sizes (default: "
                        f"{','.join(map(str, FAST_REGIONS['detector_sizes']))})")
    p.add_argument("--candidate-image-size", type=int, default=FAST_REGIONS["image_size"],
                   help="regions: the candidate's backbone input side (default: %(default)s)")
    p.add_argument("--candidate-detector-precision", choices=DETECTOR_PRECISIONS, default=FAST_REGIONS["detector_precision"],
                   help="regions: the candidate's detector precision (default: %(default)s)")
    args = p.parse_args()
    fast_regions = {"detector_sizing": args.candidate_detector_sizing, "detector_sizes": args.candidate_detector_sizes,
                    "image_size": args.candidate_image_size, "detector_precision": args.candidate_detector_precision}
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    sections = {"similarity": lambda: bench_similarity(1000, 36, 12, 512, 16, repeats),
                "scale": lambda: bench_scale([1000, 10000] if args.quick else [1000, 10000, 100000], 36, 12, 512, repeats),
                "regions": lambda: bench_regions(repeats, args.data, fast_regions),
                "evaluation": lambda: bench_evaluation(args.data)}
    results = {name: run() for name, run in sections.items()
               if name in args.only and not (args.quick and name == "evaluation")}
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
