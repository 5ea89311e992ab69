"""Photo-like images of MNIST digits, made the way people photograph or scan a digit:
a larger canvas, the digit off-centre and at another size, dark ink on light paper or
light on dark, uneven lighting, blur, sensor noise and JPEG artefacts. Used by
tests/test_predict.py to check predict.py's preprocessing as a user would meet it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage


def photo_like(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """JPEG bytes of one uint8 (28, 28) MNIST digit as a photo-like image."""
    scale = rng.uniform(2.0, 6.0)
    size = int(round(28 * scale))
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    canvas_h, canvas_w = (int(size * rng.uniform(1.3, 2.5)) for _ in range(2))
    canvas = np.zeros((canvas_h, canvas_w), dtype=np.float32)
    top, left = rng.integers(0, canvas_h - size + 1), rng.integers(0, canvas_w - size + 1)
    canvas[top: top + size, left: left + size] = np.clip(ink, 0, 1)
    canvas = ndimage.gaussian_filter(canvas, rng.uniform(0.3, 1.5) * scale / 2)
    paper, pen = (rng.uniform(150, 240), rng.uniform(10, 90)) if rng.random() < 0.5 else (rng.uniform(0, 60), rng.uniform(170, 255))
    # Uneven lighting: a gentle gradient across the page.
    gradient = np.linspace(-1, 1, canvas_w)[None, :] * rng.uniform(0, 15)
    grey = paper + (pen - paper) * canvas + gradient + rng.normal(0, rng.uniform(2, 10), canvas.shape)
    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:  # a colour photo of the page
        tint = rng.uniform(0.85, 1.0, 3)
        image = Image.fromarray(np.clip(np.asarray(image, np.float32)[..., None] * tint, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(30, 85)))
    return buffer.getvalue()
