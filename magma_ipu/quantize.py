"""int8 linear layers for the language model, derived from a loaded float model.

- CPU: dynamic int8 (fbgemm): int8 weights with per-channel scales, activations quantized on the
  fly; the fastest int8 matrix-vector path PyTorch has on a CPU. The fbgemm call is wrapped in a
  custom op so that torch.compile can compile the decode step around it.
- CUDA: weight-only int8 with per-channel scales; activations stay bf16/fp16. Batch-1 decoding is
  bound by reading weights, so halving their bytes is what counts; under `torch.compile` the
  dequantization fuses into the matmul.
The image encoder stays in float: it runs once per request, not once per token.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn


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
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


class PackedInt8Weight:
    """fbgemm's packed int8 weight (an opaque object torch.compile cannot trace), registered under
    an integer handle that a compiled graph can carry as a constant."""

    _registry: "weakref.WeakValueDictionary[int, PackedInt8Weight]" = weakref.WeakValueDictionary()
    _handles = itertools.count()
    __slots__ = ("params", "handle", "__weakref__")

    def __init__(self, qweight: torch.Tensor, bias: torch.Tensor | None):
        self.params = torch.ops.quantized.linear_prepack(qweight, bias)
        self.handle = next(self._handles)
        self._registry[self.handle] = self

    def __deepcopy__(self, memo):
        return PackedInt8Weight(*torch.ops.quantized.linear_unpack(self.params))


def fbgemm_linear(x: torch.Tensor, packed: PackedInt8Weight) -> torch.Tensor:
    # reduce_range: 7-bit activations, so that int16 pair sums cannot saturate on CPUs without VNNI
    return torch.ops.quantized.linear_dynamic(x, packed.params, True)


@torch.library.custom_op("magma_ipu::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return fbgemm_linear(x, PackedInt8Weight._registry[handle])


@int8_dynamic_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class DynamicInt8Linear(nn.Module):
    """y = x @ W^T + b with W int8 (one scale per output channel) and x quantized per call (CPU)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = per_channel_scale(w)
        zero = torch.zeros(len(scale), dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = PackedInt8Weight(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bytes = w.numel() + 8 * self.out_features  # int8 weights and a scale per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return int8_dynamic_linear(x, self.packed.handle, self.out_features)
        return fbgemm_linear(x, self.packed)  # eager: skip the custom op's dispatch


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)


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
        make = DynamicInt8Linear
    else:
        raise ValueError(f"unknown int8 method {method!r}")
    for block in model.lm.transformer.h:  # only once the method is known good: the model is left as it was otherwise
        if block.fused_in is None:
            block.fuse_input_projections()
    _replace_linears(model.lm, make)
    return model
