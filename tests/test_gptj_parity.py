"""Our GPT-J against transformers' GPTJForCausalLM (the oracle), same random weights, float32."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from magma_ipu.benchmark.reference import transformers_gptj  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_magma):
    torch.manual_seed(0)
    model = tiny_magma.model
    image = torch.randn(1, 3, 64, 64)
    ids = tiny_magma.tokenizer.encode("A picture of a red")
    prefix = tiny_magma.engine.embed([[image, ids]])[0][None]  # 1 x (4 + len(ids)) x D
    return model, transformers_gptj(model), prefix, tiny_magma.config.model.vocab_size


def ours_cached(model, prefix, steps, choose):
    """Logits at the prefill and at each cached decode step, feeding back `choose(logits)`."""
    t = prefix.shape[1]
    model.lm.setup_caches(1, t + steps)
    valid = torch.zeros(1, t + steps, dtype=torch.bool)
    valid[:, :t] = True
    slots = torch.arange(t)
    out = [model.lm.lm_head(model(prefix, slots, slots[None], valid))[:, -1]]
    for step in range(steps - 1):
        token = choose(out[-1])
        slot = torch.tensor([t + step])
        valid[:, t + step] = True
        hidden = model(model.embed_tokens(token)[:, None], slot, slot[None], valid)
        out.append(model.lm.lm_head(hidden)[:, -1])
    model.lm.clear_caches()
    return out


def oracle_cached(hf, prefix, steps, choose):
    result = hf(inputs_embeds=prefix, past_key_values=DynamicCache(config=hf.config), use_cache=True)
    out, cache = [result.logits[:, -1]], result.past_key_values
    for _ in range(steps - 1):
        token = choose(out[-1])
        result = hf(input_ids=token[:, None], past_key_values=cache, use_cache=True)
        out.append(result.logits[:, -1])
        cache = result.past_key_values
    return out


@torch.inference_mode()
def test_prefill_logits_match_transformers(setup):
    model, hf, prefix, _ = setup
    t = prefix.shape[1]
    slots = torch.arange(t)
    ours = model.lm.lm_head(model(prefix, slots, slots[None], torch.ones(1, t, dtype=torch.bool)))
    theirs = hf(inputs_embeds=prefix).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


@torch.inference_mode()
def test_cached_decode_logits_and_greedy_tokens_match_transformers(setup):
    model, hf, prefix, vocab = setup
    argmax = lambda logits: logits[:, :vocab].argmax(-1)  # noqa: E731
    ours = ours_cached(model, prefix, 20, argmax)
    theirs = oracle_cached(hf, prefix, 20, argmax)
    errors = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
    assert max(errors) < 1e-4, errors
    assert [argmax(x).item() for x in ours] == [argmax(x).item() for x in theirs]


@torch.inference_mode()
def test_oracle_really_differs_without_the_adapter(setup):
    """Guards the parity tests: the adapter changes the logits, so they do test it."""
    model, hf, prefix, _ = setup
    block = hf.transformer.h[0]
    wrapped = block.mlp
    block.mlp = wrapped.mlp
    try:
        without = hf(inputs_embeds=prefix).logits
    finally:
        block.mlp = wrapped
    with_adapter = hf(inputs_embeds=prefix).logits
    assert (without - with_adapter).abs().max().item() > 1e-3
