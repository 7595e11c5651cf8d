"""Linear layers run by a CPU kernel library that keeps the weight in its own layout.

- oneDNN, float32 (`pack_for_onednn`): at batch 1 its matrix-vector kernel reads the weight at
  about the speed of a plain reduction over it, where aten's F.linear reaches 65-80 % of that on
  the CPUs we measured; prefill matrices gain too. Same float32 arithmetic, only the summation
  order differs.
- fbgemm, int8 (quantize.py).
A packed weight is opaque to torch.compile, so each registers under an integer handle and a
compiled graph calls it through one custom op that carries the handle as a constant.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch
from torch import nn


class PackedWeight:
    """A weight (and bias) in a kernel library's layout; calling it computes x @ W^T + b."""

    _registry: "weakref.WeakValueDictionary[int, PackedWeight]" = weakref.WeakValueDictionary()
    _handles = itertools.count()

    def __init__(self):
        self.handle = next(self._handles)
        self._registry[self.handle] = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# Defined with torch.library.Library rather than the custom_op decorator: a compiled decode step calls it
# some 40 to 140 times, and the plain CPU kernel skips the decorator's per-call Python wrapping.
_library = torch.library.Library("magma_ipu", "DEF")
_library.define("packed_linear(Tensor x, int handle, int out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return PackedWeight._registry[handle](x)


_library.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("magma_ipu::packed_linear")
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


packed_linear = torch.ops.magma_ipu.packed_linear.default


class PackedLinear(nn.Module):
    """A linear layer whose weight lives in a kernel library's layout (not in the state dict)."""

    def __init__(self, packed: PackedWeight, shape: torch.Size, weight_bytes: int):
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = shape  # the weight's: a tensor-parallel shard's, not the layer's
        self.weight_bytes = weight_bytes  # read per call: what a benchmark counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.packed.handle, self.out_features)
        return self.packed(x)  # eager: skip the custom op's dispatch

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {type(self.packed).__name__}"


class OneDNNWeight(PackedWeight):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight.detach().to_mkldnn()
        self.bias = None if bias is None else bias.detach().clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def __deepcopy__(self, memo):  # an opaque oneDNN tensor cannot be copied as it is
        return OneDNNWeight(self.weight.to_dense(), self.bias)


def replace_linears(module: nn.Module, make: Callable[[str, nn.Linear], nn.Module], prefix: str = "") -> None:
    """Replace every nn.Linear below `module` by make(its qualified name, it)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(prefix + name, child))
        else:
            replace_linears(child, make, prefix + name + ".")


def fuse_blocks(model: nn.Module) -> None:
    """Fuse each block's input projections (see Block.fuse_input_projections), once."""
    for block in model.lm.transformer.h:
        if block.fused_in is None:
            block.fuse_input_projections()


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def check_float_linears(model: nn.Module) -> None:
    """Packing and quantizing start from float weights: refuse a model already packed."""
    if any(isinstance(m, PackedLinear) for m in model.lm.modules()):
        raise ValueError("the language model's linear layers are already packed: start from a float model "
                         "(load it with onednn=False)")


def pack_for_onednn(model: nn.Module) -> nn.Module:
    """Fuse and repack the float32 linear layers of `model.lm` (on CPU) for oneDNN, in place."""
    weight = model.lm.transformer.wte.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError("oneDNN packing is for float32 models on CPU")
    if not onednn_available():
        raise ValueError("this PyTorch build has no oneDNN (mkldnn)")
    check_float_linears(model)
    fuse_blocks(model)

    def pack(name: str, linear: nn.Linear) -> PackedLinear:
        size = sum(p.numel() * p.element_size() for p in linear.parameters())
        return PackedLinear(OneDNNWeight(linear.weight, linear.bias), linear.weight.shape, size)

    replace_linears(model.lm, pack)
    return model
