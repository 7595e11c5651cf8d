"""Random prompts and sampling settings thrown at the demo model: only documented errors, and the
output always decodes to valid text. The session keeps working after every error."""

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magma_ipu import PromptError, SamplingError, run_inference

IMAGE = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)

# numbers of other types, and values that are no numbers at all
odd = st.sampled_from([True, "0.5", b"1", [0.5], Fraction(1, 3), Decimal("0.25"), Decimal("NaN"), np.float32(0.5),
                       np.int64(2), 10**400, complex(1, 0)])
sampling = st.fixed_dictionaries({
    "seed": st.one_of(st.integers(-5, 2**64), st.floats(allow_nan=True), st.just("3"), odd),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.floats(allow_nan=True, allow_infinity=True), odd),
    "top_k": st.one_of(st.integers(-3, 60), st.just(2.5), odd),
    # every magnitude a float can take, subnormals included
    "temperature": st.one_of(st.floats(-1, 3), st.floats(0, allow_infinity=True, allow_subnormal=True), odd),
    "max_out_tokens": st.one_of(st.integers(-2, 80), odd),
})
# text (lone surrogates included), images, and items that are neither
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
item = st.one_of(st.text(max_size=40), surrogates, st.just(IMAGE), st.sampled_from([None, 3, b"A", ["x"], {"a": 1}]))
prompts = st.one_of(st.text(max_size=300), st.lists(item, max_size=4), st.sampled_from([b"A picture", None, 7]))


@pytest.fixture(scope="module")
def sane_answer(demo_magma):
    return demo_magma.generate("A picture of", image=IMAGE, temperature=0, max_out_tokens=3).token_ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(prompt=prompts, with_image=st.booleans(), params=sampling)
def test_random_prompts_and_settings(demo_magma, sane_answer, prompt, with_image, params):
    try:
        result = demo_magma.generate(prompt, image=IMAGE if with_image else None, **params)
    except (PromptError, SamplingError) as e:
        assert str(e)
    else:
        result.text.encode("utf-8")  # valid text: no lone surrogates
        assert len(result.token_ids) <= params["max_out_tokens"]
    # whatever happened, the session still answers a plain request as it did before
    assert demo_magma.generate("A picture of", image=IMAGE, temperature=0, max_out_tokens=3).token_ids == sane_answer


@pytest.mark.parametrize(
    "prompt, pattern",
    [("A \ud800 picture", r"prompt holds '\\ud800' at character 2, a lone surrogate"),
     (["fine", "bad \udfff"], r"prompt item 1 holds '\\udfff' at character 4, a lone surrogate"),
     (b"A picture of", "prompt must be a string or a list of strings and images, got bytes"),
     (bytearray(b"A"), "got bytearray"),
     ([1, 2, 3], r"prompt item 0 is 1 \(int\): each item must be text \(str\) or an image \(PIL image, NumPy array"),
     (["A", None], r"prompt item 1 is None \(NoneType\)"),
     (["A", b"x"], r"prompt item 1 is b'x' \(bytes\)"),
     (["A", ["nested"]], r"prompt item 1 is \['nested'\] \(list\)"),
     (["A", {"image": 1}], r"prompt item 1 .*\(dict\)"),
     ({"text": "A"}, "got dict"),
     (3.5, "got float"),
     (IMAGE, r"got ndarray \(an image alone goes in image="),
     (["A", "<|endoftext|>"], "prompt item 1 text must not contain special tokens")],
)
def test_bad_prompts_name_the_item_and_what_is_allowed(demo_magma, prompt, pattern):
    with pytest.raises(PromptError, match=pattern):
        demo_magma.generate(prompt, max_out_tokens=2)
    with pytest.raises(PromptError, match=pattern):
        list(demo_magma.stream(prompt, max_out_tokens=2))


def test_a_bad_item_is_refused_before_any_image_is_read(demo_magma, monkeypatch):
    opened = []
    monkeypatch.setattr(type(demo_magma), "image_tensor", lambda self, image: opened.append(image))
    with pytest.raises(PromptError, match="prompt item 2"):
        demo_magma.request([IMAGE, "text", None], IMAGE, 2)
    assert not opened


@pytest.mark.parametrize(
    "call, pattern",
    [(lambda m: m.generate("A", temprature=0.5), r"unknown keyword argument 'temprature' \(did you mean "
                                                 r"'temperature'\?\); the sampling settings are seed, top_p"),
     (lambda m: m.generate("A", imgae=IMAGE), r"'imgae' \(did you mean 'image'\?\)"),
     (lambda m: list(m.stream("A", top_pp=0.5)), r"'top_pp' \(did you mean 'top_p'\?\)"),
     (lambda m: m.generate_batch(["A"], sed=3), r"'sed' \(did you mean 'seed'\?\)"),
     (lambda m: run_inference(m, m.config, m.tokenizer, IMAGE, "A", temprature=0.5),
      r"run_inference got an unknown keyword argument 'temprature' \(did you mean 'temperature'\?\); it takes "
      r"session, config, tokenizer, image_url, text_prompt, seed")],
)
def test_a_misspelt_keyword_is_named_with_the_nearest(demo_magma, call, pattern):
    with pytest.raises(SamplingError, match=pattern):
        call(demo_magma)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [({"seeds": [1]}, SamplingError, r"got 2 prompts but 1 seeds: give one seed per prompt"),
     ({"seeds": [1, 2, 3]}, SamplingError, r"got 2 prompts but 3 seeds"),
     ({"seeds": 5}, SamplingError, r"seeds must be a list of integers, one per prompt, got int"),
     ({"seeds": "12"}, SamplingError, r"seeds must be a list of integers"),
     ({"seeds": [1, -2]}, SamplingError, r"seeds\[1\]: seed must be an integer in \[0, 2\*\*63\), got -2"),
     ({"seeds": [1, 2], "seed": 3}, SamplingError, "give seeds .* or seed .*, not both"),
     ({"images": "demo_example_images/scene_1.png"}, PromptError, "images must be a list with one image"),
     ({"images": [IMAGE]}, PromptError, r"got 2 prompts but 1 images"),
     ({"prompts": ["A", 5]}, PromptError, r"prompts\[1\]: prompt must be a string"),
     ({"prompts": "AB"}, PromptError, r"prompts must be a list of prompts, got str \(for one prompt, use generate\)")],
)
def test_batch_arguments_must_match_the_prompts(demo_magma, kwargs, error, pattern):
    kwargs = {"prompts": ["A picture of", "Q: What colour is the circle? A:"], **kwargs}
    with pytest.raises(error, match=pattern):
        demo_magma.generate_batch(temperature=1.0, max_out_tokens=3, **kwargs)


def test_numpy_seeds_and_exotic_numbers_generate(demo_magma):
    expected = demo_magma.generate_batch(["A picture of", "A"], images=[IMAGE, None], seeds=[3, 4], temperature=0.5,
                                         top_p=0.9, max_out_tokens=4)
    got = demo_magma.generate_batch(["A picture of", "A"], images=[IMAGE, None], seeds=np.array([3, 4]),
                                    temperature=Fraction(1, 2), top_p=Decimal("0.9"), max_out_tokens=np.int64(4))
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_the_smallest_temperatures_give_the_greedy_tokens(demo_magma):
    greedy = demo_magma.generate("A picture of", image=IMAGE, temperature=0, max_out_tokens=8).token_ids
    for temperature in (5e-324, 1e-300, 1e-38):
        assert demo_magma.generate("A picture of", image=IMAGE, temperature=temperature, top_p=1e-300,
                                   max_out_tokens=8).token_ids == greedy
    # uniform over the vocabulary: ten seeds draw ten first tokens, few of them among the model's ten
    # likeliest (10 of 384 tokens), where at an ordinary temperature most draws are among them
    likeliest = demo_magma.engine.full_logits([demo_magma.request("A picture of", IMAGE, 1)])[0, -1].topk(10).indices
    firsts = [demo_magma.generate("A picture of", image=IMAGE, temperature=temperature, top_p=1.0, seed=seed,
                                  max_out_tokens=1).token_ids[:1] for temperature in (1e300, 1.0) for seed in range(10)]
    uniform, ordinary = firsts[:10], firsts[10:]
    assert sum(t[0] in likeliest.tolist() for t in uniform if t) <= 3
    assert sum(t[0] in likeliest.tolist() for t in ordinary if t) >= 7
