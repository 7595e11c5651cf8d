"""What lies behind each generated token: the model's logits (so any sampling setting can be
replayed on them without running the model again) and where the token looked in the image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingSettings, next_token_probs


@dataclass
class TokenExplanation:
    token_id: int  # the token drawn
    logits: torch.Tensor  # V, float32 on the CPU; ids that can never be produced are -inf
    # layers x images x grid x grid: the new token's attention over each image's positions,
    # averaged over heads (rows of the grid are image rows, top first)
    image_attention: torch.Tensor | None

    def probs_model(self) -> torch.Tensor:
        """The model's own distribution (temperature 1, no filter)."""
        return self.logits.softmax(-1)

    def probs_final(self, settings: SamplingSettings) -> torch.Tensor:
        """The distribution the draw is made from under `settings` (after top-k, top-p, temperature)."""
        return next_token_probs(self.logits, settings)

    def candidates(self, settings: SamplingSettings, n: int = 10) -> list[dict]:
        """The n most likely tokens (and the drawn one, if it is not among them), with their
        probabilities before and after the filters and whether the filters keep them."""
        model, final = self.probs_model(), self.probs_final(settings)
        ids = torch.topk(model, min(n, model.numel())).indices.tolist()
        if self.token_id not in ids:
            ids.append(self.token_id)
        return [
            {"id": i, "p_model": model[i].item(), "p_final": final[i].item(), "kept": final[i].item() > 0,
             "drawn": i == self.token_id}
            for i in ids
        ]

    def attention_map(self, layers: list[int] | None = None, image: int = 0) -> torch.Tensor:
        """grid x grid attention over one image, averaged over the chosen layers (all by default)."""
        if self.image_attention is None:
            raise ValueError("this token saw no image")
        chosen = self.image_attention[:, image] if layers is None else self.image_attention[layers, image]
        return chosen.mean(0)
