"""The real presets run in half precision (float16 on CUDA, bfloat16 plans on a CPU): the demo model in
bfloat16 and in float16, on the CPU, gives float32's logits to within the dtype's precision."""

import pytest
import torch

from magma_ipu.session import Magma

IMAGE = "demo_example_images/scene_2.png"


@pytest.fixture(scope="module")
def float32_path(demo_float_magma):
    request = demo_float_magma.request("A picture of", IMAGE, 12)
    tokens = demo_float_magma.generate("A picture of", image=IMAGE, temperature=0, max_out_tokens=12).token_ids
    return request, tokens, demo_float_magma.engine.forced_logits(request, tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_cpu_gives_the_float32_logits(float32_path, dtype):
    request, tokens, want = float32_path
    half = Magma.load("demo", dtype=str(dtype).removeprefix("torch."))
    lm = half.model.lm
    assert {p.dtype for p in lm.parameters()} == {dtype}  # the language model really runs in it
    got = half.engine.forced_logits(request, tokens)  # fed float32's tokens: the same path, step by step
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)  # banned ids are -inf in both
    # within the dtype's rounding (eps: 2**-7 for bfloat16, 2**-10 for float16) of the largest logit:
    # at most twice it anywhere, a fifth of it on average (float32 weights rounded through a coarser
    # type than the run's fail the average)
    unit = torch.finfo(dtype).eps * want[finite].abs().max()
    error = (got.float() - want)[finite].abs()
    assert error.max() < 2 * unit and error.mean() < 0.2 * unit, (error.max() / unit, error.mean() / unit)
    greedy = half.generate("A picture of", image=IMAGE, temperature=0, max_out_tokens=12).token_ids
    assert greedy == tokens
