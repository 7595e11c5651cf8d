#!/usr/bin/env python3
"""Time and peak resident memory of converting and loading a MAGMA checkpoint.

Writes a synthetic checkpoint in the real format (DeepSpeed `.pt`, state dict under "module",
random fp16 weights, attention buffers and alias keys included) of the chosen config, then, each in
a fresh process: converts it to the safetensors cache, and loads the converted file into the model.
Prints one JSON line with seconds, peak RSS, and the RSS added over the process's baseline
(interpreter and libraries) divided by the converted weight bytes.

    python scripts/checkpoint_memory.py --config magma_v1_500 --workdir /big/disk   # 13 GB on disk
    python scripts/checkpoint_memory.py --config demo                                # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Unlike getrusage's ru_maxrss, which Linux
    carries over from the parent across fork and exec, these belong to this process alone."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(step: str, config_name: str, src: str, dtype: str) -> None:
    """Run one measured step in this (fresh) process and print its figures."""
    import torch

    from magma_ipu.config import load_config
    from magma_ipu.model import MagmaModel
    from magma_ipu.config import torch_dtype
    from magma_ipu.weights import cached_conversion, load_checkpoint

    cfg = load_config(config_name).model
    with torch.device("meta"):
        model = MagmaModel(cfg)
    baseline = _status_bytes("VmRSS")  # interpreter, torch, libraries
    start = time.perf_counter()
    converted = cached_conversion(model, Path(src), torch_dtype(dtype))
    if step == "load":
        load_checkpoint(model, converted, torch_dtype(dtype), "cpu")
        for t in model.state_dict().values():  # read every weight once, as a forward pass would
            t.sum()
    seconds = time.perf_counter() - start
    weights = converted.stat().st_size
    peak = _status_bytes("VmHWM")
    print(json.dumps({"step": step, "seconds": round(seconds, 1), "peak_rss_bytes": peak,
                      "baseline_rss_bytes": baseline, "weight_bytes": weights}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/magma_memory"))
    parser.add_argument("--reuse", action="store_true", help="keep a synthetic checkpoint written before")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SRC", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.config, args.child[1], args.child[2])
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"{args.config}_mp_rank_00_model_states.pt"
    env = {**os.environ, "MAGMA_CACHE": str(args.workdir / "cache")}
    start = time.perf_counter()
    if args.reuse and src.is_file():
        weight_bytes = None
    else:
        from synthetic_checkpoint import write_synthetic  # beside this script

        weight_bytes = write_synthetic(args.config, src)
    write_seconds = time.perf_counter() - start
    result = {"config": args.config, "dtype": args.dtype, "checkpoint_bytes": src.stat().st_size,
              "fp16_weight_bytes": weight_bytes, "write_seconds": round(write_seconds, 1)}
    for step in ("convert", "load"):
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--child", step, str(src), args.dtype],
                             env=env, capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        result[f"{step}_seconds"] = figures["seconds"]
        result[f"{step}_peak_rss_mb"] = round(figures["peak_rss_bytes"] / 2**20, 1)
        result[f"{step}_baseline_rss_mb"] = round(figures["baseline_rss_bytes"] / 2**20, 1)
        extra = figures["peak_rss_bytes"] - figures["baseline_rss_bytes"]
        result[f"{step}_extra_rss_over_weights"] = round(extra / figures["weight_bytes"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
