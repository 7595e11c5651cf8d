"""Tensor parallelism on CPU (gloo): 2 ranks launched by torchrun give the single-process logits
at the prefill and at every cached decode step, and the same tokens."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from magma_ipu.parallel import shard, split_of
from magma_ipu.quantize import quantize_int8
from magma_ipu.sampling import SamplingSettings
from magma_ipu.session import Magma

ROOT = Path(__file__).resolve().parent.parent


def test_split_plan_covers_every_language_model_matrix(tiny_magma):
    keys = tiny_magma.model.state_dict().keys()
    split = {k for k in keys if split_of(k) is not None}
    assert {k for k in keys if k.startswith("lm.transformer.h.0.") and (k.endswith("weight") and "ln_1" not in k)} <= split
    assert split_of("lm.lm_head.weight") == 0 and split_of("lm.transformer.wte.weight") is None
    assert split_of("image_prefix.proj.weight") is None
    w = torch.arange(24.0).reshape(4, 6)
    key = "lm.transformer.h.3.mlp.0.c_proj.weight"
    parts = [shard(w, key, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), w) and parts[0].data_ptr() == w.data_ptr()


@pytest.fixture(scope="module")
def written_model(tiny_magma, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp")
    torch.save({"module": tiny_magma.model.state_dict()}, folder / "model.pt")
    tiny_magma.tokenizer.backend.save(str(folder / "tokenizer.json"))
    return folder


def write_config(folder: Path, world: int, config, extra: str = "") -> Path:
    m = config.model
    (folder / f"tp{world}.yml").write_text(extra + "\n" +
        f"model: {{n_layer: {m.n_layer}, d_model: {m.d_model}, n_head: {m.n_head}, rotary_dim: {m.rotary_dim},\n"
        f"  d_ff: {m.d_ff}, vocab_size: {m.vocab_size}, lm_head_size: {m.lm_head_size},\n"
        f"  image_layers: {list(m.image_layers)}, image_width: {m.image_width}, image_resolution: {m.image_resolution}}}\n"
        f"sequence_length: {config.sequence_length}\ncheckpoint: ./model.pt\ntokenizer: ./tokenizer.json\n"
        f"tensor_parallel: {world}\n"
    )
    return folder / f"tp{world}.yml"


def torchrun(world: int, *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
         f"--master-port={port}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def run_ranks(folder: Path, world: int, config, extra: str = "") -> dict:
    path = write_config(folder, world, config, extra)
    out = folder / f"tp{world}.pt"
    proc = torchrun(world, str(ROOT / "tests" / "tp_worker.py"), str(path), str(out))
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    return torch.load(out)


def reference(tiny_magma, record_decode_steps):
    import numpy as np

    engine = tiny_magma.engine
    image = np.linspace(0, 255, 50 * 60 * 3).reshape(50, 60, 3).astype(np.uint8)
    request = tiny_magma.request("A picture of", image, 10)
    with record_decode_steps(engine) as steps:
        greedy = [t for (t,) in engine.tokens([request], SamplingSettings(temperature=0, max_out_tokens=10), [0])]
    sampled = tiny_magma.generate_batch(["A picture of", "Q: What colour is the star? A:"], images=[image, None],
                                        seeds=[3, 4], temperature=1.0, top_p=0.9, max_out_tokens=10)
    return engine.full_logits([request]), steps, greedy, [r.token_ids for r in sampled]


def max_diff(a, b):
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    return (a[finite] - b[finite]).abs().max().item()


@pytest.mark.parametrize("world, onednn", [(2, True), (4, False)])
def test_tensor_parallel_matches_one_process(tiny_magma, written_model, record_decode_steps, world, onednn):
    got = run_ranks(written_model, world, tiny_magma.config, f"onednn: {str(onednn).lower()}")
    prefill, steps, greedy, sampled = reference(tiny_magma, record_decode_steps)
    assert got["local_heads"] == tiny_magma.config.model.n_head // world
    assert max_diff(got["prefill"], prefill) < 1e-5
    assert len(got["steps"]) == len(steps) and max(max_diff(a, b) for a, b in zip(got["steps"], steps)) < 1e-5
    assert got["greedy"] == greedy and got["sampled"] == sampled


def test_tensor_parallel_int8_joins_its_shards(tiny_magma, written_model, record_decode_steps):
    """int8 layers replace the float ones after sharding; the collectives must still join them.
    Each rank scales its own slice of a row-split matrix, so the match is close, not exact."""
    got = run_ranks(written_model, 2, tiny_magma.config, "quantize: int8")
    model = quantize_int8(copy.deepcopy(tiny_magma.model), "dynamic")
    prefill, *_ = reference(Magma(tiny_magma.config, model, tiny_magma.tokenizer), record_decode_steps)
    scale = prefill[torch.isfinite(prefill)].abs().max().item()
    assert max_diff(got["prefill"], prefill) < 0.05 * scale


# run_inference.py's main as torchrun runs it, then a report of the gloo threads still alive: each
# must be gone, or the interpreter's exit races them and aborts ("terminate called ...")
CLI_RANK = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["PYTHONPATH"])
from run_inference import main
code = main(sys.argv[1:])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
Path(__file__).with_name(f"rank{os.environ['RANK']}.json").write_text(json.dumps([n for n in names if "gloo" in n]))
sys.exit(code)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_the_command_line_under_torchrun_prints_the_tokens_and_exits_cleanly(tiny_magma, written_model):
    path = write_config(written_model, 2, tiny_magma.config, "temperature: 0\nmax_out_tokens: 6")
    (written_model / "cli_rank.py").write_text(CLI_RANK)
    image = written_model / "image.png"
    Image.new("RGB", (60, 40), "teal").save(image)
    proc = torchrun(2, str(written_model / "cli_rank.py"), "--config", str(path), "--image", str(image),
                    "--prompt", "A picture of", "--json")
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    expected = tiny_magma.generate("A picture of", image=image, temperature=0, max_out_tokens=6)
    assert json.loads(proc.stdout)["token_ids"] == expected.token_ids  # rank 0 alone prints
    left = {rank: json.loads((written_model / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert left == {0: [], 1: []}, f"gloo threads alive after main: {left}"


def test_indivisible_sizes_are_a_config_error(tiny_magma):
    from magma_ipu import ConfigError
    from magma_ipu.parallel import check_divisible

    with pytest.raises(ConfigError, match=r"tensor_parallel=3 must divide n_head \(4\), d_ff \(256\)"):
        check_divisible(tiny_magma.model, 3)
    check_divisible(tiny_magma.model, 2)
