"""Alignment measured against gold: decode held-out pairs with their cross-attention, align them with
`model_repository.alignment` (the code the server runs), score the links against the task's gold, choose the
method (layer, heads, shift) that aligns best, and carry markup across by the same links.

Scores, per gold link (a target span and the source span it comes from: a `dates` field, a `reverse` character):
- `links_aligned`: the gold links whose every output token links inside the gold source span (the target);
- `precision`: of the links of output characters that gold covers, those inside the gold source span;
- `recall`: of the output characters gold covers, those with a link inside their gold source span;
- `aer`: the alignment error rate with every gold link sure (S = P), which is 1 - F1 of the two.
An output that differs from the reference counts all its gold links as missed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from model_repository.alignment import Aligner, AlignmentMethod, Link, word_links
from model_repository.markup import parse, place
from model_repository.tokenizer import Detokenizer

from .decoding import generate, pad_batch
from .lexical import DiceLexicon, agreement, scores
from .model import Seq2SeqTransformer
from .tasks import gold_alignment, tsv_task

BATCH = 128
S = TypeVar("S")


@dataclass
class Decoded:
    """One source decoded greedily, with the cross-attention of every step (teacher-forced on its own output)."""

    source: str
    spans: list[tuple[int, int]]
    output_ids: list[int]
    text: str
    targets: list[tuple[int, int]]  # per output token: the characters it added to `text`
    cross: np.ndarray  # (L, nh, T+1, S): step t chose token t (step T chose </s>)


@torch.no_grad()
def decode_with_attention(model: Seq2SeqTransformer, tok, sources: list[str], max_new_tokens: int = 48,
                          progress=None) -> list[Decoded]:
    model.eval()
    cfg, out = model.config, []
    for i in range(0, len(sources), BATCH):
        texts = sources[i:i + BATCH]
        src = [tok.encode(t) for t in texts]
        outputs = generate(model, src, max_new_tokens=max_new_tokens)
        src_ids, src_mask = pad_batch(src, cfg.pad_id)
        tgt_ids, tgt_mask = pad_batch([[cfg.bos_id, *o] for o in outputs], cfg.pad_id)
        _logits, _self, cross = model.decode(tgt_ids, tgt_mask, model.encode(src_ids, src_mask), src_mask)
        cross = cross.float().numpy()  # (L, B, nh, T+1, S)
        for b, (text, ids, o) in enumerate(zip(texts, src, outputs, strict=True)):
            detok, targets = Detokenizer(tok), []
            for token in o:
                before = len(detok.text)
                detok.add(token)
                targets.append((before, len(detok.text)))
            out.append(Decoded(text, tok.spans(text), o, detok.finish(), targets,
                               cross[:, b, :, : len(o) + 1, : len(ids)]))
        if progress is not None:
            progress(min(i + BATCH, len(sources)), len(sources))
    return out


def links_of(d: Decoded, method: AlignmentMethod) -> list[Link]:
    """The links the server gives for this output: the same `Aligner`, fed the same einsum, every step at once."""
    aligner = Aligner(method, d.spans, d.source)
    steps = method.masses(d.cross.transpose(0, 2, 1, 3)[:, :, :, None, :])  # (L, T+1, nh, 1, S) -> (T+1, S)
    for t, mass in enumerate(steps):
        aligner.step(mass)
        if t < len(d.targets):
            start, end = d.targets[t]
            aligner.token(start, end, d.text[start:end])
    return aligner.finish(len(d.text))


@dataclass
class AlignmentScore:
    pairs: int = 0
    gold_links: int = 0
    links_aligned: int = 0
    gold_chars: int = 0
    chars_right: int = 0
    predicted: int = 0
    predicted_right: int = 0

    def add(self, links: list[Link], gold: list[tuple[int, int, int, int]], same_output: bool) -> None:
        self.pairs += 1
        self.gold_links += len(gold)
        for ss, se, ts, te in gold:
            self.gold_chars += te - ts
            if not same_output:
                continue
            mine = [x for x in links if x.target_start < te and ts < x.target_end]
            inside = [ss <= x.source_start and x.source_end <= se for x in mine]
            self.predicted += len(mine)
            self.predicted_right += sum(inside)
            self.links_aligned += bool(mine) and all(inside)
            self.chars_right += sum(1 for c in range(ts, te)
                                    if any(ok and x.target_start <= c < x.target_end for x, ok in zip(mine, inside,
                                                                                                     strict=True)))

    @property
    def rate(self) -> float:
        return self.links_aligned / max(self.gold_links, 1)

    def summary(self) -> dict:
        p = self.predicted_right / max(self.predicted, 1)
        r = self.chars_right / max(self.gold_chars, 1)
        return {**asdict(self), "links_aligned_rate": round(self.rate, 5), "precision": round(p, 5),
                "recall": round(r, 5), "aer": round(1 - 2 * p * r / (p + r) if p + r else 1.0, 5)}


def score(decoded: list[Decoded], pairs: list[tuple[str, str]], task: str, method: AlignmentMethod) -> AlignmentScore:
    s = AlignmentScore()
    for d, (src, tgt) in zip(decoded, pairs, strict=True):
        gold = gold_alignment(task, src, tgt) or []
        s.add(links_of(d, method), gold, d.text == tgt)
    return s


def _key(s: AlignmentScore) -> tuple:
    return -s.rate, s.summary()["aer"]


def choose(n_layers: int, n_heads: int, rate: Callable[[AlignmentMethod], S],
           key: Callable[[S], tuple]) -> tuple[AlignmentMethod, list[tuple[AlignmentMethod, S]]]:
    """The heads to average and the shift, by forward selection: each single head with each shift, each layer's
    heads averaged and every head averaged; then, from the best, add the head that helps most while one does.
    `rate` scores a method, `key` orders scores (lowest best). Returns the best and what was tried, best first."""
    every = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    groups = [(x,) for x in every] + [tuple((layer, h) for h in range(n_heads)) for layer in range(n_layers)]
    groups += [tuple(every)] if n_layers > 1 else []
    tried = {m: rate(m) for g in groups for m in (AlignmentMethod(g, 0), AlignmentMethod(g, 1))}
    best = min(tried, key=lambda m: key(tried[m]))
    while True:
        grown = [AlignmentMethod((*best.heads, x), best.shift) for x in every if x not in best.heads]
        for m in grown:
            tried.setdefault(m, rate(m))
        top = min(grown, key=lambda m: key(tried[m]), default=None)
        if top is None or key(tried[top]) >= key(tried[best]):
            break
        best = top
    table = sorted(tried.items(), key=lambda x: key(x[1]))
    return best, table


def marked(source: str, gold: list[tuple[int, int, int, int]]) -> str:
    """The source with each gold source span in its own tag, in source order: <f0>..</f0>, <f1>..</f1>, ..."""
    text, at = "", 0
    for k, (ss, se, _ts, _te) in enumerate(sorted(gold)):
        text += source[at:ss] + f"<f{k}>" + source[ss:se] + f"</f{k}>"
        at = se
    return text + source[at:]


def markup_score(decoded: list[Decoded], pairs: list[tuple[str, str]], task: str, method: AlignmentMethod) -> dict:
    """Wrap each gold source span in its own tag, place the tags in the output by the alignment (the tags out,
    the source is the text `decoded` read), and count outputs that are well-formed with every tag once, and tags
    around their gold output span (a `dates` field: the year, month or day)."""
    tags = right = well_formed = 0
    for d, (src, tgt) in zip(decoded, pairs, strict=True):
        gold = sorted(gold_alignment(task, src, tgt) or [])
        markup = parse(marked(src, gold))
        out = place(markup, d.text, links_of(d, method))
        again = parse(out)  # raises if not well-formed
        names = [t.name for t in again.all_tags()]
        well_formed += again.plain == d.text and sorted(names) == sorted(t.name for t in markup.all_tags())
        for k, (_ss, _se, ts, te) in enumerate(gold):
            tags += 1
            found = [t for t in again.all_tags() if t.name == f"f{k}"]
            right += d.text == tgt and len(found) == 1 and (found[0].start, found[0].end) == (ts, te)
    return {"pairs": len(pairs), "well_formed": well_formed, "tags": tags, "tags_right": right,
            "well_formed_rate": round(well_formed / max(len(pairs), 1), 5),
            "tags_right_rate": round(right / max(tags, 1), 5)}


def lexical_agreement(decoded: list[Decoded], lexicon: DiceLexicon, method: AlignmentMethod) -> dict:
    """Where no gold exists: the word links of `method` against the lexical baseline's on the same outputs.
    precision: of the method's word links, those the baseline also makes; recall: of the baseline's, those the
    method makes; agreement: their F1 (1 - AER with the baseline's links taken as sure)."""
    both = mine = theirs = 0
    for d in decoded:
        b, m, r = agreement(word_links(links_of(d, method), d.source, d.text), lexicon.align(d.source, d.text))
        both, mine, theirs = both + b, mine + m, theirs + r
    s = scores(both, mine, theirs)
    return {"pairs": len(decoded), "word_links": mine, "baseline_links": theirs, "in_both": both,
            "precision": s["precision"], "recall": s["recall"], "agreement": s["f1"]}


def _lexical_key(a: dict) -> tuple:
    return -a["agreement"], -a["precision"]


def measure_lexical(model: Seq2SeqTransformer, tok, lexicon: DiceLexicon, choose_on: list[tuple[str, str]],
                    splits: dict) -> tuple[AlignmentMethod, dict]:
    """Where no gold exists: choose the method by its agreement with the lexical baseline on `choose_on`'s sources
    (the model's own outputs), then report it, and the default's, on each of `splits`."""
    cfg = model.config
    decoded = decode_with_attention(model, tok, [s for s, _ in choose_on])
    method, table = choose(cfg.n_decoder_layers, cfg.n_heads, lambda m: lexical_agreement(decoded, lexicon, m),
                           _lexical_key)
    default = AlignmentMethod.default(cfg.n_decoder_layers, cfg.n_heads)
    measured = {"baseline": f"Dice over {lexicon.pairs} corpus pairs, competitive linking",
                "chosen_on": {"split": "validation", **table[0][1]}, "candidates_tried": len(table)}
    for name, split in splits.items():
        decoded = decode_with_attention(model, tok, [s for s, _ in split])
        measured[name] = {**lexical_agreement(decoded, lexicon, method),
                          "default_method": lexical_agreement(decoded, lexicon, default)}
    return method, measured


def has_gold(task) -> bool:
    return task is not None and gold_alignment(task.name, *task.validation[0]) is not None


def measure(model: Seq2SeqTransformer, tok, task, splits: dict, pairs_to_choose: int,
            pairs_to_measure: int) -> tuple[AlignmentMethod, dict]:
    """Choose the method on the task's validation pairs, then score it (links and markup) on each of `splits`;
    the figures by split name, the validation's as `chosen_on`. The task must have gold."""
    cfg = model.config
    pairs = task.validation[:pairs_to_choose]
    decoded = decode_with_attention(model, tok, [s for s, _ in pairs])
    method, table = choose(cfg.n_decoder_layers, cfg.n_heads, lambda m: score(decoded, pairs, task.name, m), _key)
    measured = {"chosen_on": {"split": "validation", **table[0][1].summary()}, "candidates_tried": len(table)}
    for name, split in splits.items():
        pairs = split[:pairs_to_measure]
        decoded = decode_with_attention(model, tok, [s for s, _ in pairs])  # the marked-up sources read the same
        measured[name] = {**score(decoded, pairs, task.name, method).summary(),
                          "markup": markup_score(decoded, pairs, task.name, method)}
    return method, measured


def corpus_lexicon(path: Path, lines: int = 100_000) -> DiceLexicon:
    """The lexical baseline's counts over a TSV corpus's first `lines` pairs, every split (word aligners are run
    on the whole parallel text, the pairs they are asked about included)."""
    from .data import Corpus

    return DiceLexicon(pair for _, pair in islice(Corpus(Path(path)).lines(), lines))


def alignment_record(model: Seq2SeqTransformer, tok, task, pairs_to_choose: int = 500, pairs_to_measure: int = 1000,
                     progress=print, corpus: Path | None = None, seed: int = 0) -> dict:
    """What export writes to the manifest's `alignment`: the method chosen on the task's validation pairs and its
    figures on every test set; for a task without gold but with a parallel corpus (one it was trained on, or one
    given for an imported model), the method that agrees best with the lexical baseline; else the default."""
    cfg = model.config
    if has_gold(task):
        splits = {"test": task.test, **task.extra_tests}
        method, measured = measure(model, tok, task, splits, pairs_to_choose, pairs_to_measure)
        figures = ", ".join(f"{n} {measured[n]['links_aligned_rate']:.2%}" for n in splits)
        progress(f"      {method.describe()}: gold links aligned {figures}")
        return {"method": method.to_dict(), "chosen_by": "gold", "measured": measured}
    if corpus is not None:
        held = tsv_task(Path(corpus), seed)
        method, measured = measure_lexical(model, tok, corpus_lexicon(corpus), held.validation[:pairs_to_choose],
                                           {"test": held.test[:pairs_to_measure]})
        t = measured["test"]
        progress(f"      no gold; {method.describe()}: agreement with the lexical baseline {t['agreement']:.4f} "
                 f"(the default's {t['default_method']['agreement']:.4f}) on {t['pairs']} pairs of {corpus}")
        return {"method": method.to_dict(), "chosen_by": "lexical", "measured": measured}
    method = AlignmentMethod.default(cfg.n_decoder_layers, cfg.n_heads)
    progress(f"      no gold alignment and no parallel corpus: the default method ({method.describe()})")
    return {"method": method.to_dict(), "chosen_by": "default", "measured": None}
