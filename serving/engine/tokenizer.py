"""Reads an exported `tokenizer.json` (char, BPE or Marian SentencePiece) without torch or model_src."""

from __future__ import annotations

import base64
import json
from pathlib import Path

N_SPECIALS = 4  # <pad> <bos> <eos> <unk>, ids 0-3, fixed for the char and BPE tokenizers
UNK_ID = 3


class _Marian:
    """Marian's SentencePiece tokenization (model_src.tokenizer.MarianTokenizer writes it): source pieces looked
    up in the vocabulary with a leading `>>xx<<` language code kept whole and </s> appended; outputs joined by the
    target SentencePiece model with special tokens dropped."""

    def __init__(self, data: dict) -> None:
        import sentencepiece

        self._source = sentencepiece.SentencePieceProcessor(model_proto=base64.b64decode(data["source_spm"]))
        self._target = sentencepiece.SentencePieceProcessor(model_proto=base64.b64decode(data["target_spm"]))
        self.vocab: list[str] = data["vocab"]
        self.target_vocab: list[str] = data.get("target_vocab") or self.vocab
        self._index = {piece: i for i, piece in enumerate(self.vocab)}
        self.specials = frozenset(data["specials"].values())
        self._eos, self._unk = data["specials"]["</s>"], data["specials"]["<unk>"]

    def encode(self, text: str) -> list[int]:
        code = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[: end + 2]], text[end + 2:]
        pieces = code + self._source.encode(text, out_type=str)
        return [self._index.get(p, self._unk) for p in pieces] + [self._eos]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.target_vocab[i] for i in ids if i not in self.specials and 0 <= i < len(self.target_vocab)]
        return self._target.decode_pieces(pieces).replace("\u2581", " ").strip()


class ServingTokenizer:
    def __init__(self, data: dict) -> None:
        self.kind = data["kind"]
        self._hf = self._marian = None
        if self.kind == "char":
            self.vocab: list[str] = data["vocab"]
            self._index = {t: i for i, t in enumerate(self.vocab)}
        elif self.kind == "bpe":
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(json.dumps(data["tokenizer"]))
            self.vocab = [self._hf.id_to_token(i) for i in range(self._hf.get_vocab_size())]
        elif self.kind == "marian":
            self._marian = _Marian(data)
            self.vocab = self._marian.vocab
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")

    @classmethod
    def load(cls, path: Path) -> ServingTokenizer:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        if self._marian is not None:
            return self._marian.encode(text)
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return [self._index.get(c, UNK_ID) for c in text]

    def decode(self, ids: list[int]) -> str:
        if self._marian is not None:
            return self._marian.decode(ids)
        ids = [i for i in ids if N_SPECIALS <= i < len(self.vocab)]
        if self._hf is not None:
            return self._hf.decode(ids)
        return "".join(self.vocab[i] for i in ids)

    def extend(self, text: str, ids: list[int]) -> str:
        """The decoded text once `ids[-1]` joins `ids[:-1]`, whose text is `text`: one lookup for characters;
        subword pieces can merge with what came before, so those decode the whole output again."""
        if self._hf is not None or self._marian is not None:
            return self.decode(ids)
        last = ids[-1]
        return text + self.vocab[last] if N_SPECIALS <= last < len(self.vocab) else text

    def token_strings(self, ids: list[int]) -> list[str]:
        """Display strings of each id, e.g. for heatmap axes (Marian: the SentencePiece piece itself)."""
        if self._hf is not None:
            return [self._hf.decode([i]) if i >= N_SPECIALS else self.vocab[i] for i in ids]
        return [self.vocab[i] if 0 <= i < len(self.vocab) else "<?>" for i in ids]
