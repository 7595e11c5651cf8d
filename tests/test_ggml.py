"""The GGML GPT-J writer: its block quantizers against GGML's definition written out here again, one
value at a time; the file read back by a reader of our own; and (when ctransformers is installed)
GGML's logits against transformers' GPT-J of the same weights."""

import importlib.util
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magma_ipu.benchmark.ggml import quantize_q4_0, quantize_q8_0, write_ggml_gptj
from magma_ipu.build import init_random
from magma_ipu.config import ModelConfig
from magma_ipu.errors import ConfigError, MagmaError
from magma_ipu.model import MagmaModel
from magma_ipu.text import Tokenizer

F32, Q4_0, Q8_0 = 0, 2, 8  # GGML's tensor type ids
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18}  # per 32 values: fp16 scale + codes


def fp16(x) -> bytes:
    return struct.pack("<e", x)


def q8_0_by_definition(block) -> bytes:
    """GGML's quantize_row_q8_0_reference for one block, value by value in float32."""
    x = [np.float32(v) for v in block]
    d = np.float32(max(abs(v) for v in x) / np.float32(127))
    inverse = np.float32(1) / d if d else np.float32(0)
    codes = []
    for v in x:
        s = float(v * inverse)
        codes.append(int(math.copysign(math.floor(abs(s) + 0.5), s)))  # C's roundf
    return fp16(d) + struct.pack("<32b", *codes)


def q4_0_by_definition(block) -> bytes:
    """GGML's quantize_row_q4_0_reference (quantization version 2) for one block."""
    x = [np.float32(v) for v in block]
    m = max(x, key=abs)  # the first of equal magnitudes, as the C loop's strict comparison
    d = np.float32(m / np.float32(-8))
    inverse = np.float32(1) / d if d else np.float32(0)
    codes = [min(15, int(np.float32(v * inverse) + np.float32(8.5))) for v in x]  # int(): C's cast truncates
    return fp16(d) + bytes(codes[j] | codes[j + 16] << 4 for j in range(16))


def test_q8_0_hand_block():
    # max |x| = 127 -> d = 1: the codes are the values rounded, halves away from zero
    x = [127, -3.5, 2.5, 0.49, -0.5, 1.5, -127, 0] + [10.2] * 24
    codes = [127, -4, 3, 0, -1, 2, -127, 0] + [10] * 24
    expected = bytes([0x00, 0x3C]) + bytes(c & 0xFF for c in codes)
    assert quantize_q8_0(np.array([x])) == expected
    assert quantize_q8_0(np.zeros((1, 32))) == bytes(34)  # d = 0, every code 0


def test_q4_0_hand_blocks():
    # m = -8 -> d = 1: code = min(15, floor(x + 8.5)); low nibbles hold x[0:16], high ones x[16:32]
    x = [-8, 7.9, 0, -0.5, -0.6, 2.49] + [1.0] * 10 + [3.0] * 16
    low = [0, 15, 8, 8, 7, 10] + [9] * 10
    assert quantize_q4_0(np.array([x])) == bytes([0x00, 0x3C]) + bytes(lo | 11 << 4 for lo in low)
    # m = +4 (before -4, equal magnitude): d = -0.5, code = min(15, floor(-2x + 8.5))
    y = [4, -4] + [0.0] * 30
    assert quantize_q4_0(np.array([y])) == bytes([0x00, 0xB8, 0x80 | 0x00, 0x80 | 0x0F]) + bytes([0x88] * 14)


def test_quantizers_match_the_definition_on_many_blocks():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 128)) * 0.02).astype(np.float32)
    w[1, 32:64] = 0  # an empty block
    w[2, :32] = rng.integers(-4, 5, 32) * 0.25  # ties of magnitude and exact halves
    w[3] *= 1e3
    blocks = w.reshape(-1, 32)
    assert quantize_q8_0(w) == b"".join(q8_0_by_definition(b) for b in blocks)
    assert quantize_q4_0(w) == b"".join(q4_0_by_definition(b) for b in blocks)


# --- the file ----------------------------------------------------------------------------------


def read_ggml(path: Path) -> tuple[list[int], list[bytes], dict]:
    """(hparams after the magic, token strings, {name: (type, dims innermost first, data bytes)})."""
    data, pos = path.read_bytes(), 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    magic, *hparams = take("<I7i")
    assert magic == 0x67676D6C
    (n_vocab,) = take("<i")
    words = []
    for _ in range(n_vocab):
        (length,) = take("<I")
        words.append(data[pos : pos + length])
        pos += length
    tensors = {}
    while pos < len(data):
        n_dims, name_length, kind = take("<3i")
        dims = take(f"<{n_dims}i")
        name = data[pos : pos + name_length].decode()
        pos += name_length
        count = math.prod(dims)
        size = 4 * count if kind == F32 else count // 32 * BLOCK_BYTES[kind]
        tensors[name] = (kind, dims, data[pos : pos + size])
        pos += size
    assert pos == len(data)
    return hparams, words, tensors


def dequantized(kind: int, dims, data: bytes) -> torch.Tensor:
    """A tensor record's values as float32, in torch's shape (dims outermost first)."""
    if kind == F32:
        values = np.frombuffer(data, "<f4")
    else:
        raw = np.frombuffer(data, np.uint8).reshape(-1, BLOCK_BYTES[kind])
        d = raw[:, :2].copy().view("<f2").astype(np.float32)  # n x 1
        if kind == Q8_0:
            codes = raw[:, 2:].view(np.int8).astype(np.float32)
        else:
            codes = np.concatenate([raw[:, 2:] & 0x0F, raw[:, 2:] >> 4], axis=1).astype(np.float32) - 8
        values = (d * codes).ravel()
    return torch.from_numpy(values.copy()).reshape(tuple(reversed(dims)))


def expected_records(model):
    """transformers' GPT-J state dict: every name GGML's loader knows, in that order, with our weights."""
    lm, cfg = model.lm, model.cfg
    wte = torch.zeros(cfg.lm_head_size, cfg.d_model)
    wte[: cfg.vocab_size] = lm.transformer.wte.weight
    out = {"transformer.wte.weight": wte}
    for i, block in enumerate(lm.transformer.h):
        attention, ff = block.attn["attention"], block.mlp[0]
        out |= {f"transformer.h.{i}.ln_1.weight": block.ln_1.weight, f"transformer.h.{i}.ln_1.bias": block.ln_1.bias,
                f"transformer.h.{i}.attn.q_proj.weight": attention.q_proj.weight,
                f"transformer.h.{i}.attn.k_proj.weight": attention.k_proj.weight,
                f"transformer.h.{i}.attn.v_proj.weight": attention.v_proj.weight,
                f"transformer.h.{i}.attn.out_proj.weight": attention.out_proj.weight,
                f"transformer.h.{i}.mlp.fc_in.weight": ff.c_fc.weight, f"transformer.h.{i}.mlp.fc_in.bias": ff.c_fc.bias,
                f"transformer.h.{i}.mlp.fc_out.weight": ff.c_proj.weight,
                f"transformer.h.{i}.mlp.fc_out.bias": ff.c_proj.bias}
    return out | {"transformer.ln_f.weight": lm.transformer.ln_f.weight, "transformer.ln_f.bias": lm.transformer.ln_f.bias,
                  "lm_head.weight": lm.lm_head.weight, "lm_head.bias": lm.lm_head.bias}


def random_model(**sizes) -> MagmaModel:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"n_layer": 2, "d_model": 128, "n_head": 4, "rotary_dim": 16, "d_ff": 512, "vocab_size": 384,
                         "lm_head_size": 448, "image_layers": (1, 1, 1, 1), "image_width": 8,
                         "image_resolution": 64, **sizes})
    model = MagmaModel(cfg)
    init_random(model)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if p.dim() == 1:  # biases and norms off their defaults, so a swapped or missing one shows
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):  # sharp attention, so positions matter
                p.mul_(10)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_sized():
    """One block, bench_cpu's vocabulary: 50258 GPT-2 ids (with <|image|>), a head of 50400."""
    return random_model(n_layer=1, d_model=64, n_head=2, d_ff=256, vocab_size=50258, lm_head_size=50400)


@pytest.mark.parametrize("ftype, kind, ftype_field", [("f32", F32, 0), ("q8_0", Q8_0, 2007), ("q4_0", Q4_0, 2002)])
def test_file_layout(gpt2_sized, tmp_path, ftype, kind, ftype_field):
    model, cfg = gpt2_sized, gpt2_sized.cfg
    hparams, _, tensors = read_ggml(write_ggml_gptj(model.lm, tmp_path / "m.bin", ftype, n_ctx=512))
    assert hparams == [50400, 512, cfg.d_model, cfg.n_head, cfg.n_layer, cfg.rotary_dim, ftype_field]
    expected = expected_records(model)
    assert list(tensors) == list(expected)
    for name, (record_kind, dims, data) in tensors.items():
        weight = expected[name].detach()
        assert dims == tuple(reversed(weight.shape)), name
        assert record_kind == (kind if weight.dim() == 2 else F32), name
        values = dequantized(record_kind, dims, data)
        if record_kind == F32:
            assert torch.equal(values, weight), name
        else:  # within a code step of each block's largest value
            step = weight.reshape(-1, 32).abs().amax(1, keepdim=True) / (127 if kind == Q8_0 else 7)
            assert ((values - weight).reshape(-1, 32).abs() <= step).all(), name


def test_vocabulary_is_gpt2_bytes_then_fillers(gpt2_sized, tmp_path):
    _, words, _ = read_ggml(write_ggml_gptj(gpt2_sized.lm, tmp_path / "m.bin", "q8_0"))
    tokenizer = Tokenizer.load("gpt2")
    text = "héllo wörld € ✓ 日本語 🙂 naïve"
    assert b"".join(words[i] for i in tokenizer.encode(text)) == text.encode()  # byte-level BPE undone
    assert (words[220], words[50256], words[50257]) == (b" ", b"<|endoftext|>", b"<|image|>")
    fillers = words[50258:]
    assert len(fillers) == 142 and len(set(fillers)) == 142 and not set(fillers) & set(words[:50258])


def test_errors_a_user_can_hit(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="d_ff"):
        write_ggml_gptj(random_model(d_ff=256).lm, tmp_path / "m.bin")
    with pytest.raises(ConfigError, match="q4_0"):
        write_ggml_gptj(random_model().lm, tmp_path / "m.bin", "q5_1")
    with pytest.raises(MagmaError, match="cannot write"):
        write_ggml_gptj(random_model().lm, tmp_path / "missing" / "m.bin")
    from magma_ipu.benchmark.ggml import load_ggml

    monkeypatch.setitem(sys.modules, "ctransformers", None)  # as if not installed
    with pytest.raises(MagmaError, match="pip install ctransformers"):
        load_ggml(tmp_path / "m.bin")


# --- GGML's engine (the optional benchmark extra) ----------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("ctransformers") is None, reason="needs ctransformers (benchmark extra)")
@pytest.mark.parametrize("ftype", ["f32", "q8_0", "q4_0"])
def test_ggml_logits_match_transformers(tmp_path, ftype):
    pytest.importorskip("transformers")
    from magma_ipu.benchmark.ggml import check_ggml_against_transformers, ggml_logits, load_ggml
    from magma_ipu.benchmark.reference import transformers_gptj

    model = random_model()
    path = write_ggml_gptj(model.lm, tmp_path / "m.bin", ftype, n_ctx=64)
    llm = load_ggml(path)
    hf = transformers_gptj(model, adapters=False)
    prompt = [5, 17, 300, 2, 99, 383, 40, 41]
    check = check_ggml_against_transformers(llm, hf, prompt, new_tokens=16, threads=2)
    if ftype == "f32":  # GGML keeps keys, values and GELU's input in fp16: ~1e-3 of the scale
        assert check["max_abs_logit_diff"] < 2e-3 * check["logit_scale"], check
        assert check["argmax_agreement"] == 1.0, check
    # against the weights the file holds (dequantized), the same closeness: the codes are where GGML reads them
    with torch.no_grad():
        _, _, tensors = read_ggml(path)
        loaded = hf.load_state_dict({name: dequantized(*record) for name, record in tensors.items()}, strict=False)
        assert not loaded.unexpected_keys and not loaded.missing_keys
        sequence = prompt + [7, 8, 9, 10]
        ours = ggml_logits(llm, prompt, sequence[len(prompt):], threads=2)
        theirs = hf(torch.tensor([sequence])).logits[0, len(prompt) - 1 :]
    # Q8_0 and Q4_0 weights meet Q8_0 activations (one code step: 1/127 of a block's largest value)
    tolerance = 2e-3 if ftype == "f32" else 2e-2
    assert (ours - theirs).abs().max() < tolerance * theirs.abs().max(), (ours - theirs).abs().max()
