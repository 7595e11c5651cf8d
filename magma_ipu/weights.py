"""Checkpoint loading: the DeepSpeed `.pt` ("module" state dict), a bare state dict, or safetensors.

Safety: pickles are read with torch's `weights_only` unpickler (no code runs, no arbitrary
globals), memory-mapped where the format allows. Strictness: known buffers and alias keys are
dropped; anything else missing, unexpected or mis-shaped is reported by name in one error.
Memory: the model is built on the `meta` device and every tensor is converted to its final
dtype/device one at a time, so no second full copy of the weights is ever held.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .errors import CheckpointError

# buffers the GPT-Neo-derived attention kept in its state dict; they carry no learned weights
_KNOWN_BUFFERS = re.compile(r"\.attn\.attention\.(bias|masked_bias|scale_attn|sin|cos)$")
# keys that share storage with a canonical key
_ALIASES = (
    (re.compile(r"^word_embedding\.weight$"), "lm.transformer.wte.weight"),
    (re.compile(r"^transformer\.(\d+)\.(.*)$"), r"lm.transformer.h.\1.\2"),
)
# BatchNorm's step counter: meaningless at inference, so a checkpoint may omit it
_OPTIONAL = re.compile(r"\.num_batches_tracked$")
_MAX_LISTED = 20


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, lazily (memory-mapped) where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # the unpickler's refusal and any corrupt-file error land here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read safely (only tensors and plain containers "
            f"are allowed): {first}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        obj = obj["module"]  # DeepSpeed: the model's state dict sits under "module"
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} has entries that are not tensors: {_names(bad)}")
    return obj


def canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop known buffers; map alias keys to their canonical name unless that is present."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if _KNOWN_BUFFERS.search(key):
            continue
        for pattern, target in _ALIASES:
            if pattern.match(key):
                aliases[pattern.sub(target, key)] = tensor
                break
        else:
            out[key] = tensor
    for key, tensor in aliases.items():
        out.setdefault(key, tensor)
    return out


def check_keys(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in state and not _OPTIONAL.search(k)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k])})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    wrong_dtype = [
        f"{k} ({state[k].dtype})"
        for k in expected
        if k in state and not _OPTIONAL.search(k) and not state[k].is_floating_point()
    ]
    problems = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
        ("not floating point", wrong_dtype),
    ):
        if names:
            problems.append(f"{len(names)} {label}: {_names(names)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model; " + "; ".join(problems))


def _names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
    source: str = "",
    progress: bool = False,
) -> nn.Module:
    """Fill `model` (usually built on `meta`) from `state`, converting tensor by tensor."""
    state = canonical_keys(state)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, state, source)
    keys = list(expected)
    if progress:
        from tqdm.auto import tqdm

        keys = tqdm(keys, desc="loading weights", unit="tensor")
    converted: dict[str, torch.Tensor] = {}
    for key in keys:
        if key not in state:  # an optional step counter
            converted[key] = torch.zeros((), dtype=torch.long, device=device)
            continue
        tensor = state.pop(key)
        target = dtype if tensor.is_floating_point() else tensor.dtype
        converted[key] = tensor.to(device=device, dtype=target).contiguous()
        del tensor
    model.load_state_dict(converted, assign=True)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, dtype: torch.dtype, device, progress=False):
    return load_into(model, read_state_dict(path), dtype, device, source=repr(str(path)), progress=progress)
