"""Prefill once, then decode one position per token from a static key/value cache.

A request is a list of segments: image tensors (1 x 3 x R x R) and token-id lists, in prompt order.
Rows of a batch are left-padded to a common length; each row's rotary positions start at 0 on
its first real input and padding slots are masked out, so a row gives the same tokens alone or
in a batch. Compiled, the prefill pads further, to a multiple of PROMPT_BUCKET positions, so that
prompts of many lengths share a few compiled shapes.

Sharing: the cache lives in the model, so every computation on it (a prefill, a decode step) runs
under a lock of that model's, and a streaming generation never holds it across a `yield`. Between
its steps another call may use the cache; the generation then finds it no longer the owner and
rebuilds its own state exactly as it first computed it (its prefill again, then one decode step per
token it has produced), so each call gives the same tokens, bit for bit, as it would alone.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import torch

from .errors import NumericalError
from .explain import TokenExplanation
from .model import MagmaModel
from .sampling import SamplingSettings, draw

Segment = Union[torch.Tensor, Sequence[int]]
Request = Sequence[Segment]

PROMPT_BUCKET = 128  # compiled prefill widths: at most 6 shapes for MAGMA's 644-slot sequence

LIKELY_CAUSES = (
    "the weights are broken or do not belong to this model: NaN or infinite values in the checkpoint, "
    "a checkpoint of another model, negative BatchNorm running variances in the image encoder, "
    "or an overflow of float16 (try dtype float32)"
)


@dataclass
class GenerationStats:
    prompt_positions: int = 0  # image and text positions fed by the prefill
    time_to_first_token: float = 0.0  # seconds: image encoder + prefill + first draw
    decode_time: float = 0.0  # seconds for the tokens after the first
    new_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_time if self.new_tokens > 1 and self.decode_time else 0.0


@dataclass
class RowResult:
    token_ids: list[int] = field(default_factory=list)  # generated ids, EOS excluded
    finish_reason: str = "length"  # "eos" or "length"


class _CacheGuard:
    """The lock over one model's key/value cache and the generation whose state it holds (None:
    nobody's). One per model, shared by all its engines, since they all write the same cache."""

    def __init__(self):
        self.lock = threading.RLock()
        self.owner: object | None = None


_guards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def _guard_of(lm: torch.nn.Module) -> _CacheGuard:
    with _guards_lock:
        return _guards.setdefault(lm, _CacheGuard())


class Engine:
    """Runs requests through a MagmaModel; owns the compiled prefill and decode step and drives the
    model's cache.

    Safe to share between threads and between generators alive at once (see the module docstring):
    `generate` holds the model's lock for its whole run; `tokens` only during each computation, and
    a suspended `tokens` generator, even one never finished, holds nothing.
    """

    def __init__(self, model: MagmaModel, eos_id: int, banned_ids: Sequence[int] = (), compile: bool = False):
        self.model = model
        self._guard = _guard_of(model.lm)
        self.eos_id = eos_id
        self.banned_ids = list(banned_ids)
        self.device = model.lm.transformer.wte.weight.device
        self.dtype = model.lm.transformer.wte.weight.dtype
        self.key_valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.decode_step, self.prefill_step = self._decode_step, self._prefill_step
        self.compiled = compile
        # The number of cache slots a decode step reads grows every step. A CUDA graph needs fixed shapes,
        # so compiled on CUDA a step reads a power of two of them (see _attended); compiled on a CPU the
        # number is a dynamic size, one graph for all (see _step).
        self.padded_reads = compile and self.device.type == "cuda"
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.decode_step = torch.compile(self._decode_step, mode=mode, fullgraph=True,
                                             dynamic=False if self.padded_reads else None)
            self.prefill_step = torch.compile(self._prefill_step, mode=mode, fullgraph=True, dynamic=False)

    # -- building inputs ----------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """One L x D embedding sequence per request; all images go through the encoder in one batch."""
        images = [seg for req in requests for seg in req if isinstance(seg, torch.Tensor)]
        image_embeds = iter(())
        if images:
            pixels = torch.cat(images).to(self.device)
            image_embeds = iter(self.model.embed_images(pixels))  # each: (R/32)^2 x D
        sequences = []
        for req in requests:
            parts = []
            for seg in req:
                if isinstance(seg, torch.Tensor):
                    parts.append(next(image_embeds))
                elif len(seg):
                    ids = torch.tensor(list(seg), dtype=torch.long, device=self.device)
                    parts.append(self.model.embed_tokens(ids))
            sequences.append(torch.cat(parts))
        return sequences

    def _left_pad(self, sequences: list[torch.Tensor], width: int = 0):
        """B x T x D embeddings, B x T validity, B x T rotary positions and B pad counts; T is the
        longest sequence's length, or `width` if that is more."""
        width = max(width, max(len(s) for s in sequences))
        batch, dim = len(sequences), sequences[0].shape[-1]
        embeds = torch.zeros(batch, width, dim, dtype=self.dtype, device=self.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        for row, seq in enumerate(sequences):
            embeds[row, width - len(seq) :] = seq
            valid[row, width - len(seq) :] = True
        pads = torch.tensor([width - len(s) for s in sequences], device=self.device)
        positions = (torch.arange(width, device=self.device)[None, :] - pads[:, None]).clamp(min=0)
        return embeds, valid, positions, pads

    def _ensure_cache(self, batch: int, length: int, exact: bool = False) -> None:
        """A cache of `batch` rows and at least `length` slots (the model's own is reused if it fits).
        The steps see all its slots, or with `exact` the first `length` only: a replay sees the
        slots its generation first saw, though another call may have grown the cache since (the
        compiled steps' shapes, and so their arithmetic, depend on it)."""
        cached_batch, cached_length = self.model.lm.cache_size
        if cached_batch != batch or cached_length < length:
            self.model.lm.setup_caches(batch, length)
            cached_length = length
        seen = length if exact else cached_length
        if self.key_valid.shape != (batch, seen):
            self.key_valid = torch.zeros(batch, seen, dtype=torch.bool, device=self.device)
        self.key_valid.zero_()

    @contextmanager
    def _hold(self, call: object | None = None) -> Iterator[bool]:
        """Hold the model's cache for one computation of the generation `call` (None: a computation
        of no generation). Yields whether the cache still holds that generation's state. While it
        computes the cache is nobody's: after an exception every generation rebuilds its own."""
        guard = self._guard
        with guard.lock:
            mine = call is not None and guard.owner is call
            guard.owner = None
            yield mine
            guard.owner = call

    # -- the two phases -----------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits (... x V, banned ids at -inf) and their float32 sums before the ban (...). A NaN or
        an inf among the logits makes the sum non-finite (only finite logits near float32's limit could
        overflow it too), so checking the sums costs one reduction where counting finite logits costs four."""
        logits = self.model.logits(hidden)
        sums = logits.sum(-1, dtype=torch.float32)  # float32: float16 sums of finite logits could overflow
        if self.banned_ids:
            logits[..., self.banned_ids] = float("-inf")
        return logits, sums

    def _check_finite(self, sums: torch.Tensor, where: str, embeds: torch.Tensor | None = None) -> None:
        """Raise NumericalError unless every logit is finite (`sums`: see _logits); argmax or sampling
        would otherwise turn NaN into arbitrary tokens. Called on the steps' outputs, never inside a
        compiled function."""
        finite = torch.isfinite(sums)
        if finite.all():
            return
        # drop the cache, which now holds NaN or inf: a later request reads slots it masks out (the
        # compiled step reads past the filled ones), and a masked value still meets a weight of 0: 0 * NaN = NaN
        self.model.lm.clear_caches()
        message = f"the model's logits are NaN or infinite {where}"
        if len(sums) > 1:
            rows = (~finite.reshape(len(sums), -1).all(1)).nonzero().flatten().tolist()
            message += f" (batch rows {rows})"
        message += f": {LIKELY_CAUSES}."
        if embeds is not None:
            message += (" The prompt's embeddings are finite, so the language model's weights are at fault."
                        if torch.isfinite(embeds).all() else
                        " The prompt's embeddings are already NaN or infinite: look at the image encoder "
                        "(BatchNorm statistics) and the word embedding first.")
        raise NumericalError(message)

    def _attended(self, slot: int, step_fn) -> int:
        """How many cache slots a decode step at `slot` reads: exactly the filled ones, or for the
        compiled step on CUDA the next power of two (a few CUDA graphs to record, at most twice the reads)."""
        if step_fn == self._decode_step or not self.padded_reads:  # bound methods: equal, never identical
            return slot + 1
        return min(self.key_valid.shape[1], max(64, 1 << slot.bit_length()))

    def _prefill_step(self, embeds: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, key_valid,
                      weights_out: list | None = None):
        # embeds: B x T x D; slots: T; positions, key_valid: B x T  ->  the last position's logits, B x V
        hidden = self.model(embeds, slots, positions, key_valid, weights_out)
        return self._logits(hidden[:, -1])  # logits B x V and their sums B

    def _decode_step(self, token: torch.Tensor, slot: torch.Tensor, position: torch.Tensor, key_valid,
                     weights_out: list | None = None):
        # token: B; slot: 1; position: B x 1  ->  logits B x V and their sums B
        hidden = self.model(self.model.embed_tokens(token)[:, None], slot, position, key_valid, weights_out)
        return self._logits(hidden[:, -1])

    @torch.inference_mode()
    def tokens(
        self,
        requests: Sequence[Request],
        settings: SamplingSettings,
        seeds: Sequence[int],
        stats: GenerationStats | None = None,
        capacity: int = 0,
        explain: list[list[TokenExplanation]] | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of every row (None for a row that has finished).

        The EOS that ends a row is yielded; nothing after it. `capacity` sizes the cache so
        that later, longer requests reuse it. Given a list, `explain` receives one list per row
        of TokenExplanation, one per yielded token (the attention is then computed eagerly).

        The model's cache is held only while a token is computed, never while the generator is
        suspended; resumed after other calls used it, the generator first rebuilds its own state
        (see the module docstring). Its tokens are those it gives alone.
        """
        if explain is not None:
            explain.extend([] for _ in requests)
        yield from self._tokens(requests, settings, seeds, stats, capacity, explain)

    def _explanations(self, spans, pads, logits, out, explain, weights) -> None:
        # weights: each layer's attention of the last query, B x H x S (GPTJ.forward's weights_out)
        attention = torch.stack(weights).mean(2).cpu()  # layers x B x S, averaged over heads
        grid = self.model.cfg.image_grid
        for row, t in enumerate(out):
            if t is None:
                continue
            maps = [attention[:, row, pads[row] + start : pads[row] + start + n].reshape(-1, grid, grid)
                    for start, n in spans[row]]
            explain[row].append(TokenExplanation(t, logits[row].float().cpu(), torch.stack(maps, 1) if maps else None))

    def image_spans(self, requests: Sequence[Request]) -> list[list[tuple[int, int]]]:
        """Per request, (start, length) of each image's positions in its unpadded sequence."""
        spans = []
        for req in requests:
            start, row = 0, []
            for seg in req:
                n = self.model.cfg.image_tokens if isinstance(seg, torch.Tensor) else len(seg)
                if isinstance(seg, torch.Tensor):
                    row.append((start, n))
                start += n
            spans.append(row)
        return spans

    def _prefill(self, sequences: list[torch.Tensor], new_tokens: int, capacity: int = 0,
                 attention: list | None = None, exact: bool = False):
        """The prompts' embeddings (`embed`) through the model, filling a cache with room for
        `new_tokens` more (and at least `capacity` slots; `exact`: see _ensure_cache). Given a list,
        `attention` receives each layer's attention weights (from the eager step). Returns
        the last position's logits (B x V), the prompt width (padding included) and each row's padding."""
        longest = max(len(s) for s in sequences)
        length = max(capacity, longest + new_tokens)
        width = longest
        if self.compiled and attention is None:  # a bucket's width, as far as the cache has room for it
            width = max(longest, min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, length - new_tokens))
        embeds, valid, positions, pads = self._left_pad(sequences, width)
        self._ensure_cache(len(sequences), length, exact)
        self.key_valid[:, :width] = valid
        slots = torch.arange(width, device=self.device)
        # with `attention`, the eager step, which writes the weights out
        step_fn, weights_out = (self.prefill_step, ()) if attention is None else (self._prefill_step, (attention,))
        logits, sums = step_fn(embeds, slots, positions, self.key_valid[:, :width], *weights_out)
        self._check_finite(sums, "in the prefill (the prompt, before token 1)", embeds)
        return logits, width, pads

    def _step(self, token: torch.Tensor, slot: int, pads: torch.Tensor, number: int, attention: list | None = None):
        """Feed `token` (B) at cache slot `slot`: logits B x V for the next one, generated token
        `number` (counted from 1, for error messages). `attention`: as for _prefill."""
        self.key_valid[:, slot] = True
        slot_t = torch.tensor([slot], device=self.device)
        position = (slot_t - pads)[:, None]
        step_fn, weights_out = (self.decode_step, ()) if attention is None else (self._decode_step, (attention,))
        key_valid = self.key_valid[:, : self._attended(slot, step_fn)]
        width, length = key_valid.shape[1], self.key_valid.shape[1]
        if self.compiled and not self.padded_reads and step_fn is self.decode_step and 2 <= width < length:
            # one graph for every width (sizes 0 and 1 are always specialized, and reading the whole cache
            # specializes too: slicing the full tables is then a no-op)
            torch._dynamo.mark_dynamic(key_valid, 1, min=2, max=length - 1)
        logits, sums = step_fn(token, slot_t, position, key_valid, *weights_out)
        self._check_finite(sums, f"at token {number} (a decode step)")
        return logits

    @torch.inference_mode()
    def forced_logits(self, request: Request, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits after the prompt and after each of `token_ids` ((n + 1) x V), computed exactly as
        generation computes them (prefill, then one cached step per token) with the given tokens
        fed instead of drawn ones: how a quantized model's decoding compares along a fixed path."""
        with self._hold():
            logits, width, pads = self._prefill(self.embed([request]), len(token_ids))
            out = [logits[0].clone()]  # copies: a CUDA graph's next replay reuses its output memory
            for i, token in enumerate(token_ids):
                out.append(self._step(torch.tensor([token], device=self.device), width + i, pads, i + 2)[0].clone())
        return torch.stack(out)

    def _tokens(self, requests, settings, seeds, stats, capacity, explain) -> Iterator[list[int | None]]:
        stats = stats if stats is not None else GenerationStats()
        start = time.perf_counter()
        me = object()  # this generation, as the cache's owner
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        spans = self.image_spans(requests) if explain is not None else None
        fed: list[torch.Tensor] = []  # the tokens fed to decode steps so far: what a replay feeds again
        finished = [False] * len(requests)
        for step in range(settings.max_out_tokens):
            # explaining computes everything eagerly with captured attention, replays included, so
            # that a replay repeats the same arithmetic; a replay's weights are dropped
            weights = [] if explain is not None else None
            with self._hold(me) as mine:
                if step == 0:
                    sequences = self.embed(requests)
                    logits, width, pads = self._prefill(sequences, settings.max_out_tokens, capacity, weights)
                    pad_list = pads.tolist()
                    seen = self.key_valid.shape[1]  # the slots a replay must see again
                else:
                    if not mine:  # another call used the cache since this generation's last step
                        replay = [] if explain is not None else None
                        self._prefill(sequences, settings.max_out_tokens, seen, replay, exact=True)
                        for i, fed_token in enumerate(fed):
                            self._step(fed_token, width + i, pads, i + 2, replay)
                    logits = self._step(token, width + step - 1, pads, step + 1, weights)
                    fed.append(token)
                token = draw(logits, settings, generators)  # logits may be a CUDA graph's output: read them here
                values = token.tolist()
                out = [None if done else t for done, t in zip(finished, values)]
                if explain is not None:
                    self._explanations(spans, pad_list, logits, out, explain, weights)
            if step == 0:
                stats.prompt_positions = width - min(pad_list)  # the longest prompt, without padding
                stats.time_to_first_token = time.perf_counter() - start
                decode_start = time.perf_counter()
            finished = [done or t == self.eos_id for done, t in zip(finished, values)]
            stats.new_tokens = step + 1
            stats.decode_time = time.perf_counter() - decode_start
            yield out
            if all(finished):
                break

    def generate(
        self,
        requests: Sequence[Request],
        settings: SamplingSettings,
        seeds: Sequence[int],
        stats: GenerationStats | None = None,
        capacity: int = 0,
        explain: list[list[TokenExplanation]] | None = None,
    ) -> list[RowResult]:
        """All tokens at once. The model's cache is held throughout: concurrent calls wait rather
        than take turns step by step (each turn would cost the other a replay)."""
        results = [RowResult() for _ in requests]
        with self._guard.lock:
            for step_tokens in self.tokens(requests, settings, seeds, stats, capacity, explain):
                for row, token in enumerate(step_tokens):
                    if token is None:
                        continue
                    if token == self.eos_id:
                        results[row].finish_reason = "eos"
                        continue
                    results[row].token_ids.append(token)
        return results

    @torch.inference_mode()
    def full_logits(self, requests: Sequence[Request]) -> torch.Tensor:
        """Logits at every position, recomputed without a cache (the reference for tests and the
        no-cache benchmark). Left-padded like `tokens`; B x T x V."""
        embeds, key_valid, positions, _ = self._left_pad(self.embed(requests))
        slots = torch.arange(key_valid.shape[1], device=self.device)
        with self._hold():
            self.model.lm.clear_caches()  # the next request builds them again
            logits, sums = self._logits(self.model(embeds, slots, positions, key_valid))
            self._check_finite(sums, "in full_logits (every position, no cache)", embeds)
        return logits
