"""int8 linear layers for the language model, derived from a loaded float model.

- CPU: dynamic int8 (fbgemm): int8 weights with per-channel scales, activations quantized on the
  fly; the fastest int8 matrix-vector path PyTorch has on a CPU. Its packed weight is opaque, so
  the layer is a PackedLinear (packed.py), which torch.compile compiles around.
- CUDA: weight-only int8 with per-channel scales; activations stay bf16/fp16. Batch-1 decoding is
  bound by reading weights, so halving their bytes is what counts; under `torch.compile` the
  dequantization fuses into the matmul.
The image encoder stays in float: it runs once per request, not once per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed import PackedLinear, PackedWeight, check_float_linears, fuse_blocks, replace_linears


def per_channel_scale(w: torch.Tensor) -> torch.Tensor:
    """One symmetric int8 scale per output row: its largest magnitude maps to 127."""
    return w.abs().amax(dim=1).clamp(min=1e-12) / 127.0


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ W_int8^T) * scale + bias, with one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = per_channel_scale(w)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


class FbgemmInt8Weight(PackedWeight):
    """Symmetric per-channel int8 weights in fbgemm's packed layout; activations are quantized
    per call (7-bit: reduce_range, so that int16 pair sums cannot saturate on CPUs without VNNI)."""

    def __init__(self, qweight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.params = torch.ops.quantized.linear_prepack(qweight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.params, True)

    def __deepcopy__(self, memo):
        return FbgemmInt8Weight(*torch.ops.quantized.linear_unpack(self.params))


def dynamic_int8_linear(linear: nn.Linear) -> PackedLinear:
    """y = x @ W^T + b with W int8 (one scale per output channel) and x quantized per call (CPU)."""
    w = linear.weight.detach().float()
    scale = per_channel_scale(w)
    zero = torch.zeros(len(scale), dtype=torch.long)
    qweight = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
    bias = None if linear.bias is None else linear.bias.detach().float()
    weight_bytes = w.numel() + 8 * len(scale)  # int8 weights and a scale per row
    return PackedLinear(FbgemmInt8Weight(qweight, bias), linear, weight_bytes)


def quantize_int8(model: nn.Module, method: str | None = None) -> nn.Module:
    """Quantize the linear layers of `model.lm` in place (each block's input projections fused
    into one first). method: "dynamic" (CPU default) or "weight_only" (CUDA default; also runs
    on CPU, for tests)."""
    device = next(model.parameters()).device
    method = method or ("dynamic" if device.type == "cpu" else "weight_only")
    if method == "weight_only":
        make = Int8WeightOnlyLinear
    elif method == "dynamic":
        if device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
            raise ValueError("dynamic int8 runs on CPU float32 models only")
        make = dynamic_int8_linear
    else:
        raise ValueError(f"unknown int8 method {method!r}")
    check_float_linears(model)  # checks first: a refused call leaves the model as it was
    fuse_blocks(model)
    replace_linears(model.lm, make)
    return model
