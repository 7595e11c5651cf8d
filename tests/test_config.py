"""Config presets, YAML files and overrides."""

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from magma_ipu import ConfigError, load_config
from magma_ipu.config import preset_names


def test_presets_exist_with_the_seed_text_lengths():
    assert {"demo", "magma_v1_500", "magma_v1_1024"} <= set(preset_names())
    v500, v1024 = load_config("magma_v1_500"), load_config("magma_v1_1024")
    assert (v500.sequence_length, v1024.sequence_length) == (500, 1024)
    for cfg in (v500, v1024):
        m = cfg.model
        assert (m.n_layer, m.d_model, m.n_head, m.rotary_dim, m.d_ff) == (28, 4096, 16, 64, 16384)
        assert (m.vocab_size, m.lm_head_size, m.adapter_downsample) == (50258, 50400, 4)
        assert (m.image_layers, m.image_width, m.image_resolution, m.image_tokens) == ((6, 8, 18, 8), 96, 384, 144)
        assert (cfg.seed, cfg.top_p, cfg.top_k, cfg.temperature, cfg.max_out_tokens) == (0, 0.9, 0, 0.7, 6)


def test_file_with_relative_paths_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my.yml").write_text(
        "model: {n_layer: 2, d_model: 64, n_head: 4, rotary_dim: 8, d_ff: 128, vocab_size: 300, lm_head_size: 320,\n"
        "        image_layers: [1, 1, 1, 1], image_width: 8, image_resolution: 64}\n"
        "sequence_length: 40\ncheckpoint: ./weights.pt\ntokenizer: gpt2\n"
    )
    cfg = load_config(tmp_path / "sub" / "my.yml", n_layer="3", top_p="0.5", compile="true", image_layers="2,2,1,1")
    assert cfg.checkpoint == str(tmp_path / "sub" / "weights.pt")
    assert cfg.tokenizer == "gpt2"
    assert (cfg.model.n_layer, cfg.top_p, cfg.compile, cfg.model.image_layers) == (3, 0.5, True, (2, 2, 1, 1))
    assert cfg.replace(max_out_tokens=9).max_out_tokens == 9


@pytest.mark.parametrize(
    "overrides, pattern",
    [({"n_layr": 2}, "unknown config field 'n_layr'.*did you mean 'n_layer'"),
     ({"temprature": 1}, "did you mean 'temperature'"),
     ({"n_head": 3}, "divisible by n_head"),
     ({"dtype": "float8"}, "dtype must be one of float32, bfloat16, float16"),
     ({"top_p": 2}, r"top_p must be in \[0, 1\]"),
     ({"image_resolution": 100}, "multiple of 32"),
     ({"sequence_length": 0}, "sequence_length"),
     ({"n_layer": "two"}, "must be int"),
     ({"compile": "maybe"}, "must be bool"),
     ({"device": "tpu"}, "device must be")],
)
def test_bad_fields_are_named(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("magma_v1_500", **overrides)


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'magma_v1_500'"):
        load_config("magma_v1_50")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nowhere/cfg.yml")


LAUNCHER = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "overrides, pattern",
    [({"sequence_length": 1e10}, r"sequence_length must be at most 65392 \(the model addresses 65536 positions"),
     ({"sequence_length": 65393}, "sequence_length must be at most 65392"),
     ({"sequence_length": True}, "'sequence_length' must be int, got True"),
     ({"sequence_length": Decimal("20.5")}, "'sequence_length' must be int"),
     ({"sequence_length": Decimal("Infinity")}, "'sequence_length' must be int"),
     ({"sequence_length": float("inf")}, "'sequence_length' must be int"),
     ({"n_layer": Fraction(5, 2)}, "'n_layer' must be int"),
     ({"image_layers": [1, 2.5, 1, 1]}, "image_layers' must be a list of 4 integers"),
     ({"image_timeout": float("inf")}, r"image_timeout must be a number of seconds in \(0, 86400\], got inf"),
     ({"image_timeout": "inf"}, "image_timeout must be a number of seconds"),
     ({"image_timeout": 1e10}, "image_timeout must be a number of seconds"),
     ({"image_timeout": "nan"}, "image_timeout"),
     ({"image_timeout": 10**400}, "'image_timeout' must be float"),
     ({"max_image_bytes": 10**12}, r"max_image_bytes must be at most 1073741824"),
     ({"max_device_memory": "1e999"}, "max_device_memory must be a finite size of at least 1 byte"),
     ({"max_device_memory": "-1GiB"}, "max_device_memory must be a finite size"),
     ({"max_device_memory": "nan"}, "max_device_memory must be a finite size"),
     ({"max_device_memory": "0"}, "max_device_memory must be a finite size of at least 1 byte"),
     ({"max_device_memory": "1.2.3GB"}, "max_device_memory must be a finite size"),
     ({"max_device_memory": "6 lightyears"}, "max_device_memory must be a finite size"),
     ({"device": "cuda:abc"}, r"device must be 'cpu', 'cuda', 'cuda:N' \(N a device number\) or 'auto'"),
     ({"device": "cuda:"}, "device must be 'cpu'"),
     ({"device": "cudax"}, "device must be 'cpu'"),
     ({"tensor_parallel": 3}, r"tensor_parallel=3 must divide n_head \(16\), d_ff \(16384\), the adapter's hidden "
                              r"size d_model/adapter_downsample \(1024\)"),
     ({"tensor_parallel": 32}, r"tensor_parallel=32 must divide n_head \(16\)"),
     ({"tensor_parallel": 2}, r"tensor_parallel=2 needs one process per rank, started by torchrun .*: launch with "
                              r"torchrun --nproc-per-node 2 run_inference.py"),
     ({"model": 5}, "'model' in the overrides must be a mapping of model fields"),
     ({"checkpoint": ["a.pt"]}, r"'checkpoint' must be str or null, got \['a.pt'\]"),
     ({"tokenizer": None}, "'tokenizer' must be str, got None"),
     ({"dtype": True}, "'dtype' must be str"),
     ({"compile": 5}, "'compile' must be bool"),
     ({"compile": [1]}, "'compile' must be bool"),
     ({"temperature": True}, "'temperature' must be float, got True"),
     ({"temperature": "nan"}, "temperature must be a finite number"),
     ({"top_p": 1e999}, "top_p must be a finite number")],
)
def test_values_that_would_crash_later_are_refused_at_once(overrides, pattern, monkeypatch):
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=pattern):
        load_config("magma_v1_500", **overrides)


def test_exact_numbers_of_any_type_are_taken(monkeypatch):
    cfg = load_config("demo", sequence_length=40.0, n_layer=np.int64(4), temperature=Fraction(1, 2),
                      top_p=Decimal("0.25"), image_timeout="2.5", max_device_memory="1e9")
    assert (cfg.sequence_length, cfg.model.n_layer, cfg.temperature, cfg.top_p, cfg.image_timeout) == (40, 4, 0.5, 0.25,
                                                                                                          2.5)
    assert [type(v) for v in (cfg.sequence_length, cfg.model.n_layer, cfg.temperature)] == [int, int, float]
    assert load_config("magma_v1_500", sequence_length=65392).cache_length == 65536  # the bound itself is allowed
    assert load_config("demo", checkpoint=Path("/w/a.pt"), max_device_memory=6e9).checkpoint == "/w/a.pt"
    for name, value in LAUNCHER.items():  # under torchrun, a divisible tensor_parallel is fine
        monkeypatch.setenv(name, value)
    assert load_config("magma_v1_500", tensor_parallel=2).tensor_parallel == 2


def test_cuda_devices_this_torch_cannot_use_are_named(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"device 'cuda': CUDA is not available in this torch build \(torch .* is "
                                          r"CPU-only\); use --device cpu or auto"):
        load_config("demo", device="cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(ConfigError, match=r"device 'cuda:0': no CUDA device is visible"):
        load_config("demo", device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device 'cuda:7' does not exist: this machine has 2 CUDA devices "
                                          r"\(cuda:0 to cuda:1\)"):
        load_config("demo", device="cuda:7")
    assert load_config("demo", device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize(
    "content, pattern",
    [(b"model: 5\n", r"'model' in .*bad.yml must be a mapping of model fields"),
     (b"- 1\n- 2\n", "must hold a mapping of fields, got list"),
     (b"1: 2\n", "unknown config field 1 in"),
     (b"name: caf\xe9\n", r"bad.yml:1: config file is not UTF-8 text \(byte 0xe9\): save it as UTF-8"),
     (b"model:\n  n_layer: 2\n n_head: [\n", r"bad.yml:3:2: invalid YAML: expected <block end>, but found "
                                              r"'<block mapping start>' \(while parsing a block mapping\)"),
     (b"top_p: [0.5\n", r"bad.yml:2:1: invalid YAML: "),
     (b"sequence_length: 10\nsequence_length: 20\n", r"bad.yml:2:1: invalid YAML: 'sequence_length' is given twice"),
     (b"model:\n  n_layer: 2\n  n_layer: 3\n", r"bad.yml:3:3: invalid YAML: 'n_layer' is given twice"),
     (b"checkpoint: {a: 1}\n", "'checkpoint' must be str or null")],
)
def test_bad_yaml_files_give_one_line_with_the_place(tmp_path, content, pattern):
    (tmp_path / "bad.yml").write_bytes(content)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(tmp_path / "bad.yml")
    assert "\n" not in str(info.value)


def test_a_memory_budget_below_the_fixed_weights_is_a_config_error():
    from magma_ipu import Magma

    with pytest.raises(ConfigError, match=r"max_device_memory 1000 bytes \(9.31e-07 GiB\) cannot hold the non-block "
                                          r"weights \(\d+ bytes\) and two blocks in flight \(\d+ bytes\): give at "
                                          r"least \d+ bytes"):
        Magma.load("demo", max_device_memory="1kB")
