"""Launch the CHAN demo: python app.py [--gallery DIR] [--checkpoint PATH] [--host H] [--port P]."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Nothing leaves this machine: no analytics, no hub look-ups.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from chan.checkpoint import DEFAULT_CHECKPOINT
    from chan.data import DEFAULT_DATA

    p = argparse.ArgumentParser(description="CHAN demo: caption -> images, image -> captions, and the alignment inspector.")
    p.add_argument("--gallery", type=Path, default=DEFAULT_DATA,
                   help="a dataset folder: Flickr8k or COCO layout, a plain image folder, or precomputed features "
                        "(<split>_ims.npy + <split>_caps.txt, with a checkpoint from import-official) (default: %(default)s)")
    p.add_argument("--split", default=None, help="gallery split (default: test where the dataset has one, else every photo)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="CHAN checkpoint (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    from chan.gallery import open_gallery

    try:
        gallery = open_gallery(args.gallery, args.checkpoint, args.split)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from app.ui import build_demo, launch

    launch(build_demo(gallery), gallery, server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
