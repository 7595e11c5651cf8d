"""Config + checkpoint -> a model ready to run: dtype, device, int8 or oneDNN layers, tensor-parallel
shards, phased streaming.

Loading never holds a second full copy of the weights. A `.pt` checkpoint is converted once into
the cache (safetensors), which later starts map read-only:
- float runs: every tensor in the run dtype;
- int8 runs (world of one, not phased): int8 linear layers with their scales, made block by block
  from the fp16 source, and the rest in the run dtype. No float copy of the whole model exists at
  any point, and no float conversion file is written.
Before anything slow, the memory the model needs (and the disk a conversion needs) is checked
against what the machine has (resources.py).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed
from torch import nn

from .config import MagmaConfig, parse_bytes, torch_dtype
from .errors import ConfigError
from .model import MagmaModel
from .quantize import INT8_LAYERS, check_method, default_method, load_int8, quantize_int8
from .quantize_image import check_image_precision, trunk_in
from .resources import cache_bytes, check_disk, check_memory
from .weights import (
    _release_pages,
    _return_freed_heap,
    cache_path,
    cached_conversion,
    check_keys,
    checked_state,
    load_checkpoint,
    load_into,
    mmap_safetensors,
    progress_bar,
    quantized_layout,
    quantized_tensors,
)


def build_model(config: MagmaConfig, checkpoint: str | Path | None, progress: bool = False) -> MagmaModel:
    """The model of `config`, with weights from `checkpoint`, or random ones (seeded) if None.
    With `tensor_parallel` > 1 (under torchrun), this process's shard of it."""
    if "auto" in (config.device, config.dtype, config.quantize):
        raise ConfigError("device, dtype and quantize must be decided before building (resources.resolve_auto)")
    check_image_precision(config.image_precision, config.device)
    model = _build(config, checkpoint, progress)
    if config.image_precision != "float32":
        image_encoder_in(config.image_precision, model)
    return model


def image_encoder_in(precision: str, model: MagmaModel) -> None:
    """Replace the image prefix's float32 trunk by its bfloat16 or int8 version (quantize_image.py);
    the float weights' mapped pages then leave the resident set."""
    prefix = model.image_prefix
    floats = list(prefix.enc.state_dict().values())
    prefix.enc = trunk_in(precision, prefix.enc, model.cfg.image_resolution)
    for tensor in floats:
        _release_pages(tensor)
    del floats
    _return_freed_heap()


def _build(config: MagmaConfig, checkpoint: str | Path | None, progress: bool) -> MagmaModel:
    dtype = torch_dtype(config.dtype)
    if checkpoint is None:
        return _random_model(config, dtype)
    rank, world, device = 0, 1, config.device
    if config.tensor_parallel > 1:
        from .parallel import init_from_env

        rank, world, device = init_from_env(config.device)
        if world != config.tensor_parallel:
            raise ConfigError(f"tensor_parallel is {config.tensor_parallel} but {world} processes were launched "
                              f"(torchrun --nproc-per-node {config.tensor_parallel})")
    # a big model is built on `meta` (no memory until the weights arrive); a small one directly,
    # which saves the seconds torch takes to set up meta tensors the first time
    with torch.device("meta" if lm_parameters(config.model) > 50_000_000 else "cpu"):
        model = MagmaModel(config.model)
    if world == 1:
        check_memory(config, model)
    checkpoint = Path(checkpoint)
    if config.quantize == "int8" and world == 1 and config.max_device_memory is None:
        _load_int8(model, config, checkpoint, dtype, progress)
        return model.eval()
    if config.convert_checkpoint and checkpoint.suffix != ".safetensors":
        if rank == 0:  # one process converts; the others wait, then map the same file
            _check_cache_disk(model, checkpoint, dtype, "none")
            cached_conversion(model, checkpoint, dtype, progress=progress)
        if world > 1:
            torch.distributed.barrier()
        checkpoint = cached_conversion(model, checkpoint, dtype)
    if world > 1:
        from .parallel import shard_model

        shard_model(model, rank, world)
    if config.max_device_memory is not None:
        device = "cpu"  # PhasedBlocks below decides what goes to the device
    load_checkpoint(model, checkpoint, dtype, device, progress=progress and rank == 0, rank=rank, world=world)
    model.eval()
    loaded = list(model.state_dict().values())
    image_prefix_in_float32(model, config)
    convert_linears(model, config)
    for tensor in loaded:  # what was copied (packed, converted) leaves the resident set; the rest is read again on use
        _release_pages(tensor)
    del loaded
    if config.tensor_parallel > 1:
        from .parallel import join_shards

        join_shards(model, config.tensor_parallel)
    if config.max_device_memory is not None:
        from .phased import PhasedBlocks

        model.phased = PhasedBlocks(model, parse_bytes(config.max_device_memory), config.device)
    return model


def _random_model(config: MagmaConfig, dtype: torch.dtype) -> MagmaModel:
    if config.tensor_parallel > 1:
        raise ConfigError("tensor_parallel > 1 needs a checkpoint (each process reads its own slices of it)")
    torch.manual_seed(config.seed)
    # built where it runs (a full-size model never passes through host memory), unless phased
    with torch.device("cpu" if config.max_device_memory else config.device):
        model = MagmaModel(config.model)
    init_random(model)
    model = model.to(dtype=dtype).eval()
    image_prefix_in_float32(model, config)
    convert_linears(model, config)
    if config.max_device_memory is not None:
        from .phased import PhasedBlocks

        model.phased = PhasedBlocks(model, parse_bytes(config.max_device_memory), config.device)
    return model


def _check_cache_disk(model: MagmaModel, checkpoint: Path, dtype: torch.dtype, quantize: str) -> None:
    target = cache_path(checkpoint, dtype, quantize)
    if not target.is_file():
        check_disk(target, cache_bytes(model, dtype, quantize))


def _load_int8(model: MagmaModel, config: MagmaConfig, checkpoint: Path, dtype: torch.dtype, progress: bool) -> None:
    """Fill `model` with int8 linear layers and `dtype` rest from `checkpoint`, through the int8
    cache (or, with convert_checkpoint false, quantized in memory block by block)."""
    method = default_method(config.device)
    try:
        check_method(method, config.device, dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    source = repr(str(checkpoint))
    if config.convert_checkpoint:
        _check_cache_disk(model, checkpoint, dtype, "int8")
        cached = cached_conversion(model, checkpoint, dtype, "int8", progress=progress)
        tensors = mmap_safetensors(cached)
        source = repr(str(cached))
    else:
        tensors = dict(quantized_tensors(model, checked_state(model, checkpoint), dtype))
    expected = quantized_layout(model, model.state_dict(), dtype)
    check_keys({k: t.shape for k, t in expected.items()}, tensors, source, {k: t.dtype for k, t in expected.items()})
    load_int8(model, tensors, method, dtype, config.device, release=_release_pages,
              progress=lambda layers, total: progress_bar(layers, progress, "loading int8 layers", "layer", total))
    int8_layers = tuple(name + "." for name, m in model.named_modules() if isinstance(m, INT8_LAYERS))
    rest = [k for k in model.state_dict() if not k.startswith(int8_layers)]
    load_into(model, tensors, dtype, config.device, source, keys=rest)
    release_after_each_use(model.image_prefix)


def release_after_each_use(module: nn.Module) -> None:
    """After each forward of `module`, drop its memory-mapped weights' pages from this process's
    resident set. The image prefix runs once per image, not once per token: its 0.6 GB of float32
    weights are read again from the page cache (a fraction of a second) by the next image instead of
    staying resident through every decode step. Weights that are not file mappings are untouched.
    The tensors are looked up at each call: image_precision replaces the trunk after loading."""

    def release(*_) -> None:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type == "cpu":
                _release_pages(tensor)

    module.register_forward_hook(release)


def image_prefix_in_float32(model: MagmaModel, config: MagmaConfig) -> None:
    """On a CPU, run the image prefix in float32 whatever the language model's dtype: CPUs without
    native bfloat16/float16 arithmetic run those convolutions far slower (one 384-pixel RN50x16 pass:
    117 s in bfloat16, 0.98 s in float32, on a 2-core AVX2 machine). It runs once per image, so its
    0.6 GB of float32 weights cost memory, not time per token."""
    if torch.device(config.device).type == "cpu" and config.max_device_memory is None:
        model.image_prefix.float()


def convert_linears(model: MagmaModel, config: MagmaConfig) -> MagmaModel:
    """The language model's float linear layers as `config` runs them: int8, packed for oneDNN, or
    left as they are."""
    if config.quantize == "int8":
        quantize_int8(model)
    elif packs_for_onednn(config):
        from .packed import pack_for_onednn

        pack_for_onednn(model)
    return model


def packs_for_onednn(config: MagmaConfig) -> bool:
    """Whether build_model repacks the float32 linear layers for oneDNN (CPU; not when phased
    execution moves the blocks' weights, which packed layers hide)."""
    from .packed import onednn_available

    return (config.onednn and config.device == "cpu" and config.dtype == "float32" and config.quantize == "none"
            and config.max_device_memory is None and onednn_available())


def lm_parameters(cfg) -> int:
    """The language model's parameter count, from the config alone."""
    d, hidden = cfg.d_model, cfg.d_model // cfg.adapter_downsample
    block = 4 * d * d + 2 * d * cfg.d_ff + cfg.d_ff + d + 2 * d * hidden + hidden + d + 2 * d
    return cfg.n_layer * block + cfg.vocab_size * d + cfg.lm_head_size * (d + 1) + 2 * d


@torch.no_grad()
def init_random(model: MagmaModel) -> None:
    """GPT-style random weights (std 0.02) so random-weight models give sane logits."""
    for name, p in model.named_parameters():
        if name.startswith("lm.") and p.dim() == 2:
            p.normal_(0.0, 0.02)
        elif name.startswith("lm.") and name.endswith("bias"):
            p.zero_()
