"""The command line: caption an image or answer a question about it with MAGMA.

Installed as `magma`; `python run_inference.py` in the repository runs the same.

    python run_inference.py          # the demo model captions demo_example_images/scene_1.png
    python run_inference.py --image demo_example_images/scene_4.png --prompt "Q: How many shapes are there? A:"
    python run_inference.py --config magma_v1_500 --checkpoint magma_demo.pt --image cat.jpg \
        --prompt "Q: What is this? A:" --temperature 0 --max_out_tokens 10 --json

Every config field is a flag (`--n_layer 2`, `--top_p 0.5`, ...). `--image` and `--prompt` may be
repeated; they are interleaved in the order given. Tensor parallel over 4 GPUs:
    torchrun --nproc-per-node 4 run_inference.py --config magma_v1_500 --tensor_parallel 4 --image ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch.distributed

from .config import MODEL_FIELDS, TOP_FIELDS, MagmaConfig, ModelConfig, _suggest, load_config
from .errors import MagmaError
from .images import load_image
from .session import Magma, decide_auto

DEMO_IMAGE = Path(__file__).resolve().parent / "assets" / "demo_images" / "scene_1.png"


class _Ordered(argparse.Action):
    """Keeps --image and --prompt in the order they were given."""

    def __call__(self, parser, namespace, values, option_string=None):
        parts = getattr(namespace, "parts", None) or []
        parts.append((self.dest, values))
        namespace.parts = parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name (demo, magma_v1_500, magma_v1_1024) or a .yml path")
    parser.add_argument("--image", action=_Ordered, help="image path or URL (repeatable)")
    parser.add_argument("--prompt", action=_Ordered, help="prompt text (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--explain", action="store_true",
                        help="with --json: per token, the top candidates before/after the filters and the "
                             "image attention grid (mean over layers and heads)")
    parser.add_argument("--debug", action="store_true", help="on an unexpected error, print the full traceback")
    fields = parser.add_argument_group("config fields (override the preset)")
    defaults = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)},
                **{f.name: f.default for f in dataclasses.fields(MagmaConfig) if f.name != "model"}}
    for name in MODEL_FIELDS + TOP_FIELDS:
        if name == "name":
            continue
        fields.add_argument(f"--{name}", default=None, metavar=_metavar(name, defaults[name]))
    return parser


_METAVARS = {"checkpoint": "PATH|URL|hub", "checkpoint_sha256": "HEX", "tokenizer": "PATH|gpt2",
             "max_device_memory": "BYTES", "image_layers": "N,N,N,N", "device": "cpu|cuda[:N]|auto",
             "dtype": "float32|bfloat16|float16|auto", "quantize": "none|int8|auto",
             "image_precision": "float32|bfloat16|int8"}


def _metavar(name: str, default) -> str:
    if name in _METAVARS:
        return _METAVARS[name]
    return {bool: "true|false", int: "INT", float: "FLOAT"}.get(type(default), "TEXT")


def explain_json(magma: Magma, result) -> list[dict]:
    settings = magma.settings()
    steps = []
    for step in result.explanations:
        candidates = step.candidates(settings, n=10)
        for c in candidates:
            c["text"] = magma.tokenizer.backend.decode([c["id"]], skip_special_tokens=False)
            c["p_model"], c["p_final"] = round(c["p_model"], 6), round(c["p_final"], 6)
        steps.append({
            "token_id": step.token_id,
            "candidates": candidates,
            "image_attention": None if step.image_attention is None else [
                [[round(v, 6) for v in row] for row in step.attention_map(image=i).tolist()]
                for i in range(step.image_attention.shape[1])
            ],
        })
    return steps


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an error (one line on stderr), 2 a bad option, 130 interrupted."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    try:
        return run(parser, args, unknown)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not a MagmaError: a bug, or a case nobody checked for; still one line
        if args.debug:
            traceback.print_exc()
        frame = traceback.extract_tb(e.__traceback__)[-1]
        message = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        print(f"error: unexpected {type(e).__name__}: {message} (at {frame.filename}:{frame.lineno}; "
              + ("the traceback is above)" if args.debug else "--debug prints the traceback)"), file=sys.stderr)
        return 1
    finally:
        # every rank leaves the process group before exiting: gloo's threads would otherwise outlive
        # the interpreter and abort the process at exit ("terminate called without an active exception")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> int:
    if unknown:
        flag = unknown[0].split("=")[0]
        known = [a for a in parser._option_string_actions if a.startswith("--")]
        print(f"error: unknown option {flag!r}{_suggest(flag, known)}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if k in MODEL_FIELDS + TOP_FIELDS and v is not None}
    # no image and no prompt: caption the first demo scene, so a bare run shows what this does
    parts = getattr(args, "parts", None) or [("image", str(DEMO_IMAGE)), ("prompt", "A picture of")]
    try:
        config = load_config(args.config, **overrides)
        config = decide_auto(config, on_choice=lambda note: print(f"magma: {note}", file=sys.stderr))
        # read the images before the (slow) model load, so bad input fails at once
        limits = dict(timeout=config.image_timeout, max_bytes=config.max_image_bytes,
                      max_pixels=config.max_image_pixels)
        prompt = [load_image(v, **limits) if kind == "image" else v for kind, v in parts]
        start = time.perf_counter()
        magma = Magma.load(config, progress=sys.stderr.isatty())  # JSON goes to stdout: stderr may show progress
        load_time = time.perf_counter() - start
        if args.stream and not args.json and config.tensor_parallel == 1:
            for piece in magma.stream(prompt):
                print(piece, end="", flush=True)
            print()
            return 0
        result = magma.generate(prompt, explain=args.explain)
    except MagmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if config.tensor_parallel > 1 and torch.distributed.get_rank() != 0:
        return 0  # every rank computed the same tokens; rank 0 reports them
    if args.json:
        out = {**result.to_dict(), "config": config.name, "load_time_s": round(load_time, 3)}
        if args.explain:
            out["explain"] = explain_json(magma, result)
        print(json.dumps(out))
    else:
        print(result.text)
    return 0
