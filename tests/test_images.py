"""Preprocessing (CLIP's, exactly) and image loading from every kind of source, good and bad."""

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from magma_ipu import ImageError
from magma_ipu.images import CLIP_MEAN, CLIP_STD, load_image, preprocess


def png_bytes(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_two_colour_image_by_hand():
    # left half red, right half blue, already 64 x 64: resize and crop change nothing inside
    array = np.zeros((64, 64, 3), np.uint8)
    array[:, :32] = (255, 0, 0)
    array[:, 32:] = (0, 0, 255)
    x = preprocess(Image.fromarray(array), 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    red = [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], (0.0 - CLIP_MEAN[1]) / CLIP_STD[1], (0.0 - CLIP_MEAN[2]) / CLIP_STD[2]]
    blue = [(0.0 - CLIP_MEAN[0]) / CLIP_STD[0], (0.0 - CLIP_MEAN[1]) / CLIP_STD[1], (1.0 - CLIP_MEAN[2]) / CLIP_STD[2]]
    assert torch.allclose(x[0, :, 10, 5], torch.tensor(red), atol=1e-6)
    assert torch.allclose(x[0, :, 50, 60], torch.tensor(blue), atol=1e-6)


def reference_preprocess(image: Image.Image, r: int) -> torch.Tensor:
    """The sheet's steps written out plainly, as torchvision's Resize/CenterCrop define them."""
    w, h = image.size
    if w <= h:
        ow, oh = r, int(r * h / w)
    else:
        oh, ow = r, int(r * w / h)
    image = image.resize((ow, oh), Image.BICUBIC)
    top, left = int(round((oh - r) / 2.0)), int(round((ow - r) / 2.0))
    image = image.crop((left, top, left + r, top + r)).convert("RGB")
    x = torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((x - mean) / std)[None]


@pytest.mark.parametrize("size", [(640, 427), (300, 500), (97, 97), (385, 1000), (1001, 384)])
def test_matches_the_reference_formula(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours, ref = preprocess(image, 384), reference_preprocess(image, 384)
    assert ours.shape == ref.shape == (1, 3, 384, 384)
    assert (ours - ref).abs().max().item() < 1e-6


def test_exif_orientation_is_honoured(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # white left half, landscape
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(str(path))
    assert loaded.size == (20, 40)  # displayed upright: portrait
    top, bottom = np.asarray(loaded)[:20].mean(), np.asarray(loaded)[20:].mean()
    assert top > 200 and bottom < 50


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "I", "F", "LA", "1"])
def test_every_mode_becomes_rgb(mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (30, 50), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((30, 50), dtype=np.float32))
    else:
        image = rgb.convert(mode)
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (50, 30)
    assert preprocess(out, 64).shape == (1, 3, 64, 64)


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    array = np.full((16, 16), 65535, np.uint16)
    array[:, :8] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    out = np.asarray(load_image(str(path)))
    assert out[:, 8:].min() == 255 and out[:, :8].max() == 0


@pytest.mark.parametrize(
    "array, shape",
    [(np.zeros((10, 12, 3), np.uint8), (12, 10)), (np.ones((10, 12), np.float32), (12, 10)),
     (np.zeros((10, 12, 4), np.uint16), (12, 10)), (np.zeros((10, 12, 1), np.uint8), (12, 10))],
)
def test_arrays_are_accepted(array, shape):
    assert load_image(array).size == shape


def test_bad_arrays_and_types_are_refused():
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((3, 4, 5, 6), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(ImageError, match="dtype"):
        load_image(np.zeros((4, 4, 3), np.complex64))
    with pytest.raises(ImageError, match="must be a URL"):
        load_image(42)


def test_files_that_are_missing_corrupt_or_not_images(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(str(tmp_path / "nope.png"))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        load_image(str(tmp_path / "text.png"))
    whole = png_bytes(Image.new("RGB", (64, 64), "red"), fmt="JPEG")
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(str(tmp_path / "cut.jpg"))
    with pytest.raises(ImageError, match="http:// or https://"):
        load_image("ftp://example.org/cat.png")


def test_size_and_pixel_caps(tmp_path):
    data = png_bytes(Image.new("RGB", (300, 200), "green"))
    (tmp_path / "a.png").write_bytes(data)
    with pytest.raises(ImageError, match="over the limit of 100 bytes"):
        load_image(str(tmp_path / "a.png"), max_bytes=100)
    with pytest.raises(ImageError, match="300x200 pixels, over the limit of 1000"):
        load_image(str(tmp_path / "a.png"), max_pixels=1000)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # a 10000 x 10000 PNG of one colour: tiny on disk, 100 M pixels once decoded
    data = png_bytes(Image.new("L", (10000, 10000)))
    (tmp_path / "bomb.png").write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="pixels, over the limit"):
        load_image(str(tmp_path / "bomb.png"))
    assert time.perf_counter() - start < 5  # refused from the header, never decoded


def test_url_loads_from_a_local_server(http_server):
    http_server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, png_bytes(Image.new("RGB", (40, 30), "blue")))
    image = load_image(http_server.url("/cat.png"))
    assert image.size == (40, 30) and image.getpixel((5, 5)) == (0, 0, 255)


def test_url_failures_each_say_what_went_wrong(http_server):
    http_server.routes["/page"] = (200, {"Content-Type": "text/html"}, b"<html>hi</html>")
    http_server.routes["/big"] = (200, {}, b"x" * 5000)

    def slow(handler):
        time.sleep(2)
        handler.send_response(200)
        handler.end_headers()

    def endless(handler):  # no Content-Length: the cap must bite while streaming
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(1000):
                handler.wfile.write(b"y" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass

    http_server.routes["/slow"] = slow
    http_server.routes["/endless"] = endless
    cases = [
        ("/missing", {}, "HTTP 404"),
        ("/page", {}, "not an image"),
        ("/big", {"max_bytes": 1000}, "5000 bytes, over the limit of 1000 bytes"),
        ("/endless", {"max_bytes": 10_000}, "over the limit of 10000 bytes"),
        ("/slow", {"timeout": 0.5}, "timeout"),
    ]
    for path, kwargs, pattern in cases:
        with pytest.raises(ImageError, match=pattern):
            load_image(http_server.url(path), **kwargs)


def test_unreachable_host_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match="could not be reached"):
        load_image(f"http://127.0.0.1:{port}/x.png", timeout=2)
