"""Tokenizer loading and streaming detokenization."""

import random

import pytest

from magma_ipu import ConfigError
from magma_ipu.demo.tokenizer import train_byte_level_bpe
from magma_ipu.text import TextStream, Tokenizer, _settled_length, clean_up_spaces


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.load("gpt2")  # the shipped file: no network


def stream_pieces(tokenizer, ids):
    stream = TextStream(tokenizer)
    return [stream.push(i) for i in ids] + [stream.flush()]


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


def test_decode_cleans_up_spaces_like_the_original(gpt2):
    raw = "A dog , a cat . It 's fine , is n't it ? I 'm sure they 're here ! We 've"
    ids = gpt2.encode(raw)
    assert gpt2.decode(ids) == "A dog, a cat. It's fine, isn't it? I'm sure they're here! We've"
    assert gpt2.decode(ids, clean_up=False) == raw
    # the one pattern that takes both spaces; only the contractions listed, not every apostrophe
    assert gpt2.decode(gpt2.encode("x ' y 'll 'd")) == "x'y 'll 'd"


def test_clean_up_is_transformers_clean_up_tokenization(tokenizer):
    """Same replacements in the same order as transformers' clean_up_tokenization (the original's
    decode), over random text dense in the characters the patterns are made of."""
    transformers = pytest.importorskip("transformers")
    oracle = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    rng = random.Random(0)
    # the first two only come out right with the replacements in transformers' order
    texts = ["  ' s", " ' .", *("".join(rng.choice("   ''ntsvermdl.,?!x") for _ in range(rng.randint(0, 12)))
                               for _ in range(20000))]
    for text in texts:
        assert clean_up_spaces(text) == oracle.clean_up_tokenization(text), repr(text)


def test_settled_text_is_never_changed_by_what_follows():
    """What the stream emits, clean_up_spaces(text[:n]), is final: cleaning the whole text later gives
    it back followed by the cleanup of the rest, whatever comes next."""
    rng = random.Random(1)
    alphabet = "   ''ntsvermx.,?!"
    # "  ' v" cleans up to " 'v", which "e" turns into a match for " 've": deleted spaces pull
    # characters up to the end, so the held-back tail can be longer than the text after the last space
    cases = [("  ' v", "e"), ("  ' r", "e")]
    for _ in range(30000):
        cases.append(tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(0, k))) for k in (8, 6)))
    for text, more in cases:
        n = _settled_length(text)
        settled = clean_up_spaces(text[:n])
        assert clean_up_spaces(text + more) == settled + clean_up_spaces(text[n:] + more), (text, more)
    # only what could still change is held back
    assert [_settled_length(t) for t in ("a cat", "a cat ", "is n", "x '", "can", "we 'v", "so,", "word")] == [
        5, 5, 2, 1, 3, 2, 3, 4]


def test_stream_holds_back_text_the_clean_up_may_still_change(gpt2):
    # " n" + "'t", " '" + "s": the space the cleanup removes arrives a token before the cleanup applies
    text = "It 's fine , is n't it ? They 're here ."
    ids = gpt2.encode(text)
    pieces = stream_pieces(gpt2, ids)
    assert "".join(pieces) == gpt2.decode(ids) == "It's fine, isn't it? They're here."
    shown = "".join(pieces[: ids.index(gpt2.encode(" n")[0]) + 1])
    assert shown == "It's fine, is"  # " n" is held back: it becomes "n't"


def test_stream_pieces_join_to_the_decoded_text(gpt2):
    """Random token sequences mixing the tokens the cleanup patterns are made of (" ", " '", "s",
    " n", "'t", " ,", ...) with random ids, some of them partial UTF-8 characters: every prefix of
    the stream is a prefix of the final text, and all the pieces together are that text."""
    parts = [" ", "  ", " '", "'", "s", " n", "n", "'t", "t", " ,", " .", " ?", " !", "ve", "re", "m", " x", "\n", "é"]
    pool = sorted({i for part in parts for i in gpt2.encode(part)})
    rng = random.Random(0)
    for _ in range(1500):
        ids = [rng.choice(pool) if rng.random() < 0.85 else rng.randrange(50256) for _ in range(rng.randint(1, 10))]
        final = gpt2.decode(ids)
        pieces = stream_pieces(gpt2, ids)
        assert "".join(pieces) == final, ids
        for k in range(1, len(pieces)):
            assert final.startswith("".join(pieces[:k])), ids
