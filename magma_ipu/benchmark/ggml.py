"""Our GPT-J's weights as a GGML GPT-J file, and GGML's GPT-J engine (ctransformers) running it: the
benchmark's peer, on the same weights. GGML's GPT-J has no adapters, so the file holds the plain GPT-J
of those weights (reference.transformers_gptj(model, adapters=False) is the same model in transformers).

The file, as ctransformers 0.2.27 reads it (its gptj.cc and bundled ggml.h); integers are int32,
little-endian:
  magic 0x67676d6c ("ggml" read as a uint32)
  n_vocab, n_ctx, n_embd, n_head, n_layer, n_rot, ftype   ftype 0 (f32), 7 (Q8_0) or 2 (Q4_0); a
      quantized file adds 1000 x the quantization version (GGML_QNT_VERSION, 2 there)
  n_vocab again, then per token: uint32 length, its bytes
  tensor records to the end: n_dims, name length, type (0 f32, 8 Q8_0, 2 Q4_0), dims innermost first,
      name, data. The 2-D weights are of the file's type, the 1-D ones (norms, biases) f32.
GGML's GPT-J fixes the MLP width at 4 x n_embd and sizes wte like lm_head (n_vocab rows).
Quantized rows are blocks of 32 consecutive values, each block an fp16 scale d then codes:
  Q8_0: d = max|x| / 127; 32 int8 round(x / d), halves away from zero
  Q4_0: d = m / -8, m the value of largest |x| (the first on ties); 16 bytes, byte j holding
        min(15, floor(x_j / d + 8.5)) in its low nibble and the same of x_{j+16} in its high one
(x / d is computed as x times the float32 inverse of the float32 d, before d is rounded to fp16.)
"""

from __future__ import annotations

import struct
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, MagmaError
from ..model.gptj import GPTJ
from ..text import Tokenizer, byte_to_unicode

FILE_MAGIC = 0x67676D6C
QNT_VERSION = 2
BLOCK = 32
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", BLOCK)])  # 34 bytes
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", BLOCK // 2)])  # 18 bytes


def _blocks(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w, dtype=np.float32).reshape(-1, BLOCK)  # rows x cols -> (rows*cols/32) x 32


def _inverse(d: np.ndarray) -> np.ndarray:
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)  # an all-zero block codes 0s


def _f32_bytes(w: np.ndarray) -> bytes:
    return np.ascontiguousarray(w, dtype="<f4").tobytes()


def quantize_q8_0(w: np.ndarray) -> bytes:
    """GGML's Q8_0 blocks of a float matrix whose rows are a multiple of 32 long."""
    x = _blocks(w)
    d = np.abs(x).max(axis=1) / np.float32(127)
    scaled = x * _inverse(d)[:, None]
    whole = np.trunc(scaled)
    codes = whole + np.sign(scaled) * (np.abs(scaled - whole) >= 0.5)  # C's roundf, not numpy's half-to-even
    blocks = np.empty(len(x), dtype=Q8_0_BLOCK)
    blocks["d"], blocks["qs"] = d, codes
    return blocks.tobytes()


def quantize_q4_0(w: np.ndarray) -> bytes:
    """GGML's Q4_0 blocks (quantization version 2) of a float matrix whose rows are a multiple of 32 long."""
    x = _blocks(w)
    m = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]  # signed, so the code 0 is exactly m
    d = m / np.float32(-8)
    codes = np.minimum(15, np.trunc(x * _inverse(d)[:, None] + np.float32(8.5))).astype(np.uint8)  # 0..15
    blocks = np.empty(len(x), dtype=Q4_0_BLOCK)
    blocks["d"], blocks["qs"] = d, codes[:, : BLOCK // 2] | (codes[:, BLOCK // 2 :] << 4)
    return blocks.tobytes()


# ftype -> (hparams ftype, tensor type of the 2-D weights, their encoding)
FTYPES = {
    "f32": (0, 0, _f32_bytes),
    "q8_0": (7, 8, quantize_q8_0),
    "q4_0": (2, 2, quantize_q4_0),
}


def ggml_vocabulary(tokenizer: Tokenizer, n_vocab: int) -> list[bytes]:
    """n_vocab token strings: the tokenizer's as the bytes they stand for, then a filler name for
    each id only the head has (its ids past n_vocab, if any, are dropped)."""
    decoder = {shown: byte for byte, shown in byte_to_unicode().items()}  # stand-in character -> byte
    words = []
    for i in range(n_vocab):
        token = tokenizer.backend.id_to_token(i) if i < len(tokenizer) else None
        if token is None:
            words.append(f"<|unused_{i}|>".encode())
        elif all(c in decoder for c in token):
            words.append(bytes(decoder[c] for c in token))
        else:  # an added token written in other characters
            words.append(token.encode())
    return words


def _linear_weight(layer: nn.Module) -> torch.Tensor:
    if type(layer) is not nn.Linear:
        raise MagmaError("write the GGML file from the plain float model, before convert_linears packs or "
                         "quantizes its linear layers")
    return layer.weight


def _ggml_tensors(lm: GPTJ):
    """(name GGML's loader looks up, tensor), in transformers' GPT-J order. Adapters are left out."""
    cfg = lm.cfg
    wte = lm.transformer.wte.weight.new_zeros(cfg.lm_head_size, cfg.d_model)
    wte[: cfg.vocab_size] = lm.transformer.wte.weight  # zero rows for the ids only the head has
    yield "transformer.wte.weight", wte
    for i, block in enumerate(lm.transformer.h):
        if block.fused_in is not None:
            raise MagmaError("write the GGML file before the blocks' input projections are fused")
        attention, ff, at = block.attn["attention"], block.mlp[0], f"transformer.h.{i}."
        yield at + "ln_1.weight", block.ln_1.weight
        yield at + "ln_1.bias", block.ln_1.bias
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield at + f"attn.{name}.weight", _linear_weight(getattr(attention, name))
        yield at + "mlp.fc_in.weight", _linear_weight(ff.c_fc)
        yield at + "mlp.fc_in.bias", ff.c_fc.bias
        yield at + "mlp.fc_out.weight", _linear_weight(ff.c_proj)
        yield at + "mlp.fc_out.bias", ff.c_proj.bias
    yield "transformer.ln_f.weight", lm.transformer.ln_f.weight
    yield "transformer.ln_f.bias", lm.transformer.ln_f.bias
    yield "lm_head.weight", _linear_weight(lm.lm_head)
    yield "lm_head.bias", lm.lm_head.bias


@torch.no_grad()
def write_ggml_gptj(lm: GPTJ, path: str | Path, ftype: str = "f32", tokenizer: Tokenizer | None = None,
                    n_ctx: int = 2048) -> Path:
    """Write `lm`'s GPT-J weights (no adapters) as a GGML GPT-J file of `ftype` ("f32", "q8_0",
    "q4_0"), n_vocab = lm_head_size; the vocabulary is `tokenizer`'s (default GPT-2's). n_ctx is
    the context ctransformers allocates its key/value cache for."""
    if ftype not in FTYPES:
        raise ConfigError(f"ftype must be one of {', '.join(FTYPES)}, got {ftype!r}")
    cfg = lm.cfg
    if cfg.d_ff != 4 * cfg.d_model:
        raise ConfigError(f"GGML's GPT-J fixes d_ff at 4 x d_model: d_ff is {cfg.d_ff}, d_model {cfg.d_model}")
    if n_ctx < 1:
        raise ConfigError(f"n_ctx must be at least 1, got {n_ctx}")
    if ftype != "f32" and cfg.d_model % BLOCK:
        raise ConfigError(f"{ftype} needs d_model to be a multiple of {BLOCK}, got {cfg.d_model}")
    file_ftype, weight_type, encode = FTYPES[ftype]
    if ftype != "f32":
        file_ftype += QNT_VERSION * 1000
    words = ggml_vocabulary(tokenizer or Tokenizer.load("gpt2"), cfg.lm_head_size)
    tensors = list(_ggml_tensors(lm))  # refuses fused or packed layers before the file exists
    path = Path(path)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<I7i", FILE_MAGIC, cfg.lm_head_size, n_ctx, cfg.d_model, cfg.n_head,
                                cfg.n_layer, cfg.rotary_dim, file_ftype))
            f.write(struct.pack("<i", len(words)))
            f.writelines(struct.pack("<I", len(word)) + word for word in words)
            for name, tensor in tensors:
                w = tensor.detach().float().cpu().numpy()
                kind, data = (weight_type, encode(w)) if w.ndim == 2 else (0, _f32_bytes(w))
                encoded = name.encode()
                f.write(struct.pack(f"<3i{w.ndim}i", w.ndim, len(encoded), kind, *reversed(w.shape)))
                f.write(encoded + data)
    except OSError as e:
        raise MagmaError(f"cannot write the GGML file {str(path)!r}: {e.strerror or e}") from None
    return path


def load_ggml(path: str | Path):
    """ctransformers' GGML GPT-J (an `LLM`) of the file at `path`."""
    try:
        from ctransformers import LLM
    except ImportError:
        raise MagmaError("comparing with GGML needs ctransformers: pip install ctransformers") from None
    try:
        llm = LLM(str(path), model_type="gptj")
    except (ValueError, RuntimeError) as e:
        raise MagmaError(f"ctransformers could not load {str(path)!r} ({e}; its loader says why on stderr)") from None
    # Its first evaluation sizes the scratch memory of later ones; a long first prompt would overrun
    # the initial 256 MB and abort the process, so a short one goes first.
    llm.eval([0, 0, 0, 0], threads=1)
    _restart(llm)
    return llm


def _restart(llm) -> None:
    with warnings.catch_warnings():  # reset() is deprecated in favour of generate(), which samples
        warnings.simplefilter("ignore")
        llm.reset()


def _last_logits(llm) -> np.ndarray:
    """The logits after the last evaluated token (n_vocab,), copied out of ctransformers' buffer."""
    size = llm.ctransformers_llm_logits_size()
    return np.ctypeslib.as_array(llm.ctransformers_llm_logits_data(), shape=(size,)).copy()


def _check_length(llm, n: int) -> None:
    if n > llm.context_length:  # ctransformers would only warn, then write over its cache
        raise MagmaError(f"{n} tokens do not fit GGML's context of {llm.context_length} (write_ggml_gptj's n_ctx)")


def ggml_logits(llm, prompt: list[int], continuation: list[int], threads: int = 1) -> torch.Tensor:
    """Logits after `prompt` (evaluated at once) and after each token of `continuation` (one at a
    time, through the key/value cache): (1 + len(continuation)) x n_vocab, float32."""
    _check_length(llm, len(prompt) + len(continuation))
    _restart(llm)
    llm.eval(prompt, batch_size=len(prompt), threads=threads)
    rows = [_last_logits(llm)]
    for token in continuation:
        llm.eval([token], threads=threads)
        rows.append(_last_logits(llm))
    return torch.from_numpy(np.stack(rows))


def time_ggml_decode(llm, prompt: list[int], new_tokens: int, threads: int) -> tuple[float, float]:
    """(time to first token s, decode s per token) of greedy decoding at batch 1: the prompt in one
    evaluation, then `new_tokens` steps of one token each. Call once untimed first to warm up."""
    _check_length(llm, len(prompt) + new_tokens)
    _restart(llm)
    start = time.perf_counter()
    llm.eval(prompt, batch_size=len(prompt), threads=threads)
    token = int(_last_logits(llm).argmax())
    first = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token], threads=threads)
        token = int(_last_logits(llm).argmax())
    return first - start, (time.perf_counter() - first) / new_tokens


@torch.no_grad()
def check_ggml_against_transformers(llm, hf, prompt: list[int], new_tokens: int = 32, threads: int = 1) -> dict:
    """GGML's logits against transformers' GPT-J `hf` of the same weights without adapters
    (reference.transformers_gptj(model, adapters=False)), along hf's greedy continuation of `prompt`.
    Both read the same tokens (teacher forcing), so one disagreement does not derail the rest.

    Returns max_abs_logit_diff (f32: a few 1e-4 of logit_scale, as GGML keeps its key/value cache
    and GELU's input in fp16), argmax_agreement (the fraction of the `new_tokens` greedy choices
    GGML makes too), logit_scale and the reference's median top-2 gap (near-ties flip first)."""
    device = hf.lm_head.weight.device
    out = hf(torch.tensor([prompt], device=device), use_cache=True)
    greedy = [int(out.logits[0, -1].argmax())]
    while len(greedy) < new_tokens:
        out = hf(torch.tensor([greedy[-1:]], device=device), past_key_values=out.past_key_values, use_cache=True)
        greedy.append(int(out.logits[0, -1].argmax()))
    sequence = torch.tensor([prompt + greedy[:-1]], device=device)
    ref = hf(sequence).logits[0, len(prompt) - 1 :].float().cpu()  # new_tokens x n_vocab
    ggml = ggml_logits(llm, prompt, greedy[:-1], threads)
    top2 = ref.topk(2, dim=-1).values
    return {
        "max_abs_logit_diff": (ggml - ref).abs().max().item(),
        "argmax_agreement": (ggml.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "logit_scale": ref.abs().max().item(),
        "median_top2_gap": (top2[:, 0] - top2[:, 1]).median().item(),
    }
