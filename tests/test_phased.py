"""Phased execution under a memory budget, on CPU: the streaming path runs and changes nothing."""

import copy

import numpy as np
import pytest
import torch

from magma_ipu import ConfigError
from magma_ipu.config import parse_bytes
from magma_ipu.phased import PhasedBlocks, state_bytes
from magma_ipu.session import Magma


def test_parse_bytes():
    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes("500MB") == 500 * 10**6 and parse_bytes("1e3") == 1000
    with pytest.raises(ValueError, match="max_device_memory"):
        parse_bytes("lots")


def test_streamed_blocks_give_the_resident_logits_and_tokens(tiny_magma):
    model = copy.deepcopy(tiny_magma.model)
    per_block = state_bytes(model.lm.transformer.h[0])
    fixed = state_bytes(model) - per_block * len(model.lm.transformer.h)
    phased = PhasedBlocks(model, fixed + 3 * per_block, "cpu")  # room for 1 resident block + 2 in flight
    assert phased.resident == 1 and len(phased.streamed) == tiny_magma.config.model.n_layer - 1
    streaming = Magma(tiny_magma.config, model, tiny_magma.tokenizer)
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    request = tiny_magma.request("A picture of", image, 1)
    assert torch.equal(streaming.engine.full_logits([request]), tiny_magma.engine.full_logits([request]))
    before = phased.transfers
    a = streaming.generate("A picture of", image=image, temperature=1.0, seed=4, max_out_tokens=8)
    b = tiny_magma.generate("A picture of", image=image, temperature=1.0, seed=4, max_out_tokens=8)
    assert a.token_ids == b.token_ids
    assert phased.transfers - before >= len(phased.streamed) * len(a.token_ids)


def test_budget_too_small_is_explained(tiny_magma):
    with pytest.raises(ValueError, match="cannot hold the non-block weights"):
        PhasedBlocks(copy.deepcopy(tiny_magma.model), 1000, "cpu")
    with pytest.raises(ConfigError, match="max_device_memory"):
        tiny_magma.config.replace(max_device_memory="a lot")


def test_int8_weights_stream_with_their_blocks(tiny_magma):
    from magma_ipu.quantize import quantize_int8

    model = quantize_int8(copy.deepcopy(tiny_magma.model), "weight_only")
    resident = Magma(tiny_magma.config, copy.deepcopy(model), tiny_magma.tokenizer)
    per_block = state_bytes(model.lm.transformer.h[0])
    fixed = state_bytes(model) - per_block * len(model.lm.transformer.h)
    phased = PhasedBlocks(model, fixed + 3 * per_block, "cpu")
    assert any(t.dtype == torch.int8 for t in phased.host[0].values())  # int8 weights are buffers
    streaming = Magma(tiny_magma.config, model, tiny_magma.tokenizer)
    request = tiny_magma.request("A picture of", np.zeros((32, 32, 3), dtype=np.uint8), 1)
    assert torch.equal(streaming.engine.full_logits([request]), resident.engine.full_logits([request]))
