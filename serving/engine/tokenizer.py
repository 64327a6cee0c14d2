"""Reads an exported `tokenizer.json` (char or BPE) without torch or model_src."""

from __future__ import annotations

import json
from pathlib import Path

N_SPECIALS = 4  # <pad> <bos> <eos> <unk>, ids 0-3, fixed for every tokenizer
UNK_ID = 3


class ServingTokenizer:
    def __init__(self, data: dict) -> None:
        self.kind = data["kind"]
        if self.kind == "char":
            self.vocab: list[str] = data["vocab"]
            self._index = {t: i for i, t in enumerate(self.vocab)}
            self._hf = None
        elif self.kind == "bpe":
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(json.dumps(data["tokenizer"]))
            self.vocab = [self._hf.id_to_token(i) for i in range(self._hf.get_vocab_size())]
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")

    @classmethod
    def load(cls, path: Path) -> ServingTokenizer:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return [self._index.get(c, UNK_ID) for c in text]

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if N_SPECIALS <= i < len(self.vocab)]
        if self._hf is not None:
            return self._hf.decode(ids)
        return "".join(self.vocab[i] for i in ids)

    def extend(self, text: str, ids: list[int]) -> str:
        """The decoded text once `ids[-1]` joins `ids[:-1]`, whose text is `text`: one lookup for characters;
        BPE pieces can merge with what came before, so those decode the whole output again."""
        if self._hf is not None:
            return self.decode(ids)
        last = ids[-1]
        return text + self.vocab[last] if N_SPECIALS <= last < len(self.vocab) else text

    def token_strings(self, ids: list[int]) -> list[str]:
        """Display strings of each id, e.g. for heatmap axes."""
        if self._hf is not None:
            return [self._hf.decode([i]) if i >= N_SPECIALS else self.vocab[i] for i in ids]
        return [self.vocab[i] if 0 <= i < len(self.vocab) else "<?>" for i in ids]
