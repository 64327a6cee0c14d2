"""How well an imported Marian's alignment agrees with a lexical baseline, where there is no gold.

No pretrained opus-mt can be downloaded here, and the random-weight model of opus-mt's shape translates nothing.
So a Marian that translates is made here: a small Marian (transformers' `MarianMTModel`, SentencePiece models,
saved as `save_pretrained` saves one) is imported with `import-hf` and fine-tuned with `--init-from` on generated
English-French sentences (a grammar of 16 nouns with their genders, adjectives before and after the noun, verbs,
prepositions and adverbs), as a user would fine-tune an opus-mt. Then, on held-out sentences, the served
alignment's word links (the default method: a model without gold gets it) are compared with the lexical baseline
(`model_src.lexical`: Dice over the training pairs, competitive linking), as `attnserve evaluate --alignment
--data` does. The generator also knows each pair's true word links, so both are scored against them too: the
agreement figure can be read against how good the baseline itself is.

    python -m bench.marian_alignment --out out/marian-alignment   # ~10 min on 2 cores; needs 'hf' and 'train'
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

NOUNS = (("cat", "chat", "m"), ("dog", "chien", "m"), ("house", "maison", "f"), ("tree", "arbre", "m"),
         ("river", "rivière", "f"), ("bird", "oiseau", "m"), ("table", "table", "f"), ("car", "voiture", "f"),
         ("garden", "jardin", "m"), ("book", "livre", "m"), ("flower", "fleur", "f"), ("city", "ville", "f"),
         ("man", "homme", "m"), ("woman", "femme", "f"), ("child", "enfant", "m"), ("boat", "bateau", "m"))
BEFORE = (("big", "grand", "grande"), ("small", "petit", "petite"), ("old", "vieux", "vieille"),
          ("beautiful", "beau", "belle"))  # French puts these before the noun
AFTER = (("green", "vert", "verte"), ("blue", "bleu", "bleue"), ("red", "rouge", "rouge"),
         ("black", "noir", "noire"), ("white", "blanc", "blanche"))  # and these after it
VERBS = (("sees", "voit"), ("follows", "suit"), ("finds", "trouve"), ("likes", "aime"), ("watches", "regarde"),
         ("pushes", "pousse"))
PREPOSITIONS = (("on", "sur"), ("under", "sous"), ("in", "dans"), ("with", "avec"), ("behind", "derrière"))
ADVERBS = (("quickly", "vite"), ("slowly", "lentement"), ("often", "souvent"), ("today", "aujourd'hui"))
ARTICLES = {"the": ("le", "la"), "a": ("un", "une")}

Words = list[tuple[str, str, int]]  # (English word, French word, English position)


def _noun_phrase(rng: random.Random, at: int) -> tuple[list[str], Words]:
    """English words, and the French ones in French order, each with the position of its English word."""
    article = rng.choice(("the", "a"))
    noun, nom, gender = rng.choice(NOUNS)
    g = gender == "f"
    en, fr = [article], [(article, ARTICLES[article][g], at)]
    kind = rng.random()
    if kind < 0.3:
        adj, m, f = rng.choice(BEFORE)
        en += [adj, noun]
        fr += [(adj, f if g else m, at + 1), (noun, nom, at + 2)]
    elif kind < 0.6:
        adj, m, f = rng.choice(AFTER)
        en += [adj, noun]
        fr += [(noun, nom, at + 2), (adj, f if g else m, at + 1)]
    else:
        en += [noun]
        fr += [(noun, nom, at + 1)]
    return en, fr


def _add(rng: random.Random, en: list[str], fr: Words, choices: tuple, phrase: bool) -> None:
    """A word of `choices` at the end of both sentences, then, if `phrase`, a noun phrase."""
    word, translation = rng.choice(choices)
    fr.append((word, translation, len(en)))
    en.append(word)
    if phrase:
        more, more_fr = _noun_phrase(rng, len(en))
        en += more
        fr += more_fr


def sentence(rng: random.Random) -> tuple[str, str, list[tuple[int, int]]]:
    """A source, its translation and the true word links (source word index, target word index)."""
    en, fr = _noun_phrase(rng, 0)
    _add(rng, en, fr, VERBS, phrase=True)
    if rng.random() < 0.5:
        _add(rng, en, fr, PREPOSITIONS, phrase=True)
    if rng.random() < 0.4:
        _add(rng, en, fr, ADVERBS, phrase=False)
    gold = [(at, j) for j, (_, _, at) in enumerate(fr)]
    return " ".join(en), " ".join(w for _, w, _ in fr), gold


def corpus(n: int, seed: int) -> list[tuple[str, str, list[tuple[int, int]]]]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def _vs_truth(decoded, held, links) -> dict:
    """Word links (`links(decoded)`) against the generator's truth, over the outputs that are the reference."""
    from model_src.lexical import scores, word_indices

    both = mine = truth = 0
    for d, (_, tgt, gold) in zip(decoded, held, strict=True):
        if d.text == tgt:
            found = word_indices(links(d), d.source, d.text)
            both, mine, truth = both + len(found & set(gold)), mine + len(found), truth + len(gold)
    return scores(both, mine, truth)


def main(argv: list[str] | None = None) -> int:
    from bench.marian_model import MarianShape, build_marian
    from model_repository.alignment import AlignmentMethod, word_links
    from model_src.alignment_eval import decode_with_attention, lexical_agreement, links_of, measure_lexical
    from model_src.checkpoint import load_model
    from model_src.lexical import DiceLexicon
    from model_src.marian import import_marian
    from model_src.train import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/marian-alignment"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--pairs", type=int, default=1000, help="held-out pairs measured")
    p.add_argument("--reuse", action="store_true", help="measure the model OUT/tuned of an earlier run again")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    train_rows, held = corpus(40_000, 1), corpus(args.pairs, 2)
    data = args.out / "en-fr.tsv"
    data.write_text("".join(f"{s}\t{t}\n" for s, t, _ in train_rows), encoding="utf-8")
    shape = MarianShape(d_model=128, heads=4, encoder_layers=3, decoder_layers=3, ffn_dim=512, max_positions=64)
    metrics = json.loads((args.out / "result.json").read_text())["training"] if args.reuse else None
    if metrics is None:
        print(f"[1/4] a Marian ({shape.d_model} wide, {shape.heads} heads, {shape.encoder_layers}+"
              f"{shape.decoder_layers} layers) saved as transformers saves one, then imported", flush=True)
        folder = build_marian(args.out / "hf", shape, ([s for s, _, _ in train_rows[:5000]],
                                                       [t for _, t, _ in train_rows[:5000]]), spm_vocab=120)
        import_marian(folder, args.out / "imported")
        print(f"[2/4] fine-tuned on {len(train_rows):,} generated pairs ({args.steps} steps)", flush=True)
        cfg = TrainConfig(steps=args.steps, batch_size=64, lr=1e-3, warmup=100, eval_every=500, eval_examples=200,
                          max_new_tokens=40, device="cpu")
        metrics = train(None, args.out / "tuned", {}, cfg, data_path=data, init_from=args.out / "imported")
        metrics = {k: metrics.get(k) for k in ("best_val_exact_match", "tokens_per_s") if k in metrics}
    model, tok, _ = load_model(args.out / "tuned")
    print(f"[3/4] decoding {len(held):,} held-out sentences with their attention", flush=True)
    decoded = decode_with_attention(model, tok, [s for s, _, _ in held])
    exact = sum(d.text == t for d, (_, t, _) in zip(decoded, held, strict=True)) / len(held)
    print("[4/4] word links: the served alignment, the lexical baseline, the generator's truth", flush=True)
    lexicon = DiceLexicon((s, t) for s, t, _ in train_rows)
    validation = [(s, t) for s, t, _ in corpus(500, 3)]
    chosen, measured = measure_lexical(model, tok, lexicon, validation, {})
    default = AlignmentMethod.default(model.config.n_decoder_layers, model.config.n_heads)
    rows = [{"method": label, "heads": method.describe(),
             "vs_baseline": lexical_agreement(decoded, lexicon, method),
             "vs_truth": _vs_truth(decoded, held, lambda d, m=method: word_links(links_of(d, m), d.source, d.text))}
            for label, method in (("chosen by the baseline (export with --alignment-data)", chosen),
                                  ("the default (no parallel data)", default))]
    base = _vs_truth(decoded, held, lambda d: lexicon.align(d.source, d.text))
    result = {"shape": shape.__dict__, "steps": args.steps, "training": metrics, "held_out_pairs": len(held),
              "exact_match": round(exact, 4), "baseline_vs_truth": base, "methods": rows,
              "candidates_tried": measured["candidates_tried"],
              "minutes": round((time.monotonic() - start) / 60, 1)}
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out exact match {exact:.2%}; the lexical baseline against the truth: {base}")
    for row in rows:
        a, t = row["vs_baseline"], row["vs_truth"]
        print(f"  {row['method']}, {row['heads']}: agreement with the baseline "
              f"{a['agreement']:.4f} (P {a['precision']:.4f}, R {a['recall']:.4f}); against the truth F1 {t['f1']:.4f}")
    print(f"[{result['minutes']} min] {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
