"""scripts/gpu_check.py on a machine without CUDA: says so and exits 0 (its rows need a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run its rows")
def test_gpu_check_without_cuda_says_so_and_exits_0():
    out = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no CUDA device") and "nothing to run" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("config", ["demo", "bench_cpu"])
def test_phased_budgets_stream_about_a_third_and_two_thirds_of_the_blocks(config):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check import phased_budgets

    from magma_ipu.build import build_model
    from magma_ipu.config import load_config

    n_layer = load_config(config).model.n_layer
    streamed = []
    for budget in phased_budgets(config):  # float16 on a CPU: the sizes phased execution counts on a GPU
        cfg = load_config(config, dtype="float16", max_device_memory=budget, checkpoint=None)
        streamed.append(len(build_model(cfg, None).phased.streamed))
    assert streamed == [n_layer - 2 * n_layer // 3, n_layer - n_layer // 3], streamed
