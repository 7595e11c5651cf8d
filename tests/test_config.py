"""Config presets, YAML files and overrides."""

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
