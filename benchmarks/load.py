"""Load test of the demo: N clients send a mix of searches, alignments and uploads, in rounds.

python benchmarks/load.py [--clients 8 --requests 100 --rounds 3]

Starts `app.py` on a free loopback port (its default gallery and checkpoint unless given), drives it
through Gradio's raw HTTP API (70% search, 20% inspector on a gallery photo, 10% caption ranking
for an uploaded photo), and prints per endpoint the errors, p50 / p95 / max latency and
throughput, and the server's RSS after each round. Bounded: clients x requests x rounds calls,
each with a timeout, and the whole run stops at --deadline. Only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a dog runs through the snow", "two children play on the beach", "a man rides a bike down a hill",
           "a girl in a red dress", "people walking in a busy street", "a brown dog swims in a lake"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def call(client: httpx.Client, url: str, api: str, data: list) -> tuple[bool, float]:
    """One raw API call: (answered without an error, seconds). A handler's warning counts as an error too."""
    start = time.perf_counter()
    try:
        event = client.post(f"{url}/gradio_api/call/{api}", json={"data": data})
        stream = client.get(f"{url}/gradio_api/call/{api}/{event.json()['event_id']}").text
        ok = "event: complete" in stream and "⚠️" not in stream
    except (httpx.HTTPError, ValueError, KeyError):
        ok = False
    return ok, time.perf_counter() - start


def upload_file(client: httpx.Client, url: str, photo: Path) -> dict:
    """Upload a photo as the page does (not timed); returns the FileData that names it."""
    r = client.post(f"{url}/gradio_api/upload", files={"files": (photo.name, photo.read_bytes(), "image/jpeg")})
    return {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": photo.name}


def client_run(url: str, requests: int, seed: int, photo_ids: list[str], uploads: list[Path]) -> list[tuple[str, bool, float]]:
    """One client's requests; each caption ranking uploads another photo first (the app keeps the regions of its
    latest uploads, and a photo seen again would skip the extraction this request is meant to exercise)."""
    rng = random.Random(seed)
    out = []
    with httpx.Client(timeout=60) as client:
        for _ in range(requests):
            x = rng.random()
            if x < 0.7:
                api, data = "search_images", [rng.choice(QUERIES), 12]
            elif x < 0.9:
                api, data = "align", [None, rng.choice(QUERIES), rng.choice(photo_ids)]
            else:
                try:
                    api, data = "rank_captions", [upload_file(client, url, rng.choice(uploads)), "a dog on the grass", ""]
                except (httpx.HTTPError, ValueError, KeyError):  # a refused upload counts as that request's error
                    out.append(("rank_captions", False, 0.0))
                    continue
            out.append((api, *call(client, url, api, data)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=100, help="requests per client per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deadline", type=float, default=1800, help="stop after this many seconds in all (default: %(default)s)")
    p.add_argument("--gallery", type=Path, default=None, help="the app's --gallery (default: the app's default)")
    args = p.parse_args()
    if args.clients * args.requests * args.rounds > 10_000:
        p.error("at most 10,000 requests in one run")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sys.path.insert(0, str(ROOT))
    from chan.data import open_dataset
    from chan.gallery import DEFAULT_GALLERY

    gallery = args.gallery or DEFAULT_GALLERY
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--gallery", str(gallery)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    try:
        while True:
            try:
                httpx.get(f"{url}/gradio_api/info", timeout=2).raise_for_status()
                break
            except (httpx.HTTPError, ValueError):
                if server.poll() is not None or time.time() - started > 600:
                    print("the app did not start", file=sys.stderr)
                    return 1
                time.sleep(1)
        dataset = open_dataset(gallery)
        photos = dataset.split(dataset.default_split()).photos
        photo_ids, uploads = [ph.id for ph in photos[:200]], [ph.path for ph in photos[200:] or photos]

        rss, results = [], []
        for round_ in range(args.rounds):
            if time.time() - started > args.deadline:
                print(f"deadline reached after {round_} rounds")
                break
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                runs = pool.map(lambda c: client_run(url, args.requests, 1000 * round_ + c, photo_ids, uploads),
                                range(args.clients))
                rows = [r for run in runs for r in run]
            wall = time.perf_counter() - t0
            rss.append(rss_mb(server.pid))
            results.append((rows, wall))
            print(f"round {round_ + 1}: {len(rows)} requests in {wall:.1f} s, server RSS {rss[-1]:.0f} MB", flush=True)

        print("\n| endpoint | requests | errors | p50 ms | p95 ms | max ms | req/s |\n|---|---|---|---|---|---|---|")
        all_rows = [r for rows, _ in results for r in rows]
        wall = sum(w for _, w in results)
        summary = {}
        for api in ("search_images", "align", "rank_captions"):
            lat = np.array([s for a, _, s in all_rows if a == api]) * 1000
            errors = sum(1 for a, ok, _ in all_rows if a == api and not ok)
            if len(lat):
                p50, p95, mx = np.percentile(lat, 50), np.percentile(lat, 95), lat.max()
                summary[api] = {"requests": len(lat), "errors": errors, "p50_ms": p50, "p95_ms": p95, "max_ms": mx}
                print(f"| {api} | {len(lat)} | {errors} | {p50:.0f} | {p95:.0f} | {mx:.0f} | {len(lat) / wall:.1f} |")
        print("\nRSS per round (MB): " + ", ".join(f"{r:.0f}" for r in rss))
        growth = rss[-1] - rss[0] if rss else float("nan")
        errors = sum(1 for _, ok, _ in all_rows if not ok)
        (ROOT / "benchmarks" / "load.json").write_text(json.dumps({"endpoints": summary, "rss_mb": rss}, indent=1))
        search_p95 = summary.get("search_images", {}).get("p95_ms", float("nan"))
        print(f"{len(all_rows)} requests, {errors} errors, search p95 {search_p95:.0f} ms, RSS growth {growth:.0f} MB")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
