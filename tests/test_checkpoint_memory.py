"""scripts/checkpoint_memory.py on a scaled-down model (8 blocks of d_model 1024, full vocabulary and
image encoder; about 0.6 GB in fp16): conversion holds one tensor at a time, loading maps the file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_conversion_and_loading_stay_near_the_weight_size(tmp_path):
    out = subprocess.run([sys.executable, "scripts/checkpoint_memory.py", "--config", "bench_cpu",
                          "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["checkpoint_bytes"] > 5e8
    assert row["convert_extra_rss_over_weights"] < 0.25  # streamed: never the whole model in memory
    assert 0.5 < row["load_extra_rss_over_weights"] < 1.15  # every weight read once, no second copy


@pytest.mark.parametrize("plan", ["int8", "image_int8"])
def test_the_command_line_in_int8_stays_within_its_estimate(tmp_path, plan):
    """scripts/full_size_run.py, scaled: the real command line, first start (quantizing into the cache)
    and later start (mapping it), each in a fresh process, within the memory resources.py promises."""
    import torch

    from magma_ipu.config import load_config
    from magma_ipu.model import MagmaModel
    from magma_ipu.resources import memory_needed

    out = subprocess.run([sys.executable, "scripts/full_size_run.py", "--config", "bench_cpu", "--plans", plan,
                          "--tokens", "4", "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    config = load_config("bench_cpu", quantize="int8", image_precision="int8" if plan == "image_int8" else "float32")
    with torch.device("meta"):
        estimate = memory_needed(config, MagmaModel(config.model))
    first, later = report["rows"]
    assert (first["start"], later["start"]) == ("first", "later")
    for row in (first, later):
        assert row["cache_files"] == ["bench_cpu_mp_rank_00_model_states.float32.int8.safetensors"]  # no float file
        assert row["peak_rss_gb"] * 1e9 <= estimate, row
        assert row["tokens"] == 4
    assert not list(tmp_path.iterdir())  # the checkpoint and caches are removed afterwards
