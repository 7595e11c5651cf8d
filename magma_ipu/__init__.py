"""MAGMA (CLIP RN50x16 image prefix + GPT-J 6B with adapters) for captions and visual questions.

The demo's calls:
    session, config, tokenizer = init_inference_session("demo")
    run_inference(session, config, tokenizer, "demo_example_images/scene_1.png", "A picture of")
The object API: `Magma.load(...)`, then `.generate`, `.stream`, `.generate_batch`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from .config import MagmaConfig, ModelConfig, _suggest, load_config
from .errors import (
    CheckpointError,
    ConfigError,
    DownloadError,
    ImageError,
    MagmaError,
    NumericalError,
    PromptError,
    ResourceError,
    SamplingError,
)
from .images import ImageInput
from .sampling import SamplingSettings
from .session import Generation, Magma
from .text import Tokenizer


def init_inference_session(
    key: str = "magma_v1_500", checkpoint_path: str | Path | None = None, **overrides: Any
) -> tuple[Magma, MagmaConfig, Tokenizer]:
    """Load the model of config `key` once; returns (session, config, tokenizer)."""
    session = Magma.load(key, checkpoint_path=checkpoint_path, progress=True, **overrides)
    return session, session.config, session.tokenizer


def run_inference(
    session: Magma,
    config: MagmaConfig,
    tokenizer: Tokenizer,
    image_url: ImageInput,
    text_prompt: str,
    seed: int | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    max_out_tokens: int | None = None,
    **unknown: Any,
) -> str:
    """Caption or answer about one image; returns the generated text (special tokens removed, the
    prompt not included), as the command line's `text`. A sampling setting left out (None) is the
    session config's, as on the command line."""
    if unknown:  # a SamplingError with a did-you-mean, where Python would say only "unexpected keyword"
        name = next(iter(unknown))
        raise SamplingError(f"run_inference got an unknown keyword argument {name!r}{_suggest(name, _RUN_ARGUMENTS)}; "
                            f"it takes {', '.join(_RUN_ARGUMENTS)}")
    result = session.generate(
        text_prompt,
        image=image_url,
        seed=seed,
        top_p=top_p,
        top_k=top_k,
        temperature=temperature,
        max_out_tokens=max_out_tokens,
    )
    return result.text


_RUN_ARGUMENTS = tuple(inspect.signature(run_inference).parameters)[:-1]  # all but **unknown


__all__ = [
    "CheckpointError", "ConfigError", "DownloadError", "Generation", "ImageError", "Magma",
    "MagmaConfig", "MagmaError", "ModelConfig", "NumericalError", "PromptError", "ResourceError", "SamplingError",
    "SamplingSettings", "Tokenizer", "init_inference_session", "load_config", "run_inference",
]
