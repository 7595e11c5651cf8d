"""Held-out quality of the demo model: fresh scenes, greedy captions and answers, scored."""

from __future__ import annotations

import random

from ..session import Magma
from .scenes import CAPTION_PROMPT, draw_scene, names_objects, random_scene


def evaluate_demo(scenes: int = 200, seed: int = 10_000_019, magma: Magma | None = None) -> dict:
    """Object accuracy (caption names colour + shape), exact-caption rate and Q&A accuracy."""
    magma = magma or Magma.load("demo")
    rng = random.Random(seed)
    named = objects = exact = qa_right = qa_total = 0
    for _ in range(scenes):
        scene = random_scene(rng)
        image = draw_scene(scene, size=256)
        caption = magma.generate(CAPTION_PROMPT, image=image, temperature=0, max_out_tokens=40).text
        hits = names_objects(caption, scene)
        named, objects = named + sum(hits), objects + len(hits)
        exact += caption == scene.caption()
        question, answer = rng.choice(scene.questions())
        reply = magma.generate(question, image=image, temperature=0, max_out_tokens=4).text
        qa_right += reply.strip() == answer.strip()
        qa_total += 1
    return {
        "eval_scenes": scenes,
        "eval_seed": seed,
        "object_accuracy": round(named / objects, 4),
        "exact_caption_rate": round(exact / scenes, 4),
        "qa_accuracy": round(qa_right / qa_total, 4),
    }
