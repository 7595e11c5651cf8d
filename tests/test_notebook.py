"""The notebook's UI (in process) and the notebook itself (executed headless by nbclient)."""

import json
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import magma_ipu.session as session_module
from magma_ipu.notebook import CaptionApp

ROOT = Path(__file__).resolve().parent.parent
TRUTH = json.loads((ROOT / "demo_example_images" / "scenes.json").read_text())


def objects_named(text: str, image: str) -> float:
    objects = TRUTH[image]["objects"]
    return sum(f"{o['colour']} {o['shape']}" in text for o in objects) / len(objects)


def test_app_streams_a_caption_and_reports_speed(demo_magma):
    app = CaptionApp(demo_magma)
    app.image_choice.value = "scene_3.png"
    app.temperature.value = 0.0
    result = app.run()
    assert result is not None and objects_named(result.text, "scene_3.png") == 1.0
    direct = demo_magma.generate("A picture of", image=ROOT / "demo_example_images" / "scene_3.png", temperature=0,
                                 max_out_tokens=app.max_out_tokens.value)
    assert (result.token_ids, result.text, result.finish_reason) == (direct.token_ids, direct.text, direct.finish_reason)
    assert result.text in app.caption.value.replace("&#x27;", "'")
    assert "tokens/s" in app.status.value and bytes(app.picture.value).startswith(b"\x89PNG")


def test_errors_show_one_line_and_the_app_keeps_working(demo_magma, tmp_path):
    app = CaptionApp(demo_magma)
    app.temperature.value = 0.0
    app.image_url.value = str(tmp_path / "missing.png")
    assert app.run() is None and "does not exist" in app.status.value
    app.image_url.value = ""
    app.prompt.value = "word " * 100
    assert app.run() is None and "sequence_length" in app.status.value
    app.prompt.value = "A picture of"
    app.image_choice.value = "scene_1.png"
    result = app.run()
    direct = demo_magma.generate("A picture of", image=ROOT / "demo_example_images" / "scene_1.png", temperature=0,
                                 max_out_tokens=app.max_out_tokens.value)
    assert result is not None and result.text == direct.text and app.status.value.count("⚠") == 0


def test_sliders_and_prompts_take_effect_without_reloading_the_model(demo_magma, monkeypatch):
    from magma_ipu.model import MagmaModel

    loads = []  # a reload, by any route, builds a model and reads a tokenizer again
    monkeypatch.setattr(MagmaModel, "__init__", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(session_module.Tokenizer, "load", lambda *a, **k: loads.append(a))
    app = CaptionApp(demo_magma)
    image = ROOT / "demo_example_images" / app.image_choice.value
    for seed, temperature, top_p, top_k, prompt in [(0, 1.0, 1.0, 0, "A picture of"), (5, 1.4, 0.5, 3, "A picture"),
                                                    (9, 0.0, 0.9, 0, "Q: How many shapes are there? A:"),
                                                    (7, 1.4, 1.0, 40, "A picture of")]:
        app.seed.value, app.temperature.value, app.top_p.value, app.top_k.value = seed, temperature, top_p, top_k
        app.prompt.value = prompt
        got = app.run()
        want = demo_magma.generate(prompt, image=image, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
                                   max_out_tokens=app.max_out_tokens.value)
        assert (got.token_ids, got.text) == (want.token_ids, want.text), (seed, temperature, top_p, top_k, prompt)
    assert loads == [] and app.magma is demo_magma


def test_upload_takes_the_image_from_the_widget(demo_magma):
    app = CaptionApp(demo_magma)
    app.temperature.value = 0.0
    content = (ROOT / "demo_example_images" / "scene_4.png").read_bytes()
    app.upload.value = ({"name": "mine.png", "type": "image/png", "size": len(content), "content": memoryview(content),
                         "last_modified": datetime.now(timezone.utc)},)
    assert objects_named(app.run().text, "scene_4.png") == 1.0
    app.upload.value = ({"name": "bad.png", "type": "image/png", "size": 3, "content": memoryview(b"abc"),
                         "last_modified": datetime.now(timezone.utc)},)
    assert app.run() is None and "not a readable image" in app.status.value


@pytest.fixture(scope="module")
def executed_notebook():
    nb = nbformat.read(ROOT / "magma_interactive.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def text_outputs(cell) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))


def test_notebook_executes_and_captions(executed_notebook, demo_magma):
    # the notebook's captions are the library's (how right they are is test_demo_model's concern)
    scene = ROOT / "demo_example_images" / "scene_1.png"
    caption = demo_magma.generate("A picture of", image=scene, temperature=0, max_out_tokens=44).text
    answer = demo_magma.generate("Q: What colour is the background? A:", image=scene, temperature=0,
                                 max_out_tokens=4).text
    code = [c for c in executed_notebook.cells if c.cell_type == "code"]
    assert all(not any(o.output_type == "error" for o in c.outputs) for c in code)
    app_cell = next(c for c in code if "CaptionApp(session" in c.source)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in app_cell.outputs)
    assert repr(caption) in text_outputs(app_cell)
    api_cell = next(c for c in code if "run_inference(session" in c.source)
    assert repr(caption) in text_outputs(api_cell)
    question_cell = next(c for c in code if "colour is the background" in c.source)
    assert repr(answer) in text_outputs(question_cell)


def test_explanation_views_follow_the_sliders_without_running_the_model(demo_magma, monkeypatch):
    app = CaptionApp(demo_magma)
    app.image_choice.value = "scene_2.png"
    app.temperature.value, app.top_p.value = 0.7, 1.0
    assert app.run() is not None
    assert len(app.explanations) >= 2 and not app.token_choice.disabled
    chart, heatmap = bytes(app.chart.value), bytes(app.heatmap.value)
    assert chart.startswith(b"\x89PNG") and heatmap.startswith(b"\x89PNG")
    calls = []
    original = demo_magma.engine.tokens
    monkeypatch.setattr(demo_magma.engine, "tokens", lambda *a, **k: calls.append(1) or original(*a, **k))
    app.temperature.value = 1.4
    assert bytes(app.chart.value) != chart  # the same logits, filtered anew
    chart = bytes(app.chart.value)
    app.top_k.value = 2
    assert bytes(app.chart.value) != chart
    app.token_choice.value = 1
    app.layer_choice.value = 0
    assert bytes(app.heatmap.value) != heatmap
    assert calls == []
