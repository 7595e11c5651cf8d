"""Cached generation against full recomputation, batching, interleaving, stopping, streaming."""

import numpy as np
import pytest
import torch
from PIL import Image

from magma_ipu import NumericalError, PromptError
from magma_ipu.build import build_model
from magma_ipu.generation import Engine, GenerationStats
from magma_ipu.sampling import SamplingSettings
from magma_ipu.session import Magma


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the finite logits; banned ids (-inf) must agree."""
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    return (a[finite] - b[finite]).abs().max().item()


def picture(seed: int, size=(80, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@torch.inference_mode()
def test_cached_decoding_equals_full_recomputation_at_every_step(tiny_magma, record_decode_steps):
    engine = tiny_magma.engine
    request = tiny_magma.request("A picture of", picture(1), 12)
    settings = SamplingSettings(temperature=0, max_out_tokens=12)
    with record_decode_steps(engine) as captured:
        tokens = [t for (t,) in engine.tokens([request], settings, [0])]
    assert len(captured) == len(tokens) - 1 >= 5
    for step, cached in enumerate(captured, start=1):
        full = engine.full_logits([list(request) + [tokens[:step]]])[:, -1]
        assert max_diff(cached, full) < 1e-5
        assert full.argmax(-1).item() == tokens[step]


@torch.inference_mode()
def test_left_padded_batch_logits_equal_single_rows(tiny_magma):
    engine = tiny_magma.engine
    short = tiny_magma.request("A picture", picture(2), 4)
    long = tiny_magma.request("Q: What colour is the big square? A:", picture(3), 4)
    both = engine.full_logits([short, long])
    for row, request in enumerate((short, long)):
        alone = engine.full_logits([request])[0]
        n = alone.shape[0]
        assert max_diff(both[row, -n:], alone) < 1e-5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_gives_the_same_tokens_as_one_by_one(tiny_magma, temperature):
    prompts = ["A picture of", "Q: How many shapes are there? A:", "a"]
    images = [picture(4), None, picture(5, (40, 90))]
    batch = tiny_magma.generate_batch(prompts, images, seeds=[3, 4, 5], temperature=temperature, max_out_tokens=10)
    single = [
        tiny_magma.generate(p, image=i, seed=s, temperature=temperature, max_out_tokens=10)
        for p, i, s in zip(prompts, images, (3, 4, 5))
    ]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [b.text for b in batch] == [s.text for s in single]


def test_seed_reproduces_and_different_seeds_differ(tiny_magma):
    kwargs = dict(image=picture(6), temperature=1.5, top_p=1.0, max_out_tokens=16)
    a = tiny_magma.generate("A picture of", seed=7, **kwargs)
    b = tiny_magma.generate("A picture of", seed=7, **kwargs)
    others = {tuple(tiny_magma.generate("A picture of", seed=s, **kwargs).token_ids) for s in range(8, 12)}
    assert a.token_ids == b.token_ids
    assert len(others | {tuple(a.token_ids)}) > 1


def test_a_batch_draws_each_row_with_its_own_seed(tiny_magma):
    """One seed per prompt (a wrong count is refused: test_robustness): rows given the same seed draw
    the same tokens, rows given different seeds differ."""
    seeds = [7, 7, 8, 9, 10]
    rows = tiny_magma.generate_batch(["A picture of"] * len(seeds), images=[picture(6)] * len(seeds), seeds=seeds,
                                     temperature=1.5, top_p=1.0, max_out_tokens=16)
    tokens = [tuple(r.token_ids) for r in rows]
    assert tokens[0] == tokens[1]
    assert len(set(tokens[1:])) == 4


def test_interleaved_images_and_text_occupy_their_positions(tiny_magma):
    grid = tiny_magma.config.model.image_tokens
    tok = tiny_magma.tokenizer
    prompt = [picture(1), "left", picture(2), "right"]
    result = tiny_magma.generate(prompt, temperature=0, max_out_tokens=3)
    left, right = tok.encode("left"), tok.encode("right")
    assert result.stats.prompt_positions == 2 * grid + len(left) + len(right)
    model = tiny_magma.model
    with torch.inference_mode():
        (sequence,) = tiny_magma.engine.embed([tiny_magma.request(prompt, None, 1)])
        expected = torch.cat([
            model.embed_images(tiny_magma.image_tensor(picture(1)))[0],
            model.embed_tokens(torch.tensor(left)),
            model.embed_images(tiny_magma.image_tensor(picture(2)))[0],
            model.embed_tokens(torch.tensor(right)),
        ])
    assert sequence.shape == expected.shape
    assert (sequence - expected).abs().max().item() < 1e-5


def test_generation_stops_at_eos_and_hides_it(tiny_magma):
    engine = tiny_magma.engine
    eos = tiny_magma.tokenizer.eos_id
    bias = tiny_magma.model.lm.lm_head.bias
    saved = bias[eos].item()
    with torch.no_grad():
        bias[eos] = 1e4  # EOS is now certain
    try:
        result = tiny_magma.generate("A picture of", image=picture(1), temperature=0, max_out_tokens=8)
    finally:
        with torch.no_grad():
            bias[eos] = saved
    assert result.token_ids == [] and result.text == "" and result.finish_reason == "eos"
    assert engine.eos_id == eos


def test_max_out_tokens_bounds_the_output(tiny_magma):
    result = tiny_magma.generate("A picture of", image=picture(1), temperature=1.0, top_p=1.0, max_out_tokens=5)
    assert len(result.token_ids) <= 5
    assert result.finish_reason == "eos" or len(result.token_ids) == 5


def test_ids_beyond_the_tokenizer_and_the_image_token_are_never_produced(tiny_magma):
    vocab = tiny_magma.config.model.vocab_size
    bias = tiny_magma.model.lm.lm_head.bias
    saved = bias.clone()
    with torch.no_grad():
        bias[vocab:] = 1e4  # head rows with no token
        bias[tiny_magma.tokenizer.image_id] = 1e4
    try:
        result = tiny_magma.generate("A picture of", temperature=1.0, top_p=1.0, max_out_tokens=6)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert result.token_ids and all(t < vocab and t != tiny_magma.tokenizer.image_id for t in result.token_ids)


def test_stream_pieces_join_to_the_generated_text(tiny_magma):
    kwargs = dict(image=picture(3), temperature=1.0, top_p=1.0, seed=2, max_out_tokens=20)
    pieces = list(tiny_magma.stream("Q: What colour is the star? A:", **kwargs))
    full = tiny_magma.generate("Q: What colour is the star? A:", **kwargs)
    assert "".join(pieces) == full.text
    assert all(p and "\ufffd" not in p for p in pieces) or "\ufffd" in full.text


def test_prompt_too_long_says_by_how_much(tiny_magma):
    limit = tiny_magma.config.sequence_length
    with pytest.raises(PromptError, match=r"over by \d+") as info:
        tiny_magma.generate("word " * limit, max_out_tokens=4)
    assert "sequence_length" in str(info.value)


def test_empty_prompt_is_refused(tiny_magma):
    with pytest.raises(PromptError, match="empty"):
        tiny_magma.generate("")


def test_a_larger_request_after_a_small_one_reuses_or_grows_the_cache(tiny_magma):
    engine: Engine = tiny_magma.engine
    tiny_magma.generate("a", temperature=0, max_out_tokens=2)
    _, length = engine.model.lm.cache_size
    assert length == tiny_magma.config.cache_length
    tiny_magma.generate([picture(1), "a", picture(2), "b", picture(3)], temperature=0, max_out_tokens=2)
    assert engine.model.lm.cache_size[1] == length  # fits: reused
    many = [picture(i) for i in range(14)] + ["a"]
    tiny_magma.generate(many, temperature=0, max_out_tokens=2)
    assert engine.model.lm.cache_size[1] > length  # fourteen images need more than one image's room
    again = tiny_magma.generate("a", temperature=0, max_out_tokens=2)
    assert again.token_ids == tiny_magma.generate("a", temperature=0, max_out_tokens=2).token_ids


def test_compiled_decode_step_gives_the_eager_tokens(tiny_magma, record_decode_steps):
    engine = Engine(tiny_magma.model, tiny_magma.tokenizer.eos_id, tiny_magma.engine.banned_ids, compile=True)
    ids = tiny_magma.tokenizer.encode("A picture of")
    request = [tiny_magma.image_tensor(picture(1)), ids, tiny_magma.image_tensor(picture(2)), ids]
    width = len(tiny_magma.engine.embed([request])[0])
    request[-1] = ids * (1 + (60 - width) // len(ids))
    width = len(tiny_magma.engine.embed([request])[0])
    assert width < 64 < width + 10  # the decode crosses 64 slots: two lengths of CUDA graphs (64, 128)
    settings = SamplingSettings(temperature=0, max_out_tokens=10)
    # graphs compiled by earlier tests (the same step functions, other models) would count as recompiles
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # on a CPU, one graph for every width read
        with record_decode_steps(engine) as steps:
            compiled = engine.generate([request], settings, [0])[0].token_ids
        again = engine.generate([request], SamplingSettings(temperature=0, max_out_tokens=6), [0])[0].token_ids
    eager = tiny_magma.engine.generate([request], settings, [0])[0].token_ids
    assert compiled == eager and again == eager[:6]
    for step, logits in enumerate(steps, start=1):
        full = tiny_magma.engine.full_logits([list(request) + [compiled[:step]]])[:, -1]
        assert max_diff(logits, full) < 1e-4


def test_forced_logits_follow_the_decode_path(tiny_magma):
    request = tiny_magma.request("A picture of", picture(3), 8)
    settings = SamplingSettings(temperature=0, max_out_tokens=8)
    tokens = tiny_magma.engine.generate([request], settings, [0])[0].token_ids
    forced = tiny_magma.engine.forced_logits(request, tokens)
    assert forced.shape[0] == len(tokens) + 1
    assert forced[:-1].argmax(-1).tolist() == tokens  # greedy: each step's argmax is the next token
    full = tiny_magma.engine.full_logits([list(request) + [tokens]])[0, -len(tokens) - 1 :]
    assert max_diff(forced, full) < 1e-5


def test_compiled_prefill_pads_prompts_to_a_shared_bucket(tiny_magma):
    from magma_ipu.generation import PROMPT_BUCKET

    engine = Engine(tiny_magma.model, tiny_magma.tokenizer.eos_id, tiny_magma.engine.banned_ids, compile=True)
    settings = SamplingSettings(temperature=0, max_out_tokens=6)
    capacity = PROMPT_BUCKET + 40
    requests = [tiny_magma.request(prompt, picture(i), 6) for i, prompt in enumerate(("A picture of", "Q: How many?"))]
    widths = {len(tiny_magma.engine.embed([r])[0]) for r in requests}
    assert len(widths) == 2 and max(widths) < PROMPT_BUCKET  # two lengths, one bucket
    for i, request in enumerate(requests):
        # the second prompt reuses the first one's graphs
        with torch._dynamo.config.patch(error_on_recompile=i > 0), torch.inference_mode():
            logits, width, pads = engine._prefill(engine.embed([request]), 6, capacity)
            stats = GenerationStats()
            tokens = engine.generate([request], settings, [0], stats=stats, capacity=capacity)[0].token_ids
        assert width == PROMPT_BUCKET and stats.prompt_positions == len(tiny_magma.engine.embed([request])[0])
        with torch.inference_mode():
            eager_logits, eager_width, _ = tiny_magma.engine._prefill(engine.embed([request]), 6, capacity)
        assert eager_width < width and max_diff(logits, eager_logits) < 1e-4
        assert tokens == tiny_magma.engine.generate([request], settings, [0], capacity=capacity)[0].token_ids


def test_a_bucket_never_outgrows_the_cache(tiny_magma):
    engine = Engine(tiny_magma.model, tiny_magma.tokenizer.eos_id, tiny_magma.engine.banned_ids, compile=True)
    request = tiny_magma.request("A picture of", picture(1), 8)
    longest = len(engine.embed([request])[0])
    with torch.inference_mode():
        _, width, _ = engine._prefill(engine.embed([request]), 8, capacity=longest + 8)
    assert width == longest and engine.model.lm.cache_size[1] >= width + 8


# -- weights that give NaN or inf -------------------------------------------------------------


@pytest.fixture
def own_magma(tiny_cfg, tokenizer):
    """A model of its own to break: tiny_magma is shared by the whole session."""
    return Magma(tiny_cfg, build_model(tiny_cfg, None), tokenizer)


def set_mlp_weight(magma: Magma, value: float = float("nan")) -> float:
    """Set one weight of a middle block (NaN by default); returns the value it had."""
    weight = magma.model.lm.transformer.h[1].mlp[0].c_fc.weight
    saved = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = value
    return saved


def run(magma: Magma, call: str, prompt, **kwargs):
    if call == "generate":
        return magma.generate(prompt, **kwargs).text
    return "".join(magma.stream(prompt, **kwargs))


@pytest.mark.parametrize("call", ["generate", "stream"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])  # greedy gave "!!!!", sampling a bare RuntimeError
def test_a_nan_weight_stops_generation_with_its_likely_causes(own_magma, call, temperature):
    set_mlp_weight(own_magma)
    with pytest.raises(NumericalError, match=r"NaN or infinite in the prefill") as info:
        run(own_magma, call, "A picture of", image=picture(1), temperature=temperature, max_out_tokens=4)
    message = str(info.value)
    assert "checkpoint of another model" in message and "BatchNorm" in message and "float16" in message
    assert "language model's weights are at fault" in message  # the image and word embeddings were finite


def test_an_overflow_to_inf_is_caught_like_nan(own_magma):
    set_mlp_weight(own_magma, float("inf"))
    with pytest.raises(NumericalError, match="prefill"):
        own_magma.generate("A picture of", temperature=0, max_out_tokens=4)


def test_full_and_forced_logits_refuse_nan_too(own_magma):
    set_mlp_weight(own_magma)
    request = own_magma.request("A picture of", picture(1), 2)
    with pytest.raises(NumericalError, match="full_logits"):
        own_magma.engine.full_logits([request])
    with pytest.raises(NumericalError, match="prefill"):
        own_magma.engine.forced_logits(request, [5, 6])


def test_nan_first_met_in_a_decode_step_names_the_token(own_magma):
    kwargs = {"temperature": 0, "max_out_tokens": 4}
    first = own_magma.generate("A picture of", **kwargs).token_ids[0]
    assert first not in own_magma.tokenizer.encode("A picture of")  # so the prefill stays finite
    with torch.no_grad():
        own_magma.model.lm.transformer.wte.weight[first] = float("nan")
    with pytest.raises(NumericalError, match=r"NaN or infinite at token 2 \(a decode step\)"):
        own_magma.generate("A picture of", **kwargs)


def test_negative_batchnorm_variances_are_named_and_text_prompts_still_work(own_magma):
    before = own_magma.generate("A picture of", temperature=0, max_out_tokens=4).token_ids
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what the old synthetic checkpoint writer drew: about half negative
        for module in own_magma.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.normal_(0, 0.02, generator=generator)
    for call, temperature in (("generate", 0.0), ("stream", 1.0)):
        with pytest.raises(NumericalError, match="prefill") as info:
            run(own_magma, call, "A picture of", image=picture(2), temperature=temperature, max_out_tokens=4)
        assert "embeddings are already NaN" in str(info.value) and "BatchNorm" in str(info.value)
    with pytest.raises(NumericalError, match=r"batch rows \[0\]"):  # the row without an image is fine
        own_magma.generate_batch(["A picture of", "A picture of"], images=[picture(2), None], max_out_tokens=4)
    # the error leaves the engine usable: the language model alone is fine
    assert own_magma.generate("A picture of", temperature=0, max_out_tokens=4).token_ids == before


def test_a_compiled_engine_raises_and_then_recovers_with_mended_weights(own_magma):
    engine = Engine(own_magma.model, own_magma.tokenizer.eos_id, own_magma.engine.banned_ids, compile=True)
    capacity = own_magma.config.cache_length
    request = own_magma.request("A picture of", picture(2), 8)
    settings = SamplingSettings(temperature=0, max_out_tokens=8)
    expected = own_magma.engine.generate([request], settings, [0], capacity=capacity)[0].token_ids
    saved = set_mlp_weight(own_magma)
    with pytest.raises(NumericalError, match="prefill"):  # its bucket fills the cache but for 2 slots
        engine.generate([request], SamplingSettings(temperature=0, max_out_tokens=2), [0], capacity=capacity)
    set_mlp_weight(own_magma, saved)
    # this prefill fills fewer slots, and the compiled decode step reads them all (masking the
    # unfilled ones): NaN left there by the failed request would spoil every row
    assert engine.generate([request], settings, [0], capacity=capacity)[0].token_ids == expected


def test_eager_decoding_reads_exactly_the_filled_cache_slots(tiny_magma):
    from magma_ipu.generation import Engine
    from magma_ipu.sampling import SamplingSettings

    engine = Engine(tiny_magma.model, tiny_magma.tokenizer.eos_id, tiny_magma.engine.banned_ids)
    request = tiny_magma.request("A picture of", "demo_example_images/scene_1.png", 6)
    read = []
    forward = tiny_magma.model.forward

    def recording(embeds, slots, positions, key_valid, *rest):
        if embeds.shape[1] == 1:  # a decode step: the slot it writes and the slots it reads
            read.append((int(slots[0]), key_valid.shape[1]))
        return forward(embeds, slots, positions, key_valid, *rest)

    tiny_magma.model.forward = recording
    try:
        engine.generate([request], SamplingSettings(temperature=0, max_out_tokens=6), [0], capacity=64)
    finally:
        del tiny_magma.model.forward
    assert read and all(width == slot + 1 for slot, width in read)


def test_casting_the_model_after_use_keeps_the_rotary_table_right(tiny_magma):
    # Module.to(a real dtype) also casts complex buffers, dropping the rotation's sine: the table
    # must be rebuilt rather than reused
    settings = dict(image="demo_example_images/scene_1.png", temperature=0, max_out_tokens=8)
    before = tiny_magma.generate("A picture of", **settings).token_ids
    tiny_magma.model.to(torch.float32)  # float32 already: changes nothing but the complex buffer
    assert tiny_magma.generate("A picture of", **settings).token_ids == before
    assert tiny_magma.model.lm.rotation.dtype == torch.complex64
