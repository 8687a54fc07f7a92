"""Shared fixtures: the real Flickr8k folder from ../shared, small subsets of it, one extractor."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

# Caches written by the tests go to a temporary folder, never into the project's cache/.
os.environ.setdefault("CHAN_CACHE", tempfile.mkdtemp(prefix="chan-test-cache-"))

from chan.data import DEFAULT_DATA as FLICKR8K  # noqa: E402


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not FLICKR8K.is_dir():
        pytest.fail(f"{FLICKR8K} is missing: the tests read the real Flickr8k from ../shared")
    return FLICKR8K


def call_api(url: str, api: str, data: list) -> str:
    """POST a raw call to the demo and read its result: the last output (our message), or gradio's error text."""
    with httpx.Client(timeout=60) as client:
        event = client.post(f"{url}/gradio_api/call/{api}", content=json.dumps({"data": data}),
                            headers={"content-type": "application/json"})
        assert event.status_code == 200, event.text
        stream = client.get(f"{url}/gradio_api/call/{api}/{event.json()['event_id']}").text
    kind = [line for line in stream.splitlines() if line.startswith("event:")][-1].split(":", 1)[1].strip()
    payload = [line for line in stream.splitlines() if line.startswith("data:")][-1].split(":", 1)[1].strip()
    return payload if kind == "error" else json.loads(payload)[-1]


def butd_line(image_id, width, height, boxes, features) -> str:
    """One row as Anderson et al.'s bottom-up-attention extractor writes it."""
    import base64

    import numpy as np

    b64 = lambda a: base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()  # noqa: E731
    return "\t".join([str(image_id), str(width), str(height), str(len(boxes)), b64(boxes), b64(features)])


def make_flickr_subset(root: Path, src: Path, n_train: int, n_dev: int, n_test: int = 0) -> Path:
    """A Flickr8k-layout folder with the first photos of each split (symlinks, never copies)."""
    text, images = root / "Flickr8k_text", root / "Flicker8k_Dataset"
    text.mkdir(parents=True)
    images.mkdir()
    keep = set()
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        names = (src / "Flickr8k_text" / f"Flickr_8k.{split}Images.txt").read_text().split()[:n]
        (text / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
        keep.update(names)
    for name in keep:
        os.symlink(src / "Flicker8k_Dataset" / name, images / name)
    lines = (src / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines()
    (text / "Flickr8k.token.txt").write_text("\n".join(line for line in lines if line.split("#")[0] in keep) + "\n")
    return root


@pytest.fixture(scope="session")
def extractor():
    from chan.regions import RegionExtractor

    return RegionExtractor()


@pytest.fixture(scope="session")
def small_flickr(tmp_path_factory, flickr8k) -> Path:
    """200 train, 100 dev and 100 test photos of the real Flickr8k, with their own feature cache."""
    return make_flickr_subset(tmp_path_factory.mktemp("flickr-small"), flickr8k, 200, 100, 100)


@pytest.fixture(scope="session")
def gallery(small_flickr):
    """The default checkpoint over the 100 test photos of `small_flickr`."""
    from chan.checkpoint import DEFAULT_CHECKPOINT
    from chan.data import open_dataset
    from chan.gallery import Gallery

    return Gallery(DEFAULT_CHECKPOINT, open_dataset(small_flickr).split("test"), progress=False)


def plot_traces(plot) -> list:
    """The traces of a gr.Plot value written as Plotly JSON, with attribute access (trace.z, trace.x)."""
    return [SimpleNamespace(**t) for t in json.loads(plot.plot)["data"]]
