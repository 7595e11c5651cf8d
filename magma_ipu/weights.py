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
from .parallel import shard, split_of

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
        return mmap_safetensors(path)
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
    rank: int = 0,
    world: int = 1,
) -> nn.Module:
    """Fill `model` (usually built on `meta`) from `state`, converting tensor by tensor.
    With world > 1 the model holds one tensor-parallel shard and takes only its slices."""
    state = canonical_keys(state)
    expected = {k: full_shape(k, v.shape, world) for k, v in model.state_dict().items()}
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
        tensor = shard(state.pop(key), key, rank, world)
        target = dtype if tensor.is_floating_point() else tensor.dtype
        converted[key] = tensor.to(device=device, dtype=target).contiguous()
        del tensor
    model.load_state_dict(converted, assign=True)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, dtype: torch.dtype, device, progress=False, rank=0, world=1):
    return load_into(model, read_state_dict(path), dtype, device, repr(str(path)), progress, rank, world)


def full_shape(key: str, local: torch.Size, world: int) -> torch.Size:
    """The checkpoint shape of a tensor whose tensor-parallel shard has shape `local`."""
    split = split_of(key)
    if world == 1 or not isinstance(split, int):
        return local
    shape = list(local)
    shape[split] *= world
    return torch.Size(shape)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                       torch.int8: "I8", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel we are done with a memory-mapped tensor's pages, so they leave our resident
    set (they are re-read from the file if touched again). Harmless where it does not apply."""
    import ctypes
    import mmap

    storage = tensor.untyped_storage()
    if storage.nbytes() < (1 << 20):
        return
    start = storage.data_ptr()
    aligned = start - start % mmap.PAGESIZE
    length = storage.nbytes() + (start - aligned)
    length -= length % mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), 4)  # MADV_DONTNEED


def convert_to_safetensors(
    model: nn.Module, src: str | Path, dst: str | Path, dtype: torch.dtype, progress: bool = False
) -> Path:
    """Write `src` (any supported checkpoint) as a safetensors file of `model`'s keys in `dtype`.

    Streams tensor by tensor into `dst.part` and renames it when whole, so memory holds one
    tensor at a time and an interrupted conversion never leaves a file that looks complete."""
    import json
    import os

    src, dst = Path(src), Path(dst)
    state = canonical_keys(read_state_dict(src))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, state, repr(str(src)))
    # widest element types first: every tensor then starts aligned for its dtype
    keys = sorted((k for k in expected if k in state), key=lambda k: -state[k].element_size())
    header, offset = {}, 0
    for key in keys:
        t = state[key]
        out_dtype = dtype if t.is_floating_point() else t.dtype
        size = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[out_dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "source": src.name}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    if progress:
        from tqdm.auto import tqdm

        keys = tqdm(keys, desc=f"converting {src.name}", unit="tensor")
    try:
        with open(part, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for key in keys:
                t = state.pop(key)
                out = t.to(dtype if t.is_floating_point() else t.dtype).contiguous()
                f.write(out.reshape(-1).view(torch.uint8).numpy().data)
                _release_pages(t)
                del t, out
        os.replace(part, dst)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"could not write the converted checkpoint {str(dst)!r}: {e.strerror or e}") from None
    return dst


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one read-only-in-practice memory map (no copy)."""
    import json

    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100_000_000:
            raise CheckpointError(f"{str(path)!r} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{str(path)!r} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    size = path.stat().st_size
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[8 + n :]
    out = {}
    for key, meta in header.items():
        start, end = meta["data_offsets"]
        if meta["dtype"] not in _TORCH_DTYPES or end > size - 8 - n:
            raise CheckpointError(f"{str(path)!r}: tensor {key!r} has an unknown dtype or lies past the file end")
        raw = data[start:end]
        try:
            out[key] = raw.view(_TORCH_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        except RuntimeError:  # not aligned for its dtype in the file: copy this one
            out[key] = raw.clone().view(_TORCH_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out


def converted_checkpoint(model: nn.Module, src: Path, dtype: torch.dtype, progress: bool = False) -> Path:
    """The safetensors conversion of `src` in `dtype`, made on first use and kept in the cache
    (keyed by the source's path, size and modification time)."""
    import hashlib

    from .download import cache_dir

    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dst = cache_dir() / "converted" / key / f"{src.stem}.{str(dtype).removeprefix('torch.')}.safetensors"
    if not dst.is_file():
        convert_to_safetensors(model, src, dst, dtype, progress=progress)
    return dst
