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
