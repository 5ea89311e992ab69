"""Turning a photo or scan of one handwritten digit into what the CNN was trained on.

MNIST's own recipe (LeCun's MNIST page): each digit was size-normalised into a 20x20
box preserving its aspect ratio, then centred in 28x28 by its centre of mass; light ink
on a black background, pixels scaled to [0, 1] as in training (`model.data.scale_images`).
`mnist_style(image)` does the same to any image:

    grey -> background found (the median grey; dark ink on light paper is inverted)
    -> background subtracted, noise floor removed, contrast stretched to [0, 1]
    -> cropped to the ink's bounding box (specks away from the digit dropped)
    -> resized with Lanczos so the longer side is 20 px
    -> pasted into 28x28 with its centre of mass at MNIST's (14, 14).

An MNIST test digit comes out of it unchanged (its box is already 20 px on the longer
side and its centre of mass within half a pixel of (14, 14)). Pillow and scipy do the
resampling and the measuring; nothing here imports keras.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

IMAGE_SIZE = 28
DIGIT_BOX = 20
# Where MNIST's digits have their centre of mass (mean over the test set: 13.99, 14.00).
CENTRE_OF_MASS = (14.0, 14.0)
# Folder members predicted by predict.py; a file named on the command line is read whatever its name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# An image whose ink stands less than this far above the background (in 0-255 grey levels,
# after smoothing) holds no digit: a blank page.
MIN_INK_CONTRAST = 24.0
# Larger images are shrunk to this many pixels on their longer side first (working_size).
WORKING_SIDE = 1024


class ImageError(Exception):
    """An input could not be turned into a digit; the message is one line and says why."""


def open_image(source) -> Image.Image:
    """Read a path or bytes as an upright image: PNG, JPEG, BMP, GIF (first frame), ...

    Phone photos store pixels as the sensor saw them plus an EXIF orientation tag;
    `exif_transpose` applies the tag, so the digit is upright as the user saw it."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.seek(0)  # a GIF's (or TIFF's) first frame
        image.load()
        return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large ({error})") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageError(f"damaged or unreadable image ({' '.join(str(error).split())})") from None


def grey_levels(image: Image.Image) -> np.ndarray:
    """float32 (H, W) grey levels in [0, 255]. A transparent background (a digit drawn in a
    paint program) is filled with the colour that contrasts with the opaque strokes."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        if alpha.min() < 1.0:
            opaque = alpha > 0.5
            strokes = float(grey[opaque].mean()) if opaque.any() else 0.0
            background = 255.0 if strokes < 128 else 0.0
            return grey * alpha + background * (1.0 - alpha)
        return grey
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float scans: stretch their own range to 0-255.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.asarray(image.convert("L"), dtype=np.float32)


def ink_image(grey: np.ndarray) -> np.ndarray:
    """Light ink on a zero background, stretched to [0, 1], specks away from the digit
    removed. Raises ImageError for an image with no ink."""
    background = float(np.median(grey))
    low, high = float(grey.min()), float(grey.max())
    # The background is what most of the image is; ink is what differs from it. Paper
    # nearer the light end of the image's range means dark ink on light paper.
    ink = grey - background if high - background >= background - low else background - grey
    ink = np.clip(ink, 0.0, None)
    # Smoothing over about a stroke's width makes the ink's level and extent immune to
    # pixel noise (a stroke is several pixels wide; noise is not).
    sigma = max(0.5, min(grey.shape) / 150.0)
    smooth = ndimage.gaussian_filter(ink, sigma)
    peak = float(smooth.max())
    if peak < MIN_INK_CONTRAST:
        raise ImageError(f"no ink found (blank image: the darkest and lightest marks differ by under {MIN_INK_CONTRAST:.0f} grey levels)")
    # The digit: connected regions of the smoothed ink above a quarter of its peak that
    # hold a real share of it (a speck of dust or noise does not), grown by a margin that
    # keeps each stroke's soft edges.
    regions, count = ndimage.label(smooth > 0.25 * peak)
    mass = ndimage.sum(smooth, regions, index=np.arange(1, count + 1))
    keep = np.isin(regions, 1 + np.flatnonzero(mass >= 0.05 * mass.max()))
    keep = ndimage.binary_dilation(keep, iterations=max(2, int(round(3 * sigma))))
    # The noise floor: spread of the background (median absolute deviation), zero on a clean scan.
    outside = ink[~keep]
    floor = 3.0 * 1.4826 * float(np.median(np.abs(outside - np.median(outside)))) if outside.size else 0.0
    level = float(np.max(ink[keep]))
    # On a noisy image a few noise pixels over a stroke must not set the white point; the
    # 99th percentile of the strokes does. (A clean scan keeps its own maximum.)
    strokes = ink[keep & (smooth > 0.5 * peak)]
    if floor > 0 and strokes.size >= 50:
        level = min(level, float(np.percentile(strokes, 99)))
    if level <= floor:
        raise ImageError("no ink found (the marks are no stronger than the image's noise)")
    return np.where(keep, np.clip((ink - floor) / (level - floor), 0.0, 1.0), 0.0).astype(np.float32)


def fit_digit(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink's box, resize so the longer side is DIGIT_BOX, and place in
    IMAGE_SIZE x IMAGE_SIZE with the centre of mass at CENTRE_OF_MASS."""
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        raise ImageError("no ink found (blank image)")
    crop = ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    height, width = crop.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != (width, height):
        # Lanczos on float pixels: no banding; its slight ringing is clipped away.
        resized = Image.fromarray(crop, mode="F").resize(size, Image.Resampling.LANCZOS)
        crop = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
        # Shrinking a large photo averages its strokes' cores with their soft edges; MNIST's
        # strokes reach full white at 28x28, so the white point is set again here.
        crop = crop / max(float(crop.max()), 1e-6)
    centre_y, centre_x = ndimage.center_of_mass(crop)
    top = int(round(CENTRE_OF_MASS[0] - centre_y))
    left = int(round(CENTRE_OF_MASS[1] - centre_x))
    # Keep the whole box inside the frame (a lopsided digit's mass is off its box's centre).
    top = min(max(top, 0), IMAGE_SIZE - crop.shape[0])
    left = min(max(left, 0), IMAGE_SIZE - crop.shape[1])
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[top: top + crop.shape[0], left: left + crop.shape[1]] = crop
    return out


def working_size(grey: np.ndarray) -> np.ndarray:
    """A phone photo (12 megapixels) shrunk by box-averaging to at most WORKING_SIDE px on
    its longer side: the digit keeps well over 20 px, and the filters below run in
    milliseconds instead of seconds."""
    factor = -(-max(grey.shape) // WORKING_SIDE)
    if factor <= 1:
        return grey
    return np.asarray(Image.fromarray(grey, mode="F").reduce(factor), dtype=np.float32)


def mnist_style(image: Image.Image) -> np.ndarray:
    """float32 (28, 28) in [0, 1]: the digit in `image` as MNIST presents its digits."""
    return fit_digit(ink_image(working_size(grey_levels(image))))


def preprocess(source) -> np.ndarray:
    """A path or bytes -> float32 (28, 28) in [0, 1]; raises ImageError with the reason."""
    return mnist_style(open_image(source))
