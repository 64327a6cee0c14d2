"""A Marian checkpoint built locally, saved exactly as `transformers` saves one: for tests and size measurements.

Random weights, SentencePiece models trained on generated sentences, a joint vocabulary (the sources' and targets'
pieces, padded with filler pieces up to `vocab_size`, then <pad> last as opus-mt has it). Nothing is downloaded.
Needs the `hf` extra (transformers, sentencepiece).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

SOURCE_WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "house", "green", "blue", "tree", "river",
                "quickly", "slowly", "sees", "big", "small", "bird", "over", "under", "café", "naïve")
TARGET_WORDS = ("le", "chat", "était", "assis", "sur", "tapis", "un", "chien", "courait", "vers", "maison", "vert",
                "bleu", "arbre", "rivière", "vite", "lentement", "voit", "grand", "petit", "oiseau", "où", "été")


GAIN = 7.0


@dataclass(frozen=True)
class MarianShape:
    d_model: int = 32
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 64
    vocab_size: int = 0  # 0: just the trained pieces; otherwise padded with filler pieces to this size
    max_positions: int = 128
    activation: str = "swish"
    eos_bias: float = 1.5  # added to </s>'s final logits bias so random weights end sentences at varied lengths
    seed: int = 0
    separate_vocabs: bool = False  # Marian's separate source and target vocabularies (and embeddings)


OPUS_MT = MarianShape(d_model=512, heads=8, encoder_layers=6, decoder_layers=6, ffn_dim=2048, vocab_size=58101,
                      max_positions=512, eos_bias=0.0)


def sentences(words: tuple[str, ...], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def _train_spm(texts: list[str], vocab_size: int) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                             model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def _pieces(processors, language_codes: bool) -> list[str]:
    """Marian's ids: </s> 0, <unk> 1, then the SentencePiece models' pieces (<pad> comes last, see _filled)."""
    pieces = ["</s>", "<unk>"]
    for sp in processors:
        pieces += [p for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size())) if p not in pieces
                   and p not in ("<unk>", "<s>", "</s>")]
    return pieces + ([">>fra<<", ">>spa<<"] if language_codes else [])


def _filled(pieces: list[str], size: int) -> list[str]:
    """Filler pieces up to `size` - 1, then <pad>."""
    return [*pieces, *(f"\u2581filler{i}" for i in range(size - 1 - len(pieces))), "<pad>"]


def build_marian(out: Path, shape: MarianShape = MarianShape(),
                 texts: tuple[list[str], list[str]] | None = None, spm_vocab: int = 60) -> Path:
    """Write a Marian model folder (config, safetensors, source.spm, target.spm, vocab.json, tokenizer config).
    `texts`: the (source, target) sentences to train the SentencePiece models on (default: generated from
    SOURCE_WORDS and TARGET_WORDS)."""
    import sentencepiece
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spms = {}
    if texts is None:
        texts = sentences(SOURCE_WORDS, 2000, shape.seed), sentences(TARGET_WORDS, 2000, shape.seed + 1)
    for name, side in zip(("source.spm", "target.spm"), texts, strict=True):
        spms[name] = _train_spm(side, spm_vocab)
        (out / name).write_bytes(spms[name])
    processors = {name: sentencepiece.SentencePieceProcessor(model_proto=data) for name, data in spms.items()}
    if shape.separate_vocabs:  # one vocabulary per side, <pad> at the same id in both (Marian's pad_token_id)
        source, target = _pieces([processors["source.spm"]], True), _pieces([processors["target.spm"]], False)
        size = max(shape.vocab_size, len(source) + 1, len(target) + 1)
        source, target = _filled(source, size), _filled(target, size)
        (out / "target_vocab.json").write_text(json.dumps({p: i for i, p in enumerate(target)}, ensure_ascii=False))
    else:
        source = _filled(_pieces(list(processors.values()), True), shape.vocab_size)
        target = source
    (out / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(source)}, ensure_ascii=False))
    pieces, pad = source, len(source) - 1
    config = MarianConfig(vocab_size=len(pieces), decoder_vocab_size=len(target), d_model=shape.d_model,
                          encoder_layers=shape.encoder_layers, decoder_layers=shape.decoder_layers,
                          encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads,
                          encoder_ffn_dim=shape.ffn_dim, decoder_ffn_dim=shape.ffn_dim,
                          max_position_embeddings=shape.max_positions, activation_function=shape.activation,
                          scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0,
                          forced_eos_token_id=0, dropout=0.1,
                          share_encoder_decoder_embeddings=not shape.separate_vocabs)
    torch.manual_seed(shape.seed)
    model = MarianMTModel(config)
    with torch.no_grad():  # random at a scale where every input matters (transformers' init is 0.02 everywhere)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
            elif param.dim() == 2:  # Linear (out, in) and the shared embedding (V, C): std 1/sqrt(in)
                param.normal_(0.0, param.shape[1] ** -0.5)
        # Small token embeddings (x sqrt(d_model) they are 0.3 against the positions' 0.7) so the decoder's state
        # moves with the position instead of repeating the previous token; a large gain on the last LayerNorm
        # brings the tied output logits back to a std of about 2.
        model.get_input_embeddings().weight.mul_(0.3)
        if shape.separate_vocabs:
            model.get_decoder().get_input_embeddings().weight.mul_(0.3)
        model.model.decoder.layers[-1].final_layer_norm.weight.normal_(GAIN, 1.0)
        model.final_logits_bias.normal_(0.0, 0.5)
        model.final_logits_bias[0, 0] += shape.eos_bias
        # Real opus-mt checkpoints hold a zero <pad> row (trained with padding_idx); the decoder starts from <pad>,
        # and engines that start from a zero vector instead (CTranslate2) agree with transformers only then.
        model.get_input_embeddings().weight[pad].zero_()
        if shape.separate_vocabs:
            model.get_decoder().get_input_embeddings().weight[pad].zero_()
    model.generation_config.bad_words_ids = [[pad]]  # as opus-mt's generation_config.json has it
    model.save_pretrained(out)
    target_vocab = {"target_vocab_file": str(out / "target_vocab.json")} if shape.separate_vocabs else {}
    tokenizer = MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"),
                                source_lang="en", target_lang="fr", separate_vocabs=shape.separate_vocabs,
                                **target_vocab)
    tokenizer.save_pretrained(out)
    return out
