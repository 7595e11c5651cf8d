"""Know before you wait: memory and disk needs against the machine, and the "auto" choices."""

from collections import namedtuple

import pytest
import torch

import magma_ipu.resources as resources
from magma_ipu import ConfigError, Magma, load_config
from magma_ipu.errors import ResourceError
from magma_ipu.model import MagmaModel
from magma_ipu.resources import memory_needed, resolve_auto

GB = 1e9


@pytest.fixture(scope="module")
def full_size():
    config = load_config("magma_v1_500")
    with torch.device("meta"):
        return config, MagmaModel(config.model)


def test_full_size_figures_match_the_reference(full_size):
    config, model = full_size
    cpu = config.replace(device="cpu")
    # GPT-J's int8 linear weights alone: 28 blocks of q, k, v, out, c_fc, c_proj and the two adapter
    # matrices, and the 50400-row head
    int8_weights = 28 * (4 * 4096 * 4096 + 2 * 4096 * 16384 + 2 * 4096 * 1024) + 50400 * 4096
    assert int8_weights == 6_078_464_000
    int8 = memory_needed(cpu.replace(dtype="float32", quantize="int8"), model)
    bf16 = memory_needed(cpu.replace(dtype="bfloat16", quantize="none"), model)
    f32 = memory_needed(cpu.replace(dtype="float32", quantize="none"), model)
    assert int8_weights < int8 < 8 * GB  # the goal: a CPU int8 session within 8 GB
    assert 12.5 * GB < bf16 < 14 * GB and 24.5 * GB < f32 < 27.5 * GB
    kv_cache = 2 * 28 * (144 + 500) * 4096 * 4  # float32 keys and values for every slot
    assert int8 - resources.weight_bytes(model, torch.float32, "int8", "cpu") == kv_cache + resources.OVERHEAD


def test_too_little_memory_stops_at_once_with_what_would_fit(full_size, monkeypatch):
    config, model = full_size
    monkeypatch.setattr(resources, "available_memory", lambda device: int(10 * GB))
    with pytest.raises(ResourceError) as info:
        resources.check_memory(config.replace(device="cpu", dtype="float32", quantize="none"), model)
    message = str(info.value)
    assert "float32 needs ~26." in message and "10.0 GB available" in message
    assert "int8 ~7." in message and "--dtype float32 --quantize int8" in message
    assert "bfloat16" not in message  # 13 GB does not fit in 10
    resources.check_memory(config.replace(device="cpu", dtype="float32", quantize="none", memory_check=False), model)
    resources.check_memory(config.replace(device="cpu", dtype="float32", quantize="int8"), model)


def test_auto_picks_int8_on_a_cpu_and_float16_with_cuda(full_size, monkeypatch):
    config, model = full_size
    monkeypatch.setattr(resources, "available_memory", lambda device: int(23 * GB))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    chosen, note = resolve_auto(config, model)
    assert (chosen.device, chosen.dtype, chosen.quantize) == ("cpu", "float32", "int8")
    assert "no CUDA device" in note and "int8" in note
    explicit, _ = resolve_auto(config.replace(dtype="bfloat16"), model)  # an explicit flag wins
    assert (explicit.device, explicit.dtype, explicit.quantize) == ("cpu", "bfloat16", "none")
    explicit, _ = resolve_auto(config.replace(quantize="none"), model)  # the smallest float that fits
    assert (explicit.dtype, explicit.quantize) == ("bfloat16", "none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(resources, "available_memory", lambda device: int(80 * GB))
    chosen, note = resolve_auto(config, model)
    assert (chosen.device, chosen.dtype, chosen.quantize) == ("cuda", "float16", "none")
    assert resolve_auto(load_config("demo"), model) == (load_config("demo"), None)  # nothing left to choose


def test_auto_and_int8_rules_in_the_config():
    with pytest.raises(ConfigError, match="float32 activations"):
        load_config("demo", quantize="int8", dtype="bfloat16")
    with pytest.raises(ConfigError, match="device must be"):
        load_config("demo", device="tpu")
    assert load_config("magma_v1_500").device == "auto"


def test_the_tokenizer_is_checked_before_any_weight(tiny_magma, tmp_path, monkeypatch):
    tiny_magma.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    import magma_ipu.session as session

    monkeypatch.setattr(session, "build_model", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ConfigError, match="tokens but the model's vocab_size is 50258"):
        Magma.load("magma_v1_500", checkpoint_path="/nonexistent/magma.pt", tokenizer=str(tmp_path / "tokenizer.json"))


def test_a_conversion_that_cannot_fit_the_disk_stops_before_writing(tiny_magma, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save({"module": tiny_magma.model.state_dict()}, path)
    tiny_magma.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cache"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda folder: usage(10**12, 10**12 - 1000, 1000))
    config = tiny_magma.config.replace(checkpoint=str(path), tokenizer=str(tmp_path / "tokenizer.json"))
    for quantize in ("int8", "none"):
        with pytest.raises(ResourceError, match="on disk but .* has 0.0 GB free; point MAGMA_CACHE"):
            Magma.load(config.replace(quantize=quantize))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors*"))
