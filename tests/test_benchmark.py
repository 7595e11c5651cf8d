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


def lm_float32_bytes_read_per_token(m) -> int:
    """By hand, from the config's shapes: the float32 weights a oneDNN decode step reads. The word
    embedding is a lookup, not read whole; q, k, v and c_fc are fused into one layer whose bias
    (zero for q, k, v) is read with it."""
    d, ff, hidden = m.d_model, m.d_ff, m.d_model // m.adapter_downsample
    block = (2 * d                                 # ln_1 weight and bias
             + (3 * d + ff) * d + (3 * d + ff)     # fused q, k, v, c_fc: weight and bias
             + d * d                               # out_proj (no bias)
             + ff * d + d                          # c_proj
             + d * hidden + hidden + hidden * d + d)  # the adapter's two layers
    return 4 * (m.n_layer * block + 2 * d + m.lm_head_size * d + m.lm_head_size)  # ln_f, lm_head


DEMO_CHECKPOINT = str(ROOT / "magma_ipu" / "assets" / "demo" / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("extra, more", [([], set()),
                                         (["--quantize", "int8", "--checkpoint", DEMO_CHECKPOINT],
                                          {"greedy_tokens_agreeing_with_float32", "max_logit_error",
                                           "argmax_agreement_on_float32_path"})])
def test_quick_benchmark_emits_every_field(extra, more):
    row = run_json("--threads", "2", *extra)
    assert FIELDS | more <= set(row), sorted(FIELDS | more - set(row))
    assert all(row[k] > 0 for k in FIELDS)
    assert row["new_tokens"] == 8
    if not more:  # float32 through oneDNN
        from magma_ipu.config import load_config

        assert row["onednn"]
        assert row["weight_bytes_per_token"] == lm_float32_bytes_read_per_token(load_config("demo").model)
    else:  # the trained demo weights in int8 keep float32's greedy tokens and every argmax along its path
        assert row["greedy_tokens_agreeing_with_float32"] == row["new_tokens"]
        assert row["argmax_agreement_on_float32_path"] == 1.0
        assert 0 < row["max_logit_error"] < 0.02 * row["logit_scale"]


def test_phased_benchmark_reports_each_budget_against_the_transfer_floor():
    # demo model: 5.6 MB outside the blocks, 0.56 MB per block; two blocks are always in flight
    row = run_json("--max_device_memory", "6.8MB,8.0MB")
    first, second = row["phased"]
    assert (first["resident_blocks"], first["streamed_blocks"]) == (0, 4)
    assert (second["resident_blocks"], second["streamed_blocks"]) == (2, 2)
    assert second["streamed_mb_per_token"] == pytest.approx(first["streamed_mb_per_token"] / 2, rel=0.05)
    for budget in row["phased"]:
        assert budget["decode_ms_per_token"] > 0 and budget["transfer_floor_ms"] > 0
        assert budget["over_floor"] == pytest.approx(budget["decode_ms_per_token"] / budget["transfer_floor_ms"], rel=0.02)
    assert row["transfer_bandwidth_gb_s"] > 0 and row["resident_decode_ms_per_token"] > 0


def test_tensor_parallel_benchmark_reports_every_rank():
    checkpoint = DEMO_CHECKPOINT
    whole = run_json("--checkpoint", checkpoint, "--skip", "reference,nocache,sweep")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                f"--master-port={port}")
    row = run_json("--checkpoint", checkpoint, "--tensor_parallel", "2", launcher=launcher)
    assert row["tensor_parallel"] == 2 and [r["rank"] for r in row["ranks"]] == [0, 1]
    assert len(row["peak_memory_mb_per_rank"]) == 2 and all(m > 0 for m in row["peak_memory_mb_per_rank"])
    # a token is ready when the slowest rank is: the run's figures are that rank's
    slowest = max(r["decode_ms_per_token"] for r in row["ranks"])
    assert row["decode_ms_per_token"] == slowest and row["tokens_per_s"] == pytest.approx(1e3 / slowest, rel=0.01)
    # each rank reads its half of the split matrices (LayerNorms and biases of row-split layers are whole)
    for r in row["ranks"]:
        assert 0.45 * whole["weight_bytes_per_token"] < r["weight_bytes_per_token"] < 0.6 * whole["weight_bytes_per_token"]
