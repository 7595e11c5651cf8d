"""Phased execution: run a model larger than the device's memory budget, as the IPU demo ran
GPT-J phase by phase out of remote memory.

Everything but the GPT-J blocks stays on the device; blocks stay resident while the budget lasts
and the rest live in (pinned) host memory. Each streamed block is copied in just before it runs,
and the next streamed block's copy is started on a side stream while the current one computes,
so transfer and compute overlap. The arithmetic is the resident model's: logits are equal.
A step then costs at least (streamed weight bytes / host-to-device bandwidth): it pays off when
many positions share each pass (long prompts, batches), not for one token at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .model import MagmaModel

def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (int8 weights are buffers); not the key/value caches."""
    return {k: t for k, t in module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def state_bytes(module: nn.Module) -> int:
    """Bytes of the weights phased execution places: parameters and persistent buffers."""
    return sum(t.numel() * t.element_size() for t in _weights(module).values())


class PhasedBlocks:
    """Streams the blocks of `model.lm` that do not fit `budget` bytes on `device`."""

    def __init__(self, model: MagmaModel, budget: int, device: torch.device | str):
        self.device = torch.device(device)
        blocks = list(model.lm.transformer.h)
        per_block = state_bytes(blocks[0])
        fixed = state_bytes(model) - per_block * len(blocks)
        # two slots are kept free for streaming: the block that runs and the one being copied in
        fits = max(0, (budget - fixed) // per_block - 2) if budget > fixed + 2 * per_block else -1
        if fits < 0:
            raise ConfigError(
                f"max_device_memory {budget} bytes ({budget / 2**30:.3g} GiB) cannot hold the non-block weights "
                f"({fixed} bytes) and two blocks in flight ({2 * per_block} bytes): give at least "
                f"{fixed + 2 * per_block + 1} bytes ({(fixed + 2 * per_block + 1) / 2**30:.3g} GiB)")
        self.resident = min(fits, len(blocks))
        self.streamed = blocks[self.resident :]
        self.transfers = 0
        for module in [model.image_prefix, model.lm.transformer.wte, model.lm.transformer.ln_f, model.lm.lm_head,
                       *blocks[: self.resident]]:
            module.to(self.device)
        self.streamed_bytes = per_block * len(self.streamed)  # host-to-device traffic of one pass
        pin = self.device.type == "cuda"
        # each streamed block's weight tensors, found once: streaming swaps their .data, never the tensors
        self.weights = [_weights(b) for b in self.streamed]
        self.host = [{name: (t.data.cpu().pin_memory() if pin else t.data.cpu()) for name, t in w.items()}
                     for w in self.weights]
        for weights, host in zip(self.weights, self.host):
            for name, t in weights.items():
                t.data = host[name]
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: dict[int, tuple[dict, object]] = {}
        for i, block in enumerate(self.streamed):
            block.register_forward_pre_hook(lambda _m, _a, i=i: self._bring_in(i))
            block.register_forward_hook(lambda _m, _a, _out, i=i: self._send_back(i))

    def _copy(self, i: int) -> tuple[dict, object]:
        self.transfers += 1
        if self.side is None:  # CPU: the same path, with a plain copy standing in for the transfer
            return {n: t.clone() for n, t in self.host[i].items()}, None
        with torch.cuda.stream(self.side):
            tensors = {n: t.to(self.device, non_blocking=True) for n, t in self.host[i].items()}
            event = torch.cuda.Event()
            event.record(self.side)
        return tensors, event

    def _bring_in(self, i: int) -> None:
        tensors, event = self.pending.pop(i, None) or self._copy(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in tensors.values():  # used on the main stream: keep the allocator from reusing early
                t.record_stream(torch.cuda.current_stream(self.device))
        for name, t in self.weights[i].items():
            t.data = tensors[name]
        if i + 1 < len(self.streamed):  # overlap: the next block's copy runs while this one computes
            self.pending[i + 1] = self._copy(i + 1)

    def _send_back(self, i: int) -> None:
        for name, t in self.weights[i].items():
            t.data = self.host[i][name]
