"""Random prompts and sampling settings thrown at the demo model: only documented errors, and the
output always decodes to valid text. The session keeps working after every error."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magma_ipu import MagmaError, PromptError, SamplingError

IMAGE = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)

sampling = st.fixed_dictionaries({
    "seed": st.one_of(st.integers(-5, 2**64), st.floats(allow_nan=True), st.just("3")),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.floats(allow_nan=True, allow_infinity=True)),
    "top_k": st.one_of(st.integers(-3, 60), st.just(2.5)),
    "temperature": st.one_of(st.floats(-1, 3), st.just(float("inf"))),
    "max_out_tokens": st.integers(-2, 80),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(prompt=st.text(max_size=300), with_image=st.booleans(), params=sampling)
def test_random_prompts_and_settings(demo_magma, prompt, with_image, params):
    try:
        result = demo_magma.generate(prompt, image=IMAGE if with_image else None, **params)
    except (PromptError, SamplingError) as e:
        assert isinstance(e, MagmaError) and isinstance(e, ValueError) and str(e)
    else:
        result.text.encode("utf-8")  # valid text: no lone surrogates
        assert len(result.token_ids) <= params["max_out_tokens"]
    after = demo_magma.generate("A picture of", image=IMAGE, temperature=0, max_out_tokens=3)
    assert after.finish_reason in ("eos", "length")
