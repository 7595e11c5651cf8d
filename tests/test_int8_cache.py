"""Loading for real-size models: read-only mappings, the int8 cache, damaged caches rebuilt."""

import copy
import gc
import hashlib
import json
from pathlib import Path

import pytest
import torch

import magma_ipu.weights as weights
from magma_ipu import CheckpointError, Magma
from magma_ipu.quantize import quantize_int8
from magma_ipu.weights import mmap_safetensors, read_state_dict

from test_weights import deepspeed_layout

IMAGE = "demo_example_images/scene_2.png"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def on_disk(tiny_magma, tmp_path, monkeypatch):
    """The tiny model as a DeepSpeed checkpoint with its tokenizer, and an empty cache."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(deepspeed_layout(tiny_magma.model), path)
    tiny_magma.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cache"))
    config = tiny_magma.config.replace(tokenizer=str(tmp_path / "tokenizer.json"), checkpoint=str(path))
    return config, path, tmp_path / "cache"


def mappings_of(path: Path) -> list[str]:
    """The permission fields of this process's mappings of `path` (e.g. 'r--s')."""
    return [line.split()[1] for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(path.resolve()))]


def test_a_torch_checkpoint_is_mapped_read_only_and_shared(on_disk):
    _, path, _ = on_disk
    state = read_state_dict(path)
    assert mappings_of(path) and all(p == "r--s" for p in mappings_of(path))  # never private (copy-on-write)
    full = torch.load(path, weights_only=True)["module"]
    for key, tensor in full.items():
        assert torch.equal(state[key], tensor), key
    # alias keys still share storage, as in the file
    assert state["word_embedding.weight"].data_ptr() == state["lm.transformer.wte.weight"].data_ptr()


def test_int8_from_the_cache_equals_quantizing_the_float_model(on_disk, tiny_magma, monkeypatch):
    config, path, cache = on_disk
    made = []
    real = weights.quantize_to_safetensors
    monkeypatch.setattr(weights, "quantize_to_safetensors", lambda *a, **k: made.append(a[2]) or real(*a, **k))
    first = Magma.load(config.replace(quantize="int8"))
    second = Magma.load(config.replace(quantize="int8"))
    streamed = Magma.load(config.replace(quantize="int8", convert_checkpoint=False))
    assert len(made) == 1  # the second start mapped the cache
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert files == ["mp_rank_00_model_states.float32.int8.safetensors"]  # no float conversion file
    float_model = Magma.load(config).model  # fp16 checkpoint -> float32, then quantized in memory
    reference = Magma(first.config, quantize_int8(copy.deepcopy(float_model), "dynamic"), first.tokenizer)
    request = first.request("A picture of", IMAGE, 1)
    want = reference.engine.full_logits([request])
    for magma in (first, second, streamed):
        assert torch.equal(magma.engine.full_logits([request]), want)
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        a = reference.generate("A picture of", image=IMAGE, max_out_tokens=10, **settings)
        assert second.generate("A picture of", image=IMAGE, max_out_tokens=10, **settings).token_ids == a.token_ids


def test_the_int8_cache_is_a_standard_safetensors_file(on_disk):
    from safetensors.torch import load_file

    config, _, cache = on_disk
    Magma.load(config.replace(quantize="int8"))
    (cached,) = cache.rglob("*.safetensors")
    official = load_file(cached)
    ours = mmap_safetensors(cached)
    assert set(ours) == {k for k in official if not k.startswith(weights.PADDING)}
    for key, tensor in ours.items():
        assert torch.equal(official[key], tensor), key
        assert tensor.data_ptr() % 64 == 0, key  # every tensor aligned as the allocator would
    assert official["lm.transformer.h.0.fused_in.weight"].dtype == torch.int8
    assert official["lm.transformer.h.0.fused_in.scale"].dtype == torch.float32
    d, ff = config.model.d_model, config.model.d_ff
    assert official["lm.transformer.h.0.fused_in.weight"].shape == (3 * d + ff, d)


def test_loading_and_running_never_write_to_the_checkpoint_or_the_cache(on_disk):
    config, path, cache = on_disk
    before = sha256(path)
    magma = Magma.load(config.replace(quantize="int8"))
    (cached,) = cache.rglob("*.safetensors")
    cached_before = sha256(cached)
    magma.generate("A picture of", image=IMAGE, max_out_tokens=4)
    again = Magma.load(config.replace(quantize="int8"))
    again.generate("A picture of", image=IMAGE, max_out_tokens=4)
    assert all(p == "r--s" for p in mappings_of(cached))
    assert sha256(path) == before and sha256(cached) == cached_before


@pytest.mark.parametrize("damage", ["truncate", "empty", "overlap", "garbage"])
def test_a_damaged_cache_is_made_again(on_disk, damage):
    config, _, cache = on_disk
    good = Magma.load(config.replace(quantize="int8"))
    request = good.request("A picture of", IMAGE, 1)
    want = good.engine.full_logits([request])
    del good  # it maps the file: damaging it in place under a live mapping would fault (SIGBUS)
    gc.collect()
    (cached,) = cache.rglob("*.safetensors")
    data = cached.read_bytes()
    if damage == "truncate":
        cached.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        cached.write_bytes(b"")
    elif damage == "garbage":
        cached.write_bytes(b"\xff" * 100)
    else:  # a header whose second tensor starts inside the first
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        first, second = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")[:2]
        header[second[1]]["data_offsets"] = [o - 4 for o in header[second[1]]["data_offsets"]]
        blob = json.dumps(header).encode().ljust(n)
        cached.write_bytes(data[:8] + blob[:n] + data[8 + n :])
    rebuilt = Magma.load(config.replace(quantize="int8"))
    assert torch.equal(rebuilt.engine.full_logits([request]), want)
    assert cached.read_bytes() == data


@pytest.mark.parametrize("header, why", [
    (b"[1, 2]", "not a mapping"),
    (b'{"a": {"dtype": "F32", "shape": [1]}}', "lacks a known dtype, a shape or data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}', "lacks"),
    (b'{"a": "F32"}', "lacks"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', r"has 4 bytes for shape \[2\]"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}', "overlaps"),
])
def test_malformed_safetensors_headers_are_named(tmp_path, header, why):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    with pytest.raises(CheckpointError, match=why):
        mmap_safetensors(path)


def test_an_interrupted_conversion_leaves_no_file_under_the_final_name(on_disk, monkeypatch):
    config, _, cache = on_disk
    original = weights.quantized_tensors

    def interrupted(model, state, dtype):
        if next(iter(state.values())).is_meta:  # the header pass: shapes only
            return original(model, state, dtype)

        def tensors():
            for count, item in enumerate(original(model, state, dtype)):
                if count == 5:
                    raise KeyboardInterrupt
                yield item

        return tensors()

    monkeypatch.setattr(weights, "quantized_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Magma.load(config.replace(quantize="int8"))
    assert not [p for p in cache.rglob("*") if p.is_file()]
    monkeypatch.setattr(weights, "quantized_tensors", original)
    assert Magma.load(config.replace(quantize="int8")).generate("A picture of", image=IMAGE, max_out_tokens=2)


def resident_bytes(path: Path) -> int:
    """This process's resident bytes in its mappings of `path` (smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.endswith(str(path.resolve()))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_the_mapped_image_prefix_leaves_memory_after_each_image(tiny_magma, tmp_path, monkeypatch):
    from magma_ipu.build import build_model

    # an image encoder wide enough for megabyte-sized weights (smaller ones are never released)
    config = tiny_magma.config.replace(image_width=64, image_layers=(1, 1, 1, 1))
    source = build_model(config, None)
    path = tmp_path / "wide.pt"
    torch.save({"module": source.state_dict()}, path)
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cache"))
    model = build_model(config.replace(quantize="int8"), path)
    (cached,) = (tmp_path / "cache").rglob("*.safetensors")
    big = sum(t.numel() * t.element_size() for t in model.image_prefix.state_dict().values())
    assert big > 20 << 20
    image = torch.zeros(1, 3, config.model.image_resolution, config.model.image_resolution)
    before = resident_bytes(cached)
    with torch.inference_mode():
        first = model.embed_images(image)
        assert resident_bytes(cached) - before < 0.25 * big  # read for the image, then let go (all but the small)
        assert torch.equal(model.embed_images(image), first)  # and read back intact for the next
