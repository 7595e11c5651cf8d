"""Tensor parallelism over N processes (torch.distributed; launched by torchrun), Megatron style.

Derived from the single-device module tree at load time:
- attention: q/k/v split by heads (rows), out_proj split by its inputs (columns) -> all-reduce;
  the key/value cache is then sharded by heads as a matter of course;
- MLP: c_fc by rows, c_proj by columns -> all-reduce; adapter: first layer by rows, second by
  columns -> all-reduce (a bias that follows a reduction lives on rank 0 only);
- LM head: split over the vocabulary, logits all-gathered, so every rank samples the same token
  from the same seed;
- embedding, LayerNorms and the image encoder are replicated (each rank computes the image prefix).
Each rank reads only its own slices from the (memory-mapped) checkpoint.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist
from torch import nn

from .config import tensor_parallel_problems
from .errors import ConfigError
from .model import MagmaModel

# key suffix -> (dimension to split, or "rank0" for a bias kept on rank 0 only)
_SPLITS = {
    "attn.attention.q_proj.weight": 0,
    "attn.attention.k_proj.weight": 0,
    "attn.attention.v_proj.weight": 0,
    "attn.attention.out_proj.weight": 1,
    "mlp.0.c_fc.weight": 0,
    "mlp.0.c_fc.bias": 0,
    "mlp.0.c_proj.weight": 1,
    "mlp.0.c_proj.bias": "rank0",
    "mlp.1.adapter.0.weight": 0,
    "mlp.1.adapter.0.bias": 0,
    "mlp.1.adapter.2.weight": 1,
    "mlp.1.adapter.2.bias": "rank0",
}


def split_of(key: str):
    """How checkpoint tensor `key` is divided among ranks (None: replicated)."""
    if key in ("lm.lm_head.weight", "lm.lm_head.bias"):
        return 0
    if key.startswith("lm.transformer.h."):
        return _SPLITS.get(key.split(".", 4)[4])
    return None


def shard(tensor: torch.Tensor, key: str, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a full checkpoint tensor (a view where possible: no copy of the rest)."""
    split = split_of(key)
    if split is None:
        return tensor
    if split == "rank0":
        return tensor if rank == 0 else torch.zeros_like(tensor)
    size = tensor.shape[split] // world
    return tensor.narrow(split, rank * size, size)


def check_divisible(model: MagmaModel, world: int) -> None:
    """The config check again, for a model that did not come through load_config."""
    bad = tensor_parallel_problems(model.cfg, world)
    if bad:
        raise ConfigError(f"tensor_parallel={world} must divide {', '.join(bad)}: each process holds an equal "
                          "share of them")


def shard_model(model: MagmaModel, rank: int, world: int) -> MagmaModel:
    """Give `model` (built on `meta`) this rank's shapes; `join_shards` adds the collectives once
    the weights are loaded (and quantized or packed)."""
    check_divisible(model, world)
    for key, param in list(model.named_parameters()):
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        local = shard(torch.empty(param.shape, device="meta"), key, rank, world)
        setattr(module, name, nn.Parameter(torch.empty(local.shape, dtype=param.dtype, device="meta"),
                                           requires_grad=False))
    for block in model.lm.transformer.h:
        block.attn["attention"].n_head //= world
    return model


def join_shards(model: MagmaModel, world: int, group=None) -> MagmaModel:
    """Sum the row-split layers' partial outputs over the ranks and gather the vocabulary-split
    logits. Hooked on the layers the model finally runs, so call it after any layer replacement."""
    for block in model.lm.transformer.h:
        for linear in (block.attn["attention"].out_proj, block.mlp[0].c_proj, block.mlp[1].adapter[2]):
            linear.register_forward_hook(lambda _m, _a, out: _all_reduce(out, group))
    model.lm.lm_head.register_forward_hook(lambda _m, _a, out: _all_gather_last(out, world, group))
    return model


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


def _all_gather_last(tensor: torch.Tensor, world: int, group) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes; returns (rank, world, this rank's device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        # torch.distributed.nn.functional takes group.WORLD as a default argument when first
        # imported (a FakeTensorMode, as weights.py uses, imports it): imported after the group
        # exists, it holds the group forever, destroy_process_group cannot stop gloo's threads, and
        # the process aborts at exit ("terminate called without an active exception")
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device
