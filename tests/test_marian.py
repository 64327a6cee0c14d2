"""Importing a Marian checkpoint: the same numbers and the same tokens as transformers' MarianMTModel, then served.

The Marian model is built here (bench.marian_model: random weights, SentencePiece models trained on generated
sentences, saved with save_pretrained); nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from bench.marian_model import SOURCE_WORDS, MarianShape, build_marian, sentences
from export.pipeline import ExportConfig, export_checkpoint
from model_repository.alignment import AlignmentMethod
from model_repository.tokenizer import Detokenizer, tokenizer_from_dict
from model_src.checkpoint import load_model
from model_src.decoding import beam_search, generate, pad_batch
from model_src.marian import MarianImportError, import_marian
from serving.client import AttnServeClient
from tests.server_harness import start

N_INPUTS, MAX_NEW = 64, 40


def _built(tmp_path_factory, shape: MarianShape) -> dict:
    folder = build_marian(tmp_path_factory.mktemp("marian-hf") / "tiny-marian", shape)
    ckpt = tmp_path_factory.mktemp("marian-ckpt") / "ckpt"
    import_marian(folder, ckpt)
    model, tok, _ = load_model(ckpt)
    hf = transformers.MarianMTModel.from_pretrained(folder, attn_implementation="eager").eval()
    hf_tok = transformers.MarianTokenizer.from_pretrained(folder)
    texts = sentences(SOURCE_WORDS, N_INPUTS, seed=11)
    return {"folder": folder, "ckpt": ckpt, "model": model, "tok": tok, "hf": hf, "hf_tok": hf_tok, "texts": texts}


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    """One vocabulary and one embedding for both sides, as opus-mt has them."""
    return _built(tmp_path_factory, MarianShape())


@pytest.fixture(scope="module")
def marian_separate(tmp_path_factory):
    """Separate source and target vocabularies and embeddings (Marian's separate_vocabs)."""
    return _built(tmp_path_factory, MarianShape(separate_vocabs=True, seed=1))


BOTH = pytest.mark.parametrize("which", ["marian", "marian_separate"])


def _hf_tokens(row: torch.Tensor, m) -> list[int]:
    """A generated row without its start token, </s> and the padding after it."""
    ids = row.tolist()[1:]
    return ids[: ids.index(m.config.eos_id)] if m.config.eos_id in ids else ids


@BOTH
def test_tokenizers_are_id_for_id_transformers(request, which):
    marian = request.getfixturevalue(which)
    tok, hf_tok = marian["tok"], marian["hf_tok"]
    serving = tokenizer_from_dict(tok.to_dict())  # as the server reads tokenizer.json
    texts = [*sentences(SOURCE_WORDS, 200, seed=3), ">>fra<< the cat", "Hello, zebra! 42", "", "naïve café"]
    for text in texts:
        want = hf_tok(text)["input_ids"]
        assert tok.encode(text) == want, text
        assert serving.encode(text) == want, text
        spans = serving.spans(text)  # where each token is in the text, for alignments
        assert len(spans) == len(want) and spans[-1][0] == spans[-1][1] == len(text), text  # </s>: nothing
        assert all(0 <= a <= b <= len(text) for a, b in spans) and [a for a, _ in spans] == sorted(a for a, _ in spans)
        covered = "".join(text[a:b] for a, b in spans)
        assert covered.replace(" ", "") == text.replace(" ", ""), (text, covered)
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, tok.vocab_size, size=rng.integers(0, 20)).tolist()
        want = hf_tok.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == want and serving.decode(ids) == want, ids
        detok = Detokenizer(serving)
        pieces = [detok.add(i) for i in ids]
        assert want.startswith("".join(pieces)) and detok.finish() == want, ids  # streamed a token at a time


@BOTH
def test_logits_and_every_attention_match_transformers(request, which):
    marian = request.getfixturevalue(which)
    model, hf, tok = marian["model"], marian["hf"], marian["tok"]
    src_ids, src_mask = pad_batch([tok.encode(t) for t in marian["texts"]], model.config.pad_id)
    B = src_ids.size(0)
    rng = np.random.default_rng(1)
    targets = [[model.config.bos_id, *rng.integers(2, tok.vocab_size - 1, size=rng.integers(1, 12)).tolist()]
               for _ in range(B)]
    tgt_ids, tgt_mask = pad_batch(targets, model.config.pad_id)
    with torch.no_grad():
        enc = model.encode(src_ids, src_mask)
        logits, dec_self, cross = model.decode(tgt_ids, tgt_mask, enc, src_mask)
        ref = hf(input_ids=src_ids, attention_mask=src_mask.long(), decoder_input_ids=tgt_ids,
                 decoder_attention_mask=tgt_mask.long(), output_attentions=True)
    real_q = tgt_mask[:, None, :, None]  # (B, 1, T, 1): padded target positions are not compared
    assert (logits - ref.logits)[tgt_mask].abs().max() < 1e-5
    for layer in range(model.config.n_encoder_layers):
        valid = src_mask[:, None, :, None]  # (B, 1, S, 1)
        assert ((enc.self_attn[layer] - ref.encoder_attentions[layer]).abs() * valid).max() < 1e-5
    for layer in range(model.config.n_decoder_layers):
        assert ((cross[layer] - ref.cross_attentions[layer]).abs() * real_q).max() < 1e-5
        assert ((dec_self[layer] - ref.decoder_attentions[layer]).abs() * real_q).max() < 1e-5


@BOTH
def test_greedy_generation_is_token_identical(request, which):
    marian = request.getfixturevalue(which)
    model, hf, hf_tok, tok = marian["model"], marian["hf"], marian["hf_tok"], marian["tok"]
    ours = generate(model, [tok.encode(t) for t in marian["texts"]], max_new_tokens=MAX_NEW)
    batch = hf_tok(marian["texts"], return_tensors="pt", padding=True)
    # forced_eos_token_id=None: transformers would replace the last token at the length limit by </s>
    out = hf.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW, forced_eos_token_id=None)
    theirs = [_hf_tokens(row, model) for row in out]
    assert ours == theirs
    lengths = {len(t) for t in ours}
    assert len(lengths) >= 3 and max(lengths) == MAX_NEW, lengths  # ends at </s> and at the limit both seen


@pytest.mark.parametrize("beam_size,length_penalty", [(4, 1.0), (3, 0.6)])
def test_beam_search_is_token_identical(marian, beam_size, length_penalty):
    model, hf, tok = marian["model"], marian["hf"], marian["tok"]
    for text in marian["texts"]:
        src = tok.encode(text)
        ours = beam_search(model, src, beam_size=beam_size, max_new_tokens=MAX_NEW, length_penalty=length_penalty)
        out = hf.generate(torch.tensor([src]), num_beams=beam_size, do_sample=False, max_new_tokens=MAX_NEW,
                          length_penalty=length_penalty, early_stopping=True, forced_eos_token_id=None,
                          output_scores=True, return_dict_in_generate=True)
        assert ours[0][0] == _hf_tokens(out.sequences[0], model), text
        assert ours[0][1] == pytest.approx(float(out.sequences_scores[0]), abs=1e-4)


@pytest.mark.slow
def test_imported_model_exports_and_serves_the_same_tokens_with_attention(marian, tmp_path):
    model, hf, hf_tok = marian["model"], marian["hf"], marian["hf_tok"]
    repo = tmp_path / "repo"
    export_checkpoint(ExportConfig(checkpoint=marian["ckpt"], repo=repo, name="opus-tiny"), progress=lambda _: None)
    special = json.loads((repo / "opus-tiny" / "1" / "manifest.json").read_text())["special_ids"]
    assert special["unk"] == hf_tok.unk_token_id and special["pad"] == hf_tok.pad_token_id  # its own, not 3
    texts = marian["texts"][:8]
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    want = [_hf_tokens(r, model) for r in hf.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW,
                                                      forced_eos_token_id=None)]
    server = start(repo, engine_processes=True, max_new_tokens=MAX_NEW)
    try:
        with AttnServeClient(server.address) as client:
            for text, tokens in zip(texts, want, strict=True):
                got, text_out, cross = [], "", []
                for msg in client.generate(text, model="opus-tiny", attention="cross", max_new_tokens=MAX_NEW):
                    if msg.HasField("token"):
                        got.append(msg.token.id)
                        text_out += msg.token.text
                        cross.append([a for a in msg.attention if a.kind == "cross"])
                assert got == tokens, text
                assert text_out == hf_tok.decode(tokens, skip_special_tokens=True)
                S = len(hf_tok(text)["input_ids"])  # the source with its </s>
                for step in cross:
                    assert len(step) == model.config.n_decoder_layers
                    weights = np.asarray(step[-1].weights).reshape(model.config.n_heads, 1, S)
                    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
            aligned = client.predict(texts[0], model="opus-tiny", max_new_tokens=MAX_NEW, alignment=True)
            assert aligned.alignment and all(0 <= x.source_start < x.source_end <= len(texts[0]) and
                                             0 <= x.target_start < x.target_end <= len(aligned.text)
                                             for x in aligned.alignment)
            manifest = json.loads((repo / "opus-tiny" / "1" / "manifest.json").read_text())
            assert manifest["alignment"]["chosen_by"] == "default" and manifest["alignment"]["measured"] is None
            beam = client.predict(texts[0], model="opus-tiny", beam_size=4, max_new_tokens=MAX_NEW)
            best = beam_search(model, marian["tok"].encode(texts[0]), beam_size=4, max_new_tokens=MAX_NEW)[0]
            assert [t.id for t in beam.tokens] == best[0]
    finally:
        server.stop()


def _copy(folder: Path, tmp_path: Path, edit_config=None, drop: str | None = None) -> Path:
    dst = tmp_path / "edited"
    shutil.copytree(folder, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        (dst / drop).unlink()
    return dst


@pytest.mark.parametrize("edit,drop,message", [
    (lambda c: c.update(normalize_before=True), None, "normalize_before=True"),
    (lambda c: c.update(activation_function="gelu_new"), None, "activation_function='gelu_new'"),
    (lambda c: c.update(decoder_ffn_dim=128), None, "decoder_ffn_dim=128"),
    (lambda c: c.update(model_type="bart"), None, "model_type='bart'"),
    (lambda c: c.update(vocab_size=81), None, "vocab_size=81"),
    (None, "target.spm", "missing target.spm"),
    (None, "model.safetensors", "no model.safetensors"),
])
def test_what_cannot_be_expressed_is_refused_by_name(marian, tmp_path, edit, drop, message):
    folder = _copy(marian["folder"], tmp_path, edit, drop)
    with pytest.raises(MarianImportError, match=message.replace("(", r"\(")):
        import_marian(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parallel_data_chooses_the_heads_of_an_imported_model_by_the_lexical_baseline(marian, tmp_path, capsys):
    from model_src.alignment_eval import corpus_lexicon, decode_with_attention, links_of
    from model_src.evaluate import main as evaluate

    sources = sentences(SOURCE_WORDS, 300, seed=5)
    decoded = decode_with_attention(marian["model"], marian["tok"], sources, MAX_NEW)
    outputs = [d.text for d in decoded]
    data = tmp_path / "parallel.tsv"  # the model's own outputs stand in for translations (its weights are random)
    data.write_text("".join(f"{s}\t{t}\n" for s, t in zip(sources, outputs, strict=True) if t.strip()))
    repo = tmp_path / "repo"
    export_checkpoint(ExportConfig(checkpoint=marian["ckpt"], repo=repo, name="opus-tiny", alignment_pairs=100,
                                   alignment_data=data), progress=lambda _: None)
    record = json.loads((repo / "opus-tiny" / "1" / "manifest.json").read_text())["alignment"]
    assert record["chosen_by"] == "lexical"
    test = record["measured"]["test"]
    assert 0 < test["pairs"] <= 100 and 0 <= test["agreement"] <= 1 and "agreement" in test["default_method"]
    method = AlignmentMethod.from_dict(record["method"])
    server = start(repo, max_new_tokens=MAX_NEW)
    ended = [d for d in decoded if len(d.output_ids) < MAX_NEW]  # cut at MAX_NEW, no step follows the last token
    assert len(ended) >= 3
    try:  # the server aligns by the method the manifest records
        with AttnServeClient(server.address) as client:
            for d in ended[:6]:
                text = d.source
                got = client.predict(text, model="opus-tiny", max_new_tokens=MAX_NEW, alignment=True)
                assert got.text == d.text
                assert [(x.source_start, x.source_end, x.target_start, x.target_end) for x in got.alignment] \
                    == [tuple(x) for x in links_of(d, method)]
    finally:
        server.stop()
    assert evaluate([str(marian["ckpt"]), "--alignment", "--data", str(data), "--pairs", "50"]) == 0
    out = capsys.readouterr().out
    assert f"Dice over {corpus_lexicon(data).pairs} corpus pairs" in out and "the default method: agreement" in out
