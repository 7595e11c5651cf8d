#!/usr/bin/env python3
"""Train the embedded demo model: MAGMA's architecture at toy size, on procedurally drawn scenes.

MAGMA's recipe, scaled down:
  1. train the language model (GPT-J blocks, adapters held at zero) on text about each scene: its
     scene notation (one token per cell of the 3 x 3 grid: the object whose centre is in it, or the
     background) followed by captions and Q&A. The notation's embeddings get noise, as image
     positions never match them exactly;
  2. train the image encoder, the image prefix and the adapters on image-text pairs, the language
     model's blocks following at a tenth of the rate
     (scenes drawn as users' pictures come: any canvas, shades, outlines, resampling, JPEG): the
     3 x 3 image positions take the place of the notation, and are also pulled towards the
     notation's own embeddings, cell by cell.
Writes magma_ipu/assets/demo/{mp_rank_00_model_states.pt, tokenizer.json} (the checkpoint in the
DeepSpeed layout MAGMA ships, fp16) and prints held-out metrics as one JSON line.

    python scripts/train_demo_model.py            # under 25 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from magma_ipu.config import load_config  # noqa: E402
from magma_ipu.images import center_crop, normalize  # noqa: E402
from magma_ipu.model import MagmaModel  # noqa: E402
from magma_ipu.demo.scenes import CAPTION_PROMPT, GRID, NOTATION_TOKENS, draw_varied, random_scene  # noqa: E402
from magma_ipu.demo.tokenizer import train_byte_level_bpe  # noqa: E402

ASSETS = ROOT / "magma_ipu" / "assets" / "demo"
# Noise on the notation's embeddings in stage 1, up to this fraction of their norm: the image positions
# that stand in for them later land about 0.8 of a norm away (measured on a model trained without it),
# and a language model that only ever read exact notation lost the order of two objects, or named one
# twice, with the right objects in the right cells of its prefix.
NOTATION_NOISE = 0.8
# Scenes per task of the drawing processes. Each chunk has its own random stream, seeded by (seed, chunk):
# changing CHUNK changes the training set a seed gives.
CHUNK = 500


def draw_chunk(seed: int, chunk: int, count: int, resolution: int):
    """`count` scenes and their pictures as the model sees them (count x R x R x 3 uint8), from their
    own random stream: the same whichever process draws them."""
    rng = random.Random(f"{seed}/{chunk}")
    scenes = [random_scene(rng) for _ in range(count)]
    return scenes, np.stack([np.asarray(center_crop(draw_varied(s, rng), resolution)) for s in scenes])


def make_data(count: int, seed: int, resolution: int, workers: int):
    """Scenes and their pictures (uint8, count x R x R x 3), drawn in `workers` processes."""
    sizes = [min(CHUNK, count - start) for start in range(0, count, CHUNK)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(draw_chunk, repeat(seed), range(len(sizes)), sizes, repeat(resolution)))
    return [s for scenes, _ in parts for s in scenes], torch.from_numpy(np.concatenate([p for _, p in parts]))


def batch_text(tokenizer, docs: list[list[str]], eos: int):
    """Right-padded ids and a loss mask (B x T); each document is its texts, each ending with EOS."""
    ids = [[i for t in doc for i in tokenizer.encode(t) + [eos]] for doc in docs]
    width = max(len(x) for x in ids)
    tokens = torch.full((len(ids), width), eos, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, x in enumerate(ids):
        tokens[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = True
    return tokens, mask


def lm_loss(model: MagmaModel, prefix: torch.Tensor | None, tokens, mask, noisy: int = 0):
    """Next-token cross-entropy over the text (the image prefix, if any, is only context). The first
    `noisy` embeddings of each row get Gaussian noise of a random size, up to NOTATION_NOISE of their norm."""
    embeds = model.embed_tokens(tokens)
    if noisy:
        head = embeds[:, :noisy]  # B x noisy x D
        size = torch.rand(len(embeds), 1, 1) * NOTATION_NOISE * head.norm(dim=-1, keepdim=True) / head.shape[-1] ** 0.5
        embeds = torch.cat([head + size * torch.randn_like(head), embeds[:, noisy:]], dim=1)
    if prefix is not None:
        embeds = torch.cat([prefix, embeds], dim=1)
    b, t, _ = embeds.shape
    slots = torch.arange(t)
    hidden = model(embeds, slots, slots.expand(b, t), torch.ones(b, t, dtype=torch.bool))
    n_prefix = 0 if prefix is None else prefix.shape[1]
    logits = model.lm.lm_head(hidden[:, n_prefix - 1 if n_prefix else 0 : -1])
    targets = tokens if n_prefix else tokens[:, 1:]
    target_mask = mask if n_prefix else mask[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (loss * target_mask.flatten()).sum() / target_mask.sum()


def notation_loss(prefix: torch.Tensor, cell_classes: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Each image position classified by its nearest notation embedding (the prototypes), cross-entropy
    against its cell's token: a direct per-cell signal that pulls the position onto the embedding the
    language model learnt to read, where the caption loss only says that something went wrong."""
    distances = torch.cdist(prefix.flatten(0, 1), prototypes) ** 2  # cells x tokens
    temperature = 0.05 * (torch.cdist(prototypes, prototypes) ** 2).mean()  # typical rival: ~20 logits away
    return F.cross_entropy(-distances / temperature, cell_classes.flatten())


def pull_loss(prefix: torch.Tensor, cell_classes: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared distance of each image position to its cell's notation embedding, relative to the
    embeddings' own squared norm: draws the positions onto what the language model read in stage 1,
    where notation_loss only asks that the right embedding be the nearest."""
    return ((prefix - prototypes[cell_classes]) ** 2).sum(-1).mean() / (prototypes**2).sum(-1).mean()


def cosine(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model, groups, steps, make_batch, label):
    """AdamW over parameter groups, each {"params": [...], "peak": its peak learning rate}."""
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    params = [p for g in groups for p in g["params"]]
    start, running = time.perf_counter(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine(step, steps, group["peak"])
        loss = make_batch()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            print(f"[{label}] step {step:5d} loss {running:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=14000)
    parser.add_argument("--text_steps", type=int, default=1500)
    parser.add_argument("--image_steps", type=int, default=3600)
    parser.add_argument("--batch_size", type=int, default=32)
    # the budget is 25 minutes on 2 cores; on cores that other jobs keep busy, one thread can be faster.
    # It is also the number of processes that draw the scenes.
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lm_rate", type=float, default=2e-4, help="peak rate of the language model's blocks in stage 2")
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()

    base = load_config(ROOT / "configs" / "demo.yml")
    res = base.model.image_resolution
    scenes, pixels = make_data(args.scenes, args.seed, res, args.threads)
    examples = [(i, p + a) for i, s in enumerate(scenes) for p, a in s.examples()]  # (scene, text)
    captions = [e for e in examples if e[1].startswith(CAPTION_PROMPT)]
    print(f"data: {len(scenes)} scenes, {len(examples)} texts ({time.perf_counter() - t0:.0f} s)", flush=True)

    tokenizer = train_byte_level_bpe((t for _, t in examples), base.model.vocab_size, NOTATION_TOKENS)
    assert len(tokenizer) == base.model.vocab_size, len(tokenizer)
    eos = tokenizer.eos_id
    model = MagmaModel(base.model)
    for name, p in model.named_parameters():
        if name.startswith("lm.") and p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02)
        if ".mlp.1.adapter.2." in name:
            torch.nn.init.zeros_(p)  # adapters start as the identity

    # 1. the language model, on text alone (adapters held at zero). Each sequence is a "document"
    # about one scene: its scene notation (one token per grid cell, in the image prefix's order)
    # followed by a few of its texts, so the model learns to read a grid of cells placed before
    # the text. That is how it will read the image prefix in stage 2.
    lm_params = [p for n, p in model.lm.named_parameters() if ".adapter." not in n]
    model.train()
    by_scene = [(s.notation(), [p + a for p, a in s.examples()]) for s in scenes]

    def text_batch():
        docs = [[notation + texts[0], *texts[1:]] for notation, texts in
                ((n, rng.sample(t, min(len(t), 3))) for n, t in rng.sample(by_scene, args.batch_size))]
        return lm_loss(model, None, *batch_text(tokenizer, docs, eos), noisy=GRID**2)

    text_loss = train(model, [{"params": lm_params, "peak": 3e-3}], args.text_steps, text_batch, "text")

    # 2. train the image encoder, the prefix and the adapters; the language model's blocks follow at a
    # tenth of the rate, so that they learn to read image positions, which never land exactly on the
    # notation's embeddings. The embeddings and the head stay frozen: the notation's embeddings are
    # what pull_loss draws the image positions towards.
    for p in model.lm.parameters():
        p.requires_grad_(False)
    adapters = [p for n, p in model.lm.named_parameters() if ".adapter." in n]
    blocks = [p for n, p in model.lm.named_parameters() if n.startswith("transformer.h.") and ".adapter." not in n]
    for p in adapters + blocks:
        p.requires_grad_(True)
    image_params = list(model.image_prefix.parameters()) + adapters
    with torch.no_grad():  # image positions start at the scale of the token embeddings they stand in for
        model.image_prefix.ln.weight.fill_(model.lm.transformer.wte.weight.std().item())
    notation_vocab = torch.tensor([tokenizer.encode(t)[0] for t in NOTATION_TOKENS])
    prototypes = model.embed_tokens(notation_vocab).detach()
    class_of = {int(token): k for k, token in enumerate(notation_vocab)}
    cell_classes = torch.tensor([[class_of[t] for t in tokenizer.encode(s.notation())] for s in scenes])  # scenes x cells
    model.image_prefix.to(memory_format=torch.channels_last)  # faster convolutions on CPU: normalize's layout

    def image_batch():
        # half captions, half questions, so both kinds of prompt are conditioned on the image
        picks = rng.sample(captions, args.batch_size // 2) + rng.sample(examples, args.batch_size // 2)
        index = torch.tensor([i for i, _ in picks])
        prefix = model.image_prefix(normalize(pixels[index]))
        text = lm_loss(model, prefix, *batch_text(tokenizer, [[t] for _, t in picks], eos))
        cells = cell_classes[index]
        return text + notation_loss(prefix, cells, prototypes) + pull_loss(prefix, cells, prototypes)

    image_loss = train(model, [{"params": image_params, "peak": 2e-3}, {"params": blocks, "peak": args.lm_rate}],
                       args.image_steps, image_batch, "image")
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(args.out / "tokenizer.json"))
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    torch.save({"module": state, "global_steps": args.text_steps + args.image_steps}, args.out / "mp_rank_00_model_states.pt")
    train_time = time.perf_counter() - t0

    from magma_ipu.demo.evaluation import evaluate_demo, evaluate_drawings  # checks on the saved files
    from magma_ipu.session import Magma

    saved = Magma.load("demo", checkpoint=str(args.out / "mp_rank_00_model_states.pt"),
                       tokenizer=str(args.out / "tokenizer.json"))
    metrics = {"in_distribution": evaluate_demo(scenes=200, seed=10_000_019, magma=saved),
               "held_out": evaluate_drawings(singles=200, pairs=100, magma=saved)}
    print(json.dumps({
        "seed": args.seed, "scenes": args.scenes, "text_steps": args.text_steps,
        "image_steps": args.image_steps, "batch_size": args.batch_size,
        "final_text_loss": round(text_loss, 4), "final_image_loss": round(image_loss, 4),
        "train_seconds": round(train_time), **metrics,
    }))


if __name__ == "__main__":
    main()
