"""int8 linear layers: close to float32 and the same greedy tokens."""

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magma_ipu import quantize
from magma_ipu.quantize import activations_need_reduce_range, int8_linear, quantize_int8, quantize_rows
from magma_ipu.session import Magma


def test_weight_only_linear_is_per_channel_and_close():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[3] *= 100  # one loud channel must not cost the others their precision
    q = int8_linear(*quantize_rows(linear.weight.detach()), linear.bias, "weight_only", torch.float32)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (32,)
    x = torch.randn(5, 64)
    err = (q(x) - linear(x)).abs()
    quiet = torch.ones(32, dtype=torch.bool)
    quiet[3] = False
    assert err[:, quiet].max() < 0.02 * linear(x)[:, quiet].abs().max()


@pytest.mark.parametrize("method", ["dynamic", "weight_only"])
def test_demo_model_int8_gives_the_float_captions(demo_magma, demo_float_magma, method):
    model = copy.deepcopy(demo_float_magma.model)
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


def test_fused_input_projections_change_nothing(tiny_magma):
    model = copy.deepcopy(tiny_magma.model)
    for block in model.lm.transformer.h:
        block.fuse_input_projections()
    block, cfg = model.lm.transformer.h[0], tiny_magma.config.model
    assert block.fused_in.weight.shape == (3 * cfg.d_model + cfg.d_ff, cfg.d_model)
    assert not hasattr(block.attn["attention"], "q_proj") and not hasattr(block.mlp[0], "c_fc")
    fused = Magma(tiny_magma.config, model, tiny_magma.tokenizer)
    request = tiny_magma.request("A picture of", "demo_example_images/scene_1.png", 1)
    ref, got = tiny_magma.engine.full_logits([request]), fused.engine.full_logits([request])
    finite = torch.isfinite(ref)  # banned ids are -inf in both
    assert torch.equal(finite, torch.isfinite(got))
    assert (ref - got)[finite].abs().max() < 1e-5 * ref[finite].abs().max()
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        a = tiny_magma.generate("A picture of", image="demo_example_images/scene_1.png", max_out_tokens=12, **settings)
        b = fused.generate("A picture of", image="demo_example_images/scene_1.png", max_out_tokens=12, **settings)
        assert a.token_ids == b.token_ids


def test_quantize_rows_on_a_known_matrix():
    w = torch.tensor([[63.5, -127.0, 0.5, 1.5], [127.0, 1.0, -3.0, 2.5], [-254.0, 1.0, 3.0, -5.0], [0.0] * 4])
    q, scale = quantize_rows(w)
    # each row's largest magnitude maps to +-127 (scales exact here); the rest round to nearest,
    # ties to even; an all-zero row gets a tiny scale, not a division by zero
    assert torch.equal(scale[:3], torch.tensor([1.0, 1.0, 2.0])) and 0 < scale[3] < 1e-12
    expected = [[64, -127, 0, 2], [127, 1, -3, 2], [-127, 0, 2, -2], [0, 0, 0, 0]]
    assert torch.equal(q, torch.tensor(expected, dtype=torch.int8))
    assert q.dtype == torch.int8 and scale.dtype == torch.float32


def test_dynamic_int8_linear_error_is_bounded_on_a_known_matrix():
    linear = torch.nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -0.5, 0.25, 0.0], [127.0, 1.0, -3.0, 2.0], [0.01, 0.02, -0.03, 0.04]]))
        linear.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    q = int8_linear(*quantize_rows(linear.weight.detach()), linear.bias, "dynamic", torch.float32)
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    # weight error <= scale/2 per entry (scale = row max / 127); activations: 8 bits over their range,
    # or 7 where this CPU's products would saturate with 8
    w_step = linear.weight.abs().amax(1) / 127
    x_step = (x.max() - x.min()) / (127 if activations_need_reduce_range() else 255)
    bound = (w_step / 2 * x.abs().sum(1, keepdim=True) + linear.weight.abs().sum(1) * x_step / 2) * 1.01
    assert torch.all((q(x) - linear(x)).abs() <= bound)
    assert torch.equal(q(x)[1], linear.bias.detach())  # a zero input gives exactly the bias
    twin = copy.deepcopy(q)
    del q  # the copy owns its own packed weights
    assert torch.allclose(twin(x), linear(x), atol=bound.max().item())


def _saturating_product(x, packed, reduce_range):
    """fbgemm's int8 product as a CPU without VNNI computes it: uint8 x int8 pairs summed into int16."""
    weight, _ = torch.ops.quantized.linear_unpack(packed)
    scale = x.max().clamp(min=1e-12) / (127 if reduce_range else 255)  # x >= 0 here: zero point 0
    pairs = (torch.round(x / scale)[:, None, :] * weight.int_repr().float()).unflatten(-1, (-1, 2)).sum(-1)
    return pairs.clamp(-32768, 32767).sum(-1) * scale * weight.q_per_channel_scales().float()


def test_activations_are_7_bit_where_the_products_would_saturate(monkeypatch):
    probe = activations_need_reduce_range.__wrapped__  # uncached
    monkeypatch.setattr(quantize, "_linear_dynamic", _saturating_product)
    assert probe() is True


def _probe_with_kernels(instructions: str) -> str:
    """The probe's answer, and the 7- and 8-bit extreme products, in a process whose fbgemm runs the
    kernels of `instructions` (its FBGEMM_ENABLE_INSTRUCTIONS: a CPU may run those of an older one)."""
    code = ("import torch; from magma_ipu.quantize import activations_need_reduce_range, int8_linear, quantize_rows;"
            "w = torch.tensor([127.0, -127.0])[:, None].expand(2, 256).contiguous();"
            "p = int8_linear(*quantize_rows(w), None, 'dynamic', torch.float32).packed.params;"
            "x = torch.full((1, 256), 255.0); exact = x @ w.T;"
            "ok = [torch.allclose(torch.ops.quantized.linear_dynamic(x, p, r), exact, rtol=1e-5)"
            "      for r in (True, False)];"
            "print(activations_need_reduce_range(), *ok)")
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": instructions}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="fbgemm's x86 kernels")
def test_on_kernels_without_vnni_the_probe_chooses_7_bits_and_8_would_have_saturated():
    """fbgemm's AVX2 kernels (the real ones, on any x86 CPU of the last decade) saturate 8-bit products."""
    need, exact_7, exact_8 = _probe_with_kernels("AVX2")
    assert (need, exact_7, exact_8) == ("True", "True", "False")


CPU_FLAGS = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []


@pytest.mark.skipif("avx512_vnni" not in CPU_FLAGS, reason="needs a CPU with AVX-512 VNNI")
def test_on_vnni_kernels_the_probe_chooses_8_bits():
    need, exact_7, exact_8 = _probe_with_kernels("")
    assert (need, exact_7, exact_8) == ("False", "True", "True")


def test_the_activation_bits_chosen_for_this_cpu_give_exact_products_at_their_extremes():
    """Every pair at its extreme (the case that saturates): exact with the chosen setting, on this
    CPU's own kernels."""
    k = 256
    w = torch.tensor([127.0, -127.0])[:, None].expand(2, k).contiguous()
    layer = int8_linear(*quantize_rows(w), None, "dynamic", torch.float32)
    x = torch.full((1, k), 255.0)
    assert torch.allclose(layer(x), x @ w.T, rtol=1e-5)
    assert layer.packed.reduce_range == activations_need_reduce_range()


def test_compiled_int8_decode_gives_the_eager_int8_tokens(demo_magma, demo_float_magma, record_decode_steps):
    from magma_ipu.generation import Engine
    from magma_ipu.sampling import SamplingSettings

    model = quantize_int8(copy.deepcopy(demo_float_magma.model), "dynamic")
    eager = Engine(model, demo_magma.tokenizer.eos_id, demo_magma.engine.banned_ids)
    compiled = Engine(model, demo_magma.tokenizer.eos_id, demo_magma.engine.banned_ids, compile=True)
    request = demo_magma.request("A picture of", "demo_example_images/scene_3.png", 12)
    settings = SamplingSettings(temperature=0, max_out_tokens=12)
    # the same decode steps, one compiled: compare step by step
    with record_decode_steps(compiled) as compiled_steps, record_decode_steps(eager) as eager_steps:
        tokens = compiled.generate([request], settings, [0])[0].token_ids
        assert tokens == eager.generate([request], settings, [0])[0].token_ids
    assert len(compiled_steps) == len(eager_steps) > 0
    for got, want in zip(compiled_steps, eager_steps):
        finite = torch.isfinite(want)
        assert (got - want)[finite].abs().max() < 1e-4 * want[finite].abs().max()
