"""Checkpoint formats, strictness and safety."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from magma_ipu import CheckpointError
from magma_ipu.model import MagmaModel
from magma_ipu.weights import load_checkpoint


def deepspeed_layout(model: MagmaModel) -> dict:
    """What MAGMA's DeepSpeed file holds: the state dict under "module" (fp16), the attention
    buffers, the alias keys sharing storage, and training state beside it."""
    module = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    cfg = model.cfg
    for n in range(cfg.n_layer):
        p = f"lm.transformer.h.{n}.attn.attention."
        module[p + "bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
        module[p + "masked_bias"] = torch.tensor(-1e9)
        module[p + "scale_attn"] = torch.tensor(float(cfg.head_dim) ** 0.5)
        for k, v in list(module.items()):
            if k.startswith(f"lm.transformer.h.{n}."):
                module[k.replace("lm.transformer.h.", "transformer.", 1)] = v
    module["word_embedding.weight"] = module["lm.transformer.wte.weight"]
    return {"module": module, "optimizer": None, "global_steps": 10, "dp_world_size": 1,
            "buffer_names": ["x"], "skipped": {1, 2}}


def test_deepspeed_file_with_buffers_and_aliases_loads_exactly(tiny_magma, tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(deepspeed_layout(tiny_magma.model), path)
    with torch.device("meta"):
        fresh = MagmaModel(tiny_magma.config.model)
    load_checkpoint(fresh, path, torch.float32, "cpu")
    for key, value in tiny_magma.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value.half().to(value.dtype)), key
    assert not any(t.is_meta for t in fresh.state_dict().values())


def test_safetensors_and_bare_state_dict_load(tiny_magma, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_magma.model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "bare.pt")
    for name in ("model.safetensors", "bare.pt"):
        with torch.device("meta"):
            fresh = MagmaModel(tiny_magma.config.model)
        load_checkpoint(fresh, tmp_path / name, torch.float32, "cpu")
        for key, value in state.items():
            assert torch.equal(fresh.state_dict()[key], value), (name, key)


def test_missing_extra_and_misshaped_keys_are_all_named(tiny_magma, tmp_path):
    state = dict(tiny_magma.model.state_dict())
    del state["lm.transformer.h.1.mlp.1.adapter.0.bias"]
    state["lm.transformer.h.9.attn.attention.q_proj.weight"] = torch.zeros(3)
    state["image_prefix.proj.weight"] = torch.zeros(5, 5)
    torch.save({"module": state}, tmp_path / "bad.pt")
    with torch.device("meta"):
        fresh = MagmaModel(tiny_magma.config.model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(fresh, tmp_path / "bad.pt", torch.float32, "cpu")
    message = str(info.value)
    assert "1 missing: lm.transformer.h.1.mlp.1.adapter.0.bias" in message
    assert "1 unexpected: lm.transformer.h.9.attn.attention.q_proj.weight" in message
    assert "1 mis-shaped: image_prefix.proj.weight (file [5, 5]" in message


def test_integer_tensor_where_weights_belong_is_named(tiny_magma, tmp_path):
    state = dict(tiny_magma.model.state_dict())
    state["image_prefix.ln.weight"] = torch.ones_like(state["image_prefix.ln.weight"], dtype=torch.int64)
    torch.save(state, tmp_path / "ints.pt")
    with torch.device("meta"):
        fresh = MagmaModel(tiny_magma.config.model)
    with pytest.raises(CheckpointError, match=r"not floating point: image_prefix\.ln\.weight \(torch\.int64\)"):
        load_checkpoint(fresh, tmp_path / "ints.pt", torch.float32, "cpu")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_anything(tiny_magma, tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"module": {"x": Exploit(marker)}}, f)
    torch.save({"module": {"x": Exploit(marker)}}, tmp_path / "evil_zip.pt")
    with torch.device("meta"):
        fresh = MagmaModel(tiny_magma.config.model)
    for name in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(CheckpointError, match="could not be read safely"):
            load_checkpoint(fresh, tmp_path / name, torch.float32, "cpu")
    assert not marker.exists()


def test_garbage_and_missing_files_give_clear_errors(tiny_magma, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with torch.device("meta"):
        fresh = MagmaModel(tiny_magma.config.model)
    for name, pattern in (("junk.pt", "could not be read safely"), ("junk.safetensors", "not a valid safetensors file"),
                          ("absent.pt", "does not exist")):
        with pytest.raises(CheckpointError, match=pattern):
            load_checkpoint(fresh, tmp_path / name, torch.float32, "cpu")


def test_first_load_converts_once_to_a_standard_safetensors_file(tiny_magma, tmp_path, monkeypatch):
    import magma_ipu.weights as weights
    from safetensors.torch import load_file

    from magma_ipu import Magma

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(deepspeed_layout(tiny_magma.model), path)
    tiny_magma.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cache"))
    conversions = []
    real = weights.convert_to_safetensors
    monkeypatch.setattr(weights, "convert_to_safetensors", lambda *a, **k: conversions.append(a[1]) or real(*a, **k))
    config = tiny_magma.config.replace(tokenizer=str(tmp_path / "tokenizer.json"), checkpoint=str(path))
    first = Magma.load(config)
    second = Magma.load(config)
    assert len(conversions) == 1
    (converted,) = (tmp_path / "cache" / "converted").glob("*/*.safetensors")
    assert converted.name == "mp_rank_00_model_states.float32.safetensors"
    official = load_file(converted)  # the reference reader agrees with what we wrote
    for key, value in second.model.state_dict().items():
        assert torch.equal(official[key], value) and torch.equal(first.model.state_dict()[key], value)
    image = torch.zeros(40, 40, 3, dtype=torch.uint8).numpy()
    a = first.generate("A picture of", image=image, temperature=0)
    b = tiny_magma.generate("A picture of", image=image, temperature=0)
    assert a.token_ids == b.token_ids  # fp16 storage rounding did not change the greedy tokens here


def test_a_bad_checkpoint_is_not_converted(tiny_magma, tmp_path, monkeypatch):
    from magma_ipu.weights import cached_conversion

    state = dict(tiny_magma.model.state_dict())
    del state["lm.lm_head.bias"]
    torch.save(state, tmp_path / "bad.pt")
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cache"))
    with torch.device("meta"):
        fresh = MagmaModel(tiny_magma.config.model)
    with pytest.raises(CheckpointError, match="1 missing: lm.lm_head.bias"):
        cached_conversion(fresh, tmp_path / "bad.pt", torch.float32)
    assert not list((tmp_path / "cache").rglob("*.safetensors*"))


def fresh_model(tiny_magma):
    with torch.device("meta"):
        return MagmaModel(tiny_magma.config.model)


KEY = "image_prefix.proj.weight"


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "change, pattern",
    [(lambda s: s.update({7: torch.zeros(1)}), r"has keys that are not strings: 7$"),
     (lambda s: s.update({("a", 1): torch.zeros(1)}), r"has keys that are not strings: \('a', 1\)$"),
     (lambda s: s.update({"extra": [1, 2]}), r"has entries that are not tensors: extra$"),
     (lambda s: s.update({KEY: s[KEY].to_sparse()}), rf"has sparse tensors \(only dense ones can be loaded\): {KEY}$"),
     (lambda s: s.update({KEY: s[KEY].to_sparse_csr()}), rf"has sparse tensors .*: {KEY}$"),
     (lambda s: s.update({KEY: torch.empty_like(s[KEY], device="meta")}),
      rf"has tensors without data \(saved from the meta device\): {KEY}$")],
)
def test_entries_that_cannot_be_weights_are_named(tiny_magma, tmp_path, change, pattern, legacy):
    state = dict(tiny_magma.model.state_dict())
    change(state)
    torch.save({"module": state}, tmp_path / "odd.pt", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(fresh_model(tiny_magma), tmp_path / "odd.pt", torch.float32, "cpu")


def test_a_key_of_another_type_is_named_in_the_key_report():
    from magma_ipu.weights import check_keys

    with pytest.raises(CheckpointError, match=r"1 missing: a; 2 unexpected: 3, \('b', 4\)"):
        check_keys({"a": torch.Size([1])}, {3: torch.zeros(1), ("b", 4): torch.zeros(1)}, "'x'")


def safetensors_file(path, header, data=b""):
    import json
    import struct

    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize(
    "header, data, why",
    [([1, 2], b"", "the header is not a mapping"),
     ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "entry 'a' lacks a known dtype, a shape or data_offsets"),
     ({"a": {"dtype": "F32", "shape": ["1"], "data_offsets": ["0", "4"]}}, b"\0" * 4, "entry 'a' lacks"),
     ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [False, 4]}}, b"\0" * 4, "entry 'a' lacks"),
     ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "entry 'a' lacks"),
     ({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "entry 'a' lacks"),
     ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, b"\0" * 4, "entry 'a' lacks"),
     ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "entry 'a' lacks"),
     ({"a": "F32"}, b"", "entry 'a' lacks"),
     (b"[" * 100_000, b"", "unreadable header"),
     (b"\xff\xfe{}", b"", "unreadable header")],
)
def test_malformed_safetensors_headers_are_refused(tiny_magma, tmp_path, header, data, why):
    path = safetensors_file(tmp_path / "odd.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"is not a valid safetensors file \({why}"):
        load_checkpoint(fresh_model(tiny_magma), path, torch.float32, "cpu")


def test_an_empty_checkpoint_file_is_called_empty(tmp_path):
    from magma_ipu.weights import read_state_dict

    for name in ("empty.pt", "empty.safetensors"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CheckpointError, match="is empty"):
            read_state_dict(tmp_path / name)
