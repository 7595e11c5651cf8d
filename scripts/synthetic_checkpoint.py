#!/usr/bin/env python3
"""Write a synthetic MAGMA checkpoint: the published file's format, random weights that run.

The format is what DeepSpeed wrote for MAGMA: a torch zip `.pt` holding {"module": state_dict,
"global_steps": 1}, floats in fp16, the model's keys plus the attention buffers (`masked_bias`,
`scale_attn`) and the alias keys (`transformer.N.*`, `word_embedding.weight`) that share storage
with the weights they name.

The values give a working model: linear and embedding weights N(0, 0.02) with zero biases,
LayerNorm 1 and 0, BatchNorm near identity with positive running variances, and He-scaled
convolutions whose residual branches end small, so image features stay finite through the 50
blocks of RN50x16, in fp16 too. A seed gives the same values every time.

Memory stays at one chunk of one tensor however large the model (12.9 GB for magma_v1_500):
torch.save writes the archive over fake tensors, leaving every storage's bytes as a hole
(skip_data); each tensor is then generated chunk by chunk into its place, and the CRC-32s that
zip readers check are set to match.

    python scripts/synthetic_checkpoint.py --config magma_v1_500 --out /big/disk/magma_v1_500.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.serialization import skip_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from magma_ipu.config import ModelConfig, load_config
from magma_ipu.model import MagmaModel
from magma_ipu.model.image_encoder import Bottleneck

CHUNK_BYTES = 1 << 24  # generated and written at a time, in one buffer reused throughout
Fill = Callable[[torch.Tensor, torch.Generator], object]
Spec = tuple[torch.Size, torch.dtype, Fill]


def _normal(std: float) -> Fill:
    return lambda t, g: t.normal_(0.0, std, generator=g)


def _uniform(low: float, high: float) -> Fill:
    return lambda t, g: t.uniform_(low, high, generator=g)


def _constant(value: float) -> Fill:
    return lambda t, g: t.fill_(value)


def _fill(model: MagmaModel, key: str, value: torch.Tensor, residual_ends: set[str]) -> Fill:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if not value.dtype.is_floating_point:  # BatchNorm's num_batches_tracked
        return _constant(0)
    if isinstance(module, nn.LayerNorm):
        return _constant(1.0 if leaf == "weight" else 0.0)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return _normal(0.02) if leaf == "weight" else _constant(0.0)
    if isinstance(module, nn.Conv2d):
        # He scaling keeps ReLU activations at their scale; each residual branch ends 10x smaller,
        # so 50 branches added onto the identity path leave its scale near 1 instead of doubling it
        # block after block (fp16 overflowed by the third stage)
        std = math.sqrt(2.0 / math.prod(value.shape[1:]))
        return _normal(std * (0.1 if module_name in residual_ends else 1.0))
    if isinstance(module, nn.BatchNorm2d):
        # near identity; a negative running variance would make the image features NaN
        return {"weight": _uniform(0.9, 1.1), "bias": _normal(0.02), "running_mean": _normal(0.02),
                "running_var": _uniform(0.5, 1.5)}[leaf]
    raise ValueError(f"no synthetic values for {key} ({type(module).__name__})")


def layout(cfg: ModelConfig) -> tuple[dict[str, Spec], dict[str, str], int]:
    """What the file holds: each storage's spec (key -> shape, dtype, fill), every key of the state
    dict in file order (key -> the key whose storage it shares) and the model's own weight bytes."""
    with torch.device("meta"):
        model = MagmaModel(cfg)
    residual_ends = {f"{name}.conv3" for name, m in model.named_modules() if isinstance(m, Bottleneck)}
    specs: dict[str, Spec] = {}
    weight_bytes = 0
    for key, value in model.state_dict().items():
        dtype = torch.float16 if value.dtype.is_floating_point else value.dtype
        specs[key] = (value.shape, dtype, _fill(model, key, value, residual_ends))
        weight_bytes += value.numel() * dtype.itemsize
    keys = {key: key for key in specs}
    for n in range(cfg.n_layer):  # what the real file carries beside the weights
        block = f"lm.transformer.h.{n}."
        for name, value in (("masked_bias", -1e9), ("scale_attn", float(cfg.head_dim) ** 0.5)):
            key = f"{block}attn.attention.{name}"
            specs[key], keys[key] = (torch.Size(), torch.float32, _constant(value)), key
        for key in [k for k in keys if k.startswith(block)]:
            keys[key.replace("lm.transformer.h.", "transformer.", 1)] = key
    keys["word_embedding.weight"] = "lm.transformer.wte.weight"
    return specs, keys, weight_bytes


def write_synthetic(config_name: str, path: Path, seed: int = 0) -> int:
    """Write the synthetic checkpoint of `config_name` (a preset or a YAML path) to `path`, through
    `path`.part renamed at the end. Returns the model's weight bytes (no buffers, no aliases)."""
    specs, keys, weight_bytes = layout(load_config(config_name).model)
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        with FakeTensorMode():
            fakes = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype, _) in specs.items()}
        state = {"module": {key: fakes[storage] for key, storage in keys.items()}, "global_steps": 1}
        with open(part, "wb") as f, skip_data(materialize_fake_tensors=True):
            torch.save(state, f)
        with FakeTensorMode():  # reads the pickle only: each storage's byte offset in the file
            saved = torch.load(part, weights_only=True)["module"]
        generator = torch.Generator().manual_seed(seed)
        # one buffer for every chunk: a fresh one per chunk tripled the peak (the heap kept the freed ones)
        buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        crcs = {}
        with open(part, "r+b") as f:
            for key, (shape, dtype, fill) in specs.items():
                offset = saved[key].untyped_storage()._checkpoint_offset
                f.seek(offset)
                crcs[offset] = _write_values(f, shape.numel(), dtype, fill, generator, buffer)
            _set_crcs(f, crcs)
    except BaseException:
        part.unlink(missing_ok=True)  # never a half file, under either name
        raise
    os.replace(part, path)
    return weight_bytes


def _write_values(f: BinaryIO, numel: int, dtype: torch.dtype, fill: Fill, generator: torch.Generator,
                  buffer: torch.Tensor) -> int:
    """Generate `numel` values in `buffer`, a chunk at a time, and write them at f's position;
    returns their CRC-32."""
    crc, per_chunk = 0, len(buffer) // dtype.itemsize
    for start in range(0, numel, per_chunk):
        chunk = buffer[: min(per_chunk, numel - start) * dtype.itemsize]
        fill(chunk.view(dtype), generator)
        data = chunk.numpy()
        f.write(data)
        crc = zlib.crc32(data, crc)
    return crc


def _set_crcs(f: BinaryIO, crcs: dict[int, int]) -> None:
    """Give each storage record (keyed by its data offset) its CRC-32, which torch.save, not given
    the bytes, left at 0: in the data descriptor after the bytes and in the central directory."""
    with zipfile.ZipFile(f) as archive:
        records, central = archive.infolist(), archive.start_dir
    found = 0
    for info in records:  # in central-directory order
        f.seek(central)
        entry = f.read(46)
        if entry[:4] != b"PK\x01\x02":
            raise RuntimeError(f"no central directory entry at {central}")
        f.seek(info.header_offset + 26)
        data = info.header_offset + 30 + sum(struct.unpack("<2H", f.read(4)))  # past name and extra
        if data in crcs:
            f.seek(data + info.file_size)
            if f.read(4) != b"PK\x07\x08":
                raise RuntimeError(f"{info.filename}: no data descriptor after the bytes")
            f.write(struct.pack("<I", crcs[data]))
            f.seek(central + 16)
            f.write(struct.pack("<I", crcs[data]))
            found += 1
        central += 46 + sum(struct.unpack("<3H", entry[28:34]))  # name, extra and comment lengths
    if found != len(crcs):
        raise RuntimeError(f"found {found} of the {len(crcs)} storage records in the archive")


def _peak_rss() -> int:
    """This process's peak resident bytes (VmHWM; ru_maxrss would include a parent's across exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name or YAML path")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weight_bytes = write_synthetic(args.config, args.out, args.seed)
    print(json.dumps({"path": str(args.out), "file_bytes": args.out.stat().st_size, "weight_bytes": weight_bytes,
                      "seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_bytes": _peak_rss()}))


if __name__ == "__main__":
    main()
