"""Image loading (URL, path, PIL image, array) and CLIP's preprocessing, with Pillow and NumPy.

Preprocessing: resize the shorter side to R (bicubic, aspect kept), center-crop R x R,
scale to [0, 1], normalize with CLIP's mean and std -> 1 x 3 x R x R float32.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .download import fetch_bytes
from .errors import DownloadError, ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def load_image(
    source: ImageInput,
    timeout: float = 10.0,
    max_bytes: int = 50_000_000,
    max_pixels: int = 64_000_000,
) -> Image.Image:
    """An RGB PIL image from a URL, a file path, a PIL image or an H x W (x C) array."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (str, Path)):
        data = _read_source(str(source), timeout, max_bytes)
        image = _decode(data, str(source), max_pixels)
    else:
        raise ImageError(
            f"image must be a URL, a file path, a PIL image or a NumPy array, got {type(source).__name__}"
        )
    if image.width * image.height > max_pixels:
        raise ImageError(f"image is {image.width}x{image.height} pixels, over the limit of {max_pixels}")
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image is empty ({image.width}x{image.height})")
    return _to_rgb(image)


def _read_source(source: str, timeout: float, max_bytes: int) -> bytes:
    if source.startswith(("http://", "https://")):
        try:
            return fetch_bytes(source, timeout, max_bytes, what="image")
        except DownloadError as e:
            raise ImageError(str(e)) from None
    if "://" in source:
        raise ImageError(f"image URL {source!r} must start with http:// or https://")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ImageError(f"image file {source!r} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"image file {source!r} is {size} bytes, over the limit of {max_bytes} bytes")
    return path.read_bytes()


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:  # known from the header, before decoding
            raise ImageError(
                f"image {name!r} is {image.width}x{image.height} pixels, over the limit of {max_pixels}"
            )
        image.load()
        return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise ImageError(f"{name!r} is not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name!r} refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {name!r} is truncated or corrupt: {e}") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"image array must be H x W, H x W x 3 or H x W x 4, got shape {array.shape}")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("image array holds NaN or infinite values")
        return Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    if array.dtype == np.uint16:
        return Image.fromarray((array // 257).astype(np.uint8))
    raise ImageError(f"image array dtype must be uint8, uint16 or float in [0, 1], got {array.dtype}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16/32-bit integer samples: 0..65535 -> 0..255
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / 257.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    try:
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"image mode {image.mode!r} cannot be converted to RGB: {e}") from None


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """CLIP's preprocessing of an RGB image -> 1 x 3 x R x R float32."""
    pixels = np.asarray(center_crop(image, resolution), dtype=np.float32) / 255.0  # R x R x 3
    pixels = (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The R x R picture the model sees: shorter side resized to R (bicubic), then center-cropped."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    # torchvision's center crop offsets: int(round(...)) with Python's round-half-to-even
    top = int(round((resized.height - resolution) / 2.0))
    left = int(round((resized.width - resolution) / 2.0))
    return resized.crop((left, top, left + resolution, top + resolution))
