"""The benchmark (installed as `magma-benchmark`; `python inference.py` in the repository).

MAGMA generation on random weights of any config, against baselines measured in the same run on
the same weights:
  reference  transformers' GPTJForCausalLM (same adapters, same image-prefix embeddings), own cache;
  ggml       GGML's GPT-J engine (ctransformers, when installed: pip install magma-ipu[bench]) on a
             GGML file of the same weights (its GPT-J has no adapters; f32 against our float32,
             Q8_0 against our int8), checked against transformers before it is timed, and timed in
             rounds interleaved with ours at the same context length;
  no-cache   the IPU demo's scheme: image encoder and the whole padded sequence rerun for every token;
  image_precision  on a CPU, the time to first token with the image encoder in bfloat16 (native
             bfloat16 CPUs) and int8 against float32;
and against the hardware: weight bytes read per token / measured memory bandwidth, and one plain
F.linear pass over the same float weights (the weight-sweep floor).

    python inference.py --config bench_cpu --new_tokens 32               # CPU, float32
    python inference.py --config bench_cpu --quantize int8               # CPU, int8 (fbgemm)
    python inference.py --config magma_v1_500 --device cuda --dtype bfloat16 --compile true
    torchrun --nproc-per-node 2 inference.py --checkpoint ckpt.pt --tensor_parallel 2     # per-rank figures
    python inference.py --max_device_memory 300MB,450MB                                 # phased: ms/token per budget
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from ..build import build_model, convert_linears, packs_for_onednn
from ..config import load_config
from ..errors import ConfigError, MagmaError
from ..generation import Engine, GenerationStats
from ..packed import PackedLinear
from ..quantize_image import check_image_precision, trunk_in
from ..sampling import SamplingSettings
from ..session import decide_auto


SKIPPABLE = ("reference", "ggml", "nocache", "sweep", "image_precision")  # the rows --skip can leave out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=3) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy (read + write counted)."""
    n = (1 << 28) if device.type == "cpu" else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src), device, repeat=5)


def lm_weight_bytes(model) -> int:
    """Bytes of language-model weights read per decoded token (all of them but the embedding)."""
    # the state dict holds parameters and persistent buffers (int8 weights), not the key/value cache
    total = sum(t.numel() * t.element_size() for name, t in model.lm.state_dict().items() if "wte" not in name)
    # packed weights (oneDNN, fbgemm) are in no state dict
    return total + sum(m.weight_bytes for m in model.lm.modules() if isinstance(m, PackedLinear))


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def reference_decode(hf, prefix: torch.Tensor, new_tokens: int, device) -> tuple[float, float]:
    """transformers with its own cache: (time to first token, seconds per later token)."""
    from transformers import DynamicCache

    sync(device)
    start = time.perf_counter()
    out = hf(inputs_embeds=prefix, past_key_values=DynamicCache(config=hf.config), use_cache=True)
    token = out.logits[:, -1].argmax(-1)
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cache = out.past_key_values
    for _ in range(new_tokens - 1):
        out = hf(input_ids=token[:, None], past_key_values=cache, use_cache=True)
        token, cache = out.logits[:, -1].argmax(-1), out.past_key_values
    sync(device)
    return first, (time.perf_counter() - start) / max(1, new_tokens - 1)


@torch.inference_mode()
def nocache_step(engine: Engine, model, request, padded_length: int) -> None:
    """One token the IPU demo's way: image encoder + the whole padded sequence, no cache."""
    sequence = engine.embed([request])[0]
    embeds = torch.zeros(1, padded_length, sequence.shape[-1], dtype=sequence.dtype, device=sequence.device)
    embeds[0, : len(sequence)] = sequence
    slots = torch.arange(padded_length, device=sequence.device)
    hidden = model(embeds, slots, slots[None], torch.ones(1, padded_length, dtype=torch.bool, device=slots.device))
    model.logits(hidden[:, len(sequence) - 1]).argmax(-1).item()


@torch.inference_mode()
def weight_sweep(model, batch: int, device) -> float:
    """Seconds for one F.linear pass of a batch of vectors over every LM weight matrix."""
    mats = [(m.weight, m.bias) for m in model.lm.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=device) for w, _ in mats}
    return timed(lambda: [F.linear(x[w.shape[1]], w, b) for w, b in mats], device)


def measure(engine: Engine, requests, settings: SamplingSettings, seeds, cfg,
            between=None) -> tuple[GenerationStats, list]:
    """One warm-up (compiles) then three runs: the run with the median decode time. The cache is
    the session's (cfg.cache_length slots), so a compiled prefill pads to its bucket as in use.
    `between`, if given, runs after each of the three: a peer timed in interleaved rounds."""
    engine.generate(requests, settings, seeds, capacity=cfg.cache_length)
    runs = []
    for _ in range(3):
        stats = GenerationStats()
        runs.append((stats, engine.generate(requests, settings, seeds, stats=stats, capacity=cfg.cache_length)))
        if between is not None:
            between(stats)
    return sorted(runs, key=lambda run: run[0].decode_time)[1]


class GgmlPeer:
    """GGML's GPT-J on a file of the model's weights, checked against transformers, then timed at
    the context our engine decodes at (`time`, once per round)."""

    def __init__(self, model, cfg, ftype: str, threads: int, directory: str):
        from .ggml import check_ggml_against_transformers, load_ggml, write_ggml_gptj
        from .reference import transformers_gptj

        self.ftype, self.threads, self.rounds, self.vocab_size = ftype, threads, [], cfg.model.vocab_size
        path = write_ggml_gptj(model.lm, os.path.join(directory, f"gptj-{ftype}.bin"), ftype, n_ctx=cfg.cache_length)
        self.llm = load_ggml(path)
        gen = torch.Generator().manual_seed(1)
        probe = torch.randint(0, self.vocab_size - 2, (20,), generator=gen).tolist()
        self.check = check_ggml_against_transformers(self.llm, transformers_gptj(model, adapters=False), probe,
                                                     threads=threads)
        limit = 2e-3 if ftype == "f32" else 0.1  # of the logit scale; Q8_0's rounding alone is ~0.02
        if self.check["max_abs_logit_diff"] > limit * self.check["logit_scale"]:
            raise MagmaError(f"GGML's {ftype} logits differ from transformers' by "
                             f"{self.check['max_abs_logit_diff']:.4f} "
                             f"(logit scale {self.check['logit_scale']:.2f}): the GGML file is wrong; not timed")

    def time(self, stats: GenerationStats) -> None:
        from .ggml import time_ggml_decode

        gen = torch.Generator().manual_seed(2)
        prompt = torch.randint(0, self.vocab_size - 2, (stats.prompt_positions,), generator=gen).tolist()
        if not self.rounds:
            time_ggml_decode(self.llm, prompt, 4, self.threads)  # warm-up
        self.rounds.append(time_ggml_decode(self.llm, prompt, stats.new_tokens - 1, self.threads))

    def row(self, ours_first: float, ours_per_token: float) -> dict:
        first = statistics.median(r[0] for r in self.rounds)
        per_token = statistics.median(r[1] for r in self.rounds)
        return {"ggml_ftype": self.ftype,
                "ggml_max_logit_diff_vs_transformers": round(self.check["max_abs_logit_diff"], 5),
                "ggml_argmax_agreement_vs_transformers": round(self.check["argmax_agreement"], 3),
                "ggml_decode_ms_per_token": round(per_token * 1e3, 3),
                "ggml_time_to_first_token_ms": round(first * 1e3, 2),
                "decode_over_ggml": round(ours_per_token / per_token, 3),
                "time_to_first_token_over_ggml_prefill": round(ours_first / first, 3)}


def ggml_peer_reason(args, cfg, skip: set) -> str | None:
    """Why GGML is not timed in this run, or None when it is."""
    if "ggml" in skip:
        return "skipped"
    if cfg.device != "cpu" or args.batch_size != 1:
        return "GGML's GPT-J is timed on the CPU at batch 1"
    if cfg.dtype != "float32" or cfg.model.d_ff != 4 * cfg.model.d_model:
        return "GGML's GPT-J runs float32 activations and fixes d_ff at 4 x d_model"
    try:
        import ctransformers  # noqa: F401
    except ImportError:
        return "ctransformers is not installed (pip install magma-ipu[bench])"
    return None


def image_precision_figures(engine: Engine, model, requests, seeds, rounds: int = 3) -> dict:
    """The image encoder in bfloat16 (where this CPU has native bfloat16) and in int8 against float32,
    in the same run on the same weights: seconds to prepare each, the relative error of its feature
    map, and the time to first token of each, alternating (median of `rounds` each, after a warm-up)."""
    prefix = model.image_prefix
    float_trunk, image = prefix.enc, requests[0][0]
    trunks, row = {"float32": float_trunk}, {}
    with torch.inference_mode():
        reference = float_trunk(image)
    for precision in ("bfloat16", "int8"):
        try:
            check_image_precision(precision, "cpu")
        except ConfigError as e:
            row[f"image_{precision}"] = str(e)
            continue
        start = time.perf_counter()
        trunks[precision] = trunk_in(precision, copy.deepcopy(float_trunk), model.cfg.image_resolution)
        row[f"image_{precision}_prepare_s"] = round(time.perf_counter() - start, 2)
        with torch.inference_mode():
            error = (trunks[precision](image) - reference).norm() / reference.norm()
        row[f"image_{precision}_feature_error"] = round(error.item(), 4)
    first_token = SamplingSettings(temperature=0, max_out_tokens=1)
    times: dict = {precision: [] for precision in trunks}
    try:
        for round_ in range(rounds + 1):
            for precision, trunk in trunks.items():
                prefix.enc = trunk
                stats = GenerationStats()
                engine.generate(requests, first_token, seeds, stats=stats)
                if round_:  # the first round warms them up
                    times[precision].append(stats.time_to_first_token)
    finally:
        prefix.enc = float_trunk
    firsts = {precision: statistics.median(t) for precision, t in times.items()}
    for precision, first in firsts.items():
        row[f"image_{precision}_time_to_first_token_ms"] = round(first * 1e3, 2)
        if precision != "float32":
            row[f"image_{precision}_time_to_first_token_over_float32"] = round(first / firsts["float32"], 3)
    return row


def per_token(stats: GenerationStats) -> float:
    return stats.decode_time / max(1, stats.new_tokens - 1)


def transfer_bandwidth(device: torch.device) -> float:
    """Bytes per second moved from host memory (pinned) to `device`; on CPU, a plain copy."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
    move = (lambda: src.to(device)) if device.type == "cuda" else src.clone
    return n / timed(move, device, repeat=5)


def print_row(row: dict) -> None:
    width = max(len(k) for k in row)
    for key, value in row.items():
        if not isinstance(value, list):
            print(f"{key:<{width}}  {value}")
    print(json.dumps(row))


def parallel_run(args, cfg, requests, settings, seeds, row: dict) -> None:
    """Under torchrun: each rank loads its shard of the checkpoint; rank 0 prints every rank's figures."""
    import torch.distributed as dist

    if args.checkpoint is None:
        raise SystemExit("--tensor_parallel needs --checkpoint (each rank reads its own slices of it)")
    model = build_model(cfg, args.checkpoint)
    device = model.lm.transformer.wte.weight.device
    stats, _ = measure(Engine(model, eos_id=-1, compile=cfg.compile), requests, settings, seeds, cfg)
    mine = {"rank": dist.get_rank(), "decode_ms_per_token": round(per_token(stats) * 1e3, 3),
            "time_to_first_token_ms": round(stats.time_to_first_token * 1e3, 2),
            "peak_memory_mb": round(peak_memory(device) / 2**20, 1), "weight_bytes_per_token": lm_weight_bytes(model)}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        slowest = max(r["decode_ms_per_token"] for r in ranks)
        row.update({"tensor_parallel": len(ranks), "decode_ms_per_token": slowest,
                    "tokens_per_s": round(args.batch_size / slowest * 1e3, 2),
                    "time_to_first_token_ms": max(r["time_to_first_token_ms"] for r in ranks),
                    "peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in ranks], "ranks": ranks})
        for r in ranks:
            print(f"rank {r['rank']}: {r['decode_ms_per_token']} ms/token, peak {r['peak_memory_mb']} MB, "
                  f"{r['weight_bytes_per_token'] / 2**20:.1f} MiB of weights read per token")
        print_row(row)
    dist.destroy_process_group()


def phased_run(args, cfg, requests, settings, seeds, row: dict) -> None:
    """Time per token at each memory budget against the transfer floor (streamed bytes / bandwidth)."""
    device = torch.device(cfg.device)
    bandwidth = transfer_bandwidth(device)
    resident = build_model(cfg, args.checkpoint)
    stats, _ = measure(Engine(resident, eos_id=-1, compile=cfg.compile), requests, settings, seeds, cfg)
    resident_per_token = per_token(stats)
    del resident
    table = []
    for budget in args.max_device_memory.split(","):
        model = build_model(cfg.replace(max_device_memory=budget), args.checkpoint)
        stats, _ = measure(Engine(model, eos_id=-1, compile=cfg.compile), requests, settings, seeds, cfg)
        streamed = model.phased.streamed_bytes
        floor = streamed / bandwidth
        table.append({"budget": budget, "resident_blocks": model.phased.resident,
                      "streamed_blocks": len(model.phased.streamed), "streamed_mb_per_token": round(streamed / 2**20, 1),
                      "decode_ms_per_token": round(per_token(stats) * 1e3, 2),
                      "transfer_floor_ms": round(floor * 1e3, 2),
                      "over_floor": round(per_token(stats) / floor, 2) if floor else None,
                      "over_resident": round(per_token(stats) / resident_per_token, 2)})
        del model
    row.update({"transfer_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                "resident_decode_ms_per_token": round(resident_per_token * 1e3, 2), "phased": table})
    print(f"{'budget':>10} {'resident':>8} {'streamed':>8} {'MB/token':>9} {'ms/token':>9} {'floor ms':>9} "
          f"{'/floor':>7} {'/resident':>9}")
    for t in table:
        print(f"{t['budget']:>10} {t['resident_blocks']:>8} {t['streamed_blocks']:>8} {t['streamed_mb_per_token']:>9} "
              f"{t['decode_ms_per_token']:>9} {t['transfer_floor_ms']:>9} {t['over_floor'] or '-':>7} "
              f"{t['over_resident']:>9}")
    print_row(row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench_cpu")
    parser.add_argument("--checkpoint", default=None, help="weights from this file (default: random weights)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_tokens", type=int, default=20)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantize", default=None, choices=["none", "int8", "auto"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", default="false", choices=["true", "false"])
    parser.add_argument("--onednn", default="true", choices=["true", "false"],
                        help="CPU float32: the linear layers through oneDNN (false: aten's F.linear)")
    parser.add_argument("--threads", type=int, default=None, help="per process (default: all cores, shared by ranks)")
    parser.add_argument("--tensor_parallel", type=int, default=1, help="ranks (run under torchrun; needs --checkpoint)")
    parser.add_argument("--max_device_memory", default=None,
                        help="comma-separated budgets, e.g. 2GiB,4GiB: phased execution's time per token at each")
    parser.add_argument("--skip", default="", help="comma-separated: " + ",".join(SKIPPABLE))
    parser.add_argument("--quick", action="store_true", help="a seconds-long run on the demo-sized model (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.new_tokens, args.prompt_tokens = "demo", 8, 6
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.tensor_parallel)
    torch.set_num_threads(threads)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SKIPPABLE):
        parser.error(f"--skip takes {', '.join(SKIPPABLE)}; not {', '.join(sorted(skip - set(SKIPPABLE)))}")
    overrides = {k: v for k, v in (("dtype", args.dtype), ("device", args.device), ("quantize", args.quantize))
                 if v is not None}
    cfg = load_config(args.config, compile=args.compile, onednn=args.onednn, tensor_parallel=args.tensor_parallel,
                      **overrides)
    cfg = decide_auto(cfg, on_choice=lambda note: print(f"magma: {note}", file=sys.stderr))
    vocab = cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, cfg.model.image_resolution, cfg.model.image_resolution, generator=gen)
    requests = [[image, torch.randint(0, vocab - 2, (args.prompt_tokens,), generator=gen).tolist()]
                for _ in range(args.batch_size)]
    settings = SamplingSettings(temperature=0, max_out_tokens=args.new_tokens)
    seeds = [0] * args.batch_size
    row: dict = {"config": cfg.name, "device": cfg.device, "dtype": cfg.dtype, "quantize": cfg.quantize,
                 "batch_size": args.batch_size, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                 "threads": threads, "compile": cfg.compile, "onednn": packs_for_onednn(cfg)}
    if args.tensor_parallel > 1:
        return parallel_run(args, cfg, requests, settings, seeds, row)
    if args.max_device_memory:
        return phased_run(args, cfg, requests, settings, seeds, row)
    device = torch.device(cfg.device)
    # the baselines use the plain float model; it is quantized or packed for oneDNN after them
    model = build_model(cfg.replace(quantize="none", compile=False, onednn=False), args.checkpoint)
    base_engine = Engine(model, eos_id=-1)

    check_accuracy = cfg.quantize != "none" or cfg.dtype != "float32"
    if check_accuracy:  # the float32 model with the same seed (or checkpoint) gives the same weights
        plain = cfg.replace(dtype="float32", quantize="none", compile=False, onednn=False)
        f32 = Engine(build_model(plain, args.checkpoint), -1)
        float_tokens = f32.generate(requests[:1], settings, [0])[0].token_ids
        float_logits = f32.forced_logits(requests[0], float_tokens).cpu()
        del f32
    if "reference" not in skip:
        from magma_ipu.benchmark.reference import transformers_gptj

        hf = transformers_gptj(model)
        prefix = base_engine.embed(requests[:1])[0][None]
        reference_decode(hf, prefix, 4, device)  # warm-up
        ref_first, ref_per_token = reference_decode(hf, prefix, args.new_tokens, device)
        del hf
    if "nocache" not in skip:
        nocache_per_token = timed(lambda: nocache_step(base_engine, model, requests[0], cfg.cache_length), device,
                                  repeat=2)
    if "sweep" not in skip:
        sweep = weight_sweep(model, args.batch_size, device)

    ggml_reason = ggml_peer_reason(args, cfg, skip)
    with tempfile.TemporaryDirectory() as directory:
        ggml = None
        if ggml_reason is None:
            ggml = GgmlPeer(model, cfg, "q8_0" if cfg.quantize == "int8" else "f32", threads, directory)
        convert_linears(model, cfg)
        engine = Engine(model, eos_id=-1, compile=cfg.compile)
        stats, results = measure(engine, requests, settings, seeds, cfg, between=ggml and ggml.time)
    decode_per_token = per_token(stats)
    request_time = stats.time_to_first_token + stats.decode_time
    weight_bytes = lm_weight_bytes(model)
    bandwidth = memory_bandwidth(device)
    row.update({
        "time_to_first_token_ms": round(stats.time_to_first_token * 1e3, 2),
        "decode_ms_per_token": round(decode_per_token * 1e3, 3),
        "tokens_per_s": round(args.batch_size / decode_per_token, 2),
        "request_ms": round(request_time * 1e3, 1),
        "peak_memory_mb": round(peak_memory(device) / 2**20, 1),
        "weight_bytes_per_token": weight_bytes,
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "fraction_of_bandwidth_limit": round(weight_bytes / bandwidth / decode_per_token, 3),
    })
    if check_accuracy:
        tokens = results[0].token_ids
        agree = next((i for i, (a, b) in enumerate(zip(tokens, float_tokens)) if a != b), len(tokens))
        ours = engine.forced_logits(requests[0], float_tokens).float().cpu()  # decoded along float32's path
        ref, finite = float_logits, torch.isfinite(float_logits)  # banned ids are -inf in both
        error = (ours - ref)[finite].abs()
        top2 = ref.topk(2, dim=-1).values
        row.update({"greedy_tokens_agreeing_with_float32": agree,
                    "argmax_agreement_on_float32_path": round((ours.argmax(-1) == ref.argmax(-1)).float().mean().item(), 3),
                    "max_logit_error": round(error.max().item(), 5),
                    "mean_logit_error": round(error.mean().item(), 5),
                    "float32_median_top2_gap": round((top2[:, 0] - top2[:, 1]).median().item(), 5),
                    "logit_scale": round(ref[finite].abs().max().item(), 3)})
    if "reference" not in skip:
        row.update({"reference_decode_ms_per_token": round(ref_per_token * 1e3, 3),
                    "reference_time_to_first_token_ms": round(ref_first * 1e3, 2),
                    "speedup_vs_reference": round(ref_per_token / decode_per_token, 2)})
    if "nocache" not in skip:
        row.update({"nocache_ms_per_token": round(nocache_per_token * 1e3, 1),
                    "request_speedup_vs_nocache": round(nocache_per_token * args.new_tokens / request_time, 1)})
    row.update(ggml.row(stats.time_to_first_token, decode_per_token) if ggml else {"ggml": ggml_reason})
    if "sweep" not in skip:
        row.update({"float32_weight_sweep_ms": round(sweep * 1e3, 3),
                    "decode_over_weight_sweep": round(decode_per_token / sweep, 3)})
    if "image_precision" not in skip and device.type == "cpu":
        row.update(image_precision_figures(engine, model, requests, seeds))
    print_row(row)
