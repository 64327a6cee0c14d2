"""A version's `tokenizer.json` as serving holds it: the one implementation of `model_repository.tokenizer`
(char, BPE or Marian SentencePiece; no torch), loaded with its `load_tokenizer`."""

from __future__ import annotations

from model_repository.tokenizer import Detokenizer, Tokenizer

ServingTokenizer = Tokenizer  # what jobs, the runner and the API hold

__all__ = ["Detokenizer", "ServingTokenizer"]
