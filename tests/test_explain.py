"""Per-token explanations: probabilities before/after the filters, and image attention maps."""

import numpy as np
import torch
from PIL import Image

from magma_ipu.sampling import SamplingSettings

SETTINGS = dict(seed=3, temperature=1.3, top_p=0.6, top_k=40, max_out_tokens=8)


def picture():
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8))


def test_probabilities_and_the_drawn_token(tiny_magma):
    result = tiny_magma.generate("A picture of", image=picture(), explain=True, **SETTINGS)
    settings = SamplingSettings(**SETTINGS)
    assert len(result.explanations) >= len(result.token_ids) >= 1
    for step in result.explanations:
        model, final = step.probs_model(), step.probs_final(settings)
        assert abs(model.sum().item() - 1) < 1e-5 and abs(final.sum().item() - 1) < 1e-5
        kept = set((final > 0).nonzero().flatten().tolist())
        assert step.token_id in kept
        # the kept set is the smallest nucleus of the top-k tokens, by the model's own probabilities
        topk = set(torch.topk(step.logits, 40).indices.tolist())
        renorm = torch.zeros_like(model)
        renorm[list(topk)] = model[list(topk)]
        renorm /= renorm.sum()
        order = renorm.argsort(descending=True).tolist()
        mass, nucleus = 0.0, set()
        for i in order:
            if mass >= 0.6:
                break
            nucleus.add(i)
            mass += renorm[i].item()
        assert kept == nucleus
        rows = step.candidates(settings, n=5)
        assert sum(r["drawn"] for r in rows) == 1 and all(r["kept"] == (r["p_final"] > 0) for r in rows)
    assert [e.token_id for e in result.explanations][: len(result.token_ids)] == result.token_ids


def test_explaining_does_not_change_the_tokens(tiny_magma):
    plain = tiny_magma.generate("A picture of", image=picture(), **SETTINGS)
    explained = tiny_magma.generate("A picture of", image=picture(), explain=True, **SETTINGS)
    assert plain.token_ids == explained.token_ids and plain.explanations is None


def rotate_pairs(x, cos, sin):
    """GPT-J's rotary written out: dims (2i, 2i+1) of the first rotary_dim turn by angle i."""
    out = x.clone()
    rot = cos.shape[-1] * 2
    even, odd = x[..., 0:rot:2], x[..., 1:rot:2]
    out[..., 0:rot:2] = even * cos - odd * sin
    out[..., 1:rot:2] = odd * cos + even * sin
    return out


@torch.inference_mode()
def reference_image_attention(magma, request, grid):
    """Each layer's attention of the last position over the image positions, computed plainly
    (eager softmax(q k^T / sqrt(d)), heads averaged) from a full pass without a cache."""
    model = magma.model
    (sequence,) = magma.engine.embed([request])
    t = len(sequence)
    inputs = {}
    hooks = [blk.ln_1.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, out))
             for i, blk in enumerate(model.lm.transformer.h)]
    slots = torch.arange(t)
    model.lm.clear_caches()  # a plain pass over the whole sequence
    model(sequence[None], slots, slots[None], torch.ones(1, t, dtype=torch.bool))
    for h in hooks:
        h.remove()
    cfg = model.cfg
    inv = 1.0 / 10000 ** (torch.arange(0, cfg.rotary_dim, 2).float() / cfg.rotary_dim)
    angles = slots[None, :, None].float() * inv
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    maps = []
    for i, blk in enumerate(model.lm.transformer.h):
        att = blk.attn["attention"]
        h = inputs[i]
        q = rotate_pairs(att.q_proj(h).view(1, t, cfg.n_head, -1), cos, sin)[0, -1]  # H x hd
        k = rotate_pairs(att.k_proj(h).view(1, t, cfg.n_head, -1), cos, sin)[0]  # T x H x hd
        weights = torch.einsum("hd,thd->ht", q, k).div(cfg.head_dim**0.5).softmax(-1).mean(0)  # T
        cells = torch.empty(grid, grid)
        for r in range(grid):
            for c in range(grid):
                cells[r, c] = weights[r * grid + c]  # the image comes first: token r*g+c is cell (r, c)
        maps.append(cells)
    return torch.stack(maps)


def test_attention_maps_equal_a_plain_reference(tiny_magma):
    result = tiny_magma.generate("A picture of", image=picture(), explain=True, temperature=0, max_out_tokens=4)
    grid = tiny_magma.config.model.image_grid
    ids = tiny_magma.tokenizer.encode("A picture of")
    for step, explanation in enumerate(result.explanations):
        request = [tiny_magma.image_tensor(picture()), ids + result.token_ids[:step]]
        expected = reference_image_attention(tiny_magma, request, grid)
        got = explanation.image_attention[:, 0]
        assert got.shape == (tiny_magma.config.model.n_layer, grid, grid)
        assert (got - expected).abs().max().item() < 1e-5
        assert torch.allclose(explanation.attention_map(), expected.mean(0), atol=1e-5)
