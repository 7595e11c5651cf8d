"""GPT-J with MAGMA's MLP adapters and a static key/value cache.

Block (parallel, one LayerNorm):  h = ln_1(x);  x' = x + attn(h) + adapter(mlp(h))
Attention and MLP read the same h, so their input matrices (q, k, v, c_fc) can be fused into one
after loading (Block.fuse_input_projections): one matrix-vector product per block instead of four.
Attention: no biases, interleaved ("rotate every two") rotary on the first rotary_dim dims of
each head, softmax(q k^T / sqrt(head_dim)) under a causal mask.
The module tree is the checkpoint's key tree: lm.transformer.h.N.attn.attention.q_proj, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class KVCache(nn.Module):
    """Preallocated keys and values, written in place at the given slots."""

    def __init__(self, batch: int, n_head: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # slots: T;  k, v: B x H x T x hd  ->  the whole cache, B x H x S x hd
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    # x: B x T x H x hd;  rotation: B x T x 1 x rotary_dim/2, complex64 (cos + i sin of each angle).
    # Pairs (2i, 2i+1) of the first rotary_dim dims rotate together: as complex numbers, one product.
    rot = rotation.shape[-1] * 2
    pairs = torch.view_as_complex(x[..., :rot].float().unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
    return rotated if rot == x.shape[-1] else torch.cat((rotated, x[..., rot:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, q, k, v, rotation, slots, mask, weights_out: list | None = None):
        # q, k, v: B x T x H*hd projections (see Block.projections);  mask: B x 1 x T x S, added to
        # the scores (0 = may attend, -inf = may not);  weights_out: see GPTJ.forward
        b, t, _ = q.shape
        q = apply_rotary(q.view(b, t, self.n_head, self.head_dim), rotation)
        k = apply_rotary(k.view(b, t, self.n_head, self.head_dim), rotation)
        v = v.view(b, t, self.n_head, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # B x H x T x hd
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(slots, k, v)
            live = mask.shape[-1]  # attend over the slots the mask covers, not the whole cache
            k, v = k[:, :, :live], v[:, :, :live]  # B x H x S x hd
        if weights_out is not None:  # the same attention, written out so its weights can be kept
            scores = (q @ k.transpose(-2, -1)) / self.head_dim**0.5
            weights = (scores + mask).softmax(dim=-1)
            weights_out.append(weights[:, :, -1].float())
            y = weights @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, pre):
        # pre: c_fc's output, computed by Block.projections (possibly fused with q, k, v)
        return self.c_proj(F.gelu(pre, approximate="tanh"))


class Adapter(nn.Module):
    """MAGMA's bottleneck adapter on the MLP output: m + W2 relu(W1 m + b1) + b2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.d_model // cfg.adapter_downsample
        self.adapter = nn.Sequential(
            nn.Linear(cfg.d_model, hidden), nn.ReLU(), nn.Linear(hidden, cfg.d_model)
        )

    def forward(self, x):
        return x + self.adapter(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        # the checkpoint nests attention one level down: attn.attention.q_proj
        self.attn = nn.ModuleDict({"attention": Attention(cfg)})
        self.mlp = nn.Sequential(FeedForward(cfg), Adapter(cfg))
        self.fused_in: nn.Linear | None = None
        self.fused_sizes: list[int] = []

    def projections(self, h):
        """q, k, v (B x T x H*hd each) and the MLP's pre-activation (B x T x d_ff) of ln_1's output."""
        if self.fused_in is not None:
            return self.fused_in(h).split(self.fused_sizes, dim=-1)
        attention = self.attn["attention"]
        return attention.q_proj(h), attention.k_proj(h), attention.v_proj(h), self.mlp[0].c_fc(h)

    @torch.no_grad()
    def fuse_input_projections(self) -> None:
        """Replace q_proj, k_proj, v_proj and c_fc by one linear layer holding all four (same
        arithmetic). A decode step then reads them in one call, and int8 quantizes h once."""
        attention, ff = self.attn["attention"], self.mlp[0]
        parts = [attention.q_proj, attention.k_proj, attention.v_proj, ff.c_fc]
        self.fused_sizes = [p.weight.shape[0] for p in parts]  # not out_features: a shard has fewer rows
        weight = torch.cat([p.weight for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.zero_()[-self.fused_sizes[-1] :].copy_(ff.c_fc.bias)
        self.fused_in = fused
        del attention.q_proj, attention.k_proj, attention.v_proj, ff.c_fc

    def forward(self, x, rotation, slots, mask, weights_out: list | None = None):
        h = self.ln_1(x)
        q, k, v, pre = self.projections(h)
        return x + self.attn["attention"](q, k, v, rotation, slots, mask, weights_out) + self.mlp(pre)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5)


class GPTJ(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.lm_head_size)
        # per-slot tables, built for the cache (or the longest input without one), not at each step
        self.register_buffer("rotation", torch.empty(0, 0, dtype=torch.complex64), persistent=False)
        for name in ("causal", "own"):
            self.register_buffer(name, torch.empty(0, 0, dtype=torch.bool), persistent=False)

    def _ensure_tables(self, length: int, device) -> None:
        """The rotary rotation of positions 0..length-1 (length x rotary_dim/2: cos + i sin of each
        angle, float32 whatever the model's dtype) and the slot masks (length x length: key slot <=
        query slot; key slot == query slot)."""
        # the dtype too: Module.to(a real dtype) casts complex buffers, dropping the rotation's sine
        table = self.rotation
        if table.shape[0] >= length and table.device == device and table.dtype == torch.complex64:
            return
        rot = self.cfg.rotary_dim
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2, device=device).float() / rot)
        angles = torch.arange(length, device=device).float()[:, None] * inv_freq
        self.rotation = torch.polar(torch.ones_like(angles), angles)
        slots = torch.arange(length, device=device)
        self.causal = slots[None, :] <= slots[:, None]
        self.own = slots[None, :] == slots[:, None]

    def setup_caches(self, batch: int, length: int) -> None:
        """Allocate a static cache of `length` slots per row; the forward then writes into it."""
        w = self.transformer.wte.weight
        for block in self.transformer.h:
            attention = block.attn["attention"]  # its own head count: fewer under tensor parallelism
            attention.kv_cache = KVCache(batch, attention.n_head, length, attention.head_dim, w.dtype, w.device)
        self._ensure_tables(length, w.device)

    def clear_caches(self) -> None:
        for block in self.transformer.h:
            block.attn["attention"].kv_cache = None

    @property
    def cache_size(self) -> tuple[int, int]:
        """(batch, length) of the key/value cache; (0, 0) when there is none."""
        cache = self.transformer.h[0].attn["attention"].kv_cache
        return (0, 0) if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def forward(self, embeds, slots, positions, key_valid, weights_out: list | None = None):
        """Hidden states after ln_f.

        embeds: B x T x D input embeddings (image prefix and/or token embeddings);
        slots: T, the sequence slots these inputs occupy (the cache slots when a cache is set);
        positions: B x T rotary positions (slot minus the row's left padding);
        key_valid: B x S, which slots hold real inputs (S: the first S slots of the cache, or T
        without a cache; keys beyond S are not read);
        weights_out: a list, or None. Given a list, each layer appends its attention weights of the
        last query (B x H x S, float32, layers in order), computed by an explicit softmax instead of
        the fused kernel: what "why this token?" shows.
        """
        self._ensure_tables(self.cache_size[1] or embeds.shape[1], embeds.device)
        s = key_valid.shape[1]
        rotation = self.rotation[positions][:, :, None, :]  # B x T x 1 x rotary_dim/2
        # a padding query attends to itself only, so its row stays finite
        allowed = (self.causal[slots, :s][None] & key_valid[:, None, :]) | self.own[slots, :s][None]  # B x T x S
        # as an additive mask, once for all layers (a boolean one is converted by every attention call)
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill_(~allowed, float("-inf"))[:, None]  # B x 1 x T x S
        x = embeds
        for block in self.transformer.h:
            x = block(x, rotation, slots, mask, weights_out)
        return self.transformer.ln_f(x)
