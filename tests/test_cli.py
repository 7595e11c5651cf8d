"""run_inference.py and the demo's API calls, end to end on a small model written to disk."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from magma_ipu import init_inference_session, run_inference

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tiny_magma, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.save({"module": tiny_magma.model.state_dict()}, folder / "mp_rank_00_model_states.pt")
    tiny_magma.tokenizer.backend.save(str(folder / "tokenizer.json"))
    m = tiny_magma.config.model
    (folder / "tiny.yml").write_text(
        f"model: {{n_layer: {m.n_layer}, d_model: {m.d_model}, n_head: {m.n_head}, rotary_dim: {m.rotary_dim},\n"
        f"  d_ff: {m.d_ff}, vocab_size: {m.vocab_size}, lm_head_size: {m.lm_head_size},\n"
        f"  image_layers: {list(m.image_layers)}, image_width: {m.image_width}, image_resolution: {m.image_resolution}}}\n"
        f"sequence_length: {tiny_magma.config.sequence_length}\n"
        "checkpoint: ./mp_rank_00_model_states.pt\ntokenizer: ./tokenizer.json\ntemperature: 0\nmax_out_tokens: 8\n"
    )
    Image.new("RGB", (90, 70), "orange").save(folder / "img.png")
    return folder


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_inference.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_json_output_and_overrides(model_dir, tiny_magma):
    base = ["--config", str(model_dir / "tiny.yml"), "--image", str(model_dir / "img.png"), "--prompt", "A picture of"]
    out = cli(*base, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    expected = tiny_magma.generate("A picture of", image=model_dir / "img.png", temperature=0, max_out_tokens=8)
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    assert result["time_to_first_token_s"] > 0
    short = json.loads(cli(*base, "--json", "--max_out_tokens", "3").stdout)
    assert short["token_ids"] == expected.token_ids[:3]


def test_interleaved_images_and_prompts(model_dir, tiny_magma):
    img = str(model_dir / "img.png")
    out = cli("--config", str(model_dir / "tiny.yml"), "--image", img, "--prompt", "one", "--image", img,
              "--prompt", "two", "--json")
    assert out.returncode == 0, out.stderr
    grid = tiny_magma.config.model.image_tokens
    ids = len(tiny_magma.tokenizer.encode("one")) + len(tiny_magma.tokenizer.encode("two"))
    assert json.loads(out.stdout)["prompt_positions"] == 2 * grid + ids


@pytest.mark.parametrize(
    "args, message",
    [(["--top_p", "3"], "top_p must be in [0, 1]"),
     (["--image", "/no/such.png"], "does not exist"),
     (["--temprature", "1"], "did you mean '--temperature'"),
     (["--config", "nonexistent"], "unknown config 'nonexistent'"),
     (["--device", "cuda:abc"], "device must be 'cpu', 'cuda', 'cuda:N'"),
     (["--tensor_parallel", "2"], "launch with torchrun --nproc-per-node 2"),
     (["--tensor_parallel", "3"], "tensor_parallel=3 must divide n_head (4)"),
     (["--max_device_memory", "1e999"], "max_device_memory must be a finite size of at least 1 byte"),
     (["--max_device_memory", "100"], "max_device_memory 100 bytes"),
     (["--sequence_length", "10000000000"], "sequence_length must be at most"),
     (["--image_timeout", "inf"], "image_timeout must be a number of seconds in (0, 86400]"),
     (["--temperature", "nan"], "temperature must be a finite number"),
     (["--config", "LATIN1"], "config file is not UTF-8 text (byte 0xe9)"),
     (["--config", "BROKEN"], "broken.yml:2:1: invalid YAML:")],
)
def test_bad_input_gives_one_line_and_nonzero_exit(model_dir, args, message):
    (model_dir / "latin1.yml").write_bytes(b"name: caf\xe9\n")
    (model_dir / "broken.yml").write_text("top_p: [0.5\n")
    args = [{"LATIN1": str(model_dir / "latin1.yml"), "BROKEN": str(model_dir / "broken.yml")}.get(a, a) for a in args]
    base = ["--config", str(model_dir / "tiny.yml"), "--prompt", "hi"]
    out = cli(*base, *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_demo_api_calls(model_dir, tiny_magma):
    session, config, tokenizer = init_inference_session(str(model_dir / "tiny.yml"))
    text = run_inference(session, config, tokenizer, str(model_dir / "img.png"), "A picture of",
                         seed=0, top_p=0.9, top_k=0, temperature=0.0, max_out_tokens=8)
    expected = tiny_magma.generate("A picture of", image=model_dir / "img.png", temperature=0, max_out_tokens=8)
    assert text == expected.text
    model = session.model
    for temperature in (0.0, 0.5, 1.2):  # new settings never reload the model
        run_inference(session, config, tokenizer, str(model_dir / "img.png"), "A", temperature=temperature)
    assert session.model is model


def test_explain_adds_candidates_and_attention(model_dir, tiny_magma):
    out = cli("--config", str(model_dir / "tiny.yml"), "--image", str(model_dir / "img.png"), "--prompt", "A picture of",
              "--json", "--explain", "--temperature", "1", "--top_k", "5", "--seed", "2")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    grid = tiny_magma.config.model.image_grid
    assert len(result["explain"]) >= len(result["token_ids"])
    for step, token in zip(result["explain"], result["token_ids"]):
        assert step["token_id"] == token
        drawn = [c for c in step["candidates"] if c["drawn"]]
        assert len(drawn) == 1 and drawn[0]["kept"] and drawn[0]["id"] == token
        assert sum(c["kept"] for c in step["candidates"]) <= 5
        (image_map,) = step["image_attention"]
        assert len(image_map) == grid and all(len(r) == grid for r in image_map)


def test_auto_choice_is_said_on_stderr_and_progress_shows_on_a_terminal(model_dir, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()  # stderr is a terminal; stdout a pipe, as in `... --json > out.json`
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a width
    env = {**os.environ, "MAGMA_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "run_inference.py"), "--config", str(model_dir / "tiny.yml"),
                          "--image", str(model_dir / "img.png"), "--prompt", "A picture of", "--json",
                          "--device", "auto", "--dtype", "auto", "--quantize", "auto"],
                         stdout=subprocess.PIPE, stderr=secondary, cwd=ROOT, env=env, timeout=120)
    os.close(secondary)
    stderr = b""
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        stderr += chunk
    os.close(primary)
    stderr = stderr.decode(errors="replace")
    assert out.returncode == 0, stderr
    assert json.loads(out.stdout)["token_ids"]  # stdout holds only the JSON object
    assert "magma: no CUDA device: running on cpu in int8 (--dtype float32 --quantize int8" in stderr
    assert "quantizing mp_rank_00_model_states.pt to int8" in stderr and "loading int8 layers" in stderr


def test_help_names_what_each_flag_takes():
    out = cli("--help")
    assert out.returncode == 0 and "NONETYPE" not in out.stdout
    for flag in ("--checkpoint PATH|URL|hub", "--dtype float32|bfloat16|float16|auto", "--quantize none|int8|auto",
                 "--max_device_memory BYTES", "--top_p FLOAT", "--compile true|false"):
        assert flag in out.stdout, flag


def test_cuda_on_a_cpu_only_torch_is_one_line(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    out = cli("--config", str(model_dir / "tiny.yml"), "--prompt", "hi", "--device", "cuda")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: device 'cuda': CUDA is not available in this torch build (torch {torch.__version__} is CPU-only); "
        "use --device cpu or auto"]


@pytest.fixture
def command_line():
    """The command line's module, run in this process (to plant failures in it)."""
    import magma_ipu.cli as module

    return module


def test_an_unexpected_error_is_one_line_saying_where(model_dir, command_line, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug nobody checked for\nsecond line")

    monkeypatch.setattr(command_line.Magma, "load", broken)
    args = ["--config", str(model_dir / "tiny.yml"), "--prompt", "hi"]
    assert command_line.main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unexpected RuntimeError: a bug nobody checked for (at ")
    assert "test_cli.py:" in lines[0] and lines[0].endswith("--debug prints the traceback)")
    assert command_line.main(args + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in broken" in err
    assert err.strip().splitlines()[-1].endswith("the traceback is above)")


def test_an_interrupt_is_one_line_and_exit_130(model_dir, command_line, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command_line.Magma, "load", interrupted)
    assert command_line.main(["--config", str(model_dir / "tiny.yml"), "--prompt", "hi"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_run_inference_answers_as_the_command_line_does(model_dir):
    """The demo's call and the command line share their defaults (the config's) and their text."""
    config_path = str(model_dir / "tiny.yml")
    session, config, tokenizer = init_inference_session(config_path)
    for settings, flags in (({}, []), ({"temperature": 1.0, "seed": 3, "max_out_tokens": 5},
                                       ["--temperature", "1.0", "--seed", "3", "--max_out_tokens", "5"])):
        text = run_inference(session, config, tokenizer, str(model_dir / "img.png"), "A picture of", **settings)
        out = cli("--config", config_path, "--image", str(model_dir / "img.png"), "--prompt", "A picture of",
                  "--json", *flags)
        assert out.returncode == 0, out.stderr
        assert text == json.loads(out.stdout)["text"]
        assert not text.startswith("A picture of")


def test_stream_prints_the_text_that_a_plain_run_prints(command_line, demo_magma, monkeypatch, capsys):
    image = str(ROOT / "demo_example_images" / "scene_4.png")
    args = ["--image", image, "--prompt", "A picture of", "--temperature", "0", "--max_out_tokens", "12"]
    pieces = []
    stream = command_line.Magma.stream

    def counted(self, *a, **k):
        for piece in stream(self, *a, **k):
            pieces.append(piece)
            yield piece

    monkeypatch.setattr(command_line.Magma, "stream", counted)
    assert command_line.main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert command_line.main(args) == 0
    plain = capsys.readouterr().out
    expected = demo_magma.generate("A picture of", image=image, temperature=0, max_out_tokens=12).text
    assert streamed == plain == expected + "\n"
    assert len(pieces) > 1 and "".join(pieces) == expected  # it did stream, piece by piece
