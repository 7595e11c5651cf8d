"""Tokenizer loading and streaming detokenization."""

import json

import pytest

from magma_ipu import ConfigError
from magma_ipu.text import TextStream, Tokenizer, train_byte_level_bpe


def test_tokenizer_file_is_really_read(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.backend.save(str(path))
    loaded = Tokenizer.load(path)
    from_dir = Tokenizer.load(tmp_path)
    text = "A picture of a small red circle."
    assert loaded.encode(text) == tokenizer.encode(text) == from_dir.encode(text)
    assert len(loaded) == len(tokenizer)
    # a different file gives a different tokenizer: the file is what is used, not a default
    other = train_byte_level_bpe(["zebra zebra zebra quartz"] * 20, 262)
    other.backend.save(str(path))
    reloaded = Tokenizer.load(path)
    assert len(reloaded) == 262 and reloaded.encode("zebra") == other.encode("zebra")
    assert reloaded.encode(text) != tokenizer.encode(text)


def test_special_tokens_follow_gpt2_layout(tokenizer):
    assert tokenizer.eos_id == len(tokenizer) - 2 and tokenizer.image_id == len(tokenizer) - 1
    ids = tokenizer.encode("hello")
    assert tokenizer.eos_id not in ids and ids[0] != tokenizer.eos_id  # no BOS
    assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.image_id]) == "hello"


def test_byte_level_round_trip(tokenizer):
    for text in ["héllo wörld € ✓ 日本語 🙂", "  two  spaces\nand a newline\t", "\x00\x07 control"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_stream_never_splits_a_character(tokenizer):
    text = "snow ☃ and 🙂 emoji 日本語"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # some multi-byte characters needed several tokens


def test_missing_tokenizer_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Tokenizer.load(tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="could not be read"):
        Tokenizer.load(tmp_path / "broken.json")
