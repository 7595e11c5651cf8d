"""Held-out quality of the demo model, greedy captions and answers, scored.

Two measures: `evaluate_demo` on fresh scenes of the training world (in distribution), and
`evaluate_drawings` on pictures from the independent drawer in drawings.py (held out), scored against
that drawer's own description. A caption's objects are the "colour shape" pairs it names, in order.
"""

from __future__ import annotations

import random
import re

from ..session import Magma
from .drawings import held_out_drawings
from .scenes import CAPTION_PROMPT, COLOURS, SHAPES, draw_varied, random_scene

BATCH = 20
_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def named_objects(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in the order it names them."""
    return _OBJECT.findall(caption)


def _greedy(magma: Magma, prompts: list[str], images: list, max_out_tokens: int) -> list[str]:
    texts = []
    for start in range(0, len(prompts), BATCH):
        batch = magma.generate_batch(prompts[start : start + BATCH], images=images[start : start + BATCH],
                                     temperature=0, max_out_tokens=max_out_tokens)
        texts += [g.text for g in batch]
    return texts


def _qa_accuracy(magma: Magma, qa: list[tuple[object, str, str]]) -> float:
    """qa: (image, question, answer) triples; a reply is right when it is the answer, exactly."""
    # room for the longest answer: the small BPE spells " hexagon" in 7 tokens
    replies = _greedy(magma, [q for _, q, _ in qa], [image for image, _, _ in qa], max_out_tokens=10)
    return sum(reply.strip() == answer.strip() for reply, (_, _, answer) in zip(replies, qa)) / len(qa)


def evaluate_demo(scenes: int = 200, seed: int = 10_000_019, magma: Magma | None = None) -> dict:
    """In distribution: the training world's scenes, drawn as in training. Object accuracy (the caption
    names colour + shape), exact-caption rate, Q&A accuracy (one random question per scene)."""
    magma = magma or Magma.load("demo")
    rng = random.Random(seed)
    drawn = [(scene, draw_varied(scene, rng)) for scene in (random_scene(rng) for _ in range(scenes))]
    captions = _greedy(magma, [CAPTION_PROMPT] * scenes, [image for _, image in drawn], max_out_tokens=44)
    named = [set(named_objects(c)) for c in captions]
    hits = [(o.colour, o.shape) in n for (scene, _), n in zip(drawn, named) for o in scene.objects]
    qa = [(image, *rng.choice(scene.questions())) for scene, image in drawn]
    return {
        "eval_scenes": scenes,
        "eval_seed": seed,
        "object_accuracy": round(sum(hits) / len(hits), 4),
        "exact_caption_rate": round(sum(c == s.caption() for c, (s, _) in zip(captions, drawn)) / scenes, 4),
        "qa_accuracy": round(_qa_accuracy(magma, qa), 4),
    }


def evaluate_drawings(singles: int = 200, pairs: int = 100, seed: int = 20_250_101, magma: Magma | None = None) -> dict:
    """Held out: the independent drawer's pictures.
    single_accuracy: one-object captions that name its colour + shape; named_once: ... and nothing
    else, once; pair_accuracy: two-object captions naming exactly both, in reading order;
    hallucination_rate: captions naming a (colour, shape) object that is not there; repeat_rate:
    captions naming an object more than once; qa_accuracy: every question about every drawing."""
    magma = magma or Magma.load("demo")
    drawings = held_out_drawings(singles, pairs, seed)
    images = [d.image for d in drawings]
    named = [named_objects(c) for c in _greedy(magma, [CAPTION_PROMPT] * len(drawings), images, max_out_tokens=44)]
    truth = [[(o.colour, o.shape) for o in d.objects] for d in drawings]
    single, pair = list(zip(named, truth))[:singles], list(zip(named, truth))[singles:]
    qa = [(d.image, q, a) for d in drawings for q, a in d.questions()]
    return {
        "held_out_singles": singles,
        "held_out_pairs": pairs,
        "held_out_seed": seed,
        "single_accuracy": round(sum(t[0] in n for n, t in single) / max(1, singles), 4),
        "named_once": round(sum(n == t for n, t in single) / max(1, singles), 4),
        "pair_accuracy": round(sum(n == t for n, t in pair) / max(1, pairs), 4),
        "hallucination_rate": round(sum(any(o not in t for o in n) for n, t in zip(named, truth)) / len(drawings), 4),
        "repeat_rate": round(sum(len(set(n)) < len(n) for n in named) / len(drawings), 4),
        "qa_accuracy": round(_qa_accuracy(magma, qa), 4),
    }
