#!/usr/bin/env python3
"""Build GPT-2's tokenizer (plus MAGMA's `<|image|>`) as a Hugging Face `tokenizers` tokenizer.json, offline.

GPT-2's exact BPE ranks are published on the package registry inside openai-whisper's source
distribution, as `whisper/assets/gpt2.tiktoken` (one line per token: its bytes in base64 and its
rank, which is also its id). That file holds no merge list, so the merges are derived here: byte-level
BPE builds every multi-byte token from two earlier tokens, and running BPE on a token's own bytes
with only the lower ranks allowed stops at exactly those two parts.

    pip download --no-deps --no-binary :all: openai-whisper==20250625 -d /tmp/whisper
    python scripts/make_gpt2_tokenizer.py /tmp/whisper/openai_whisper-20250625.tar.gz
    # or from the copy the tests keep (same bytes, checked by sha256):
    python scripts/make_gpt2_tokenizer.py tests/data/gpt2.tiktoken --license tests/data/LICENSE-whisper

Writes magma_ipu/assets/gpt2/{tokenizer.json, PROVENANCE.md, LICENSE}.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from magma_ipu.text import EOS_TOKEN, IMAGE_TOKEN, byte_to_unicode  # noqa: E402

OUT = ROOT / "magma_ipu" / "assets" / "gpt2"
PACKAGE, VERSION = "openai-whisper", "20250625"
SDIST = f"openai_whisper-{VERSION}.tar.gz"
MEMBER = "whisper/assets/gpt2.tiktoken"
# The published file's digest: the tokenizer is only ever built from exactly these bytes.
SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
VOCAB_SIZE = 50257  # GPT-2: 256 bytes + 50000 merges + <|endoftext|>


def read_source(source: Path, license_path: Path | None) -> tuple[bytes, str]:
    """The bytes of gpt2.tiktoken and the licence text, from the sdist or from a bare copy."""
    if tarfile.is_tarfile(source):
        with tarfile.open(source) as sdist:
            # the sdist holds one top folder, openai_whisper-VERSION/
            members = {m.name.split("/", 1)[-1]: m for m in sdist.getmembers() if m.isfile()}
            missing = [name for name in (MEMBER, "LICENSE") if name not in members]
            if missing:
                sys.exit(f"{source}: no {' or '.join(missing)} in this archive; is it {SDIST}?")
            ranks_file = sdist.extractfile(members[MEMBER]).read()
            licence = sdist.extractfile(members["LICENSE"]).read().decode()
    else:
        if license_path is None:
            sys.exit("a bare gpt2.tiktoken needs --license (the MIT licence from the same sdist)")
        ranks_file, licence = source.read_bytes(), license_path.read_text()
    digest = hashlib.sha256(ranks_file).hexdigest()
    if digest != SHA256:
        sys.exit(f"{source}: gpt2.tiktoken has sha256 {digest}, expected {SHA256} ({PACKAGE}=={VERSION})")
    return ranks_file, licence


def parse_ranks(ranks_file: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in ranks_file.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != VOCAB_SIZE - 1:
        raise ValueError(f"expected ranks 0..{VOCAB_SIZE - 2}, each once")
    if not all(bytes([b]) in ranks for b in range(256)):
        raise ValueError("byte-level BPE needs all 256 single bytes in the vocabulary")
    return ranks


def bpe(word: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Byte-level BPE of `word`: repeatedly join the adjacent pair whose joined bytes have the lowest
    rank (leftmost on ties), using only tokens ranked below `below`."""
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        best = None  # (rank, position)
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < below and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order (a merge's priority is its token's rank)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = bpe(token, ranks, below=rank)
        if len(parts) != 2:
            raise ValueError(f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens: {parts}")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer_json(ranks: dict[bytes, int]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in derive_merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # use_regex=True is GPT-2's own pattern:
    # 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # added after the BPE vocabulary, so they take ids 50256 and 50257 (GPT-2's layout plus MAGMA's)
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True), AddedToken(IMAGE_TOKEN, special=True)])
    if (tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(IMAGE_TOKEN)) != (VOCAB_SIZE - 1, VOCAB_SIZE):
        raise ValueError("special tokens did not land at 50256 and 50257")
    return tokenizer.to_str()  # compact: no indentation


PROVENANCE = """\
# GPT-2 tokenizer: provenance

`tokenizer.json` is GPT-2's byte-level BPE tokenizer (50257 tokens, `{eos}` = 50256) plus
MAGMA's `{image}` = 50257, in the Hugging Face `tokenizers` format.

- Source: the package `{package}=={version}` on PyPI, source distribution `{sdist}`,
  file `{member}` (GPT-2's BPE ranks: base64 bytes and rank per line).
- sha256 of `gpt2.tiktoken`: `{sha256}` (checked by the script before use).
- Licence: MIT, Copyright (c) 2022 OpenAI; the text from the sdist is in `LICENSE` beside this file.
- Derived by `scripts/make_gpt2_tokenizer.py`: vocabulary = the ranks with GPT-2's byte-to-unicode
  spelling; merges derived from the ranks; ByteLevel pre-tokenizer (GPT-2's regex, no prefix
  space) and decoder; the two special tokens added last.

Regenerate with:

    pip download --no-deps --no-binary :all: {package}=={version} -d /tmp/whisper
    python scripts/make_gpt2_tokenizer.py /tmp/whisper/{sdist}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help=f"{SDIST} or the gpt2.tiktoken file from it")
    parser.add_argument("--license", type=Path,
                        help="the sdist's LICENSE (for a bare gpt2.tiktoken; an sdist brings its own)")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    ranks_file, licence = read_source(args.source, args.license)
    text = build_tokenizer_json(parse_ranks(ranks_file))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenizer.json").write_text(text, encoding="utf-8")
    (args.out / "LICENSE").write_text(licence, encoding="utf-8")
    (args.out / "PROVENANCE.md").write_text(
        PROVENANCE.format(eos=EOS_TOKEN, image=IMAGE_TOKEN, package=PACKAGE, version=VERSION, sdist=SDIST,
                          member=MEMBER, sha256=SHA256),
        encoding="utf-8",
    )
    print(f"wrote {args.out}/tokenizer.json ({len(text.encode())} bytes), LICENSE, PROVENANCE.md")


if __name__ == "__main__":
    main()
