"""The image encoder in bfloat16 and in int8 (image_precision): what each computes, and the demo model's
captions with it."""

import copy
from pathlib import Path

import pytest
import torch

from magma_ipu.build import build_model, image_encoder_in
from magma_ipu.config import load_config
from magma_ipu.demo.drawings import held_out_drawings
from magma_ipu.errors import ConfigError
from magma_ipu.images import preprocess
from magma_ipu.quantize_image import (CALIBRATION_IMAGES, bfloat16_trunk, calibration_pixels, check_image_precision,
                                      native_bfloat16, quantize_trunk)
from magma_ipu.session import Magma

ROOT = Path(__file__).resolve().parent.parent
SCENES = sorted((ROOT / "demo_example_images").glob("scene_*.png"))


@pytest.fixture(scope="module")
def demo_int8_images():
    return Magma.load("demo", image_precision="int8")


@pytest.fixture(scope="module")
def demo_bfloat16_images(demo_magma):
    """Built through the loader's own step, on any CPU: without native bfloat16 the configuration is
    refused (too slow at full size), but the demo's small trunk runs emulated in a fraction of a second."""
    model = copy.deepcopy(demo_magma.model)
    image_encoder_in("bfloat16", model)
    return Magma(demo_magma.config, model, demo_magma.tokenizer)


def test_the_demo_model_captions_its_scenes_and_unseen_drawings_the_same_with_a_bfloat16_image_encoder(
        demo_magma, demo_bfloat16_images):
    trunk = demo_bfloat16_images.model.image_prefix.enc.trunk
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())  # all folded
    assert trunk.conv1.weight.dtype == torch.bfloat16 and trunk.layer1[0].conv2.weight.is_contiguous(
        memory_format=torch.channels_last)
    drawings = [d.image for d in held_out_drawings(singles=20, pairs=10, seed=4242)]
    for image in [*SCENES, *drawings]:
        assert (demo_bfloat16_images.generate("A picture of", image=image).text
                == demo_magma.generate("A picture of", image=image).text), image


def test_a_bfloat16_trunk_stays_near_the_float_one(demo_float_magma):
    """Folding each BatchNorm into its convolution is exact arithmetic; bfloat16 keeps 8 bits of mantissa
    (a relative rounding of 0.4 % a number), so the feature map moves by about 1 %."""
    from PIL import Image

    trunk = copy.deepcopy(demo_float_magma.model.image_prefix.enc)
    pixels = preprocess(Image.open(ROOT / "demo_example_images" / "scene_3.png"), 96)
    with torch.inference_mode():
        reference = trunk(pixels)
        out = bfloat16_trunk(trunk)(pixels)
    assert out.shape == reference.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert (out - reference).norm() / reference.norm() < 0.03


def test_folding_the_batchnorms_alone_changes_nothing_but_rounding(demo_float_magma, monkeypatch):
    """The bfloat16 path's folding, checked in float32 (the cast to bfloat16 made a no-op)."""
    from PIL import Image

    trunk = copy.deepcopy(demo_float_magma.model.image_prefix.enc)
    pixels = preprocess(Image.open(ROOT / "demo_example_images" / "scene_3.png"), 96)
    with torch.inference_mode():
        reference = trunk(pixels)
    monkeypatch.setattr(torch, "bfloat16", torch.float32)
    folded = bfloat16_trunk(trunk)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        assert (folded(pixels) - reference).abs().max() < 1e-5 * reference.abs().max()


def test_image_precision_bfloat16_builds_a_bfloat16_trunk(monkeypatch):
    import magma_ipu.quantize_image

    monkeypatch.setattr(magma_ipu.quantize_image, "native_bfloat16", lambda: True)  # the demo's trunk is small
    model = build_model(load_config("demo", image_precision="bfloat16"), None)
    assert type(model.image_prefix.enc).__name__ == "Bfloat16Trunk"
    with torch.inference_mode():
        prefix = model.embed_images(calibration_pixels(model.cfg.image_resolution)[:2])
    assert prefix.dtype == torch.float32 and torch.isfinite(prefix).all()


def test_the_demo_model_captions_its_scenes_the_same_with_an_int8_image_encoder(demo_magma, demo_int8_images):
    first_conv = demo_int8_images.model.image_prefix.enc.quantized.conv1
    assert isinstance(first_conv, torch.ao.nn.intrinsic.quantized.ConvReLU2d)
    for path in SCENES:
        assert (demo_int8_images.generate("A picture of", image=path).text
                == demo_magma.generate("A picture of", image=path).text), path.name


def test_the_demo_model_mostly_captions_unseen_drawings_the_same_with_an_int8_image_encoder(demo_magma,
                                                                                         demo_int8_images):
    drawings = held_out_drawings(singles=20, pairs=10, seed=4242)
    same = sum(demo_int8_images.generate("A picture of", image=d.image).text
               == demo_magma.generate("A picture of", image=d.image).text for d in drawings)
    assert same >= 27, same  # 30 of 30 when written


def test_an_int8_trunk_stays_near_the_float_one_on_a_picture_left_out_of_calibration(demo_float_magma):
    """The demo model's trained trunk (a random one's output hardly depends on its input)."""
    from PIL import Image

    trunk = copy.deepcopy(demo_float_magma.model.image_prefix.enc)
    unseen, other = (preprocess(Image.open(ROOT / "demo_example_images" / f"{name}.png"), 96)
                     for name in ("scene_3", "scene_4"))
    assert "scene_3" not in CALIBRATION_IMAGES
    with torch.inference_mode():
        reference, elsewhere = trunk(unseen), trunk(other)
    quantized = quantize_trunk(trunk, calibration_pixels(96))
    with torch.inference_mode():
        out = quantized(unseen)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert (elsewhere - reference).norm() / reference.norm() > 1  # what a different picture changes
    assert (out - reference).norm() / reference.norm() < 0.25  # 0.110 when written (the model before: 0.169)


def test_a_lower_image_precision_is_refused_where_it_cannot_run(monkeypatch):
    for precision in ("int8", "bfloat16"):
        with pytest.raises(ConfigError, match=f"image_precision {precision} is for the image encoder on a CPU"):
            check_image_precision(precision, "cuda:0")
        with pytest.raises(ConfigError, match=f"image_precision {precision} and max_device_memory"):
            load_config("demo", image_precision=precision, max_device_memory="1GB")
    with pytest.raises(ConfigError, match="image_precision must be one of float32, bfloat16, int8, got 'fp8'"):
        load_config("demo", image_precision="fp8")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    with pytest.raises(ConfigError, match="needs a CPU with native bfloat16 arithmetic"):
        load_config("demo", image_precision="bfloat16")


def test_a_random_model_can_be_built_with_an_int8_image_encoder():
    model = build_model(load_config("demo", image_precision="int8"), None)
    with torch.inference_mode():
        prefix = model.embed_images(calibration_pixels(model.cfg.image_resolution)[:2])
    assert prefix.shape == (2, model.cfg.image_tokens, model.cfg.d_model) and torch.isfinite(prefix).all()


def test_an_int8_image_encoder_passes_a_picture_with_nan_pixels_on_as_nan():
    """int8 cannot carry a NaN: without the check, such a picture would get finite features and a
    caption of nothing, where the float encoder's NaN makes the engine refuse it."""
    model = build_model(load_config("demo", image_precision="int8"), None)
    pixels = calibration_pixels(model.cfg.image_resolution)[:2].clone()
    pixels[1, 0, 5, 7] = float("nan")
    with torch.inference_mode():
        prefix = model.embed_images(pixels)
    assert torch.isfinite(prefix[0]).all()
    assert torch.isnan(prefix[1]).any()
