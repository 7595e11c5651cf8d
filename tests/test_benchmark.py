"""inference.py in its quick mode: it runs and prints one JSON line with every field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "time_to_first_token_ms", "decode_ms_per_token", "tokens_per_s", "request_ms", "peak_memory_mb",
    "weight_bytes_per_token", "memory_bandwidth_gb_s", "fraction_of_bandwidth_limit",
    "reference_decode_ms_per_token", "speedup_vs_reference", "nocache_ms_per_token", "request_speedup_vs_nocache",
    "float32_weight_sweep_ms", "decode_over_weight_sweep",
}


@pytest.mark.parametrize("extra, more", [([], set()),
                                         (["--quantize", "int8"], {"greedy_tokens_agreeing_with_float32", "max_logit_error",
                                                                   "argmax_agreement_on_float32_path"})])
def test_quick_benchmark_emits_every_field(extra, more):
    out = subprocess.run([sys.executable, "inference.py", "--quick", "--threads", "2", *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert FIELDS | more <= set(row), sorted(FIELDS | more - set(row))
    assert all(row[k] > 0 for k in FIELDS)
    assert row["new_tokens"] == 8
    if more:
        assert 0 <= row["greedy_tokens_agreeing_with_float32"] <= 8
        assert 0 <= row["max_logit_error"] < 0.1 * row["logit_scale"]
        assert 0 <= row["argmax_agreement_on_float32_path"] <= 1
