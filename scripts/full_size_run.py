#!/usr/bin/env python3
"""The real command line on a full-size synthetic MAGMA v1 checkpoint: starts, memory, disk, speed.

Writes a synthetic checkpoint in the real format (scripts/synthetic_checkpoint.py; 12.9 GB for
magma_v1_500), measures this machine's memory read bandwidth, then for each plan runs
`run_inference.py` twice in fresh processes with an empty cache of its own: the first start
(conversion into the cache, then loading) and a later start (the cache mapped). Prints one table
and one JSON line: wall seconds of each start and of its load, peak RSS (VmHWM), disk used by the
cache, time to first token, decode ms/token, and decode against the time to read the weights once
at the measured bandwidth.

    python scripts/full_size_run.py --workdir /big/disk            # magma_v1_500: ~13 GB + caches
    python scripts/full_size_run.py --config bench_cpu             # the same, scaled (0.6 GB)

Plans: "auto" is the preset's own choice with no flags (for MAGMA v1 on a machine without CUDA: the
CPU in int8 when it fits), "int8" asks for the CPU in int8, "image_int8" and "image_bfloat16" the same
with the image encoder in int8 or bfloat16 too (the latter on CPUs with native bfloat16), "bfloat16" adds
`--dtype bfloat16 --quantize none`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "demo_example_images" / "cabin_by_a_lake.png"
# 20 GPT-2 tokens: with the image's 144 positions, a prefill of 164, as in the benchmark
PROMPT = "Q: What is in this picture? Describe its scene and colours in a sentence. A:"
INT8 = ["--device", "cpu", "--dtype", "float32", "--quantize", "int8"]
PLANS = {"auto": [], "int8": INT8, "image_int8": [*INT8, "--image_precision", "int8"],
         "image_bfloat16": [*INT8, "--image_precision", "bfloat16"],
         "bfloat16": ["--dtype", "bfloat16", "--quantize", "none"]}


def read_bandwidth(threads: int, size_bytes: int = 1 << 30) -> float:
    """GB/s of summing a buffer much larger than the caches (best of 5), on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(size_bytes // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9


def child(argv: list[str]) -> None:
    """Run the command line in this process, then report its peak and final memory on stderr."""
    sys.path.insert(0, str(ROOT))
    import run_inference

    code = run_inference.main(argv)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    figures = {k: int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    print("MEMORY " + json.dumps(figures), file=sys.stderr)
    sys.exit(code)


def run_start(config: str, checkpoint: Path, flags: list[str], cache: Path, tokens: int) -> dict:
    argv = ["--config", config, "--checkpoint", str(checkpoint), "--image", str(IMAGE), "--prompt",
            PROMPT, "--json", "--temperature", "0", "--max_out_tokens", str(tokens), *flags]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                         env={**os.environ, "MAGMA_CACHE": str(cache)})
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"run_inference {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    memory = json.loads(next(line for line in out.stderr.splitlines() if line.startswith("MEMORY "))[7:])
    chose = [line for line in out.stderr.splitlines() if line.startswith("magma: ")]
    generated = len(result["token_ids"])
    return {
        "wall_s": round(wall, 1), "load_s": result["load_time_s"],
        "ttft_s": result["time_to_first_token_s"],
        "decode_ms_per_token": round(1000 * result["decode_time_s"] / max(1, generated - 1), 1),
        "peak_rss_gb": round(memory["VmHWM"] / 1e9, 2), "anon_rss_gb_at_exit": round(memory["RssAnon"] / 1e9, 2),
        "cache_gb": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e9, 2),
        "cache_files": sorted(p.name for p in cache.rglob("*") if p.is_file()),
        "chose": chose[0][7:] if chose else "", "tokens": generated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="magma_v1_500")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/magma_full_size"))
    parser.add_argument("--plans", default="auto,bfloat16", help="comma-separated: " + ", ".join(PLANS))
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate per run")
    parser.add_argument("--reuse", action="store_true", help="keep a synthetic checkpoint written before")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and caches afterwards")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    sys.path.insert(0, str(ROOT))
    from synthetic_checkpoint import write_synthetic  # beside this script

    import torch

    from magma_ipu.config import load_config
    from magma_ipu.model import MagmaModel
    from magma_ipu.resources import weight_bytes

    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.workdir / f"{args.config}_mp_rank_00_model_states.pt"
    start = time.perf_counter()
    reused = args.reuse and checkpoint.is_file()
    if not reused:
        write_synthetic(args.config, checkpoint)
    report: dict = {"config": args.config, "checkpoint_gb": round(checkpoint.stat().st_size / 1e9, 2),
                    "write_s": None if reused else round(time.perf_counter() - start, 1), "cpu": _cpu_name(),
                    "threads": torch.get_num_threads()}
    report["read_bandwidth_gb_s"] = round(read_bandwidth(torch.get_num_threads()), 1)
    with torch.device("meta"):
        model = MagmaModel(load_config(args.config).model)
    def decode_bytes(dtype: torch.dtype, quantize: str) -> int:
        """What one decode step reads: the weights less the image prefix's (and on a CPU less the
        embedding, of which it reads one row)."""
        image = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                    for t in model.image_prefix.state_dict().values())
        return weight_bytes(model, dtype, quantize, "cpu") - image

    lm_weights = {"int8": decode_bytes(torch.float32, "int8"), "bfloat16": decode_bytes(torch.bfloat16, "none")}
    rows = []
    try:
        for plan in args.plans.split(","):
            cache = args.workdir / f"cache_{plan}"
            shutil.rmtree(cache, ignore_errors=True)
            for start_kind in ("first", "later"):
                row = {"plan": plan, "start": start_kind,
                       **run_start(args.config, checkpoint, PLANS[plan], cache, args.tokens)}
                kind = "int8" if ".int8." in " ".join(row["cache_files"]) else "bfloat16"
                floor_ms = 1000 * lm_weights[kind] / (report["read_bandwidth_gb_s"] * 1e9)
                row["weights_read_ms"] = round(floor_ms, 1)
                row["decode_over_read"] = round(row["decode_ms_per_token"] / floor_ms, 2)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.keep:
            checkpoint.unlink(missing_ok=True)
    written = "reused" if reused else f"written in {report['write_s']} s"
    print(f"{args.config}: {report['checkpoint_gb']} GB checkpoint {written}; {report['cpu']}, "
          f"{report['threads']} threads, read bandwidth {report['read_bandwidth_gb_s']} GB/s")
    header = ("plan", "start", "wall_s", "load_s", "peak_rss_gb", "cache_gb", "ttft_s", "decode_ms_per_token",
              "weights_read_ms", "decode_over_read")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    for row in rows:
        if row["chose"]:
            print(f"{row['plan']} chose: {row['chose']}")
            break
    print(json.dumps({**report, "rows": rows}))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
