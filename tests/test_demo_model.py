"""The embedded demo model really captions: held-out scenes, greedy, scored."""

import json
from pathlib import Path

from magma_ipu.demo.evaluation import evaluate_demo
from magma_ipu.demo.scenes import names_objects

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_model_has_magma_layout_and_fits_the_size_budget(demo_float_magma):
    assets = ROOT / "magma_ipu" / "assets" / "demo"
    assert sum(p.stat().st_size for p in assets.iterdir()) < 25 * 2**20
    keys = set(demo_float_magma.model.state_dict())
    assert "lm.transformer.h.0.attn.attention.q_proj.weight" in keys
    assert "lm.transformer.h.3.mlp.1.adapter.2.bias" in keys
    assert "image_prefix.enc.layer4.0.downsample.0.weight" in keys


def test_held_out_scenes_are_captioned_correctly(demo_magma):
    # the training script used seed 0; this seed never drew a training scene
    metrics = evaluate_demo(scenes=80, seed=424242, magma=demo_magma)
    assert metrics["object_accuracy"] >= 0.9, metrics
    assert metrics["qa_accuracy"] >= 0.6, metrics


def test_demo_images_get_their_true_captions(demo_magma):
    truth = json.loads((ROOT / "demo_example_images" / "scenes.json").read_text())
    named = total = 0
    for name, scene in truth.items():
        text = demo_magma.generate("A picture of", image=ROOT / "demo_example_images" / name, temperature=0,
                                   max_out_tokens=40).text
        hits = [f"{o['colour']} {o['shape']}" in text for o in scene["objects"]]
        named, total = named + sum(hits), total + len(hits)
    assert named / total >= 0.9


def test_names_objects_needs_colour_and_shape_together():
    from magma_ipu.demo.scenes import Scene, SceneObject

    scene = Scene("white", (SceneObject("circle", "red", "small", 0.2, 0.2), SceneObject("star", "blue", "large", 0.8, 0.8)))
    assert names_objects(" a small red circle to the left of a large blue star.", scene) == [True, True]
    assert names_objects(" a small blue circle to the left of a large red star.", scene) == [False, False]


def test_scene_notation_puts_each_object_in_its_grid_cell():
    from magma_ipu.demo.scenes import Scene, SceneObject

    scene = Scene("grey", (SceneObject("circle", "red", "small", 0.15, 0.2), SceneObject("star", "blue", "large", 0.5, 0.85)))
    cells = scene.notation().replace("|><|", "|>\n<|").splitlines()
    assert len(cells) == 9
    assert cells[0] == "<|small red circle|>"  # top row, left column
    assert cells[7] == "<|large blue star|>"  # bottom row, middle column
    assert all(c == "<|grey|>" for i, c in enumerate(cells) if i not in (0, 7))


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
