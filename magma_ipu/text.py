"""The tokenizer: GPT-2's byte-level BPE plus `<|image|>`; no BOS, `<|endoftext|>` is EOS."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer as _HFTokenizer

from .errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|image|>"

# Tokenizer names served from files inside the package, so they load with no network. GPT-2's is
# derived from its published BPE ranks by scripts/make_gpt2_tokenizer.py (see PROVENANCE.md there).
SHIPPED = {"gpt2": Path(__file__).parent / "assets" / "gpt2" / "tokenizer.json"}

# The original MAGMA decodes with the GPT-2 tokenizer of transformers, whose default
# clean_up_tokenization_spaces=True removes the space before punctuation and English contractions.
# These are its replacements, applied in this order, each over the whole text: the order matters, as
# one replacement can make a match for a later one. Each `old` starts with a space and each `new` is
# `old` without its spaces; TextStream relies on that.
CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


class Tokenizer:
    def __init__(self, backend: _HFTokenizer):
        self.backend = backend
        if backend.token_to_id(IMAGE_TOKEN) is None:
            backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True)])
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ConfigError(f"tokenizer has no {EOS_TOKEN} token")
        self.eos_id: int = eos
        self.image_id: int = backend.token_to_id(IMAGE_TOKEN)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.special_tokens = frozenset(t.content for t in backend.get_added_tokens_decoder().values() if t.special)

    @classmethod
    def load(cls, source: str | Path) -> "Tokenizer":
        """From a tokenizer.json file, a folder holding one, a shipped name (gpt2: no network), or a
        Hugging Face Hub repository name."""
        path = SHIPPED.get(str(source), Path(source))
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.is_file():
            try:
                return cls(_HFTokenizer.from_file(str(path)))
            except Exception as e:  # tokenizers raises bare Exceptions on malformed files
                raise ConfigError(f"tokenizer file {str(path)!r} could not be read: {e}") from None
        if path.suffix == ".json" or str(source).startswith(("/", ".", "~")):
            raise ConfigError(f"tokenizer file {str(source)!r} does not exist")
        from .download import hub_file

        return cls(_HFTokenizer.from_file(str(hub_file(str(source), "tokenizer.json"))))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], clean_up: bool = True) -> str:
        """The text of `ids`, special tokens left out; `clean_up` spaces as the original does (CLEANUPS)."""
        text = self.backend.decode(ids, skip_special_tokens=True)
        return clean_up_spaces(text) if clean_up else text


def clean_up_spaces(text: str) -> str:
    for old, new in CLEANUPS:
        text = text.replace(old, new)
    return text


# What may end a text whose cleanup is still open, i.e. could change when more text follows: the
# proper prefixes of the CLEANUPS patterns, less their leading space (" n" of " n't" gives "n").
_OPEN_ENDS = frozenset(old[1:k] for old, _ in CLEANUPS for k in range(1, len(old)))


def _settled_length(text: str) -> int:
    """The length of the longest prefix of `text` whose cleanup no following text can change: for
    any `more`, clean_up_spaces(text + more) == clean_up_spaces(text[:n]) + clean_up_spaces(text[n:] + more).

    Why a cut is safe: every pattern starts with a space and the cleanup only ever deletes spaces.
    Let `tail` be the characters between the last space before the cut and the cut. None of them is
    ever deleted, nor is anything between them, so at every step of the cleanup the left part still
    ends with `tail`. A match across the cut needs the left part to end with a space and an
    `_OPEN_ENDS` string, and that string must then end with `tail` (`tail` holds no space). So where
    `tail` is a suffix of no `_OPEN_ENDS` string, no match ever crosses the cut and each replacement
    treats the two sides apart. Where there is no space before the cut, no match can start left of it.
    """
    n = len(text)
    while n:
        space = text.rfind(" ", 0, n)
        if space < 0 or not any(end.endswith(text[space + 1 : n]) for end in _OPEN_ENDS):
            return n
        n -= 1
    return 0


class TextStream:
    """Turns token ids, one at a time, into text pieces that are always whole characters and
    that join up to `tokenizer.decode` of all the ids.

    A byte-level BPE token can end inside a multi-byte character; such a piece is held back
    (it decodes to U+FFFD) until the tokens that complete it arrive. The space cleanup can change
    text across tokens (" n" then "'t" gives "n't"), so text whose cleanup is still open is held back
    too, until a later token settles it (see _settled_length) or flush.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        raw = self.tokenizer.decode(self.ids, clean_up=False)
        if raw.endswith("\ufffd"):
            return ""
        return self._emit(clean_up_spaces(raw[: _settled_length(raw)]))

    def flush(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        """What `text` adds to what was emitted before (which it always starts with)."""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies are written with these).

    Bytes that are visible, non-space Latin-1 characters stand for themselves; the other 68 (controls,
    space, DEL, NBSP, soft hyphen, ...) take the code points from 256 upwards, in byte order."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in visible}
    extra = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(extra)
            extra += 1
    return mapping
