"""The tokenizers training uses: the one implementation, shared with export and serving, is
`model_repository.tokenizer` (no torch)."""

from model_repository.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    UNK_ID,
    BPETokenizer,
    CharTokenizer,
    Detokenizer,
    MarianTokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "SPECIALS", "UNK_ID", "BPETokenizer", "CharTokenizer", "Detokenizer",
           "MarianTokenizer", "Tokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_from_dict"]
