"""The object API: load a model once, then generate, stream or batch as often as you like.

    magma = Magma.load("demo")
    print(magma.generate("A picture of", image="demo_example_images/scene_1.png").text)
    for piece in magma.stream("Q: What colour is the circle? A:", image=img):
        print(piece, end="")

Sampling settings are per call; nothing is rebuilt or reloaded between calls.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .build import build_model
from .config import MagmaConfig, _suggest, load_config
from .download import resolve_checkpoint
from .errors import ConfigError, MagmaError, PromptError, SamplingError
from .explain import TokenExplanation
from .generation import Engine, GenerationStats
from .images import ImageInput, load_image, preprocess
from .model import MagmaModel
from .resources import resolve_auto
from .sampling import SamplingSettings, _shown
from .text import TextStream, Tokenizer

ImageLike = Union[Image.Image, np.ndarray]
Prompt = Union[str, Sequence[Union[str, ImageLike]]]
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingSettings))
CALL_ARGUMENTS = ("prompt", "prompts", "image", "images", "seeds", "explain")  # for did-you-mean only
PROMPT_IMAGES = (Image.Image, np.ndarray, Path)  # the types a prompt list holds as images

@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids, EOS excluded
    finish_reason: str  # "eos" or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)
    explanations: list[TokenExplanation] | None = None  # one per generated token (EOS included)

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_positions": s.prompt_positions,
            "time_to_first_token_s": round(s.time_to_first_token, 6),
            "decode_time_s": round(s.decode_time, 6),
            "tokens_per_second": round(s.tokens_per_second, 3),
        }


def check_tokenizer(tokenizer: Tokenizer, config: MagmaConfig) -> None:
    if len(tokenizer) != config.model.vocab_size:
        raise ConfigError(f"tokenizer {config.tokenizer!r} has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{config.model.vocab_size}: they do not belong together")


def decide_auto(config: MagmaConfig, on_choice: Callable[[str], None] | None = None) -> MagmaConfig:
    """`config` with its "auto" fields decided; the choice goes to `on_choice`, or to the
    `magma_ipu` logger."""
    if "auto" not in (config.device, config.dtype, config.quantize):
        return config
    with torch.device("meta"):
        shape_only = MagmaModel(config.model)
    config, note = resolve_auto(config, shape_only)
    (on_choice or logging.getLogger("magma_ipu").info)(note)
    return config


def _at(i: int, n: int, name: str, check: Callable[[], Any]) -> Any:
    """check(), with a MagmaError it raises prefixed by `name[i]` when there are several."""
    try:
        return check()
    except MagmaError as e:
        if n == 1:
            raise
        raise type(e)(f"{name}[{i}]: {e}") from None


class Magma:
    """A loaded MAGMA model with its tokenizer and config."""

    def __init__(self, config: MagmaConfig, model: MagmaModel, tokenizer: Tokenizer):
        check_tokenizer(tokenizer, config)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        banned = sorted(tokenizer.special_ids - {tokenizer.eos_id})  # placeholders, never text to show
        self.engine = Engine(model, tokenizer.eos_id, banned_ids=banned, compile=config.compile)

    @classmethod
    def load(
        cls,
        config: str | Path | MagmaConfig = "demo",
        checkpoint_path: str | Path | None = None,
        progress: bool = False,
        random_weights: bool = False,
        **overrides: Any,
    ) -> "Magma":
        """From a preset name, a YAML path or a MagmaConfig; fields can be overridden by keyword.
        "auto" device, dtype and quantize are decided here (resources.resolve_auto); what was
        chosen is logged by the `magma_ipu` logger."""
        cfg = config.replace(**overrides) if isinstance(config, MagmaConfig) else load_config(config, **overrides)
        if checkpoint_path is not None:
            cfg = cfg.replace(checkpoint=str(checkpoint_path))
        tokenizer = Tokenizer.load(cfg.tokenizer)
        check_tokenizer(tokenizer, cfg)  # before any weight is read
        cfg = decide_auto(cfg)
        if random_weights:
            checkpoint = None
        elif cfg.checkpoint is None:
            raise ConfigError(
                f"config {cfg.name!r} names no checkpoint: pass checkpoint_path=..., set `checkpoint`, "
                "or use the embedded 'demo' model"
            )
        else:
            checkpoint = resolve_checkpoint(cfg.checkpoint, sha256=cfg.checkpoint_sha256, progress=progress)
        return cls(cfg, build_model(cfg, checkpoint, progress=progress), tokenizer)

    # -- inputs -------------------------------------------------------------------------------

    def settings(self, **overrides: Any) -> SamplingSettings:
        """The config's sampling defaults with `overrides` (None: keep the default), validated."""
        unknown = [k for k in overrides if k not in SAMPLING_FIELDS]
        if unknown:
            # the keyword arguments of generate, generate_batch and stream end up here
            raise SamplingError(f"unknown keyword argument {unknown[0]!r}"
                                f"{_suggest(unknown[0], SAMPLING_FIELDS + CALL_ARGUMENTS)}; the sampling settings "
                                f"are {', '.join(SAMPLING_FIELDS)}")
        return self.config.sampling(**overrides).validate()

    def open_image(self, image: ImageInput) -> Image.Image:
        """An image from a URL, path, PIL image or array, upright and within the config's size limits, in
        its own mode: preprocessing resizes in that mode and converts to RGB after the crop, as CLIP did."""
        c = self.config
        return load_image(image, timeout=c.image_timeout, max_bytes=c.max_image_bytes, max_pixels=c.max_image_pixels)

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        return preprocess(self.open_image(image), self.config.model.image_resolution)

    def request(self, prompt: Prompt, image: ImageInput | None, max_out_tokens: int) -> list:
        """Segments for the engine: image tensors and token-id lists, in prompt order. Every item
        is checked before any image is read."""
        if isinstance(prompt, str):
            parts, where = [prompt], lambda i: "prompt"
        elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
            parts, where = list(prompt), lambda i: f"prompt item {i}"
        else:
            hint = {bytes: " (decode it to str first)", bytearray: " (decode it to str first)"}.get(type(prompt), "")
            if isinstance(prompt, PROMPT_IMAGES):
                hint = " (an image alone goes in image=..., or in a list: [image])"
            raise PromptError(f"prompt must be a string or a list of strings and images, got "
                              f"{type(prompt).__name__}{hint}")
        for i, part in enumerate(parts):
            if isinstance(part, str):
                try:
                    part.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer can encode it
                    raise PromptError(f"{where(i)} holds {part[e.start]!r} at character {e.start}, a lone surrogate: "
                                      "text must be valid Unicode (encodable as UTF-8)") from None
                found = sorted(t for t in self.tokenizer.special_tokens if t in part)
                if found:
                    raise PromptError(f"{where(i)} text must not contain special tokens: {', '.join(found)}")
            elif not isinstance(part, PROMPT_IMAGES):
                raise PromptError(f"{where(i)} is {_shown(part)} ({type(part).__name__}): each item must be text (str) "
                                  "or an image (PIL image, NumPy array, pathlib.Path; a path or URL string "
                                  "is text here, it goes in image=...)")
        segments: list = [self.image_tensor(image)] if image is not None else []
        text_tokens = 0
        for part in parts:
            if isinstance(part, str):
                ids = self.tokenizer.encode(part)
                text_tokens += len(ids)
                segments.append(ids)
            else:
                segments.append(self.image_tensor(part))
        if not any(isinstance(s, torch.Tensor) or len(s) for s in segments):
            raise PromptError("prompt is empty: give an image, some text, or both")
        limit = self.config.sequence_length
        if text_tokens + max_out_tokens > limit:
            raise PromptError(
                f"prompt has {text_tokens} tokens and max_out_tokens is {max_out_tokens}: "
                f"{text_tokens + max_out_tokens} > sequence_length {limit} "
                f"(over by {text_tokens + max_out_tokens - limit})"
            )
        return segments

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self, prompt: Prompt = "", image: ImageInput | None = None, explain: bool = False, **sampling: Any
    ) -> Generation:
        """One completion. `sampling`: seed, top_p, top_k, temperature, max_out_tokens.
        Safe to share like generate_batch."""
        return self.generate_batch([prompt], images=[image], explain=explain, **sampling)[0]

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        images: Sequence[ImageInput | None] | None = None,
        seeds: Sequence[int] | None = None,
        explain: bool = False,
        **sampling: Any,
    ) -> list[Generation]:
        """Several prompts at once; each row gives what it would give alone (same seed).
        `explain=True` adds each token's logits and image attention (see TokenExplanation).

        A session is safe to share: calls from several threads, and calls made while streams of
        it are open, each give exactly the tokens they give alone. This call holds the model for
        its whole run; other calls wait for it."""
        # a string is a Sequence too: each character would become a prompt
        if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise PromptError(f"prompts must be a list of prompts, got {type(prompts).__name__} "
                              "(for one prompt, use generate)")
        if not prompts:
            raise PromptError("prompts must not be empty")
        n = len(prompts)
        if images is None:
            images = [None] * n
        elif isinstance(images, (str, bytes, bytearray, *PROMPT_IMAGES)) or not isinstance(images, Sequence):
            raise PromptError(f"images must be a list with one image (or None) per prompt, got {type(images).__name__}")
        if len(images) != n:
            raise PromptError(f"got {n} prompts but {len(images)} images: give one image (or None) per prompt")
        settings = self.settings(**sampling)
        if seeds is None:
            seeds = [settings.seed] * n
        else:
            if sampling.get("seed") is not None:
                raise SamplingError("give seeds (one per prompt) or seed (the same for every prompt), not both")
            if not isinstance(seeds, (Sequence, np.ndarray)) or isinstance(seeds, (str, bytes, bytearray)):
                raise SamplingError(f"seeds must be a list of integers, one per prompt, got {type(seeds).__name__}")
            if len(seeds) != n:
                raise SamplingError(f"got {n} prompts but {len(seeds)} seeds: give one seed per prompt, "
                                    f"or no seeds (every prompt then uses seed {settings.seed})")
            seeds = [_at(i, n, "seeds", lambda: SamplingSettings(seed=seed).validate().seed)
                     for i, seed in enumerate(seeds)]
        requests = [_at(i, n, "prompts", lambda: self.request(p, im, settings.max_out_tokens))
                    for i, (p, im) in enumerate(zip(prompts, images))]
        stats = GenerationStats()
        explanations: list | None = [] if explain else None
        rows = self.engine.generate(requests, settings, seeds, stats=stats, capacity=self.config.cache_length,
                                    explain=explanations)
        return [
            Generation(self.tokenizer.decode(row.token_ids), row.token_ids, row.finish_reason, stats,
                       explanations[i] if explain else None)
            for i, row in enumerate(rows)
        ]

    def stream(self, prompt: Prompt = "", image: ImageInput | None = None, **sampling: Any) -> Iterator[str]:
        """Yield text pieces as tokens are decoded (always whole characters). Safe to share like
        stream_with_stats."""
        for piece, _ in self.stream_with_stats(prompt, image, **sampling):
            if piece:
                yield piece

    def stream_with_stats(
        self,
        prompt: Prompt = "",
        image: ImageInput | None = None,
        explain: list[TokenExplanation] | None = None,
        **sampling: Any,
    ) -> Iterator[tuple[str, GenerationStats]]:
        """Text pieces with the running timing figures; the last piece may be empty.
        Given a list, `explain` receives a TokenExplanation per generated token.

        The model is held only while a token is computed, never between pieces: other calls and
        other streams, in this thread or others, may run in between, and this stream still gives
        exactly the tokens it gives alone (after another call used the model it first recomputes
        its prompt and tokens so far, which costs time). A stream left unfinished holds nothing."""
        settings = self.settings(**sampling)
        request = self.request(prompt, image, settings.max_out_tokens)
        stats = GenerationStats()
        text = TextStream(self.tokenizer)
        rows: list | None = [] if explain is not None else None
        tokens = self.engine.tokens([request], settings, [settings.seed], stats, self.config.cache_length, explain=rows)
        for (token,) in tokens:
            if rows:
                explain[:] = rows[0]
            if token is None or token == self.tokenizer.eos_id:
                break
            piece = text.push(token)
            if piece:
                yield piece, stats
        yield text.flush(), stats
