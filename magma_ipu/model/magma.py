"""MAGMA: image prefix + GPT-J. Images become embeddings placed before (or between) text."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .gptj import GPTJ
from .image_prefix import ImagePrefix


class MagmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.lm = GPTJ(cfg)
        self.image_prefix = ImagePrefix(cfg)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        # images: b x 3 x R x R (normalized)  ->  b x (R/32)^2 x D, in the language model's dtype.
        # The prefix may run in a dtype of its own (float32 on a CPU, see build.py).
        prefix_dtype = self.image_prefix.proj.weight.dtype
        return self.image_prefix(images.to(prefix_dtype)).to(self.lm.transformer.wte.weight.dtype)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.transformer.wte(ids)

    def forward(self, embeds, slots, positions, key_valid, weights_out: list | None = None) -> torch.Tensor:
        return self.lm(embeds, slots, positions, key_valid, weights_out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the tokenizer's ids only: head rows >= vocab_size have no token."""
        return self.lm.lm_head(hidden)[..., : self.cfg.vocab_size].float()
