"""The image prefix: trunk features -> one language-model embedding per grid cell."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .image_encoder import ModifiedResNet


class ImagePrefix(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enc = ModifiedResNet(cfg.image_layers, cfg.image_width)
        self.proj = nn.Linear(cfg.image_features, cfg.d_model)
        self.dropout = nn.Dropout(0.1)  # training only; identity in eval
        self.ln = nn.LayerNorm(cfg.d_model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: b x 3 x R x R  ->  b x (R/32)^2 x d_model
        features = self.enc(images)  # b x C x g x g
        tokens = features.flatten(2).transpose(1, 2)  # b x g*g x C, token = row * g + col
        return self.ln(self.dropout(self.proj(tokens)))
