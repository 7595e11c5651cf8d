"""scripts/synthetic_checkpoint.py: the published file's layout, values that give a working model
(finite image features through RN50x16's depth, in fp16 too), one seed one file, and memory that
stays at one buffer however large the file."""

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magma_ipu.build import build_model
from magma_ipu.config import load_config
from magma_ipu.images import preprocess
from magma_ipu.model import MagmaModel
from magma_ipu.session import Magma
from magma_ipu.text import Tokenizer
from magma_ipu.weights import read_state_dict

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "synthetic_checkpoint.py"
_spec = importlib.util.spec_from_file_location("synthetic_checkpoint", SCRIPT)
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)

# the full RN50x16 trunk (6, 8, 18, 8 blocks) at a toy width and resolution, behind a toy language model
DEEP = """model: {n_layer: 1, d_model: 64, n_head: 4, rotary_dim: 8, d_ff: 128, vocab_size: 384, lm_head_size: 448,
        image_layers: [6, 8, 18, 8], image_width: 8, image_resolution: 64}
convert_checkpoint: false
"""
# about 400 MB: the language model at d_model 1536 with GPT-J's vocabulary
LARGE = """model: {n_layer: 2, d_model: 1536, n_head: 12, rotary_dim: 64, d_ff: 4096, vocab_size: 50258,
        lm_head_size: 50400, image_layers: [1, 1, 1, 1], image_width: 16, image_resolution: 64}
"""


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "demo.pt"
    return path, synthetic.write_synthetic("demo", path)


@pytest.fixture(scope="module")
def deep_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep") / "deep.yml"
    path.write_text(DEEP)
    return path


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))


@torch.inference_mode()
def trunk_features(model: MagmaModel) -> torch.Tensor:
    """The image encoder's output (before the projection and LayerNorm) for one picture, as float32."""
    pixels = preprocess(picture(), model.cfg.image_resolution).to(model.image_prefix.proj.weight.dtype)
    return model.image_prefix.enc(pixels).float()


def test_the_file_has_the_published_layout(demo_file):
    path, weight_bytes = demo_file
    cfg = load_config("demo").model
    with torch.device("meta"):
        expected = MagmaModel(cfg).state_dict()
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == {"module", "global_steps"} and loaded["global_steps"] == 1
    module = loaded["module"]
    buffers = {f"lm.transformer.h.{n}.attn.attention.{name}"
               for n in range(cfg.n_layer) for name in ("masked_bias", "scale_attn")}
    own = set(expected) | buffers
    aliases = {k.replace("lm.transformer.h.", "transformer.", 1): k for k in own if k.startswith("lm.transformer.h.")}
    aliases["word_embedding.weight"] = "lm.transformer.wte.weight"
    assert set(module) == own | set(aliases)
    for key, value in expected.items():
        assert module[key].shape == value.shape, key
        assert module[key].dtype == (torch.float16 if value.dtype.is_floating_point else value.dtype), key
    assert weight_bytes == sum(module[k].nbytes for k in expected)
    for key in buffers:
        assert module[key].dtype == torch.float32 and module[key].shape == ()
        value = -1e9 if key.endswith("masked_bias") else cfg.head_dim**0.5
        assert torch.equal(module[key], torch.tensor(value))  # float32, as the real file's
    storage = {k: v.untyped_storage().data_ptr() for k, v in module.items()}
    assert all(storage[alias] == storage[key] for alias, key in aliases.items())  # shared, as in the real file
    assert len({storage[k] for k in own}) == len(own)  # and nothing else is
    assert zipfile.ZipFile(path).testzip() is None  # every record's CRC-32 matches its bytes
    assert not path.with_name(path.name + ".part").exists()


def test_the_values_give_a_working_model(demo_file):
    module = torch.load(demo_file[0], weights_only=True)["module"]
    weights = module["lm.transformer.h.0.mlp.0.c_fc.weight"].float()
    assert abs(weights.std().item() - 0.02) < 0.002 and not module["lm.transformer.h.0.mlp.0.c_fc.bias"].any()
    assert (module["lm.transformer.ln_f.weight"] == 1).all() and not module["image_prefix.ln.bias"].any()
    variances = torch.cat([v.float() for k, v in module.items() if k.endswith("running_var")])
    assert 0.5 <= variances.min().item() and variances.max().item() <= 1.5  # all positive


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_project_loads_it_and_generates(demo_file, dtype):
    path = demo_file[0]
    state = read_state_dict(path)  # the project's own reader: read-only views of the file
    assert torch.equal(state["word_embedding.weight"], state["lm.transformer.wte.weight"])
    cfg = load_config("demo", dtype=dtype)
    magma = Magma(cfg, build_model(cfg, path), Tokenizer.load(cfg.tokenizer))
    features = trunk_features(magma.model)
    assert features.isfinite().all() and (features != 0).float().mean() > 0.2
    result = magma.generate("A picture of", image=picture(), max_out_tokens=5)
    assert result.finish_reason in ("eos", "length")  # NumericalError had the logits been NaN


def test_image_features_stay_finite_through_the_full_depth_in_float16(deep_config, tmp_path):
    path = tmp_path / "deep.pt"
    synthetic.write_synthetic(str(deep_config), path)
    features = {}
    for dtype in ("float32", "float16"):
        cfg = load_config(deep_config, dtype=dtype)
        model = build_model(cfg, path)
        model.image_prefix.to(getattr(torch, dtype))  # as on CUDA (a CPU runs the prefix in float32)
        features[dtype] = trunk_features(model)
        assert features[dtype].isfinite().all() and (features[dtype] != 0).float().mean() > 0.2
    error = (features["float16"] - features["float32"]).norm() / features["float32"].norm()
    assert error < 0.01  # no overflow or underflow on the way


def test_a_seed_fixes_every_value(tmp_path):
    files = {name: tmp_path / f"{name}.pt" for name in ("a", "b", "c")}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.write_synthetic("demo", files[name], seed=seed)
    a, b, c = (torch.load(files[n], weights_only=True)["module"] for n in ("a", "b", "c"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm.lm_head.weight"], c["lm.lm_head.weight"])


def test_writing_holds_one_buffer_not_the_model(tmp_path):
    """Peak resident memory while writing a 400 MB file grows by the 16 MB buffer, not by the file
    nor by its largest tensor (the 155 MB head); a first small write pays the fixed costs. (A fresh
    buffer per chunk grew it by about 48 MB.)"""
    config = tmp_path / "large.yml"
    config.write_text(LARGE)
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(SCRIPT.parent)!r})
from synthetic_checkpoint import write_synthetic

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

write_synthetic("demo", Path({str(tmp_path / "warm.pt")!r}))
before = status("VmRSS")
write_synthetic({str(config)!r}, Path({str(tmp_path / "large.pt")!r}))
print(json.dumps({{"growth": status("VmHWM") - before}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    size = (tmp_path / "large.pt").stat().st_size
    assert size > 4e8
    assert growth < 40 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB writing {size / 2**20:.0f} MB"


def test_the_command_line_writes_and_reports(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--config", "demo", "--out", str(tmp_path / "sub" / "x.pt")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["file_bytes"] == (tmp_path / "sub" / "x.pt").stat().st_size > report["weight_bytes"] > 0
    assert report["peak_rss_bytes"] > 0 and report["seconds"] >= 0
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.pt"]
