"""The gallery's photos as the page serves them: one folder that holds exactly those files.

Gradio's file route serves a static folder whole, and checks a file against an allow-list of single
files one entry at a time (1,000 files cost 0.7 s per result page, measured). So the served folder is
built to hold the gallery's photos and nothing else: hard links (copies where the photos lie on
another file system), under a name derived from the photos and their file stats, so a changed
photo gets a new folder and a restart re-uses an unchanged one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from chan.gallery import Gallery
from chan.store import CACHE_DIR


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not permitted
        shutil.copy2(source, target)


def served_photos(gallery: Gallery, root: Path = CACHE_DIR / "served-photos") -> dict[str, Path]:
    """Each gallery photo id -> its file in the served folder (built on first use; photos without a file are left out)."""
    sources = {pid: p.path.resolve() for pid, p in gallery.all_photos.items() if p.path and p.path.is_file()}
    names = {pid: f"{i:05d}-{path.name}" for i, (pid, path) in enumerate(sorted(sources.items()))}
    stats = [[pid, str(path), (st := path.stat()).st_size, st.st_mtime_ns] for pid, path in sorted(sources.items())]
    folder = root / hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]
    if not folder.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        for pid, source in sources.items():
            _link_or_copy(source, building / names[pid])
        try:
            building.rename(folder)
        except OSError:  # another process built the same folder meanwhile
            shutil.rmtree(building, ignore_errors=True)
    return {pid: folder / name for pid, name in names.items()}
