"""int8 linear layers: close to float32 and the same greedy tokens."""

import copy

import pytest
import torch

from magma_ipu.quantize import Int8WeightOnlyLinear, quantize_int8
from magma_ipu.session import Magma


def test_weight_only_linear_is_per_channel_and_close():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[3] *= 100  # one loud channel must not cost the others their precision
    q = Int8WeightOnlyLinear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (32,)
    x = torch.randn(5, 64)
    err = (q(x) - linear(x)).abs()
    quiet = torch.ones(32, dtype=torch.bool)
    quiet[3] = False
    assert err[:, quiet].max() < 0.02 * linear(x)[:, quiet].abs().max()


@pytest.mark.parametrize("method", ["dynamic", "weight_only"])
def test_demo_model_int8_gives_the_float_captions(demo_magma, method):
    model = copy.deepcopy(demo_magma.model)
    quantize_int8(model, method)
    int8 = Magma(demo_magma.config, model, demo_magma.tokenizer)
    image = "demo_example_images/scene_2.png"
    for prompt in ("A picture of", "Q: How many shapes are there? A:"):
        a = demo_magma.generate(prompt, image=image, temperature=0, max_out_tokens=24)
        b = int8.generate(prompt, image=image, temperature=0, max_out_tokens=24)
        assert a.token_ids == b.token_ids
    request = demo_magma.request("A picture of", image, 1)
    ref, got = demo_magma.engine.full_logits([request]), int8.engine.full_logits([request])
    finite = torch.isfinite(ref)
    assert (ref - got)[finite].abs().max() < 0.05 * ref[finite].abs().max()
    linears = [m for m in model.lm.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every language-model linear layer was replaced
