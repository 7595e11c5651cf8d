"""Image loading (URL, path, PIL image, array) and CLIP's preprocessing, with Pillow and NumPy.

Preprocessing, in CLIP's order: resize the shorter side to R (bicubic, aspect kept) in the image's
own mode, center-crop R x R, only then convert to RGB; scale to [0, 1], normalize with CLIP's mean
and std -> 1 x 3 x R x R float32. The order matters: Pillow resizes palette images with nearest
whatever filter is asked, and transparent ones premultiplied (fully transparent pixels turn black).

Deliberate differences from the original: EXIF orientation is applied; 16-bit and float samples
are scaled to 8 bits (the original clips them at 255); PA images are resized with nearest like P
(Pillow's bicubic resize of PA drops the palette: a black picture); extreme aspect ratios are refused.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .download import fetch_bytes
from .errors import DownloadError, ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# long side / short side. The short side is scaled to the resolution before the crop, so this
# bounds the resized image at R x (R * ratio) pixels (a 1 x 1,000,000 image would need 384 x 384 M)
MAX_ASPECT_RATIO = 100

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def load_image(
    source: ImageInput,
    timeout: float = 10.0,
    max_bytes: int = 50_000_000,
    max_pixels: int = 64_000_000,
) -> Image.Image:
    """A decoded PIL image from a URL, a file path, a PIL image or an H x W (x C) array: upright (EXIF
    orientation applied), 8-bit samples, and still in its own mode (P, RGBA, CMYK, ...), because
    `preprocess` converts to RGB only after the resize, as CLIP does."""
    if isinstance(source, Image.Image):
        image = source
        name = f"PIL image {_shown(source.filename)}" if getattr(source, "filename", "") else "PIL image"
    elif isinstance(source, np.ndarray):
        image, name = _from_array(source), "image array"
    elif isinstance(source, (str, Path)):
        text = str(source)
        if "://" in text:
            name = f"image at {_shown(text)}"
            data = _fetch(text, name, timeout, max_bytes)
        else:
            name = f"image file {_shown(text)}"
            data = _read_file(text, name, max_bytes)
        with _pillow_errors(name):
            image = Image.open(io.BytesIO(data))
    else:
        raise ImageError(
            f"image must be a URL, a file path, a PIL image or a NumPy array, got {type(source).__name__}"
        )
    # from the header of a file or a lazily opened image: nothing is decoded yet
    width, height = image.size
    _check_shape(width, height, name)
    if width * height > max_pixels:
        raise ImageError(f"{name} is too large: {width}x{height} pixels, over the limit of {max_pixels} pixels")
    with _pillow_errors(name):
        image.load()
        image = ImageOps.exif_transpose(image)  # a copy: a PIL image passed in is left as it was
    return _eight_bit(image)


def _shown(text: str) -> str:
    """A path or URL quoted for a message, shortened in the middle past 120 characters."""
    text = repr(text)
    return text if len(text) <= 120 else f"{text[:80]}...{text[-37:]}"


def _fetch(url: str, name: str, timeout: float, max_bytes: int) -> bytes:
    if url.split("://", 1)[0].lower() not in ("http", "https"):
        raise ImageError(f"{name}: a URL must start with http:// or https://")
    try:
        return fetch_bytes(url, timeout, max_bytes, what="image")
    except DownloadError as e:
        raise ImageError(str(e)) from None


def _read_file(source: str, name: str, max_bytes: int) -> bytes:
    try:
        path = Path(source).expanduser()
    except RuntimeError:  # "~user/..." naming no user
        raise ImageError(f"{name} does not exist (no user {source[1:].split('/', 1)[0]!r})") from None
    try:
        # non-blocking, so that a FIFO is opened at once (and refused below), not waited on for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageError(f"{name} does not exist") from None
    except (OSError, ValueError) as e:  # a name too long, no permission, a NUL byte
        raise ImageError(f"{name} cannot be opened: {getattr(e, 'strerror', None) or e}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{name} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{name} is not a regular file (a pipe, socket or device)")
        if info.st_size > max_bytes:
            raise ImageError(f"{name} is {info.st_size} bytes, over the limit of {max_bytes} bytes")
        # stat's size can be short (procfs says 0): the read itself stops past the cap
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(f"{name} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageError(f"{name} is over the limit of {max_bytes} bytes")
    return data


@contextmanager
def _pillow_errors(name: str):
    """Pillow's many exception types, while it opens or decodes, as one-line ImageErrors."""
    try:
        yield
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image Pillow can read") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit, Image.MAX_IMAGE_PIXELS
        raise ImageError(f"{name} is too large: {e}") from None
    except (OSError, SyntaxError, EOFError, struct.error) as e:
        raise ImageError(f"{name} is truncated or corrupt: {e}") from None
    except ValueError as e:  # a closed PIL image, a chunk over Pillow's limits
        raise ImageError(f"{name} cannot be read: {e}") from None


def _check_shape(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{name} is empty ({width}x{height} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{name} is {width}x{height} pixels, an aspect ratio over the limit of {MAX_ASPECT_RATIO}:1 "
            "(its short side is scaled to the model's resolution before the center crop)"
        )


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


def _eight_bit(image: Image.Image) -> Image.Image:
    """Integer (16/32-bit) and float images as 8-bit L, scaled: the original clips them at 255."""
    if image.mode.startswith("I"):  # 0..65535 -> 0..255
        array = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":  # 0..1 -> 0..255
        array = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8))


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """CLIP's preprocessing of an image in any mode -> 1 x 3 x R x R float32."""
    # np.array, not asarray: a writable copy, which torch.from_numpy takes without a warning
    return normalize(torch.from_numpy(np.array(center_crop(image, resolution)))[None]).contiguous()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP's scaling of cropped RGB pictures: N x R x R x 3 uint8 -> N x 3 x R x R float32 (channels-last
    strides, as it comes)."""
    mean, std = torch.tensor(CLIP_MEAN, dtype=torch.float32), torch.tensor(CLIP_STD, dtype=torch.float32)
    scaled = (pixels.float() / 255.0 - mean) / std
    return scaled.permute(0, 3, 1, 2)


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The R x R RGB picture the model sees: shorter side resized to R (bicubic) in the image's own
    mode, center-cropped, then converted to RGB."""
    image = _eight_bit(image)
    width, height = image.size
    _check_shape(width, height, "image")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    # Pillow resizes P and 1 with nearest whatever is asked; PA too here: its bicubic drops the palette
    resample = Image.Resampling.NEAREST if image.mode == "PA" else Image.Resampling.BICUBIC
    resized = image.resize(size, resample)
    # torchvision's center crop offsets: int(round(...)) with Python's round-half-to-even
    top = int(round((resized.height - resolution) / 2.0))
    left = int(round((resized.width - resolution) / 2.0))
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    try:
        return cropped.convert("RGB")
    except ValueError as e:
        raise ImageError(f"image mode {image.mode!r} cannot be converted to RGB: {e}") from None
