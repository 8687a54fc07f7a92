"""How soon `python app.py` answers, on an empty cache and on a warm one; prints a table, writes JSON.

python benchmarks/startup.py [--gallery DIR] [--json FILE] [--warm-only]
Cold: a new, empty cache folder: the page must answer while the gallery is indexed in the background;
the table also gives the time to the first searchable photos and to the whole index. Warm: the same
cache again, every feature and the index already there. Each is one launch of a real server process.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import call_api  # noqa: E402

TARGETS_S = {"cold: page answers": 15, "warm: page answers, index loaded": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cache: Path, gallery: Path | None, whole_index: bool) -> dict[str, float]:
    """Seconds from the process start to the page answering, to a search over some photos, and (cold) to the whole index."""
    port = _free_port()
    args = [sys.executable, "app.py", "--port", str(port)] + (["--gallery", str(gallery)] if gallery else [])
    start = time.monotonic()
    app = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "CHAN_CACHE": str(cache)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, times = f"http://127.0.0.1:{port}", {}
    try:
        while "page" not in times:
            if app.poll() is not None:
                raise SystemExit("the app stopped; run it by hand to see why")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    times["page"] = time.monotonic() - start
            except httpx.HTTPError:
                time.sleep(0.1)
        while "whole" not in times:
            status = call_api(url, "search_images", ["a dog runs on the grass", 5])
            if status.startswith("Top 5") and "first" not in times:
                times["first"] = time.monotonic() - start
            if status.startswith("Top 5") and "indexed so far" not in status:
                times["whole"] = time.monotonic() - start
            if not whole_index and "first" in times:
                break
            time.sleep(0.5)
    finally:
        app.terminate()
        app.wait(30)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=Path, default=None, help="a gallery folder (default: the app's bundled gallery)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "startup.json")
    p.add_argument("--warm-only", action="store_true",
                   help="one warm launch on the project's own cache (run the app once before, so that it is filled)")
    args = p.parse_args()
    if args.warm_only:
        warm = launch(Path(os.environ.get("CHAN_CACHE", ROOT / "cache")), args.gallery, whole_index=False)
        print(f"warm: page answers {warm['page']:.1f} s, first search {warm['first']:.1f} s after launch (target 3 s)")
        return
    with tempfile.TemporaryDirectory(prefix="chan-startup-") as cache:
        cold = launch(Path(cache), args.gallery, whole_index=True)
        warm = launch(Path(cache), args.gallery, whole_index=False)
    rows = {
        "cold: page answers": cold["page"],
        "cold: first search (photos indexed so far)": cold["first"],
        "cold: whole gallery indexed": cold["whole"],
        "warm: page answers, index loaded": max(warm["page"], warm.get("first", 0)),
    }
    print("| startup (empty cache, then warm) | seconds | target |\n|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s:.1f} | {TARGETS_S.get(name, '')} |")
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
