#!/usr/bin/env python3
"""Everything that needs a GPU, in one command: the CUDA tests, then the GPU benchmark rows, then
the table for the README.

    python scripts/gpu_check.py                      # magma_v1_500's shape, random weights
    python scripts/gpu_check.py --config bench_cpu   # a smaller model, minutes instead

Rows (each `inference.py` in a fresh process, so one failure or out-of-memory costs only its row):
float16 and bfloat16 eager, float16 compiled (CUDA graphs), weight-only int8 eager and compiled,
phased streaming at two memory budgets, and tensor parallelism over every GPU when there are two
or more (on a synthetic checkpoint in the real format, written to a temporary folder). Without CUDA it says so and exits 0: there is nothing here to run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "float16": ["--dtype", "float16"],
    "bfloat16": ["--dtype", "bfloat16"],
    "float16, CUDA graphs": ["--dtype", "float16", "--compile", "true"],
    "int8 weight-only": ["--dtype", "float16", "--quantize", "int8"],
    "int8 weight-only, CUDA graphs": ["--dtype", "float16", "--quantize", "int8", "--compile", "true"],
}
COLUMNS = ("decode_ms_per_token", "tokens_per_s", "time_to_first_token_ms", "weight_bytes_per_token",
           "memory_bandwidth_gb_s", "fraction_of_bandwidth_limit", "speedup_vs_reference", "peak_memory_mb")


def run_row(label: str, command: list[str], timeout: int) -> dict:
    print(f"-- {label}: {' '.join(command)}", flush=True)
    try:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": label, "error": f"timed out after {timeout} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"row": label, "error": f"exit {out.returncode}: {tail}"}
    return {"row": label, **json.loads(lines[-1])}


def phased_budgets(config: str) -> list[str]:
    """Two float16 budgets that keep about two thirds and one third of the blocks on the GPU, beyond what
    phased execution always holds: the weights outside the blocks and two blocks in flight."""
    from magma_ipu.config import load_config
    from magma_ipu.model import MagmaModel
    from magma_ipu.phased import state_bytes

    with torch.device("meta"):
        model = MagmaModel(load_config(config).model).half()
    blocks = model.lm.transformer.h
    block = state_bytes(blocks[0])
    fixed = state_bytes(model) - len(blocks) * block
    return [str(int(fixed + (2 + share * len(blocks)) * block) + 1) for share in (2 / 3, 1 / 3)]


def tensor_parallel_row(args, gpus: int) -> dict:
    """Tensor parallelism reads its shards from a checkpoint: a synthetic one in the real format,
    written to a temporary folder for the run and deleted after it."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "mp_rank_00_model_states.pt"
        written = subprocess.run([sys.executable, "scripts/synthetic_checkpoint.py", "--config", args.config,
                                  "--out", str(checkpoint)], cwd=ROOT, capture_output=True, text=True)
        if written.returncode != 0:
            return {"row": f"tensor parallel x{gpus}", "error": "could not write a synthetic checkpoint"}
        command = ["torchrun", f"--nproc-per-node={gpus}", "inference.py", "--config", args.config,
                   "--device", "cuda", "--dtype", "float16", "--tensor_parallel", str(gpus),
                   "--checkpoint", str(checkpoint), "--new_tokens", str(args.new_tokens)]
        return run_row(f"float16, tensor parallel x{gpus}", command, args.timeout)


def print_table(rows: list[dict]) -> None:
    print("\n| row | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for row in rows:
        if "error" in row:
            print(f"| {row['row']} | {row['error']} |")
            continue
        print(f"| {row['row']} | " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
        for phase in row.get("phased", []):
            print(f"|   phased {phase['budget']} | {phase['decode_ms_per_token']} ms/token, "
                  f"{phase['over_floor']}x the transfer floor |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="magma_v1_500")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per row")
    parser.add_argument("--skip_tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): "
              "nothing to run here; this script runs the CUDA tests and the GPU benchmark rows where one is")
        return 0
    gpus = torch.cuda.device_count()
    for i in range(gpus):
        props = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"], cwd=ROOT)
        print(f"CUDA tests: exit {tests.returncode}", flush=True)

    bench = [sys.executable, "inference.py", "--config", args.config, "--device", "cuda",
             "--new_tokens", str(args.new_tokens), "--skip", "nocache"]
    rows = [run_row(label, bench + flags, args.timeout) for label, flags in ROWS.items()]
    rows.append(run_row("float16, phased", bench + ["--dtype", "float16", "--skip", "nocache,reference,sweep",
                                                    "--max_device_memory", ",".join(phased_budgets(args.config))],
                        args.timeout))
    if gpus > 1:
        rows.append(tensor_parallel_row(args, gpus))
    print_table(rows)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
