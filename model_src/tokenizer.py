"""Tokenizers: characters for the built-in tasks, byte-pair encoding for user corpora; both saved as JSON.

Special tokens are fixed for every tokenizer: <pad>=0, <bos>=1, <eos>=2, <unk>=3. The JSON file is the one
contract with export and serving, which read it without this module (see `serving/tokenizer.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.vocab: list[str] = list(SPECIALS) + sorted(set(chars) - set(SPECIALS))
        self._index = {t: i for i, t in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(c, UNK_ID) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i >= len(SPECIALS) and i < len(self.vocab))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab, "specials": dict(zip(SPECIALS, range(4), strict=True))}


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library, trained on a user corpus."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def from_texts(cls, texts: Iterable[str], vocab_size: int = 1000) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([i for i in ids if i >= len(SPECIALS)])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": json.loads(self._tok.to_str()),
                "specials": dict(zip(SPECIALS, range(4), strict=True))}


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_dict(data: dict) -> Tokenizer:
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["vocab"][len(SPECIALS):])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(data["tokenizer"])))
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'bpe')")


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    Path(path).write_text(json.dumps(tok.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")


def load_tokenizer(path: Path) -> Tokenizer:
    return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
