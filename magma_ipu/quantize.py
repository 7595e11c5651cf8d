"""int8 linear layers for the language model, derived from a loaded float model.

- CPU: dynamic int8 (fbgemm/x86): int8 weights with per-channel scales, activations quantized on
  the fly; the fastest int8 matrix-vector path PyTorch has on a CPU.
- CUDA: weight-only int8 with per-channel scales; activations stay bf16/fp16. Batch-1 decoding is
  bound by reading weights, so halving their bytes is what counts; under `torch.compile` the
  dequantization fuses into the matmul.
The image encoder stays in float: it runs once per request, not once per token.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ W_int8^T) * scale + bias, with one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)


def quantize_int8(model: nn.Module, method: str | None = None) -> nn.Module:
    """Quantize the linear layers of `model.lm` in place. method: "dynamic" (CPU default) or
    "weight_only" (CUDA default; also runs on CPU, for tests)."""
    device = next(model.parameters()).device
    method = method or ("dynamic" if device.type == "cpu" else "weight_only")
    if method == "weight_only":
        _replace_linears(model.lm, Int8WeightOnlyLinear)
    elif method == "dynamic":
        if device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
            raise ValueError("dynamic int8 runs on CPU float32 models only")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # the eager quantization API warns that it is deprecated
            warnings.simplefilter("ignore")
            quantize_dynamic(model.lm, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    else:
        raise ValueError(f"unknown int8 method {method!r}")
    return model
