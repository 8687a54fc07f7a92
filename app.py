"""Launch the CHAN demo: python app.py [--gallery DIR] [--checkpoint PATH] [--compare PATH | --no-compare] [--qdrant URL_OR_PATH]
[--host H] [--port P]."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Nothing leaves this machine: no analytics, no hub look-ups.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Requests run in several threads, each with its own OpenMP team: idle team threads sleep instead of spinning
# on the two cores that the others need (read when torch loads, so set before it does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Gradio recomputes its monitoring summary (a pandas table of up to 10,000 past events) after every event;
# nothing here reads it, so every 100 events over the latest 1,000 (read when gradio loads).
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "100")
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from chan.__main__ import add_detector_precision_override
    from chan.checkpoint import DEFAULT_CHECKPOINT, DEFAULT_COMPARISON
    from chan.gallery import DEFAULT_GALLERY
    from chan.search import add_qdrant_options

    p = argparse.ArgumentParser(description="CHAN demo: caption -> images, image -> captions, and the alignment inspector.")
    p.add_argument("--gallery", type=Path, default=DEFAULT_GALLERY,
                   help="a dataset folder: Flickr8k or COCO layout, a plain image folder, or precomputed features "
                        "(<split>_ims.npy + <split>_caps.txt, with a checkpoint from import-official). It is indexed in "
                        "the background on first use, and cached (default: the bundled 1,000 Flickr8k test photos, "
                        "%(default)s)")
    p.add_argument("--split", default=None, help="gallery split (default: test where the dataset has one, else every photo)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="CHAN checkpoint (default: %(default)s)")
    p.add_argument("--compare", type=Path, action="append", default=None, metavar="CHECKPOINT",
                   help="a model shown beside the main one in the search tab, e.g. runs/global-bert.safetensors; "
                        f"repeat for several (default: the SCAN twin, {DEFAULT_COMPARISON.relative_to(ROOT)}, if present)")
    p.add_argument("--no-compare", action="store_true", help="serve the main model alone")
    add_detector_precision_override(p, note=" and a little lower accuracy; the compared models read the same regions",
                                    auto=True)
    add_qdrant_options(p, where=" (a collection pushed by `python -m chan index`; caption ranking and the "
                                "inspector still run here)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="where the models and the gallery index run: auto (the first CUDA GPU when there is one, "
                        "else the CPU), cpu, cuda or cuda:N (default: auto)")
    args = p.parse_args(argv)
    if args.no_compare:
        args.compare = []
    elif args.compare is None:
        args.compare = [DEFAULT_COMPARISON] if DEFAULT_COMPARISON.is_file() else []
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    from app.memory import keep_memory_flat
    from chan.device import resolve_device

    keep_memory_flat()
    # a thread coming back from torch or ONNX Runtime waits up to this long for the interpreter: 1 ms instead of
    # Python's 5 ms shortens each search's waits behind photo work (load test: search p50 about 220 -> 195 ms)
    sys.setswitchinterval(0.001)
    from chan.gallery import Comparison, index_in_background, open_gallery

    try:
        device = resolve_device(args.device)
        comparisons = [Comparison.of(c) for c in args.compare]
        gallery = open_gallery(args.gallery, args.checkpoint, args.split, index_now=False, device=device,
                               detector_precision=args.detector_precision)
        if args.qdrant:
            from chan.search import default_collection

            gallery.use_qdrant(args.qdrant, args.collection or default_collection(args.gallery), args.prefetch)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    index_in_background(gallery, comparisons)  # the page answers meanwhile, on the photos indexed so far
    from app.ui import build_demo, launch

    launch(build_demo(gallery, comparisons), server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
