"""The demo model's tokenizer: a small GPT-2-style byte-level BPE trained on the scenes' texts."""

from __future__ import annotations

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from ..text import EOS_TOKEN, IMAGE_TOKEN, Tokenizer


def train_byte_level_bpe(texts, vocab_size: int, extra_special: tuple[str, ...] = ()) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts`, with EOS and the image token added last
    (as in GPT-2 + MAGMA: ..., <|endoftext|>, <|image|>); `extra_special` tokens go just before them."""
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
