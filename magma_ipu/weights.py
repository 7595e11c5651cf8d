"""Checkpoint loading: the DeepSpeed `.pt` ("module" state dict), a bare state dict, or safetensors.

Safety: pickles are read with torch's `weights_only` unpickler (no code runs, no arbitrary
globals), memory-mapped where the format allows. Strictness: known buffers and alias keys are
dropped; anything else missing, unexpected or mis-shaped is reported by name in one error.
Memory: the model is built on the `meta` device and every tensor is converted to its final
dtype/device one at a time, so no second full copy of the weights is ever held.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

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
    """Every tensor of a checkpoint file, as read-only views of the file where the format allows
    (safetensors and torch's zip format): nothing is copied and nothing can write to the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {str(path)!r} is empty (an interrupted download or copy?)")
    if path.suffix == ".safetensors":
        return mmap_safetensors(path)
    try:
        obj = _load_torch_file(path)
    except CheckpointError:
        raise
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
    for problem, is_bad in (
        ("keys that are not strings", lambda k, v: not isinstance(k, str)),
        ("entries that are not tensors", lambda k, v: not isinstance(v, torch.Tensor)),
        # sparse weights would need densifying; a meta tensor has a shape but no values to load
        ("sparse tensors (only dense ones can be loaded)", lambda k, v: v.layout != torch.strided),
        ("tensors without data (saved from the meta device)", lambda k, v: v.is_meta),
    ):
        bad = [k for k, v in obj.items() if is_bad(k, v)]
        if bad:
            raise CheckpointError(f"checkpoint {str(path)!r} has {problem}: {_names(bad)}")
    return obj


def _load_torch_file(path: Path):
    """torch.load's object tree, with each tensor a read-only view of the file (zip format).

    torch.load(mmap=True) maps the whole file privately (copy-on-write), which Linux counts
    against RAM + swap and refuses for files larger than the machine. Instead the pickle is read
    by torch's weights-only unpickler under FakeTensorMode, which records each storage's byte
    offset in the file; the tensors are then views of one read-only shared mapping."""
    if not zipfile.is_zipfile(path):  # the legacy format cannot be mapped: read it whole
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    try:
        fake_log.disabled = True  # it logs a traceback of its own before raising
        with FakeTensorMode():
            fake = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # FakeTensorMode cannot rebuild every layout (sparse CSR): loaded onto `meta`, which reads no
        # data, such tensors can still be named by read_state_dict. Anything else is the first error.
        try:
            shapes = torch.load(path, map_location="meta", weights_only=True)
        except Exception:
            raise e from None
        if not any(t.layout != torch.strided for t in _leaves(shapes)):
            raise
        return shapes
    finally:
        fake_log.disabled = False
    data = _map_read_only(path)

    def real(t):
        if not isinstance(t, FakeTensor):
            return t
        if t.layout != torch.strided or t.device.type == "meta":  # no bytes in the file: read_state_dict names it
            return torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device="meta")
        storage = t.untyped_storage()
        start = storage._checkpoint_offset
        if start is None or start + storage.nbytes() > len(data):
            raise CheckpointError(f"checkpoint {str(path)!r}: a tensor lies outside the file (truncated?)")
        if start % t.dtype.itemsize:
            raise CheckpointError(f"checkpoint {str(path)!r}: a {t.dtype} tensor is not aligned in the file")
        typed = data[start : start + storage.nbytes()].view(t.dtype)
        # as_strided counts its offset from the start of the whole mapping, not of `typed`
        return typed.as_strided(t.shape, t.stride(), typed.storage_offset() + t.storage_offset())

    return _tree_map(real, fake)


def _leaves(obj) -> Iterator:
    """The tensors in a tree of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from _leaves(v)


def _tree_map(fn, obj):
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, v) for v in obj)
    return fn(obj)


def _map_read_only(path: Path) -> torch.Tensor:
    """The bytes of `path` as a uint8 tensor over a read-only shared mapping: pages come from the
    page cache on demand and are not charged as private memory; a write would fault, never
    reach the file."""
    import mmap
    import warnings

    with open(path, "rb") as f:  # callers refuse empty files first: mmap cannot map zero bytes
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # torch warns that the buffer is not writable: that is the point
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapped, dtype=torch.uint8)


def _in_read_only_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one read-only, shared mapping of a file (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    for line in maps.splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= start < high:
            return end <= high and fields[1][1] == "-" and fields[1][3] == "s" and len(fields) >= 6
    return False


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


def check_keys(
    expected: dict[str, torch.Size], state: dict[str, torch.Tensor], source: str,
    dtypes: dict[str, torch.dtype] | None = None,
) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key, and every
    tensor whose dtype is not `dtypes`' (without `dtypes`: not floating point where weights belong)."""
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
        if k in state and not _OPTIONAL.search(k)
        and (state[k].dtype != dtypes[k] if dtypes is not None else not state[k].is_floating_point())
    ]
    problems = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
        ("not floating point" if dtypes is None else "of another dtype", wrong_dtype),
    ):
        if names:
            problems.append(f"{len(names)} {label}: {_names(names)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model; " + "; ".join(problems))


def _names(names: Iterable) -> str:
    names = [n if isinstance(n, str) else repr(n) for n in names]  # a key of another type is still named
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def checked_state(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint `path` under `model`'s key names, checked to fit it (check_keys)."""
    state = canonical_keys(read_state_dict(path))
    check_keys({k: v.shape for k, v in model.state_dict().items()}, state, repr(str(path)))
    return state


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
    source: str = "",
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
    keys: Iterable[str] | None = None,
) -> nn.Module:
    """Fill `model` (usually built on `meta`) from `state`, converting tensor by tensor.
    With world > 1 the model holds one tensor-parallel shard and takes only its slices.
    `keys`: the model's entries to fill (default: all of them)."""
    state = canonical_keys(state)
    local = model.state_dict()
    wanted = list(local) if keys is None else list(keys)
    expected = {k: full_shape(k, local[k].shape, world) for k in wanted}
    check_keys(expected, state, source)
    converted: dict[str, torch.Tensor] = {}
    for key in progress_bar(list(expected), progress, "loading weights", "tensor"):
        if key not in state:  # an optional step counter
            converted[key] = torch.zeros((), dtype=torch.long, device=device)
            continue
        tensor = shard(state.pop(key), key, rank, world)
        target = dtype if tensor.is_floating_point() else tensor.dtype
        # standard strides: a file may record odd ones for size-1 dims (1x1 convolutions saved
        # channels-last), which would steer kernels to another algorithm than a freshly built model's
        converted[key] = tensor.to(device=device, dtype=target).contiguous().reshape(-1).view(tensor.shape)
        del tensor
    model.load_state_dict(converted, assign=True, strict=keys is None)
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


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
CACHE_FORMAT = "1"  # bumped whenever what a cache file holds changes; older files are rebuilt
ALIGNMENT = 64
PADDING = "__padding__."  # safetensors entries that only fill the gaps between aligned tensors


def _release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel we are done with the pages of a memory-mapped tensor, so they leave our
    resident set (they are read from the file again if touched). Harmless where it does not apply."""
    import ctypes
    import mmap

    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
    last = end - end % mmap.PAGESIZE
    if last - first < (1 << 20) or not _in_read_only_file_mapping(first, last):
        return  # dropping pages anywhere else would lose data
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


Spec = tuple[torch.dtype, tuple[int, ...]]


def write_safetensors(
    dst: Path, specs: dict[str, Spec], tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]
) -> Path:
    """Write a safetensors file whose tensors arrive one at a time, in any order.

    The header is laid out from `specs` first, every tensor starting on a 64-byte boundary of the
    file (as torch's allocator would place it: kernels then see the same alignment whether a
    weight is mapped or in memory), then each tensor is written at its offset as it arrives:
    memory holds one tensor at a time. The file is written under a name of this process's own and renamed
    when whole, so an interruption, a full disk or a second process converting the same file
    never leaves a partial file under the final name."""
    import json

    header: dict = {}
    offset = 0
    for key, (dtype, shape) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        if offset % ALIGNMENT:  # the format allows no holes, so the gap is a named tensor of its own
            pad = ALIGNMENT - offset % ALIGNMENT
            header[f"{PADDING}{len(header)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            offset += pad
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGNMENT)
    base = 8 + len(blob)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f"{dst.name}.{os.getpid()}.part")
    written = set()
    try:
        with open(part, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            f.truncate(base + offset)
            for key, tensor in tensors:
                dtype, shape = specs[key]
                if key in written or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise RuntimeError(f"{key}: {tensor.dtype} {list(tensor.shape)} does not match its header entry")
                f.seek(base + header[key]["data_offsets"][0])
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                written.add(key)
            if written != set(specs):
                raise RuntimeError(f"tensors never written: {_names(sorted(set(specs) - written))}")
        os.replace(part, dst)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {str(dst)!r}: {e.strerror or e}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dst


def convert_to_safetensors(
    model: nn.Module, src: str | Path, dst: str | Path, dtype: torch.dtype, progress: bool = False
) -> Path:
    """Write `src` (any supported checkpoint) as a safetensors file of `model`'s keys in `dtype`."""
    src, dst = Path(src), Path(dst)
    state = checked_state(model, src)
    keys = [k for k in model.state_dict() if k in state]
    specs = {k: (dtype if state[k].is_floating_point() else state[k].dtype, tuple(state[k].shape)) for k in keys}

    def tensors():
        for key in progress_bar(keys, progress, f"converting {src.name}", "tensor"):
            t = state.pop(key)
            yield key, t.to(specs[key][0])
            _release_pages(t)

    return write_safetensors(dst, specs, tensors(), _cache_metadata(src, dtype, "none"))


def quantized_tensors(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `model` (a float model on `meta`) with int8 language-model linear layers, made
    from the checked checkpoint `state` one block at a time: each block is built in float32 from
    its fp16 source, its input projections fused, and every linear layer quantized
    (quantize.quantize_rows: int8 `weight`, float32 `scale`, `bias` in `dtype`); everything else is
    converted to `dtype`. Memory holds one block at a time. On a `meta` state, yields the shapes."""
    from .quantize import quantize_rows

    def convert(prefix: str, module: nn.Module, fuse: bool):
        unit = copy.deepcopy(module)  # still on meta: filled below from the source's tensors
        sources = {name: state.pop(prefix + name) for name in unit.state_dict()}
        unit.load_state_dict({k: v.to(torch.float32) for k, v in sources.items()}, assign=True)
        if fuse:
            unit.fuse_input_projections()
        linears = {name: m for name, m in unit.named_modules() if isinstance(m, nn.Linear)}
        for name, linear in linears.items():
            key = f"{prefix}{name}." if name else prefix
            weight, scale = quantize_rows(linear.weight)
            yield key + "weight", weight
            yield key + "scale", scale
            if linear.bias is not None:
                yield key + "bias", linear.bias.to(dtype)
        owned = {f"{n}.{p}" if n else p for n, m in linears.items() for p, _ in m.named_parameters(recurse=False)}
        for name, tensor in unit.state_dict().items():
            if name not in owned:
                yield prefix + name, tensor.to(dtype if tensor.is_floating_point() else tensor.dtype)
        for tensor in sources.values():
            _release_pages(tensor)

    for n, block in enumerate(model.lm.transformer.h):
        yield from convert(f"lm.transformer.h.{n}.", block, fuse=True)
    yield from convert("lm.lm_head.", model.lm.lm_head, fuse=False)
    for key in [k for k in model.state_dict() if k in state]:
        tensor = state.pop(key)
        yield key, tensor.to(dtype if tensor.is_floating_point() else tensor.dtype)
        _release_pages(tensor)


def quantized_layout(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What quantized_tensors makes of `state` (any tensors of the right keys and shapes), as
    `meta` tensors: names, shapes and dtypes, computed without touching any data."""
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    return dict(quantized_tensors(model, meta, dtype))


def quantize_to_safetensors(
    model: nn.Module, src: str | Path, dst: str | Path, dtype: torch.dtype, progress: bool = False
) -> Path:
    """Write `src` as a safetensors file of int8 linear layers and `dtype` rest (quantized_tensors),
    streaming from the fp16 source: never a float copy of the whole model."""
    src, dst = Path(src), Path(dst)
    state = checked_state(model, src)
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in quantized_layout(model, state, dtype).items()}
    blocks = len(model.lm.transformer.h)
    tensors = quantized_tensors(model, state, dtype)
    if progress:
        tensors = progress_bar(tensors, True, f"quantizing {src.name} to int8", "tensor", total=len(specs))
    return write_safetensors(dst, specs, tensors, {**_cache_metadata(src, dtype, "int8"), "blocks": str(blocks)})


def progress_bar(items, enabled: bool, desc: str, unit: str, total: int | None = None):
    """`items`, with a progress bar on stderr when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr)


def _cache_metadata(src: Path, dtype: torch.dtype, quantize: str) -> dict[str, str]:
    return {"format": "pt", "source": src.name, "dtype": str(dtype).removeprefix("torch."), "quantize": quantize,
            "magma_cache_format": CACHE_FORMAT}


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one read-only mapping (no copy).
    The header is checked before any tensor is made: known dtypes, sizes that match the shapes,
    and offsets that tile the data exactly (no overlap, no gap, nothing past the end)."""
    path = Path(path)
    header = read_safetensors_header(path)
    data = _map_read_only(path)
    base = 8 + header.pop("__header_bytes__")
    header.pop("__metadata__", None)
    out = {}
    for key, meta in header.items():
        if key.startswith(PADDING):
            continue
        start, end = meta["data_offsets"]
        raw = data[base + start : base + end]
        dtype = _TORCH_DTYPES[meta["dtype"]]
        try:
            out[key] = raw.view(dtype).reshape(meta["shape"])
        except RuntimeError:  # not aligned for its dtype in the file: copy this one
            out[key] = raw.clone().view(dtype).reshape(meta["shape"])
    return out


def read_safetensors_header(path: Path) -> dict:
    """The parsed and validated header of a safetensors file (with `__header_bytes__` added)."""
    import json

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{str(path)!r} is not a valid safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad("shorter than its header")
        n = int.from_bytes(prefix, "little")
        if n > min(100_000_000, size - 8):
            raise bad(f"header of {n} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # not JSON, not UTF-8; nested past Python's stack
            raise bad("unreadable header") from None
    if not isinstance(header, dict):
        raise bad("the header is not a mapping")
    spans = []
    for key, meta in header.items():
        if key == "__metadata__":
            if not isinstance(meta, dict):
                raise bad("__metadata__ is not a mapping")
            continue
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and meta["dtype"] in _TORCH_DTYPES
                and isinstance(meta.get("shape"), list) and all(_count(d) for d in meta["shape"])
                and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
                and all(_count(o) for o in meta["data_offsets"])):
            raise bad(f"entry {key!r} lacks a known dtype, a shape or data_offsets")
        start, end = meta["data_offsets"]
        if end - start != math.prod(meta["shape"]) * _TORCH_DTYPES[meta["dtype"]].itemsize or start < 0:
            raise bad(f"tensor {key!r} has {end - start} bytes for shape {meta['shape']}")
        spans.append((start, end, key))
    position = 0
    for start, end, key in sorted(spans):
        if start != position:
            raise bad(f"tensor {key!r} {'overlaps another' if start < position else 'leaves a gap before it'}")
        position = end
    if 8 + n + position != size:
        raise bad(f"{size} bytes where the header describes {8 + n + position} (truncated or extended)")
    header["__header_bytes__"] = n
    return header


def _count(value) -> bool:
    """An integer >= 0 in a JSON header (JSON's true and false are Python ints too)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def cache_path(src: Path, dtype: torch.dtype, quantize: str) -> Path:
    """Where the cache keeps `src` converted to `dtype` (and quantized): keyed by the source's path,
    size and modification time, so a changed source gets a new file."""
    import hashlib

    from .download import cache_dir

    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    kind = str(dtype).removeprefix("torch.") + ("" if quantize == "none" else f".{quantize}")
    return cache_dir() / "converted" / key / f"{src.stem}.{kind}.safetensors"


def cached_conversion(
    model: nn.Module, src: Path, dtype: torch.dtype, quantize: str = "none", progress: bool = False
) -> Path:
    """The cache's conversion of `src` (safetensors, `dtype`, int8 linear layers if quantize is
    "int8"), made on first use. A cached file is reused only if its header is valid, describes
    exactly its size and was written by this format version; otherwise it is made again."""
    dst = cache_path(src, dtype, quantize)
    if dst.is_file():
        try:
            meta = read_safetensors_header(dst).get("__metadata__", {})
            if meta.get("magma_cache_format") == CACHE_FORMAT and meta.get("quantize") == quantize:
                return dst
        except CheckpointError:
            pass
        if progress:
            print(f"the cached conversion {str(dst)!r} is damaged or outdated: making it again", file=sys.stderr)
    write = quantize_to_safetensors if quantize == "int8" else convert_to_safetensors
    converted = write(model, src, dst, dtype, progress=progress)
    _return_freed_heap()
    return converted


def _return_freed_heap() -> None:
    """Give the heap that conversion's temporaries freed back to the system. glibc keeps freed
    memory below its trim threshold, sometimes 0.3 GB at bench_cpu's size, and it then stays in the
    resident set through loading and the first token. Nothing to do where libc has no malloc_trim."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # TypeError: Windows cannot open the process itself by None
        return
    trim(0)
