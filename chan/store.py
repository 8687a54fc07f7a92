"""The one way tensors are kept on disk here: safetensors tagged with their kind, written atomically, read with checks."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

CACHE_DIR = Path(os.environ.get("CHAN_CACHE", Path(__file__).resolve().parents[1] / "cache"))  # every cache of the project


class StoreError(ValueError):
    """A file that cannot be used: missing, damaged, or of another kind; the message says which and where."""


def file_digest(path: Path) -> str:
    """The SHA-1 of a file's bytes (what identifies a checkpoint: caches and collections record it)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], kind: str) -> None:
    """Write `tensors` with `meta` and the tag `format=kind`, atomically: a killed run leaves the old file or the new
    one, never half of one."""
    write_bytes(path, dumps(tensors, meta, kind))


def dumps(tensors: dict[str, torch.Tensor], meta: dict[str, str], kind: str) -> bytes:
    """The bytes of the file `write` would write (to send a file between processes)."""
    return save(tensors, metadata={**meta, "format": kind})


def loads(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of `dumps`'s bytes (written by this process or a worker of it: trusted)."""
    return load(data)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: a killed run leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def read(path: Path, kind: str, what: str, tensors: bool = True,
         error: type[StoreError] = StoreError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (none with `tensors=False`: the header alone) and metadata of a file of this kind; `what` names
    the kind in messages, and `error` is the exception raised (a subclass of StoreError)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != kind:
                raise error(f"{path}: not a {what} (format {meta.get('format')!r}, expected {kind!r})")
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except StoreError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise error(f"{path}: not a readable {what} ({e}); delete it to rebuild it, or use another file") from e
    return out, meta
