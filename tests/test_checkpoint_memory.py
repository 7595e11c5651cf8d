"""scripts/checkpoint_memory.py on a scaled-down model (8 blocks of d_model 1024, full vocabulary and
image encoder; about 0.6 GB in fp16): conversion holds one tensor at a time, loading maps the file."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_conversion_and_loading_stay_near_the_weight_size(tmp_path):
    out = subprocess.run([sys.executable, "scripts/checkpoint_memory.py", "--config", "bench_cpu",
                          "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["checkpoint_bytes"] > 5e8
    assert row["convert_extra_rss_over_weights"] < 0.25  # streamed: never the whole model in memory
    assert 0.5 < row["load_extra_rss_over_weights"] < 1.15  # every weight read once, no second copy
