"""Tokenizers, the one implementation training, export and serving share: characters for the built-in tasks,
byte-pair encoding for user corpora, Marian's SentencePiece models for imported checkpoints; all saved as the JSON
that travels in checkpoints and version folders (`tokenizer.json`).

Special tokens are fixed for the char and BPE tokenizers: <pad>=0, <bos>=1, <eos>=2, <unk>=3; an imported
Marian vocabulary keeps its own ids (see `MarianTokenizer`). No torch here: serving uses it as training does.
`tokenizers` and `sentencepiece` are imported only by the kinds that need them. `Detokenizer` turns a growing
output into text a token at a time without decoding the whole output again at every step.
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
    unk_id = UNK_ID

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

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Each token of `encode(text)` as the [start, end) character offsets it covers in `text`."""
        return [(i, i + 1) for i in range(len(text))]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i >= len(SPECIALS) and i < len(self.vocab))

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Display strings of each id, e.g. for heatmap axes."""
        return [self.vocab[i] if 0 <= i < len(self.vocab) else "<?>" for i in ids]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab, "specials": dict(zip(SPECIALS, range(4), strict=True))}


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library, trained on a user corpus."""

    kind = "bpe"
    unk_id = UNK_ID

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

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Each token of `encode(text)` as the [start, end) character offsets it covers in `text`."""
        return [tuple(o) for o in self._tok.encode(text, add_special_tokens=False).offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([i for i in ids if i >= len(SPECIALS)])

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        return [self._tok.decode([i]) if i >= len(SPECIALS) else SPECIALS[i] if 0 <= i < len(SPECIALS) else "<?>"
                for i in ids]

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

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Each token of `encode(text)` as the [start, end) character offsets it covers in `text`: a language
        code its own text, a piece its surface (a lone word-boundary piece covers nothing), </s> nothing."""
        spans, offset = [], 0
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            spans, offset, text = [(0, end + 2)], end + 2, text[end + 2:]
        data = text.encode("utf-8")
        chars = [0] * (len(data) + 1)  # byte offset -> character offset
        at = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            chars[at:at + n] = [i] * n
            at += n
        chars[len(data)] = len(text)
        for piece in self._source.encode(text, out_type="proto").pieces:
            spans.append((offset + chars[piece.begin], offset + chars[piece.end]))
        return [*spans, (offset + len(text), offset + len(text))]

    def encode_target(self, text: str) -> list[int]:
        """A target text as training labels: target SentencePiece pieces in the target vocabulary, no </s>."""
        index = {piece: i for i, piece in enumerate(self.target_vocab)} if self.target_vocab else self._index
        return [index.get(p, self.unk_id) for p in self._target.encode(text, out_type=str)]

    def decode(self, ids: Iterable[int]) -> str:
        vocab, skip = self.target_vocab or self.vocab, set(self.specials.values())
        pieces = [vocab[i] for i in ids if i not in skip and 0 <= i < len(vocab)]
        return self._target.decode_pieces(pieces).replace("\u2581", " ").strip()

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """The SentencePiece piece of each (source) id."""
        return [self.vocab[i] if 0 <= i < len(self.vocab) else "<?>" for i in ids]

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


class Detokenizer:
    """The text of a growing output, one token at a time. Characters are looked up; subword pieces (BPE bytes,
    SentencePiece spaces) can change how what came before reads, so the text of a short window is decoded twice,
    without and with the new tokens, and the difference appended, as vLLM and TGI do: the cost per token no longer
    grows with the output. A window whose text ends inside a character (U+FFFD) or adds nothing waits for the
    next token. `text` is what was released so far; `finish()` checks it against one whole decode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self._prefix = self._read = 0  # ids[prefix:read] is the window's already-released part
        self._chars = tokenizer.vocab if isinstance(tokenizer, CharTokenizer) else None

    def add(self, token: int) -> str:
        """Append `token`; returns the text it releases (may be empty)."""
        self.ids.append(token)
        if self._chars is not None:
            piece = self._chars[token] if len(SPECIALS) <= token < len(self._chars) else ""
            self.text += piece
            return piece
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        piece = after[len(before):]
        self.text += piece
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def finish(self) -> str:
        """The whole output's text: what was released, plus what a last window held back, checked against one
        decode of every id (which wins, should the windows ever have read differently)."""
        whole = self.tokenizer.decode(self.ids)
        self.text = whole
        return whole
