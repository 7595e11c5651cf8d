"""The image encoder in lower precision on a CPU (opt-in: `image_precision: bfloat16` or `int8`).

The RN50x16 trunk is most of the time to first token on a CPU. Both paths replace the float32 trunk
at load; its output is a float32 feature map again, so the image prefix's projection and LayerNorm,
and everything after them, are unchanged.

- bfloat16, on CPUs with native bfloat16 arithmetic (AMX or AVX512-BF16): each BatchNorm folded into
  its convolution, the trunk channels-last in bfloat16 (oneDNN's kernels). On a 2-core Xeon with
  AMX, RN50x16 at 384 pixels: 0.31 s a picture instead of 0.95 s, 0.9 % relative error in the
  feature map. Elsewhere it is refused: emulated bfloat16 convolutions take minutes.
- int8, on x86 (fbgemm): static quantization (PyTorch's FX graph mode) folds each BatchNorm into its
  convolution, fuses the ReLUs, and runs every convolution on int8 weights (per output channel) and
  int8 activations, whose ranges are observed once, at load, on the pictures bundled with the
  package (photographs and demo scenes). On a 2-core AVX2 CPU: 0.47 s a picture instead of 1.0 s,
  3.3 % relative error in the feature map of a photograph left out of the calibration, about 8 s of
  calibration at load.
The demo model's captions of its demo scenes are unchanged by either. The benchmark measures the time
to first token of each against float32, in the same run.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import ConfigError
from .images import preprocess

CALIBRATION_IMAGES = ("cabin_by_a_lake", "fruit_bowl", "night_city", "sunny_house", "scene_1", "scene_2", "scene_6")
_ASSETS = Path(__file__).resolve().parent / "assets" / "demo_images"
_QUANTIZING = threading.Lock()  # torch.fx's tracing patches module-level state: one quantization at a time


PRECISIONS = ("float32", "bfloat16", "int8")


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX tiles or AVX512-BF16): as torch detects it,
    or, where this torch has no such check, from the kernel's CPU flags."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_image_precision(precision: str, device: str) -> None:
    """Refuse an image precision that cannot run, or not fast, on `device`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"image_precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return
    if torch.device(device).type != "cpu":
        raise ConfigError(f"image_precision {precision} is for the image encoder on a CPU, not on {device} "
                          "(there it runs in the model's dtype): leave it float32, or run on the CPU (--device cpu)")
    if precision == "bfloat16" and not native_bfloat16():
        instead = "int8 or float32" if "x86" in torch.backends.quantized.supported_engines else "float32"
        raise ConfigError("image_precision bfloat16 needs a CPU with native bfloat16 arithmetic (AMX or AVX512-BF16), "
                          "which this one lacks: its emulated bfloat16 convolutions would take minutes a picture. "
                          f"Use {instead}")
    if precision == "int8" and "x86" not in torch.backends.quantized.supported_engines:
        raise ConfigError("image_precision int8 needs PyTorch's x86 quantized engine (fbgemm), which this build or "
                          f"CPU lacks (it has: {', '.join(torch.backends.quantized.supported_engines)}); "
                          "leave it float32")


def calibration_pixels(resolution: int) -> torch.Tensor:
    """The bundled calibration pictures, preprocessed as the model sees them: N x 3 x R x R."""
    return torch.cat([preprocess(Image.open(_ASSETS / f"{name}.png"), resolution) for name in CALIBRATION_IMAGES])


class Bfloat16Trunk(nn.Module):
    """A trunk whose BatchNorms are folded, channels-last in bfloat16; float32 in and out."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: b x 3 x R x R, float32  ->  b x C x g x g, float32
        return self.trunk(x.to(torch.bfloat16, memory_format=torch.channels_last)).float().contiguous()


def bfloat16_trunk(trunk: nn.Module) -> Bfloat16Trunk:
    """The float32 ResNet trunk `trunk` with each BatchNorm folded into its convolution, in
    bfloat16, channels-last. Folded and cast a convolution at a time: never a float copy of the whole
    trunk. `trunk` itself is changed and consumed."""
    trunk.eval()
    for module in list(trunk.modules()):
        for conv_name, bn_name in _conv_batchnorm_pairs(module):
            folded = fuse_conv_bn_eval(module._modules[conv_name], module._modules[bn_name])
            module._modules[conv_name] = folded.to(torch.bfloat16, memory_format=torch.channels_last)
            module._modules[bn_name] = nn.Identity()
    return Bfloat16Trunk(trunk.to(torch.bfloat16))


def _conv_batchnorm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """The (convolution, BatchNorm) children of `module` where the BatchNorm reads that convolution's
    output alone: convN/bnN in the stem and in each Bottleneck, and a shortcut's "0"/"1"."""
    children = module._modules
    pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)] + [("0", "1")]
    return [(c, b) for c, b in pairs
            if isinstance(children.get(c), nn.Conv2d) and isinstance(children.get(b), nn.BatchNorm2d)]


def trunk_in(precision: str, trunk: nn.Module, resolution: int) -> nn.Module:
    """The float32 trunk `trunk` (consumed) in `precision`: "bfloat16", or "int8" calibrated on the
    bundled pictures at `resolution` pixels."""
    if precision == "bfloat16":
        return bfloat16_trunk(trunk)
    return quantize_trunk(trunk, calibration_pixels(resolution))


class Int8Trunk(nn.Module):
    """The quantized trunk, giving NaN features for a picture whose pixels are not all finite: int8
    cannot carry a NaN, and the engine then refuses the picture as it does with the float trunk."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        self.quantized = quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: b x 3 x R x R  ->  b x C x g x g, float32
        finite = torch.isfinite(x).flatten(1).all(1)  # b
        return self.quantized(x).masked_fill(~finite[:, None, None, None], float("nan"))


def quantize_trunk(trunk: nn.Module, calibration: torch.Tensor) -> Int8Trunk:
    """The float32 ResNet trunk `trunk` in int8, its activation ranges observed on `calibration`
    (N x 3 x R x R). `trunk` itself is left to be dropped: quantization folds and copies its
    modules one by one, never the whole trunk at once."""
    from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_per_channel_weight_observer
    from torch.ao.quantization.fx import utils as fx_utils
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # activations: their observed range (7-bit, reduce_range, so that fbgemm's int16 pair sums cannot
    # saturate on CPUs without VNNI); the x86 default's histogram observer calibrated 1.7x slower
    # for the same error here. Weights: symmetric, per output channel.
    qconfig = QConfig(activation=MinMaxObserver.with_args(reduce_range=True), weight=default_per_channel_weight_observer)
    with _QUANTIZING, warnings.catch_warnings():  # the FX quantization API's own deprecation notices
        warnings.simplefilter("ignore")
        prepared = prepare_fx(trunk.eval(), QConfigMapping().set_global(qconfig), (calibration[:1],))
        with torch.inference_mode():  # a picture at a time: min/max observers give the batch's ranges
            for picture in calibration:
                prepared(picture[None])
        quantized = convert_fx(prepared)
        # What would otherwise keep the BatchNorm-folded float copy of the trunk alive: the graph's
        # observer factories (they close over the float convolutions) and a module-level cache of
        # torch's that holds every module it was asked about
        for node in quantized.graph.nodes:
            node.meta.pop("target_dtype_info", None)
        clear = getattr(getattr(fx_utils, "assert_and_get_unique_device", None), "cache_clear", None)
        if clear is not None:
            clear()
    del prepared
    return Int8Trunk(quantized)
