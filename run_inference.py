#!/usr/bin/env python3
"""Caption an image or answer a question about it with MAGMA.

    python run_inference.py --image demo_example_images/scene_1.png --prompt "A picture of"
    python run_inference.py --config magma_v1_500 --checkpoint magma_demo.pt --image cat.jpg \
        --prompt "Q: What is this? A:" --temperature 0 --max_out_tokens 10 --json

Every config field is a flag (`--n_layer 2`, `--top_p 0.5`, ...). `--image` and `--prompt` may be
repeated; they are interleaved in the order given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from magma_ipu import Magma, MagmaError
from magma_ipu.config import MODEL_FIELDS, TOP_FIELDS, MagmaConfig, ModelConfig, _suggest, load_config


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
    fields = parser.add_argument_group("config fields (override the preset)")
    defaults = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)},
                **{f.name: f.default for f in dataclasses.fields(MagmaConfig) if f.name != "model"}}
    for name in MODEL_FIELDS + TOP_FIELDS:
        if name == "name":
            continue
        fields.add_argument(f"--{name}", default=None, metavar=type(defaults[name]).__name__.upper())
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        known = [a for a in parser._option_string_actions if a.startswith("--")]
        print(f"error: unknown option {flag!r}{_suggest(flag, known)}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if k in MODEL_FIELDS + TOP_FIELDS and v is not None}
    parts = getattr(args, "parts", None) or []
    try:
        config = load_config(args.config, **overrides)
        start = time.perf_counter()
        magma = Magma.load(config, progress=not args.json)
        load_time = time.perf_counter() - start
        prompt = [magma.open_image(v) if kind == "image" else v for kind, v in parts]
        if args.stream and not args.json:
            for piece in magma.stream(prompt):
                print(piece, end="", flush=True)
            print()
            return 0
        result = magma.generate(prompt)
    except MagmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.to_dict(), "config": config.name, "load_time_s": round(load_time, 3)}))
    else:
        print(result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
