"""The shipped GPT-2 tokenizer (magma_ipu/assets/gpt2/tokenizer.json, derived from published BPE
ranks by scripts/make_gpt2_tokenizer.py) against tiktoken, an independent BPE implementation,
built from the very same published ranks (tests/data/gpt2.tiktoken, see tests/data/README.md)."""

import base64
import hashlib
import inspect
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from magma_ipu import download
from magma_ipu.text import SHIPPED, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ASSETS = ROOT / "magma_ipu" / "assets" / "gpt2"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def ranks():
    """The published ranks, checked to be the file PROVENANCE.md names (same sha256)."""
    data = (DATA / "gpt2.tiktoken").read_bytes()
    pinned = re.search(r"sha256 of `gpt2.tiktoken`: `([0-9a-f]{64})`", (ASSETS / "PROVENANCE.md").read_text())
    assert pinned and hashlib.sha256(data).hexdigest() == pinned.group(1)
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}


@pytest.fixture(scope="module")
def oracle(ranks):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.load("gpt2")


def varied_text() -> list[str]:
    """Documents of every kind a tokenizer meets, plus seeded random ones."""
    docs = [
        "Hello world",
        " A picture of",
        ("The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We'll see; they'd "
         "know, I'm sure, and you're right: we've been here before. THEY'RE HERE! 'quoted' \"double\""),
        "MAGMA -- Multimodal Augmentation of Generative Models through Adapter-based finetuning.",
        "3.14159 2,718 1,000,000 2024-05-01T12:30:00Z 0x1F 1e-9 -42 +7 12345678901234567890 ½ ² ٣ ४ 〇",
        "a  b   c    d\t\te\n\n\nf \t \n  g   \n   \r\n\r\nh\u000bi\u000cj    ",
        "   leading spaces and trailing ones   ",
        "\n\n\n", " ", "  ", "\t", "",
        "café naïve résumé Ærøskøbing Ångström façade déjà vu São Paulo Łódź İstanbul Ελληνικά Русский",
        "日本語のテキストです。中文文本，标点符号！한국어 텍스트 ภาษาไทย العربية עברית हिन्दी",
        "emoji 🙂👍🏽👨‍👩‍👧‍👦🇩🇪❤️‍🔥 ☃ ✓ € ™ ∑ ∞ ≠ → ⌘ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓂀",
        "".join(map(chr, range(32))) + "\x7f\x85\xa0\xad\u2028\u2029\u200b\u200d\u2060\ufeff\u3000\ufffd",
        "<|endoftext> <|image| <| |> endoftext",
        "def f(x):\n    return {'a': [1, 2.5], \"b\": x ** 2}  # comment\n\tif x != 0: print(f'{x!r}')\n",
        'fn main() { let v: Vec<u8> = vec![0xFF; 16]; println!("{:?}", v); } // Rust\n#include <stdio.h>',
        "<html><body class=\"a-b\">&amp; &lt;tag&gt; https://example.com/path?q=1&r=%20#frag</body></html>",
    ]
    # code and English prose: the source of some standard-library modules
    import difflib
    import json.decoder
    import textwrap

    docs += [inspect.getsource(module) for module in (difflib, json.decoder, textwrap)]
    rng = random.Random(13)
    # random code points from every plane (no surrogates: they are not text), mixed with ASCII and spaces
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(1, 60)):
            kind = rng.random()
            if kind < 0.3:
                chars.append(rng.choice(" \t\n  "))
            elif kind < 0.5:
                chars.append(chr(rng.randint(32, 126)))
            elif kind < 0.7:
                chars.append(chr(rng.randint(0x80, 0x7FF)))
            else:
                code = rng.randint(0x800, 0x10FFFF)
                chars.append(chr(code if not 0xD800 <= code <= 0xDFFF else code + 0x800))
        docs.append("".join(chars))
    return docs


def random_token_text(ranks, rng: random.Random, count: int) -> str:
    """Text made of random GPT-2 tokens glued together: exercises a large part of the merges."""
    valid = []
    for token in ranks:
        try:
            valid.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return "".join(rng.choice(valid) for _ in range(count))


def test_reference_facts(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" A picture of") == [317, 4286, 286]
    assert len(gpt2) == 50258 and gpt2.eos_id == 50256 and gpt2.image_id == 50257
    assert gpt2.special_ids == {50256, 50257}


def test_gpt2_loads_the_shipped_file_without_network(monkeypatch):
    def no_hub(*args):
        raise AssertionError(f"hub asked for {args}")

    monkeypatch.setattr(download, "hub_file", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert SHIPPED["gpt2"] == ASSETS / "tokenizer.json" and SHIPPED["gpt2"].is_file()
    assert Tokenizer.load("gpt2").encode("Hello world") == [15496, 995]
    # the shipped data keeps its licence beside it
    assert (ASSETS / "LICENSE").read_text() == (DATA / "LICENSE-whisper").read_text()
    assert "MIT License" in (ASSETS / "LICENSE").read_text()


def test_vocabulary_is_the_published_ranks(gpt2, oracle, ranks):
    """Every id spells the published token, and BPE on a token's own spelling gives back just that
    token: every merge is there and in an order that reaches it."""
    assert gpt2.backend.get_vocab_size(with_added_tokens=False) == len(ranks) == 50256
    model = gpt2.backend.model
    for rank in range(len(ranks)):
        spelling = gpt2.backend.id_to_token(rank)
        assert [t.id for t in model.tokenize(spelling)] == [rank], (rank, spelling)
        expected = oracle.decode_single_token_bytes(rank).decode("utf-8", errors="replace")
        assert gpt2.backend.decode([rank]) == expected, rank


def test_ids_match_tiktoken_on_varied_text(gpt2, oracle, ranks):
    docs = varied_text() + [random_token_text(ranks, random.Random(5), 20000)]
    ours = [e.ids for e in gpt2.backend.encode_batch(docs, add_special_tokens=False)]
    theirs = oracle.encode_ordinary_batch(docs)
    for doc, a, b in zip(docs, ours, theirs):
        assert a == b, doc[:200]
        assert gpt2.decode(a, clean_up=False) == doc == oracle.decode(b)
    assert sum(map(len, ours)) > 50000  # a large sample of the merges


def test_regenerating_gives_the_shipped_files(tmp_path):
    """The script, run on the published ranks, writes exactly the files shipped."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_gpt2_tokenizer.py"), str(DATA / "gpt2.tiktoken"),
         "--license", str(DATA / "LICENSE-whisper"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in ("tokenizer.json", "LICENSE", "PROVENANCE.md"):
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
