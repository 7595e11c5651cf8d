"""The embedded demo model really captions: fresh scenes of its own world, greedy, scored. (Pictures
from the independent drawer: tests/test_demo_drawings.py.)"""

import json
from pathlib import Path

import torch

from magma_ipu.demo.evaluation import evaluate_demo
from magma_ipu.demo.scenes import names_objects

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_model_has_magma_layout_and_fits_the_size_budget(demo_float_magma):
    assets = ROOT / "magma_ipu" / "assets" / "demo"
    assert (assets / "mp_rank_00_model_states.pt").stat().st_size <= 4_000_000  # the model: 4 MB
    assert sum(p.stat().st_size for p in assets.iterdir()) <= 4 * 2**20  # with its tokenizer: 4 MiB
    keys = set(demo_float_magma.model.state_dict())
    assert "lm.transformer.h.0.attn.attention.q_proj.weight" in keys
    assert "lm.transformer.h.3.mlp.1.adapter.2.bias" in keys
    assert "image_prefix.enc.layer4.0.downsample.0.weight" in keys


def test_fresh_scenes_of_its_own_world_are_captioned_correctly(demo_magma):
    # the training script used seed 0; this seed never drew a training scene
    # scenes drawn as in training: tiny to huge objects, outlines, up to three, JPEG (0.93 / 0.98 here)
    metrics = evaluate_demo(scenes=150, seed=424242, magma=demo_magma)
    assert metrics["object_accuracy"] >= 0.87, metrics
    assert metrics["qa_accuracy"] >= 0.9, metrics


def test_demo_images_get_their_true_captions(demo_magma):
    truth = json.loads((ROOT / "demo_example_images" / "scenes.json").read_text())
    named = total = 0
    for name, scene in truth.items():
        text = demo_magma.generate("A picture of", image=ROOT / "demo_example_images" / name, temperature=0,
                                   max_out_tokens=44).text
        hits = [f"{o['colour']} {o['shape']}" in text for o in scene["objects"]]
        named, total = named + sum(hits), total + len(hits)
    assert named / total >= 0.9  # all 12 objects in the seven scenes when written


def test_names_objects_needs_colour_and_shape_together():
    from magma_ipu.demo.scenes import Scene, SceneObject

    scene = Scene("white", (SceneObject("circle", "red", 0.2, 0.2, 0.1), SceneObject("star", "blue", 0.8, 0.8, 0.4)))
    assert names_objects(" a small red circle to the left of a large blue star.", scene) == [True, True]
    assert names_objects(" a small blue circle to the left of a large red star.", scene) == [False, False]


def test_scene_notation_names_each_object_once_in_the_cell_of_its_centre():
    from magma_ipu.demo.scenes import Scene, SceneObject

    # the star covers most of the picture, and every cell, but its centre is in the bottom middle one
    scene = Scene("grey", (SceneObject("circle", "red", 0.15, 0.2, 0.1), SceneObject("star", "blue", 0.5, 0.7, 0.8)))
    cells = scene.notation().replace("|><|", "|>\n<|").splitlines()
    assert len(cells) == 9
    assert cells[0] == "<|small red circle|>"  # top row, left column
    assert cells[7] == "<|large blue star|>"  # bottom row, middle column
    assert all(c == "<|grey|>" for i, c in enumerate(cells) if i not in (0, 7))
    assert scene.caption() == " a small red circle above a large blue star."


def test_captions_follow_the_cells_of_the_centres():
    from magma_ipu.demo.scenes import Scene, SceneObject

    # the square's centre is higher, but both centres are in the middle row: left to right
    square, circle = SceneObject("square", "red", 0.8, 0.36, 0.2), SceneObject("circle", "blue", 0.2, 0.6, 0.2)
    assert Scene("white", (square, circle)).caption() == " a small blue circle to the left of a small red square."


def test_demo_model_never_writes_notation_tokens(demo_magma):
    notation_ids = demo_magma.tokenizer.special_ids - {demo_magma.tokenizer.eos_id}
    assert len(notation_ids) > 70
    result = demo_magma.generate("A picture of", image=ROOT / "demo_example_images" / "scene_2.png",
                                 temperature=1.5, top_p=1.0, seed=1, max_out_tokens=40)
    assert not set(result.token_ids) & notation_ids


def test_scenes_json_matches_the_scene_generator():
    import random

    from magma_ipu.demo.scenes import random_scene

    truth = json.loads((ROOT / "demo_example_images" / "scenes.json").read_text())
    for entry in truth.values():
        scene = random_scene(random.Random(entry["seed"]))
        assert entry["caption"] == scene.caption() and entry["background"] == scene.background
        assert entry["objects"] == [{"colour": o.colour, "shape": o.shape, "size": o.size} for o in scene.objects]


def test_training_scenes_are_the_same_however_many_processes_draw_them(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import train_demo_model

    monkeypatch.setattr(train_demo_model, "CHUNK", 4)
    one_scenes, one_pixels = train_demo_model.make_data(10, seed=3, resolution=32, workers=1)
    two_scenes, two_pixels = train_demo_model.make_data(10, seed=3, resolution=32, workers=2)
    assert one_scenes == two_scenes and torch.equal(one_pixels, two_pixels)
    assert one_pixels.shape == (10, 32, 32, 3) and one_pixels.dtype == torch.uint8
    assert one_scenes[:2] != one_scenes[4:6]  # each chunk draws from its own stream


def test_training_circles_and_hexagons_stay_regular():
    import random

    from magma_ipu.demo.scenes import random_scene

    rng = random.Random(5)
    objects = [o for _ in range(300) for o in random_scene(rng).objects]
    assert {o.stretch for o in objects if o.shape in ("circle", "hexagon")} == {1.0}
    assert len({o.stretch for o in objects if o.shape in ("square", "star")}) > 50
