"""Opening any photo a user may have: any PIL mode, EXIF orientation, corrupt files, bombs."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class PhotoError(ValueError):
    """The file is not a photo we can use; the message says why in plain words."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, high bit depths rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
        lo = 0.0 if image.mode.startswith("I;16") else min(float(a.min()), 0.0)
        image = Image.fromarray(np.clip((a - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_photo(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a path, raw bytes or PIL image as an upright RGB photo, or raise PhotoError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                image = source
            elif isinstance(source, bytes):
                image = Image.open(io.BytesIO(source))
            else:
                image = Image.open(source)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        limit = Image.MAX_IMAGE_PIXELS or 0
        raise PhotoError(
            f"this image is too large to open safely (over {limit / 1e6:.0f} megapixels); "
            "downscale it and try again"
        ) from None
    except FileNotFoundError:
        raise PhotoError(f"no such file: {source}") from None
    except UnidentifiedImageError:
        raise PhotoError("this file is not an image (or not a format we can read)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise PhotoError(f"this image is corrupt or truncated and cannot be decoded ({e})") from None
