"""On a CUDA device: the demo model gives the CPU's captions in every GPU mode (float32, float16,
bfloat16, weight-only int8, CUDA graphs, phased streaming). Skipped without CUDA; run by
scripts/gpu_check.py on a machine that has one."""

from pathlib import Path

import pytest
import torch

from magma_ipu import Magma
from magma_ipu.phased import state_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [ROOT / "demo_example_images" / f"scene_{i}.png" for i in (1, 2, 3)]
GREEDY = dict(temperature=0, max_out_tokens=24)


@pytest.fixture(scope="module")
def cpu_captions():
    magma = Magma.load("demo")
    return [magma.generate("A picture of", image=image, **GREEDY).text for image in IMAGES]


def captions(**overrides) -> list[str]:
    magma = Magma.load("demo", device="cuda", **overrides)
    assert next(magma.model.lm.parameters()).device.type == "cuda"
    return [magma.generate("A picture of", image=image, **GREEDY).text for image in IMAGES]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_dtypes_give_the_cpu_captions(cpu_captions, dtype):
    assert captions(dtype=dtype) == cpu_captions


def test_cuda_weight_only_int8_gives_the_cpu_captions(cpu_captions):
    assert captions(dtype="float16", quantize="int8") == cpu_captions


def test_cuda_graphs_give_the_eager_tokens(cpu_captions):
    assert captions(dtype="float16", compile=True) == captions(dtype="float16")


def test_phased_streaming_on_cuda_gives_the_resident_captions(cpu_captions):
    # the least budget that runs, so that every block streams: the weights outside the blocks, and two
    # blocks in flight
    model = Magma.load("demo", device="cuda", dtype="float16").model
    blocks = model.lm.transformer.h
    budget = state_bytes(model) - (len(blocks) - 2) * state_bytes(blocks[0]) + 1
    streamed = Magma.load("demo", device="cuda", dtype="float16", max_device_memory=str(budget))
    assert streamed.model.phased.resident == 0
    texts = [streamed.generate("A picture of", image=image, **GREEDY).text for image in IMAGES]
    assert texts == captions(dtype="float16")


def test_auto_picks_float16_on_cuda():
    magma = Magma.load("demo", device="auto", dtype="auto", quantize="auto")
    assert magma.config.device.startswith("cuda") and magma.config.dtype == "float16"
