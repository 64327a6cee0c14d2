"""`attnserve import-hf`: a Marian checkpoint as `transformers` saves it -> this project's checkpoint directory.

Reads `config.json`, `model.safetensors` (or `pytorch_model.bin`), `source.spm`, `target.spm`, `vocab.json`
(and `target_vocab.json` when the vocabularies are separate) and `tokenizer_config.json`; writes weights, config
and tokenizer in the layout `export` reads (model_src.checkpoint). Needs neither `transformers` nor the hub: a
local folder is enough. Every Marian setting is mapped to a `ModelConfig` option or refused by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import save_model
from .model import ModelConfig, Seq2SeqTransformer, sinusoidal_positions
from .tokenizer import MarianTokenizer

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish"}
# Marian's stack names -> ours, per layer (the rest of each name, e.g. `.weight`, carries over)
ENCODER_LAYER = {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "fc1": "ff.fc1", "fc2": "ff.fc2",
                 "final_layer_norm": "norm2"}
DECODER_LAYER = {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "encoder_attn": "cross_attn",
                 "encoder_attn_layer_norm": "norm2", "fc1": "ff.fc1", "fc2": "ff.fc2", "final_layer_norm": "norm3"}


class MarianImportError(ValueError):
    """A folder that is not a Marian checkpoint, or one whose settings this model cannot express."""


def _require(config: dict, field: str, ok, expected: str) -> None:
    if field in config and not ok(config[field]):
        raise MarianImportError(f"config.json: {field}={config[field]!r} cannot be expressed ({expected})")


def model_config(config: dict, vocab_size: int, target_vocab_size: int, generation: dict | None = None) -> ModelConfig:
    """Marian's config.json (and generation_config.json) as a ModelConfig; refuses, by field name, what the model
    cannot express. Never generated: the single-token `bad_words_ids` (opus-mt lists its <pad>) and <pad> itself,
    which is the decoder's start token."""
    if config.get("model_type") != "marian":
        raise MarianImportError(f"config.json: model_type={config.get('model_type')!r}; only 'marian' can be imported")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config.get(a) != config.get(b):
            raise MarianImportError(f"config.json: {a}={config.get(a)} differs from {b}={config.get(b)}; one value "
                               "serves both stacks here")
    # Older conversions carry BART-style switches; only Marian's own values can be expressed.
    for field, value in (("normalize_before", False), ("normalize_embedding", False), ("add_final_layer_norm", False),
                         ("static_position_embeddings", True), ("add_bias_logits", False)):
        _require(config, field, lambda v, want=value: v == want, f"needs {value}")
    _require(config, "activation_function", lambda v: v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}")
    _require(config, "encoder_layerdrop", lambda v: not v, "layer drop is a training setting; needs 0")
    eos, pad = config.get("eos_token_id", 0), config.get("pad_token_id")
    start = config.get("decoder_start_token_id", pad)
    if isinstance(eos, list):
        raise MarianImportError(f"config.json: eos_token_id={eos!r}: one end token is supported")
    if config.get("vocab_size") != vocab_size:
        raise MarianImportError(f"config.json: vocab_size={config.get('vocab_size')} but vocab.json holds {vocab_size} "
                           "tokens")
    decoder_vocab = config.get("decoder_vocab_size") or config.get("vocab_size")
    if decoder_vocab != target_vocab_size:
        raise MarianImportError(f"config.json: decoder_vocab_size={decoder_vocab} but the target vocabulary holds "
                           f"{target_vocab_size} tokens")
    try:
        return ModelConfig(
            src_vocab_size=vocab_size, tgt_vocab_size=target_vocab_size, d_model=config["d_model"],
            n_heads=config["encoder_attention_heads"], n_encoder_layers=config["encoder_layers"],
            n_decoder_layers=config["decoder_layers"], d_ff=config["encoder_ffn_dim"],
            dropout=float(config.get("dropout", 0.1)), max_len=config["max_position_embeddings"], pad_id=pad,
            bos_id=start, eos_id=eos, share_embeddings=config.get("share_encoder_decoder_embeddings", True),
            pre_norm=False, positions="halves", scale_embeddings=bool(config.get("scale_embedding", False)),
            activation=ACTIVATIONS[config.get("activation_function", "gelu")],
            tie_output_embeddings=bool(config.get("tie_word_embeddings", True)),
            suppress_ids=_suppressed(config, generation or {}, pad, eos))
    except KeyError as e:
        raise MarianImportError(f"config.json: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise MarianImportError(f"config.json: {e}") from e


def _suppressed(config: dict, generation: dict, pad: int | None, eos: int) -> tuple[int, ...]:
    bad = generation.get("bad_words_ids", config.get("bad_words_ids")) or []
    ids = {words[0] for words in bad if len(words) == 1}
    if any(len(words) != 1 for words in bad):
        raise MarianImportError(f"bad_words_ids={bad!r}: only single tokens can be suppressed here")
    if pad is not None:
        ids.add(pad)
    return tuple(sorted(ids - {eos}))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise MarianImportError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _first(weights: dict, *names: str) -> torch.Tensor | None:
    return next((weights[n] for n in names if n in weights), None)


def map_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Marian's state dict -> ours. Positions are checked against our table, not copied (ours is computed)."""
    weights = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in weights.items()}
    table = sinusoidal_positions(cfg.max_len, cfg.d_model, cfg.positions)
    for stack in ("encoder", "decoder"):
        stored = weights.pop(f"{stack}.embed_positions.weight", None)
        if stored is not None and (stored.shape != table.shape or (stored.float() - table).abs().max() > 1e-4):
            raise MarianImportError(f"{stack}.embed_positions.weight is not the sinusoidal table Marian computes")
    shared = _first(weights, "shared.weight", "encoder.embed_tokens.weight")
    out = {"src_embed.weight": shared,
           "tgt_embed.weight": shared if cfg.share_embeddings else _first(weights, "decoder.embed_tokens.weight")}
    head = _first(weights, "lm_head.weight")
    out["lm_head.weight"] = out["tgt_embed.weight"] if cfg.tie_output_embeddings or head is None else head
    bias = _first(weights, "final_logits_bias")
    out["lm_head.bias"] = bias.reshape(-1) if bias is not None else torch.zeros(cfg.tgt_vocab_size)  # (1, V) -> (V,)
    for stack, n, names in (("encoder", cfg.n_encoder_layers, ENCODER_LAYER),
                            ("decoder", cfg.n_decoder_layers, DECODER_LAYER)):
        for i in range(n):
            for theirs, ours in names.items():
                for kind in ("weight", "bias"):
                    for proj in (("q_proj.", "k_proj.", "v_proj.", "out_proj.") if "attn" in theirs
                                 and "norm" not in theirs else ("",)):
                        key = f"{stack}.layers.{i}.{theirs}.{proj}{kind}"
                        if key not in weights:
                            raise MarianImportError(f"weights: {key} is missing")
                        out[f"{stack}.{i}.{ours}.{proj}{kind}"] = weights[key]
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise MarianImportError(f"weights: nothing to fill {', '.join(missing)}")
    return out


def read_tokenizer(folder: Path) -> MarianTokenizer:
    tok_config = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))

    def vocab_list(path: Path) -> list[str]:
        if not path.is_file():
            raise MarianImportError(f"{folder}: missing {path.name}")
        index = json.loads(path.read_text(encoding="utf-8"))
        if sorted(index.values()) != list(range(len(index))):
            raise MarianImportError(f"{path}: ids are not 0..{len(index) - 1} without gaps")
        pieces = [""] * len(index)
        for piece, i in index.items():
            pieces[i] = piece
        return pieces

    for name in ("source.spm", "target.spm"):
        if not (folder / name).is_file():
            raise MarianImportError(f"{folder}: missing {name}")
    vocab = vocab_list(folder / "vocab.json")
    target = vocab_list(folder / Path(tok_config.get("target_vocab_file") or "target_vocab.json").name) \
        if tok_config.get("separate_vocabs") else None
    index = {p: i for i, p in enumerate(vocab)}
    specials = {}
    for role, default in (("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<pad>")):
        piece = tok_config.get(role, default)
        piece = piece["content"] if isinstance(piece, dict) else piece
        if piece not in index:
            raise MarianImportError(f"vocab.json: the {role} {piece!r} is not in the vocabulary")
        specials[default] = index[piece]
        if target is not None and (specials[default] >= len(target) or target[specials[default]] != piece):
            raise MarianImportError(f"target vocabulary: the {role} {piece!r} is not at id {specials[default]} as "
                                    "in vocab.json")
    return MarianTokenizer((folder / "source.spm").read_bytes(), (folder / "target.spm").read_bytes(), vocab, target,
                           specials)


def import_marian(folder: Path, out: Path) -> tuple[Seq2SeqTransformer, MarianTokenizer]:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MarianImportError(f"{folder}: not a transformers checkpoint folder (no config.json)")
    hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = read_tokenizer(folder)
    gen_path = folder / "generation_config.json"
    generation = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    cfg = model_config(hf_config, tokenizer.vocab_size, len(tokenizer.target_vocab or tokenizer.vocab), generation)
    if (tokenizer.eos_id, tokenizer.specials["<pad>"]) != (cfg.eos_id, cfg.pad_id):
        raise MarianImportError(f"tokenizer and config.json disagree: </s>={tokenizer.eos_id}, <pad>="
                           f"{tokenizer.specials['<pad>']} vs eos_token_id={cfg.eos_id}, pad_token_id={cfg.pad_id}")
    model = Seq2SeqTransformer(cfg)
    state = map_weights(read_weights(folder), cfg)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    if wrong:
        raise MarianImportError(f"weights: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, config.json implies "
                           f"{tuple(expected[wrong[0]].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    save_model(out, model, tokenizer, {"task": None, "imported_from": {
        "format": "marian", "path": str(folder.resolve()), "name_or_path": hf_config.get("_name_or_path", "")}})
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnserve import-hf",
                                description="Import a Marian (opus-mt) checkpoint saved by transformers, from a "
                                            "local folder, as an attnserve checkpoint that export reads.")
    p.add_argument("folder", type=Path, help="the folder save_pretrained wrote (or a downloaded opus-mt model)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    args = p.parse_args(argv)
    try:
        model, tokenizer = import_marian(args.folder, args.out)
    except MarianImportError as e:
        print(f"import-hf: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(f"imported {args.folder} -> {args.out}: {model.num_parameters():,} parameters, d_model {c.d_model}, "
          f"{c.n_heads} heads, {c.n_encoder_layers}+{c.n_decoder_layers} layers, vocabulary {tokenizer.vocab_size}")
    return 0
