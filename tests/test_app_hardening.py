"""The demo as an attacker sees it: raw API calls with server paths, oversized input, odd values."""
import httpx
import pytest

from app.handlers import MAX_OWN_CAPTIONS, NOT_AN_UPLOAD, Handlers
from app.served_photos import served_photos
from chan.checkpoint import DEFAULT_CHECKPOINT
from tests.conftest import call_api as _call


@pytest.fixture(scope="module")
def server(gallery):
    from app.ui import build_demo, launch

    demo = build_demo(gallery)
    launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield demo.local_url.rstrip("/")
    demo.close()


SERVER_FILE = str(DEFAULT_CHECKPOINT.with_suffix(".png"))


@pytest.mark.parametrize("image", [
    {"path": SERVER_FILE},  # a dict path without meta
    {"path": "/etc/hostname"},
    {"path": "/nope/x.jpg"},  # absent: the same message as present
    {"path": "checkpoints/chan-bert-flickr8k.png"},  # relative
    {"path": "/tmp/gradio/../../etc/hostname"},  # .. out of the upload folder
], ids=["no-meta", "etc", "absent", "relative", "dotdot"])
@pytest.mark.parametrize("api", ["rank_captions", "align"])
def test_server_paths_are_refused_the_same_way(server, api, image):
    data = [image, "a dog", ""]
    assert _call(server, api, data) == f"⚠️ {NOT_AN_UPLOAD}"
    assert "ms" in _call(server, "search_images", ["a dog", 3])  # still serving


def test_bare_string_paths_are_refused_whether_or_not_they_exist(server):
    # gradio's own validation refuses a bare string before any handler runs: the answer says nothing of the file
    assert _call(server, "rank_captions", [SERVER_FILE, "a dog", ""]) == _call(server, "rank_captions", ["/nope/x.jpg", "a dog", ""])
    assert "ranked" not in _call(server, "rank_captions", [SERVER_FILE, "a dog", ""])
    assert "ms" in _call(server, "search_images", ["a dog", 3])


def test_fake_filedata_meta_is_stopped(server):
    fake = {"path": SERVER_FILE, "meta": {"_type": "gradio.FileData"}}
    out = _call(server, "rank_captions", [fake, "a dog", ""])
    assert "Detected" not in out and "ranked" not in out  # gradio or our check refuses it; nothing is drawn
    assert "ms" in _call(server, "search_images", ["a dog", 3])


def test_file_route_serves_the_gallery_photos_only(server, gallery):
    served = served_photos(gallery)
    folder = next(iter(served.values())).parent
    assert sorted(folder.iterdir()) == sorted(served.values()) and len(served) == len(gallery.all_photos)
    source_folder = gallery.photos[0].path.parent  # the dataset's folder: every split's photos
    outside_split = next(p for p in sorted(source_folder.iterdir()) if p.name not in gallery.all_photos)
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{server}/gradio_api/file={served[gallery.photos[0].id]}").status_code == 200
        for refused in (outside_split, gallery.photos[0].path, SERVER_FILE):
            assert client.get(f"{server}/gradio_api/file={refused}").status_code in (403, 404), refused


def test_uploads_over_the_size_limit_are_refused(server):
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{server}/gradio_api/upload", files={"files": ("big.jpg", b"\0" * (11 * 2**20), "image/jpeg")})
    assert r.status_code == 413 or "size" in r.text.lower(), (r.status_code, r.text[:200])


@pytest.fixture(scope="module")
def handlers(gallery, tmp_path_factory):
    return Handlers(gallery, upload_folder=tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("k,message", [(float("nan"), "whole number"), (2.7, "whole number"), (0, "whole number"),
                                       (10**9, "whole number"), ("5", "whole number")])
def test_odd_k(handlers, k, message):
    assert message in handlers.search_images("a dog", k)[-1]


@pytest.mark.parametrize("query,message", [("\ud800 dog", "not valid Unicode"), ("\u200b\u200c\u200d\ufeff", "Type a caption"),
                                           ({"q": 1}, "must be text"), ("x" * 5000, "characters long")])
def test_odd_queries(handlers, query, message):
    assert message in handlers.search_images(query, 3)[-1]


def test_photo_id_must_be_a_gallery_name(handlers):
    assert "as text" in handlers.rank_captions(None, "", {"id": 1})[-1]
    assert "No gallery photo" in handlers.align(None, "a dog", "../../etc/passwd")[-1]


def test_own_captions_are_bounded(handlers, gallery):
    pid = gallery.photos[0].id
    many = "\n".join(f"caption {i}" for i in range(MAX_OWN_CAPTIONS + 1))
    assert f"at most {MAX_OWN_CAPTIONS}" in handlers.rank_captions(None, many, pid)[-1]
    assert "under 300 characters" in handlers.rank_captions(None, "a" * 301, pid)[-1]
    rows, _, status = handlers.rank_captions(None, "\n".join(f"a dog number {i}" for i in range(MAX_OWN_CAPTIONS)), pid)
    assert sum(r[3] == "your caption" for r in rows) == MAX_OWN_CAPTIONS and "ranked" in status
