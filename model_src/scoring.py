"""Held-out quality: teacher-forced loss and token accuracy, greedy exact match, and for user corpora BLEU and
chrF (sacrebleu's corpus scores, its default tokenization) of the greedy outputs against the references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Encoded, make_batch
from .decoding import generate
from .model import Seq2SeqTransformer

BATCH = 256


@torch.no_grad()
def evaluate(model: Seq2SeqTransformer, data: list[Encoded], max_new_tokens: int = 48,
             exact_examples: int | None = None, tok=None, references: list[str] | None = None) -> dict:
    """Loss and token accuracy on `data`; exact match (and, given the tokenizer and the reference texts, BLEU and
    chrF) of greedy decoding on its first `exact_examples` pairs."""
    was_training = model.training
    model.eval()
    mcfg, device = model.config, next(model.parameters()).device
    total_loss, total_tokens, correct = 0.0, 0, 0
    for i in range(0, len(data), BATCH):
        src, smask, tin, tmask, labels = (x.to(device) for x in make_batch(data[i:i + BATCH], mcfg))
        logits = model(src, smask, tin, tmask).float()
        keep = labels != mcfg.pad_id
        total_loss += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        correct += (logits.argmax(-1)[keep] == labels[keep]).sum().item()
        total_tokens += keep.sum().item()
    subset = data[: exact_examples or len(data)]
    outputs: list[list[int]] = []
    for i in range(0, len(subset), BATCH):
        outputs += generate(model, [s for s, _ in subset[i:i + BATCH]], max_new_tokens=max_new_tokens)
    result = {"loss": total_loss / total_tokens, "token_accuracy": correct / total_tokens,
              "exact_match": sum(o == t for o, (_, t) in zip(outputs, subset, strict=True)) / len(subset)}
    if tok is not None and references is not None:
        import sacrebleu

        hypotheses = [tok.decode(o) for o in outputs]
        refs = [references[: len(hypotheses)]]
        result["bleu"] = round(sacrebleu.corpus_bleu(hypotheses, refs).score, 2)
        result["chrf"] = round(sacrebleu.corpus_chrf(hypotheses, refs).score, 2)
    if was_training:
        model.train()
    return result
