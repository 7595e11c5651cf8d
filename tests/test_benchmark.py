"""inference.py in its quick mode: it runs and prints one JSON line with every field."""

import json
import socket
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


def run_json(*args: str, launcher=(sys.executable,)) -> dict:
    out = subprocess.run([*launcher, "inference.py", "--quick", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra, more", [([], set()),
                                         (["--quantize", "int8"], {"greedy_tokens_agreeing_with_float32", "max_logit_error",
                                                                   "argmax_agreement_on_float32_path"})])
def test_quick_benchmark_emits_every_field(extra, more):
    row = run_json("--threads", "2", *extra)
    assert FIELDS | more <= set(row), sorted(FIELDS | more - set(row))
    assert all(row[k] > 0 for k in FIELDS)
    assert row["new_tokens"] == 8
    if not more:  # float32, oneDNN: every weight but the embedding, and the zero q/k/v part of the fused bias
        from magma_ipu.config import load_config
        from magma_ipu.build import lm_parameters

        m = load_config("demo").model
        floats = lm_parameters(m) - m.vocab_size * m.d_model + 3 * m.d_model * m.n_layer
        assert row["onednn"] and row["weight_bytes_per_token"] == 4 * floats
    if more:
        assert 0 <= row["greedy_tokens_agreeing_with_float32"] <= 8
        assert 0 <= row["max_logit_error"] < 0.1 * row["logit_scale"]
        assert 0 <= row["argmax_agreement_on_float32_path"] <= 1


def test_phased_benchmark_reports_each_budget_against_the_transfer_floor():
    # demo model: 2.7 MB outside the blocks, 0.56 MB per block; two blocks are always in flight
    row = run_json("--max_device_memory", "3.9MB,5.1MB")
    first, second = row["phased"]
    assert (first["resident_blocks"], first["streamed_blocks"]) == (0, 4)
    assert (second["resident_blocks"], second["streamed_blocks"]) == (2, 2)
    assert second["streamed_mb_per_token"] == pytest.approx(first["streamed_mb_per_token"] / 2, rel=0.05)
    for budget in row["phased"]:
        assert budget["decode_ms_per_token"] > 0 and budget["transfer_floor_ms"] > 0
        assert budget["over_floor"] == pytest.approx(budget["decode_ms_per_token"] / budget["transfer_floor_ms"], rel=0.02)
    assert row["transfer_bandwidth_gb_s"] > 0 and row["resident_decode_ms_per_token"] > 0


def test_tensor_parallel_benchmark_reports_every_rank():
    checkpoint = str(ROOT / "magma_ipu" / "assets" / "demo" / "mp_rank_00_model_states.pt")
    whole = run_json("--checkpoint", checkpoint, "--skip", "reference,nocache,sweep")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                f"--master-port={port}")
    row = run_json("--checkpoint", checkpoint, "--tensor_parallel", "2", launcher=launcher)
    assert row["tensor_parallel"] == 2 and [r["rank"] for r in row["ranks"]] == [0, 1]
    assert len(row["peak_memory_mb_per_rank"]) == 2 and all(m > 0 for m in row["peak_memory_mb_per_rank"])
    assert row["tokens_per_s"] > 0 and row["decode_ms_per_token"] >= max(r["decode_ms_per_token"] for r in row["ranks"])
    # each rank reads its half of the split matrices (LayerNorms and biases of row-split layers are whole)
    for r in row["ranks"]:
        assert 0.45 * whole["weight_bytes_per_token"] < r["weight_bytes_per_token"] < 0.6 * whole["weight_bytes_per_token"]
