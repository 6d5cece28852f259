"""Robust image reading: any mode in, RGB uint8 out, or a clear reason why not.

Example:

```python
rgb = load_rgb("photo.png")  # grayscale, RGBA, CMYK, 16-bit all become RGB
rgb.shape[-1]
```
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# Decompression-bomb guard stays on, but real large photos (e.g. 12k x 12k scans) pass.
Image.MAX_IMAGE_PIXELS = 300_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 0 else 1.0) * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency over white, as a viewer shows it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | Path, max_side: int | None = None) -> tuple[Image.Image, str]:
    """Open and fully decode an image as RGB. Returns (image, original mode).

    Raises BadImageError for missing, empty, truncated or non-image files.
    `max_side` downsizes very large images early to bound memory.
    """
    path = Path(path)
    if not path.exists():
        raise BadImageError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: zero-byte file")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if max_side and max(img.size) > max_side:
                img.draft("RGB", (max_side, max_side))  # cheap JPEG downscale
            img.load()
            rgb = _to_rgb(img)
            if max_side and max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side))
            return rgb.copy(), mode
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def load_rgb(path: str | Path, size: tuple[int, int] | None = None, max_side: int | None = 2048) -> np.ndarray:
    """RGB uint8 array [H, W, 3], optionally resized to `size` (width, height)."""
    img, _ = open_rgb(path, max_side=max_side)
    if size is not None:
        img = img.resize(size, Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
