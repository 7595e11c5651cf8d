"""int8 linear layers for the language model.

Every int8 weight comes from one function, `quantize_rows`: symmetric, one float32 scale per
output row (its largest magnitude maps to 127), rounded to nearest (ties to even). The same int8
weights are made whether a float model is quantized in memory (`quantize_int8`) or a checkpoint
is quantized block by block into the cache (weights.quantized_tensors), so both run identically.
- CPU: dynamic int8 (fbgemm): int8 weights, activations quantized on the fly; the fastest int8
  matrix-vector path PyTorch has on a CPU. Its packed weight is opaque, so the layer is a
  PackedLinear (packed.py), which torch.compile compiles around.
- CUDA: weight-only int8; activations stay bf16/fp16. Batch-1 decoding is bound by reading
  weights, so halving their bytes is what counts; under `torch.compile` the dequantization fuses
  into the matmul.
The image encoder is not touched here: it runs once per request, not once per token (its own lower
precisions are quantize_image.py's).
"""

from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .packed import PackedLinear, PackedWeight, check_float_linears, fuse_blocks, replace_linears

METHODS = ("dynamic", "weight_only")
# quantized tensors are deprecated upstream; this module is their one user, and layers are packed
# from several threads, where warnings.catch_warnings cannot be used
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel", category=UserWarning)
_ROWS_PER_CHUNK = 4096  # bounds the float temporaries of quantizing a big matrix


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row) with w ~= weight * scale[:, None]."""
    # w: N x K float  ->  N x K int8, N float32
    if w.is_meta:
        return torch.empty(w.shape, dtype=torch.int8, device="meta"), torch.empty(w.shape[0], device="meta")
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    out = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for start in range(0, w.shape[0], _ROWS_PER_CHUNK):
        rows = w[start : start + _ROWS_PER_CHUNK].float()
        s = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        scale[start : start + len(s)] = s
        out[start : start + len(s)] = torch.round(rows / s[:, None]).clamp(-127, 127).to(torch.int8)
    return out, scale


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ W_int8^T) * scale + bias, with one scale per output channel."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


_linear_dynamic = torch.ops.quantized.linear_dynamic.default


@functools.cache
def activations_need_reduce_range() -> bool:
    """Whether fbgemm's int8 products must quantize activations to 7 bits on this CPU.

    Without VNNI, fbgemm multiplies uint8 activations by int8 weights in pairs summed into int16
    (vpmaddubsw), which saturates at 2 x 255 x 127 > 32767: 8-bit activations would then give wrong
    products silently, 7-bit ones (reduce_range) cannot. With VNNI the pairs sum straight into int32,
    and 8 bits halve the activations' rounding error. Rather than trust CPU flags, one product with
    every pair at its extreme (+-127 weights, activations quantized to 255) is computed with 8-bit
    activations and compared with its exact value: measured once per process."""
    k = 64  # 32 pairs: a saturated sum would be about half of the exact one
    rows = torch.tensor([127, -127], dtype=torch.int8)[:, None].expand(2, k).contiguous()
    weight = torch._make_per_channel_quantized_tensor(rows, torch.ones(2, dtype=torch.double),
                                                      torch.zeros(2, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(weight, None)
    x = torch.full((1, k), 255.0)  # quantized with scale 1 and zero point 0: every activation is 255
    with torch._C.DisableTorchFunctionSubclass():
        y = _linear_dynamic(x, packed, False)
    exact = torch.tensor([[255.0 * 127 * k, -255.0 * 127 * k]])
    return not torch.allclose(y, exact, rtol=1e-6, atol=0)


class FbgemmInt8Weight(PackedWeight):
    """Symmetric per-channel int8 weights in fbgemm's packed layout; activations are quantized
    per call, in 8 bits where this CPU's products cannot saturate, else 7 (see
    activations_need_reduce_range). Packing copies the weight into fbgemm's own memory: the int8
    tensor given may be a view of a memory-mapped file."""

    def __init__(self, qweight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.params = torch.ops.quantized.linear_prepack(qweight, bias)
        self.reduce_range = activations_need_reduce_range()

    @classmethod
    def from_int8(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> "FbgemmInt8Weight":
        zero = torch.zeros(len(scale), dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero, 0)
        return cls(qweight, None if bias is None else bias.float().contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Without this, the call looks up __torch_function__ on the packed weight, a ScriptObject, which
        # raises and catches a C++ exception: 14 of the 20 us a small product takes
        with torch._C.DisableTorchFunctionSubclass():
            return _linear_dynamic(x, self.params, self.reduce_range)

    def __deepcopy__(self, memo):
        return FbgemmInt8Weight(*torch.ops.quantized.linear_unpack(self.params))


INT8_LAYERS = (Int8WeightOnlyLinear, PackedLinear)  # what int8_linear makes (PackedLinear: fbgemm's)


def int8_linear(
    weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, method: str, dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The layer running int8 `weight` (N x K) with per-row `scale` by `method`."""
    if method == "dynamic":
        packed = FbgemmInt8Weight.from_int8(weight, scale, bias)
        size = weight.numel() + 8 * len(scale)  # int8 weights and a scale per row: what a step reads
        return PackedLinear(packed, weight.shape, size)
    return Int8WeightOnlyLinear(weight.to(device), scale.to(device), None if bias is None else bias.to(device), dtype)


def default_method(device: torch.device | str) -> str:
    return "dynamic" if torch.device(device).type == "cpu" else "weight_only"


def check_method(method: str, device: torch.device | str, dtype: torch.dtype) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown int8 method {method!r}")
    if method == "dynamic" and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise ValueError("dynamic int8 runs on CPU float32 models only")


def quantize_int8(model: nn.Module, method: str | None = None) -> nn.Module:
    """Quantize the linear layers of `model.lm` in place (each block's input projections fused
    into one first). method: "dynamic" (CPU default) or "weight_only" (CUDA default; also runs
    on CPU, for tests)."""
    weight = next(model.parameters())
    method = method or default_method(weight.device)
    check_method(method, weight.device, weight.dtype)
    check_float_linears(model)  # checks first: a refused call leaves the model as it was
    fuse_blocks(model)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        q, scale = quantize_rows(linear.weight.detach())
        return int8_linear(q.to(weight.device), scale, linear.bias, method, weight.dtype, weight.device)

    replace_linears(model.lm, make)
    return model


def load_int8(model: nn.Module, tensors: dict[str, torch.Tensor], method: str, dtype: torch.dtype,
              device: torch.device | str, release: Callable[[torch.Tensor], None] = lambda t: None,
              progress: Callable[[Iterable, int], Iterable] = lambda layers, total: layers) -> None:
    """Give `model` (a float model on `meta`) the int8 linear layers held in `tensors` (as
    weights.quantized_tensors names them: `weight`, `scale`, `bias`), popping what it uses.
    fbgemm packing is single-threaded, so the layers are packed by a pool of this process's
    threads; `release` is called on each int8 weight once it has been packed, and `progress` wraps
    the stream of finished layers (with their count)."""
    fuse_blocks(model)
    linears = [name for name, m in model.lm.named_modules() if isinstance(m, nn.Linear)]

    def make(name: str) -> nn.Module:
        prefix = "lm." + name + "."
        weight = tensors.pop(prefix + "weight")
        layer = int8_linear(weight, tensors.pop(prefix + "scale"), tensors.pop(prefix + "bias", None),
                            method, dtype, device)
        release(weight)
        return layer

    workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1)) if method == "dynamic" else 1
    with ThreadPoolExecutor(workers) as pool:
        layers = dict(zip(linears, progress(pool.map(make, linears), len(linears))))
    replace_linears(model.lm, lambda name, linear: layers[name])
