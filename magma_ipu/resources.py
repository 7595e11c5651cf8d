"""Know before you wait: what a config needs in memory and on disk, against what the machine has,
and the choice of device, dtype and int8 for configs that leave them to us ("auto").

Figures are for one session (batch 1, one image): the weights as they will be held (int8 layers
1 byte per weight plus a scale per row; everything else in the run dtype), the key/value cache,
and a fixed allowance for activations and the libraries. On a CPU the token embedding is read
from the memory-mapped cache file row by row, so it is not counted there, and the image prefix is
held in float32.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import MagmaConfig, torch_dtype
from .errors import ResourceError

GB = 1e9
OVERHEAD = 640 * 2**20  # activations, torch's memory, allocator slack (bench_cpu int8 peaked at 1.39 GB against 1.387 with 600)


@dataclass(frozen=True)
class Plan:
    dtype: str
    quantize: str

    @property
    def flags(self) -> str:
        return f"--dtype {self.dtype} --quantize {self.quantize}"

    def label(self) -> str:
        return "int8" if self.quantize == "int8" else self.dtype


def weight_bytes(model: nn.Module, dtype: torch.dtype, quantize: str, device: str) -> int:
    """Bytes of weights `model` (any device, meta included) holds when run in `dtype` / `quantize`."""
    total = 0
    quantized = set()
    if quantize == "int8":
        for module in model.lm.modules():
            if isinstance(module, nn.Linear):
                out_features, in_features = module.weight.shape
                total += out_features * in_features + 4 * out_features  # int8 weight, float32 scale
                quantized.add(id(module.weight))
    cpu = torch.device(device).type == "cpu"
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in quantized or (cpu and name == "lm.transformer.wte.weight"):
            continue
        float_bytes = 4 if cpu and name.startswith("image_prefix.") else dtype.itemsize  # build.image_prefix_in_float32
        total += tensor.numel() * (float_bytes if tensor.is_floating_point() else tensor.element_size())
    return total


def memory_needed(config: MagmaConfig, model: nn.Module, plan: Plan | None = None) -> int:
    plan = plan or Plan(config.dtype, config.quantize)
    dtype = torch_dtype(plan.dtype)
    m = config.model
    kv_cache = 2 * m.n_layer * config.cache_length * m.d_model * dtype.itemsize
    return (weight_bytes(model, dtype, plan.quantize, config.device) + kv_cache + OVERHEAD
            + image_precision_bytes(config, model))


def image_precision_bytes(config: MagmaConfig, model: nn.Module) -> int:
    """What image_precision adds to the weights, in shares of the float32 trunk's size. int8: twice.
    Calibration holds a BatchNorm-folded float copy of the trunk; then fbgemm's packed int8 trunk
    stays, with its copies, besides the float weights (measured at full size: peak +0.95 GB, +0.81 GB
    after the first token, for a 0.55 GB float32 trunk). bfloat16: half, its folded bfloat16 copy
    (folded a convolution at a time)."""
    share = {"float32": 0, "bfloat16": 0.5, "int8": 2}[config.image_precision]
    trunk = model.image_prefix.enc.state_dict().values()
    return int(share * sum(t.numel() * 4 for t in trunk if t.is_floating_point()))


def available_memory(device: str) -> int | None:
    """Bytes this process can still use on `device`: the GPU's free memory, or on a CPU
    MemAvailable bounded by the cgroup's limit. None if unknown."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def plans(device: str) -> list[Plan]:
    """What runs on `device`, smallest first (CPU int8 needs float32 activations)."""
    if torch.device(device).type == "cpu":
        return [Plan("float32", "int8"), Plan("bfloat16", "none"), Plan("float32", "none")]
    return [Plan("float16", "int8"), Plan("float16", "none"), Plan("bfloat16", "none"), Plan("float32", "none")]


def check_memory(config: MagmaConfig, model: nn.Module) -> None:
    """Stop at once, in one line, if the config's model cannot fit this machine's free memory."""
    if not config.memory_check:
        return
    available = available_memory(config.device)
    needed = memory_needed(config, model)
    if available is None or needed <= available:
        return
    plan = Plan(config.dtype, config.quantize)
    where = "the GPU has" if config.device.startswith("cuda") else "this machine has"
    fits = [p for p in plans(config.device) if p != plan and memory_needed(config, model, p) <= available]
    alternatives = "; ".join(f"{p.label()} ~{memory_needed(config, model, p) / GB:.1f} GB ({p.flags})" for p in fits)
    raise ResourceError(
        f"{config.name} in {plan.label()} needs ~{needed / GB:.1f} GB of memory but {where} "
        f"{available / GB:.1f} GB available; "
        + (f"what would fit: {alternatives}" if fits else "nothing fits: free memory or use a bigger machine")
        + " (memory_check false skips this check)"
    )


def check_disk(target: Path, size: int) -> None:
    """Stop at once if `target`'s folder cannot take a file of `size` bytes."""
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if size > free:
        raise ResourceError(
            f"writing {target.name} needs {size / GB:.1f} GB on disk but {folder} has {free / GB:.1f} GB free; "
            "point MAGMA_CACHE at a bigger disk"
        )


def resolve_auto(config: MagmaConfig, model: nn.Module) -> tuple[MagmaConfig, str | None]:
    """`config` with "auto" device, dtype and quantize decided, and a line saying what was chosen
    (None when nothing was left to choose). With CUDA: float16, the checkpoint's own precision.
    Without: int8 on the CPU if it fits, else the smallest CPU plan that fits."""
    auto = [name for name in ("device", "dtype", "quantize") if getattr(config, name) == "auto"]
    if not auto:
        return config, None
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = config.replace(device=device)
    if device.startswith("cuda"):
        config = config.replace(dtype="float16" if config.dtype == "auto" else config.dtype,
                                quantize="none" if config.quantize == "auto" else config.quantize)
        reason = "a CUDA device is available"
    else:
        candidates = [p for p in plans("cpu")
                      if config.dtype in ("auto", p.dtype) and config.quantize in ("auto", p.quantize)]
        available = available_memory("cpu")
        chosen = next((p for p in candidates if available is None or memory_needed(config, model, p) <= available),
                      candidates[0] if candidates else Plan("float32", "none"))
        config = config.replace(dtype=chosen.dtype, quantize=chosen.quantize)
        reason = "no CUDA device" if "device" in auto else "on the CPU"
    plan = Plan(config.dtype, config.quantize)
    available = available_memory(config.device)
    room = f" of {available / GB:.1f} GB available" if available is not None else ""
    return config, (f"{reason}: running on {config.device} in {plan.label()} ({plan.flags}; needs "
                    f"~{memory_needed(config, model) / GB:.1f} GB{room}); explicit flags override this")


def cache_bytes(model: nn.Module, dtype: torch.dtype, quantize: str) -> int:
    """Size of the cache file converting `model`'s checkpoint to `dtype` / `quantize` writes."""
    return weight_bytes(model, dtype, quantize, "cuda")
