"""The demo model on pictures it never trained on: the independent drawer's, scored against the
drawer's own description (magma_ipu/demo/drawings.py)."""

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from magma_ipu.demo.drawings import BACKDROPS, SHADES, held_out_drawings
from magma_ipu.demo.evaluation import evaluate_drawings, named_objects

ROOT = Path(__file__).resolve().parent.parent
SEED = 7_700_001  # the fixed held-out sample; the training script never runs the drawer
SINGLES, PAIRS = 200, 100  # a caption more or less moves the hallucination rate by a third of a point


def test_held_out_drawings_are_named_once_in_order_and_answered(demo_magma):
    # The goals, as they are: >= 95 % of one-object captions right, >= 90 % of two-object ones (both, once
    # each, in reading order), <= 3 % of captions naming an object that is not there, >= 90 % of answers
    # exact; at most 1 % naming an object twice. The shipped model: 0.99 / 0.94 / 0.0267 / 0.9925, 0.0;
    # the one before it failed two of them here (0.89 pairs, 0.0433 hallucinating).
    metrics = evaluate_drawings(singles=SINGLES, pairs=PAIRS, seed=SEED, magma=demo_magma)
    assert metrics["single_accuracy"] >= 0.95, metrics
    assert metrics["pair_accuracy"] >= 0.9, metrics
    assert metrics["hallucination_rate"] <= 0.03, metrics
    assert metrics["repeat_rate"] <= 0.01, metrics
    assert metrics["qa_accuracy"] >= 0.9, metrics


def test_the_drawer_shares_no_code_with_the_training_scenes_but_their_words():
    tree = ast.parse((ROOT / "magma_ipu" / "demo" / "drawings.py").read_text())
    from_scenes = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "scenes"
                   for alias in node.names}
    assert from_scenes <= {"QUESTIONS", "SHAPES"}


def test_the_drawers_description_matches_its_pixels():
    """Each object's colour covers pixels around its described centre, in the seen square."""
    palette = {**SHADES, **{"bg " + n: s for n, s in BACKDROPS.items()}}
    names = [name for name, shades in palette.items() for _ in shades]
    colours = np.array([rgb for shades in palette.values() for rgb in shades], np.float32)
    for drawing in held_out_drawings(singles=8, pairs=8, seed=SEED + 1):
        pixels = np.asarray(drawing.image, np.float32)
        short = min(pixels.shape[:2])
        top, left = (pixels.shape[0] - short) // 2, (pixels.shape[1] - short) // 2
        seen = pixels[top : top + short, left : left + short]
        nearest = np.argmin(((seen[:, :, None, :] - colours) ** 2).sum(-1), axis=-1)
        for o in drawing.objects:
            ys, xs = np.nonzero(np.isin(nearest, [i for i, n in enumerate(names) if n == o.colour]))
            assert len(xs) > 0.2 * (o.span * short) ** 2 * (0.1 if o.outline else 0.5), (o, len(xs))
            assert abs(xs.mean() / short - o.cx) < 0.05 and abs(ys.mean() / short - o.cy) < 0.05, o


def test_pair_truth_is_in_reading_order_by_the_cells_of_the_centres():
    for drawing in held_out_drawings(singles=0, pairs=30, seed=SEED + 2):
        cells = [(int(o.cy * 3), int(o.cx * 3)) for o in drawing.objects]
        assert cells == sorted(cells) and cells[0] != cells[1]


class ScriptedModel:
    """Stands in for the model: captions from the drawer's own truth, rewritten by `caption`;
    answers every question right."""

    def __init__(self, drawings, caption):
        self.truth = {id(d.image): d for d in drawings}
        self.caption = caption

    def generate_batch(self, prompts, images, **sampling):
        replies = []
        for prompt, image in zip(prompts, images):
            drawing = self.truth[id(image)]
            answers = dict(drawing.questions())
            text = answers[prompt] if prompt in answers else self.caption([f"a {o.colour} {o.shape}" for o in drawing.objects])
            replies.append(SimpleNamespace(text=" " + text))
        return replies


@pytest.mark.parametrize("caption, expected", [
    (lambda named: " and ".join(named), {"single_accuracy": 1, "pair_accuracy": 1, "hallucination_rate": 0, "repeat_rate": 0}),
    (lambda named: " and ".join(named[::-1]), {"single_accuracy": 1, "pair_accuracy": 0, "hallucination_rate": 0}),
    (lambda named: " and ".join(named + named), {"single_accuracy": 1, "named_once": 0, "pair_accuracy": 0, "repeat_rate": 1}),
    (lambda named: " and ".join(named) + " and a red square and a blue square",
     {"single_accuracy": 1, "pair_accuracy": 0, "hallucination_rate": 1}),
])
def test_the_scores_count_what_they_say(monkeypatch, caption, expected):
    import magma_ipu.demo.evaluation as evaluation

    drawings = held_out_drawings(6, 4, SEED)
    monkeypatch.setattr(evaluation, "held_out_drawings", lambda *args: drawings)
    metrics = evaluate_drawings(singles=6, pairs=4, seed=SEED, magma=ScriptedModel(drawings, caption))
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["qa_accuracy"] == 1


def test_named_objects_reads_colour_shape_pairs_in_order():
    assert named_objects(" a small red circle to the left of a large blue star.") == [("red", "circle"), ("blue", "star")]
    assert named_objects(" a small reddish circle and a bluestar.") == []
