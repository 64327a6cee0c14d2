"""A version's `tokenizer.json` as serving uses it: the one implementation of `model_repository.tokenizer` (char,
BPE or Marian SentencePiece; no torch), loaded from the version folder."""

from __future__ import annotations

from pathlib import Path

from model_repository.tokenizer import Detokenizer, Tokenizer, load_tokenizer

ServingTokenizer = Tokenizer  # what jobs, the runner and the API hold

__all__ = ["Detokenizer", "ServingTokenizer", "load"]


def load(path: Path) -> ServingTokenizer:
    return load_tokenizer(path)
