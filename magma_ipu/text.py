"""The tokenizer: GPT-2's byte-level BPE plus `<|image|>`; no BOS, `<|endoftext|>` is EOS."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer as _HFTokenizer

from .errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|image|>"


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
        """From a tokenizer.json file, a folder holding one, or a hub repository name (e.g. gpt2)."""
        path = Path(source)
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

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns token ids, one at a time, into text pieces that are always whole characters.

    A byte-level BPE token can end inside a multi-byte character; such a piece is held back
    (it decodes to U+FFFD) until the tokens that complete it arrive.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def train_byte_level_bpe(texts, vocab_size: int, extra_special: tuple[str, ...] = ()) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts`, with EOS and the image token added last
    (as in GPT-2 + MAGMA: ..., <|endoftext|>, <|image|>); `extra_special` tokens go just before them."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2 - len(extra_special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    specials = [*extra_special, EOS_TOKEN, IMAGE_TOKEN]
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return Tokenizer(backend)
