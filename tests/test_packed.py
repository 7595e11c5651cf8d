"""float32 linear layers repacked for oneDNN: the plain model's logits and tokens, eager and compiled."""

import copy

import pytest
import torch

from magma_ipu.generation import Engine
from magma_ipu.packed import PackedLinear, pack_for_onednn
from magma_ipu.quantize import quantize_int8
from magma_ipu.sampling import SamplingSettings
from magma_ipu.build import build_model, packs_for_onednn
from magma_ipu.session import Magma

IMAGE = "demo_example_images/scene_1.png"


@pytest.fixture(scope="module")
def packed(tiny_magma):
    model = pack_for_onednn(copy.deepcopy(tiny_magma.model))
    return Magma(tiny_magma.config, model, tiny_magma.tokenizer)


def close(got, want, rel=1e-5):
    finite = torch.isfinite(want)  # banned ids are -inf in both
    assert torch.equal(finite, torch.isfinite(got))
    assert (got - want)[finite].abs().max() <= rel * want[finite].abs().max()


def test_every_language_model_linear_is_packed_and_counted(packed, tiny_magma):
    layers = [m for m in packed.model.lm.modules() if isinstance(m, PackedLinear)]
    assert not [m for m in packed.model.lm.modules() if isinstance(m, torch.nn.Linear)]
    # per block: fused q/k/v/c_fc, out_proj, c_proj, two adapter layers; and the head
    assert len(layers) == 5 * tiny_magma.config.model.n_layer + 1
    # float32 bytes, by hand from the config's shapes (q, k, v and c_fc fused: one bias, zero for q, k, v)
    m = tiny_magma.config.model
    d, ff, hidden = m.d_model, m.d_ff, m.d_model // m.adapter_downsample
    block = (3 * d + ff) * (d + 1) + d * d + (ff * d + d) + (d * hidden + hidden) + (hidden * d + d)
    assert sum(layer.weight_bytes for layer in layers) == 4 * (m.n_layer * block + m.lm_head_size * (d + 1))


def test_packed_model_gives_the_plain_logits_and_tokens(packed, tiny_magma):
    request = tiny_magma.request("A picture of", IMAGE, 1)
    close(packed.engine.full_logits([request]), tiny_magma.engine.full_logits([request]))
    tokens = tiny_magma.generate("A picture of", image=IMAGE, temperature=0, max_out_tokens=10).token_ids
    close(packed.engine.forced_logits(request, tokens), tiny_magma.engine.forced_logits(request, tokens))
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        a = tiny_magma.generate("A picture of", image=IMAGE, max_out_tokens=10, **settings)
        b = packed.generate("A picture of", image=IMAGE, max_out_tokens=10, **settings)
        assert a.token_ids == b.token_ids


def test_compiled_packed_decode_gives_the_eager_logits(packed):
    eager = packed.engine
    compiled = Engine(packed.model, eager.eos_id, eager.banned_ids, compile=True)
    request = packed.request("A picture of", IMAGE, 8)
    tokens = eager.generate([request], SamplingSettings(temperature=0, max_out_tokens=8), [0])[0].token_ids
    close(compiled.forced_logits(request, tokens), eager.forced_logits(request, tokens))


def test_a_copy_owns_its_packed_weights(tiny_magma):
    model = pack_for_onednn(copy.deepcopy(tiny_magma.model))
    request = tiny_magma.request("A picture of", IMAGE, 1)
    want = Engine(model, -1).full_logits([request])
    twin = copy.deepcopy(model)
    del model
    close(Engine(twin, -1).full_logits([request]), want, rel=0)


def test_packing_or_quantizing_twice_is_refused_and_changes_nothing(packed):
    before = [type(m) for m in packed.model.modules()]
    for convert in (pack_for_onednn, quantize_int8):
        with pytest.raises(ValueError, match="already packed"):
            convert(packed.model)
    assert [type(m) for m in packed.model.modules()] == before


def test_build_model_packs_cpu_float32_only(tiny_cfg):
    assert packs_for_onednn(tiny_cfg.replace(onednn=True))
    for other in ({"onednn": False}, {"quantize": "int8"}, {"dtype": "bfloat16"}, {"max_device_memory": "1MB"}):
        assert not packs_for_onednn(tiny_cfg.replace(**{"onednn": True, **other}))
    model = build_model(tiny_cfg.replace(onednn=True), None)
    assert isinstance(model.lm.lm_head, PackedLinear)
