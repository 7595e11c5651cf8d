"""transformers' GPTJForCausalLM carrying our weights and MAGMA's adapters: the independent
reference that the parity tests and the benchmark compare against. Needs `transformers`."""

from __future__ import annotations

import torch
from torch import nn

from ..model import MagmaModel


class MlpWithAdapter(nn.Module):
    """transformers' GPT-J MLP followed by MAGMA's adapter: m + adapter(m)."""

    def __init__(self, mlp: nn.Module, adapter: nn.Module):
        super().__init__()
        self.mlp, self.adapter = mlp, adapter

    def forward(self, h):
        m = self.mlp(h)
        return m + self.adapter(m)


@torch.no_grad()
def transformers_gptj(model: MagmaModel, adapters: bool = True):
    """A GPTJForCausalLM with `model.lm`'s weights (copied) and adapters (shared modules); with
    `adapters` false, the plain GPT-J of the same weights (what GGML's GPT-J runs).

    transformers sizes the embedding and the head alike, so the embedding is padded with zero rows
    up to the head's size; ids beyond vocab_size are never fed."""
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = model.cfg
    hf_cfg = GPTJConfig(
        vocab_size=cfg.lm_head_size, n_positions=4096, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, rotary_dim=cfg.rotary_dim, n_inner=cfg.d_ff, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf_cfg._attn_implementation = "eager"
    ours = model.lm
    dtype, device = ours.transformer.wte.weight.dtype, ours.transformer.wte.weight.device
    hf = GPTJForCausalLM(hf_cfg).to(dtype=dtype, device=device).eval()
    hf.transformer.wte.weight.zero_()
    hf.transformer.wte.weight[: cfg.vocab_size] = ours.transformer.wte.weight
    for theirs, block in zip(hf.transformer.h, ours.transformer.h):
        theirs.ln_1.load_state_dict(block.ln_1.state_dict())
        attention = block.attn["attention"]
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(theirs.attn, name).weight.copy_(getattr(attention, name).weight)
        theirs.mlp.fc_in.load_state_dict(block.mlp[0].c_fc.state_dict())
        theirs.mlp.fc_out.load_state_dict(block.mlp[0].c_proj.state_dict())
        if adapters:
            theirs.mlp = MlpWithAdapter(theirs.mlp, block.mlp[1].adapter)
    hf.transformer.ln_f.load_state_dict(ours.transformer.ln_f.state_dict())
    hf.lm_head.load_state_dict(ours.lm_head.state_dict())
    return hf
