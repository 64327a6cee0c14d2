"""Tokenizers: characters for the built-in tasks, byte-pair encoding for user corpora, Marian's SentencePiece
models for imported checkpoints; all saved as JSON.

Special tokens are fixed for the char and BPE tokenizers: <pad>=0, <bos>=1, <eos>=2, <unk>=3; an imported
Marian vocabulary keeps its own ids (see `MarianTokenizer`). The JSON file is the one contract with export and
serving, which read it without this module (see `serving/engine/tokenizer.py`).
"""

from __future__ import annotations

import base64
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


class MarianTokenizer:
    """Marian's tokenization, as `transformers`' MarianTokenizer does it.

    Sources: a leading language code (`>>fra<<`) kept whole, the rest cut into pieces by the source SentencePiece
    model, pieces looked up in the vocabulary (absent ones are <unk>), </s> appended. Outputs: the ids' pieces
    joined by the target SentencePiece model, special tokens dropped. One vocabulary serves both sides unless
    the checkpoint has a separate target vocabulary. Both SentencePiece models travel inside the JSON (base64).
    """

    kind = "marian"

    def __init__(self, source_spm: bytes, target_spm: bytes, vocab: list[str], target_vocab: list[str] | None,
                 specials: dict[str, int]) -> None:
        import sentencepiece

        self.source_spm, self.target_spm = source_spm, target_spm
        self._source = sentencepiece.SentencePieceProcessor(model_proto=source_spm)
        self._target = sentencepiece.SentencePieceProcessor(model_proto=target_spm)
        self.vocab, self.target_vocab, self.specials = vocab, target_vocab, specials
        self._index = {piece: i for i, piece in enumerate(vocab)}
        self.eos_id, self.unk_id = specials["</s>"], specials["<unk>"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        code = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[: end + 2]], text[end + 2:]
        pieces = code + self._source.encode(text, out_type=str)
        return [self._index.get(p, self.unk_id) for p in pieces] + [self.eos_id]

    def encode_target(self, text: str) -> list[int]:
        """A target text as training labels: target SentencePiece pieces in the target vocabulary, no </s>."""
        index = {piece: i for i, piece in enumerate(self.target_vocab)} if self.target_vocab else self._index
        return [index.get(p, self.unk_id) for p in self._target.encode(text, out_type=str)]

    def decode(self, ids: Iterable[int]) -> str:
        vocab, skip = self.target_vocab or self.vocab, set(self.specials.values())
        pieces = [vocab[i] for i in ids if i not in skip and 0 <= i < len(vocab)]
        return self._target.decode_pieces(pieces).replace("\u2581", " ").strip()

    def to_dict(self) -> dict:
        b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
        return {"kind": self.kind, "source_spm": b64(self.source_spm), "target_spm": b64(self.target_spm),
                "vocab": self.vocab, "target_vocab": self.target_vocab, "specials": self.specials}

    @classmethod
    def from_dict(cls, data: dict) -> MarianTokenizer:
        return cls(base64.b64decode(data["source_spm"]), base64.b64decode(data["target_spm"]), data["vocab"],
                   data.get("target_vocab"), data["specials"])


Tokenizer = CharTokenizer | BPETokenizer | MarianTokenizer


def tokenizer_from_dict(data: dict) -> Tokenizer:
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["vocab"][len(SPECIALS):])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(data["tokenizer"])))
    if kind == "marian":
        return MarianTokenizer.from_dict(data)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'char', 'bpe' or 'marian')")


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    Path(path).write_text(json.dumps(tok.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")


def load_tokenizer(path: Path) -> Tokenizer:
    return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
