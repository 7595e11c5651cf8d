"""Preprocessing (CLIP's, exactly) and image loading from every kind of source, good and bad."""

import io
import os
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from magma_ipu import ImageError, MagmaError
from magma_ipu.images import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_ASPECT_RATIO,
    center_crop,
    load_image,
    preprocess,
)


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


def reference_preprocess(image: Image.Image, r: int, resample=Image.BICUBIC) -> torch.Tensor:
    """CLIP's steps written out with plain PIL and NumPy, in its order (torchvision's Resize and
    CenterCrop on a PIL image): resize the shorter side in the image's own mode, crop, only then RGB."""
    w, h = image.size
    if w <= h:
        ow, oh = r, int(r * h / w)
    else:
        oh, ow = r, int(r * w / h)
    image = image.resize((ow, oh), resample)
    top, left = int(round((oh - r) / 2.0)), int(round((ow - r) / 2.0))
    x = np.asarray(image.crop((left, top, left + r, top + r)).convert("RGB"), np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def image_in_mode(mode: str, size=(150, 97)) -> Image.Image:
    """Noise in `mode`. With alpha: the left third fully transparent (coloured underneath), the
    middle third partly, the rest opaque. CMYK with all four inks (a converted RGB image has K = 0)."""
    w, h = size
    rng = np.random.default_rng(7)
    if mode == "CMYK":
        return Image.frombytes("CMYK", size, rng.integers(0, 256, (h, w, 4), dtype=np.uint8).tobytes())
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[:, : w // 3, 3] = 0
    rgba[:, 2 * w // 3 :, 3] = 255
    image = Image.fromarray(rgba)
    return image if mode == "RGBA" else image.convert(mode)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("size", [(640, 427), (300, 500), (97, 97), (385, 1000), (1001, 384)])
def test_matches_the_reference_formula(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours, ref = preprocess(image, 384), reference_preprocess(image, 384)
    assert ours.shape == ref.shape == (1, 3, 384, 384)
    assert (ours - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("size", [(150, 97), (37, 53)])
@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "RGB", "L", "CMYK"])
def test_resized_in_its_own_mode_then_converted(mode, size):
    image = image_in_mode(mode, size)
    assert max_diff(preprocess(image, 64), reference_preprocess(image, 64)) < 1e-6


@pytest.mark.parametrize("mode", ["P", "RGBA"])
def test_converting_first_would_differ(mode):
    # what we did before: RGB first, then resize. Palette images then got bicubic instead of
    # nearest; transparent pixels kept their colour instead of coming out black
    image = image_in_mode(mode)
    assert max_diff(preprocess(image, 64), reference_preprocess(image.convert("RGB"), 64)) > 0.5


def test_transparent_pixels_come_out_black():
    rgba = np.random.default_rng(1).integers(0, 256, (97, 150, 4), dtype=np.uint8)
    rgba[:, :75, 3] = 0  # left half fully transparent: about the crop's left 28 columns
    x = preprocess(Image.fromarray(rgba), 64)
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])[:, None, None]
    assert max_diff(x[0, :, :, :20], black.expand(3, 64, 20)) < 1e-6
    assert x[0, :, :, 40:].std() > 0.5  # the opaque noise is still there


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK"])
def test_every_input_kind_keeps_the_original_order(mode, tmp_path, http_server):
    image = image_in_mode(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"  # lossless in every mode here
    data = png_bytes(image, fmt=fmt)
    expected = reference_preprocess(Image.open(io.BytesIO(data)), 64)
    (tmp_path / "x.img").write_bytes(data)
    http_server.routes["/x.img"] = (200, {}, data)
    sources = {
        "path": tmp_path / "x.img",
        "URL": http_server.url("/x.img"),
        "PIL image": image,
        "upload (opened lazily)": Image.open(io.BytesIO(data)),
        "loaded twice, as the session does": load_image(str(tmp_path / "x.img")),
    }
    if mode == "RGBA":
        sources["array"] = np.asarray(image)
    for kind, source in sources.items():
        assert max_diff(preprocess(load_image(source), 64), expected) < 1e-6, kind


def test_pa_is_resized_with_nearest_like_p():
    # deliberate difference: Pillow's bicubic resize of PA drops the palette (a black picture)
    image = image_in_mode("RGBA").convert("PA")
    x = preprocess(image, 64)
    assert max_diff(x, reference_preprocess(image, 64, Image.NEAREST)) < 1e-6
    assert max_diff(x, reference_preprocess(image, 64)) > 0.5


def test_sixteen_bit_is_scaled_before_the_resize():
    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65536, (97, 150), dtype=np.uint16)
    scaled = Image.fromarray((deep / 257.0 + 0.5).astype(np.uint8))
    expected = reference_preprocess(scaled, 64)
    assert max_diff(preprocess(Image.fromarray(deep), 64), expected) < 1e-6
    assert max_diff(preprocess(load_image(Image.fromarray(deep)), 64), expected) < 1e-6


def exif_rotated(tmp_path):
    """A landscape JPEG, white left half, tagged "rotate 90 CW to display"."""
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def assert_upright(image):
    assert image.size == (20, 40)  # displayed upright: portrait
    top, bottom = np.asarray(image)[:20].mean(), np.asarray(image)[20:].mean()
    assert top > 200 and bottom < 50


def test_exif_orientation_is_honoured(tmp_path):
    assert_upright(load_image(str(exif_rotated(tmp_path))))


def test_exif_orientation_of_a_pil_image(tmp_path):
    opened = Image.open(exif_rotated(tmp_path))
    assert_upright(load_image(opened))
    assert opened.size == (40, 20)  # the caller's image is left as it was
    assert_upright(load_image(load_image(opened)))  # applied once: the result carries no tag


@pytest.mark.parametrize("mode", ["RGBA", "P", "PA", "L", "CMYK", "YCbCr", "I;16", "I", "F", "LA", "1"])
def test_every_mode_is_kept_until_the_crop_then_rgb(mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (30, 50), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((30, 50), dtype=np.float32))
    else:
        image = rgb.convert(mode)
    out = load_image(image)
    # 16-bit and float samples scaled to 8 bits (L); every other mode as it came
    assert out.mode == ("L" if mode in ("I;16", "I", "F") else mode) and out.size == (50, 30)
    assert center_crop(out, 64).mode == "RGB"
    x = preprocess(out, 64)
    assert x.shape == (1, 3, 64, 64) and torch.isfinite(x).all()


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
    with pytest.raises(ImageError, match="300x200 pixels, over the limit of 1000") as info:
        load_image(str(tmp_path / "a.png"), max_pixels=1000)
    assert "too large" in str(info.value) and "truncated" not in str(info.value)
    with pytest.raises(ImageError, match="too large: 300x200 pixels, over the limit of 1000"):
        load_image(Image.open(tmp_path / "a.png"), max_pixels=1000)  # a PIL image, still lazy


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


def test_extreme_aspect_ratio_is_refused_before_scaling(tmp_path):
    # 2 kB on disk and 1 M pixels, but scaled to a 384-pixel short side it would be 384 x 384 M
    path = tmp_path / "thread.png"
    Image.new("L", (1, 1_000_000)).save(path)
    assert path.stat().st_size < 10_000
    with pytest.raises(ImageError, match=f"1x1000000 pixels.*over the limit of {MAX_ASPECT_RATIO}:1"):
        load_image(str(path))
    # and preprocess on its own (64 x 128000 once resized: harmless if the guard were missing)
    with pytest.raises(ImageError, match=f"2000x1 pixels.*over the limit of {MAX_ASPECT_RATIO}:1"):
        preprocess(Image.new("RGB", (2000, 1)), 64)
    # the limit itself still loads
    assert preprocess(Image.new("RGB", (MAX_ASPECT_RATIO, 1)), 64).shape == (1, 3, 64, 64)


def redirect_to(location):
    def route(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def test_redirects_are_followed_only_to_http(http_server):
    http_server.routes["/cat.png"] = (200, {}, png_bytes(Image.new("RGB", (40, 30), "blue")))
    http_server.routes["/moved"] = redirect_to("/cat.png")
    assert load_image(http_server.url("/moved")).size == (40, 30)
    with socket.socket() as listener:  # where the ftp:// redirect points: nothing may connect
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        ftp = f"ftp://127.0.0.1:{listener.getsockname()[1]}/cat.png"
        for target in (ftp, "file:///etc/passwd"):
            http_server.routes["/away"] = redirect_to(target)
            with pytest.raises(ImageError, match="only http:// and https://") as info:
                load_image(http_server.url("/away"), timeout=2)
            assert http_server.url("/away") in str(info.value) and target in str(info.value)
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_files_are_read_only_up_to_the_cap(tmp_path):
    if os.path.exists("/proc/self/environ"):  # procfs: stat() says 0 bytes, reading gives more
        with pytest.raises(ImageError, match="over the limit of 10 bytes"):
            load_image("/proc/self/environ", max_bytes=10)
    with pytest.raises(ImageError, match="is a directory"):
        load_image(str(tmp_path))
    if hasattr(os, "mkfifo"):  # opening a pipe must not wait for a writer
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(ImageError, match="not a regular file"):
            load_image(str(tmp_path / "pipe"))


def test_bad_inputs_are_one_line_errors_naming_the_input(tmp_path, http_server, monkeypatch):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    closed = Image.new("RGB", (8, 8))
    closed.close()
    http_server.routes["/img/.."] = (200, {}, b"<html>not a picture</html>")
    cases = [
        ("~no_such_user_here/x.png", "'~no_such_user_here/x.png' does not exist"),
        (str(tmp_path / ("a" * 300 + ".png")), "cannot be opened: File name too long"),
        ("ftp://example.org/" + "a" * 10_000, "must start with http:// or https://"),
        (closed, "PIL image cannot be read: Operation on closed image"),
        # opened lazily, as the notebook opens an upload: decoded (and refused) here, not later
        (Image.open(io.BytesIO(data[: len(data) // 2])), "PIL image is truncated or corrupt"),
        (Image.open(tmp_path / "cut.png"), f"PIL image {str(tmp_path / 'cut.png')!r} is truncated or corrupt"),
        (http_server.url("/img/.."), f"{http_server.url('/img/..')}' is not an image"),  # sent as it is
    ]
    for source, pattern in cases:
        with pytest.raises(MagmaError) as info:
            load_image(source)
        message = str(info.value)
        assert pattern in message and "\n" not in message and len(message) < 300, message
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cut.png"))  # a file: images never use the cache
    (tmp_path / "x.png").write_bytes(data)
    assert load_image(str(tmp_path / "x.png")).size == (200, 200)
