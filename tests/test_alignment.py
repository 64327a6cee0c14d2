"""Alignments and markup: the shipped `dates` model served on every protocol, its links checked against the
generator's gold (which template wrote which field), not against the code's own output; markup placed
well-formed; the method and its figures recorded by export; `attnserve evaluate --alignment` on both tasks."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from model_repository.alignment import Link, word_links
from model_repository.markup import MarkupError, parse, place
from model_repository.tokenizer import CharTokenizer
from model_src.alignment_eval import marked as mark_fields
from model_src.tasks import MONTHS, _date_parts, _joined, dates_task, gold_alignment
from serving.client import AttnServeClient

from .server_harness import start
from .test_http import request, sse

ROOT = Path(__file__).resolve().parents[1]
TASK = dates_task(0)
PAIRS = TASK.test[:60] + TASK.extra_tests["test_years"][:60]


# ---------------------------------------------------------------------------------------------- gold, offline
def test_the_dates_gold_spans_hold_the_year_month_and_day_as_written():
    """Every template's spans, read back with no template code: the year as 4 or 2 digits, the month as a name
    (any language, full or 3 letters) or a number, the day as a number, an ordinal or `1er`."""
    months = {name.lower(): i + 1 for names in MONTHS.values() for i, name in enumerate(names)}
    months |= {name[:3].lower(): i + 1 for i, name in enumerate(MONTHS["en"])}
    rng = random.Random(3)
    for _ in range(300):
        d = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(36524))
        for parts in _date_parts(d):
            text, _ = _joined(parts)
            links = gold_alignment("dates", text, d.isoformat())
            assert len(links) == 3, text
            (ys, ye, *_), (ms, me, *_), (ds, de, *_) = links
            year, month, day = text[ys:ye], text[ms:me], text[ds:de]
            assert year in (str(d.year), f"{d.year % 100:02d}"), (text, year)
            assert (months.get(month.lower()) or int(month)) == d.month, (text, month)
            assert (int(re.match(r"\d+", day).group()) == d.day and day.removeprefix(str(d.day)) in (
                "", "st", "nd", "rd", "th", "er")) or day == f"{d.day:02d}", (text, day)
            assert [x[2:] for x in links] == [(0, 4), (5, 7), (8, 10)]
    assert gold_alignment("reverse", "abc", "cba") == [(2, 3, 0, 1), (1, 2, 1, 2), (0, 1, 2, 3)]
    assert gold_alignment("dates", "le 14 juillet 1789", "1789-07-15") == []  # no template writes that pair
    assert gold_alignment("mycorpus", "a", "b") is None


# ---------------------------------------------------------------------------------------------- markup, offline
def _random_markup(rng: random.Random) -> str:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    out, depth = [], 0
    for _ in range(rng.randint(3, 12)):
        r = rng.random()
        if r < 0.2:
            out.append(f"<t{len(out)} class=\"x\">")
            depth += 1
        elif r < 0.35 and depth:
            out.append("</CLOSE>")
            depth -= 1
        elif r < 0.45:
            out.append("<ph/>")
        else:
            out.append(rng.choice(words) + " ")
    out += ["</CLOSE>"] * depth
    text, stack = "", []  # give every closing tag the name of the tag it closes
    for piece in out:
        if piece == "</CLOSE>":
            piece = f"</{stack.pop()}>"
        elif piece.startswith("<t"):
            stack.append(piece[1:].split()[0])
        text += piece
    return text


def test_markup_is_always_well_formed_with_every_tag_once_whatever_the_links():
    rng = random.Random(0)
    for _ in range(400):
        source = _random_markup(rng)
        m = parse(source)
        output = "".join(rng.choice("xyz -") for _ in range(rng.randint(0, 25)))
        links = [Link(*sorted(rng.sample(range(len(m.plain) + 1), 2)), *sorted(rng.sample(range(len(output) + 1), 2)))
                 for _ in range(rng.randint(0, 8))] if output and m.plain else []
        placed = place(m, output, links)
        again = parse(placed)  # raises MarkupError unless well-formed
        assert again.plain == output
        assert sorted(t.open for t in again.all_tags()) == sorted(t.open for t in m.all_tags())


def test_markup_refusals_name_the_tag_and_where_it_is():
    for text, words in (("<b>x", "never closed"), ("x</b>", "character 1 has no opening"),
                        ("<b><i>x</b></i>", "does not match the open '<i>'")):
        with pytest.raises(MarkupError, match=words):
            parse(text)
    m = parse('a <a href="u">b</a> <br/>c')
    assert m.plain == "a b c" and [t.open for t in m.all_tags()] == ['<a href="u">', "<br/>"]
    # a pair no output links to goes to the end of the output, wrapping nothing: kept, never lost
    assert place(m, "xyz", []) == 'xyz<a href="u"></a><br/>'
    assert place(m, "B C", [Link(2, 3, 0, 1), Link(4, 5, 2, 3)]) == '<a href="u">B</a> <br/>C'


def test_word_links_join_links_to_whole_words():
    links = [Link(0, 1, 0, 1), Link(6, 7, 3, 4)]
    assert word_links(links, "ab cd efg", "xy zw") == [Link(0, 2, 0, 2), Link(6, 9, 3, 5)]


def test_tokenizer_spans_are_where_each_token_is_in_the_text():
    tok = CharTokenizer.from_texts(["abc d"])
    assert tok.spans("ab d") == [(0, 1), (1, 2), (2, 3), (3, 4)] and len(tok.encode("ab d")) == 4
    from model_repository.tokenizer import BPETokenizer

    bpe = BPETokenizer.from_texts(["the cat sat on the mat"] * 20, vocab_size=300)
    text = "the cat sat"
    spans = bpe.spans(text)
    assert len(spans) == len(bpe.encode(text)) and "".join(text[a:b] for a, b in spans) == text


# ---------------------------------------------------------------------------------------------- served
@pytest.fixture(scope="module")
def dates_repo(tmp_path_factory) -> Path:
    """The shipped dates checkpoint exported (fewer parity inputs than the product's default: they are tested
    elsewhere), its alignment chosen and measured on 300 pairs."""
    from export.pipeline import ExportConfig, export_checkpoint

    repo = tmp_path_factory.mktemp("aligned")
    export_checkpoint(ExportConfig(checkpoint=ROOT / "checkpoints" / "dates", repo=repo, name="dates",
                                   parity_inputs=8, greedy_inputs=8, alignment_pairs=300), progress=lambda _: None)
    return repo


@pytest.fixture(scope="module")
def server(dates_repo):
    s = start(dates_repo, http_port=0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with AttnServeClient(server.address) as c:
        yield c


def _field_rate(pairs, answers) -> float:
    """Gold fields whose every output character links inside the field's gold source span."""
    right = total = 0
    for (src, tgt), (text, links) in zip(pairs, answers, strict=True):
        for ss, se, ts, te in gold_alignment("dates", src, tgt):
            total += 1
            mine = [x for x in links if x[2] < te and ts < x[3]]
            right += text == tgt and bool(mine) and all(ss <= x[0] and x[1] <= se for x in mine)
    return right / total


def _links(msg) -> list[tuple]:
    return [(x.source_start, x.source_end, x.target_start, x.target_end) for x in msg]


def test_export_records_the_method_and_its_figures_against_gold(dates_repo):
    manifest = json.loads((dates_repo / "dates" / "1" / "manifest.json").read_text())
    a = manifest["alignment"]
    assert a["chosen_by"] == "gold" and a["method"]["heads"] and a["method"]["shift"] in (0, 1)
    for split in ("test", "test_years"):
        assert a["measured"][split]["links_aligned_rate"] >= 0.98, a["measured"][split]
        assert a["measured"][split]["markup"]["well_formed_rate"] == 1.0


def test_served_links_put_each_date_field_on_its_gold_source_span(client):
    answers = []
    for src, _ in PAIRS:
        r = client.predict(src, alignment=True)
        answers.append((r.text, _links(r.alignment)))
        for x in r.alignment:  # every link inside both texts
            assert 0 <= x.source_start < x.source_end <= len(src) and 0 <= x.target_start < x.target_end <= len(r.text)
    assert _field_rate(PAIRS[:60], answers[:60]) >= 0.98  # test: 1950-2049
    assert _field_rate(PAIRS[60:], answers[60:]) >= 0.98  # test_years: years never seen in training


def test_streamed_links_come_with_their_tokens_and_add_up_to_the_whole(client):
    for src, _ in PAIRS[:12]:
        msgs = list(client.generate(src, alignment=True))
        streamed = [link for m in msgs for link in _links(m.alignment)]
        finish = msgs[-1].finish
        assert streamed == _links(finish.alignment) and streamed
        assert streamed == _links(client.predict(src, alignment=True).alignment)
        assert {w.source_start for w in finish.word_alignment} <= {m.start() for m in re.finditer(r"\S+", src)}
        plain = list(client.generate(src))
        assert [m.token.id for m in plain if m.HasField("token")] == [m.token.id for m in msgs if m.HasField("token")]
        assert not any(m.alignment for m in plain) and not plain[-1].finish.alignment


def test_beam_search_aligns_the_hypothesis_it_returns(client):
    for src, _ in PAIRS[:6]:
        beam = client.predict(src, beam_size=4, alignment=True)
        greedy = client.predict(src, alignment=True)
        covered = {c for x in beam.alignment for c in range(x.target_start, x.target_end)}
        assert covered == set(range(len(beam.text))) - {i for i, c in enumerate(beam.text) if not c.strip()}
        if beam.text == greedy.text:
            assert _links(beam.alignment) == _links(greedy.alignment)


def test_markup_lands_on_the_right_fields_and_is_always_well_formed(client):
    right = tags = 0
    for src, tgt in PAIRS:
        marked = mark_fields(src, gold_alignment("dates", src, tgt))
        r = client.predict(marked, markup=True)
        out = parse(r.markup)
        assert out.plain == r.text and sorted(t.name for t in out.all_tags()) == ["f0", "f1", "f2"]
        gold = sorted(gold_alignment("dates", src, tgt))
        for k, (_ss, _se, ts, te) in enumerate(gold):
            tag = next(t for t in out.all_tags() if t.name == f"f{k}")
            tags += 1
            right += r.text == tgt and (tag.start, tag.end) == (ts, te)
        assert not r.alignment  # markup alone does not send the links
    assert right / tags >= 0.98
    # links asked with markup index the text as sent, tags included
    r = client.predict("<b>14</b> juillet <i>1789</i>", markup=True, alignment=True)
    assert r.markup == "<i>1789</i>-07-<b>14</b>"
    year = [x for x in r.alignment if x.target_start < 4]
    assert year and all("<b>14</b> juillet <i>1789</i>"[x.source_start:x.source_end] in "1789" for x in year)


def test_kserve_and_http_give_the_same_links_and_markup(server, client):
    texts = [src for src, _ in PAIRS[:3]]
    want = [client.predict(t, alignment=True) for t in texts]
    triton = tc.InferenceServerClient(server.address)
    try:
        inp = tc.InferInput("TEXT", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        result = triton.infer("dates", [inp], outputs=[tc.InferRequestedOutput("TEXT"),
                                                       tc.InferRequestedOutput("ALIGNMENT")])
        got = result.as_numpy("ALIGNMENT")  # (N, links, 4), -1 padded
        assert got.dtype == np.int64 and got.ndim == 3 and got.shape[2] == 4
        for row, w in zip(got, want, strict=True):
            assert [tuple(x) for x in row if x[0] >= 0] == _links(w.alignment)
        marked = tc.InferInput("TEXT", [1, 1], "BYTES")
        marked.set_data_from_numpy(np.array([[b"<b>14</b> juillet <i>1789</i>"]], dtype=object))
        result = triton.infer("dates", [marked], parameters={"markup": True})
        assert result.as_numpy("MARKUP")[0][0].decode() == "<i>1789</i>-07-<b>14</b>"
        assert result.as_numpy("TEXT")[0][0].decode() == "1789-07-14"
    finally:
        triton.close()
    port = server.app.http_port
    status, body, _ = request(port, "POST", "/v2/models/dates/generate",
                              {"text_input": texts[0], "parameters": {"alignment": True}})
    assert status == 200 and [tuple(x) for x in body["alignment"]] == _links(want[0].alignment)
    assert [tuple(x) for x in body["word_alignment"]] == _links(want[0].word_alignment)
    events = sse(port, "/v2/models/dates/generate_stream", {"text_input": texts[0], "parameters": {"alignment": True}})
    assert [tuple(x) for e in events for x in e.get("alignment", []) if "finish_reason" not in e] \
        == [tuple(x) for x in events[-1]["alignment"]] == _links(want[0].alignment)
    status, body, _ = request(port, "POST", "/v2/models/dates/generate",
                              {"text_input": "<b>3</b> mars <u>2021</u>", "parameters": {"markup": True}})
    assert status == 200 and body["markup_output"] == "<u>2021</u>-03-<b>03</b>" and "alignment" not in body


def test_alignment_and_markup_refusals_on_every_protocol(server, client):
    for kw, words in (({"alignment": True}, "need the source as text"), ({"markup": True}, "need the source as text")):
        with pytest.raises(grpc.RpcError) as e:
            client.predict([5, 6, 7], **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("<b>14 juillet", markup=True))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "never closed" in e.value.details()
    status, body, _ = request(server.app.http_port, "POST", "/v2/models/dates/generate",
                              {"text_input": "14</i>", "parameters": {"markup": True}})
    assert status == 400 and "no opening tag" in body["error"]
    status, body, _ = request(server.app.http_port, "POST", "/v2/models/dates/generate",
                              {"text_input": "14 juillet", "parameters": {"alignment": "maybe"}})
    assert status == 400 and "'alignment' must be a boolean" in body["error"]
    triton = tc.InferenceServerClient(server.address)
    try:
        ids = tc.InferInput("SOURCE_IDS", [1, 3], "INT64")
        ids.set_data_from_numpy(np.array([[5, 6, 7]], dtype=np.int64))
        with pytest.raises(Exception, match="need the source as text"):
            triton.infer("dates", [ids], outputs=[tc.InferRequestedOutput("ALIGNMENT")])
    finally:
        triton.close()
    assert client.predict("14 juillet 1789").text == "1789-07-14"  # still serving


def test_engine_processes_align_as_engine_threads_do(dates_repo, client):
    s = start(dates_repo, engine_processes=True)
    try:
        with AttnServeClient(s.address) as other:
            for src, _ in PAIRS[:5]:
                a, b = client.predict(src, alignment=True), other.predict(src, alignment=True)
                assert _links(a.alignment) == _links(b.alignment) and a.text == b.text
                assert _links(a.word_alignment) == _links(b.word_alignment)
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("task, target", [("reverse", 0.99), ("dates", 0.98)])
def test_evaluate_alignment_meets_the_targets_on_every_test_set(task, target, capsys):
    from model_src.evaluate import main

    assert main([str(ROOT / "checkpoints" / task), "--alignment", "--pairs", "400"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "gold links aligned" in x and "held-out" in x]
    assert len(lines) == (2 if task == "dates" else 1)
    for line in lines:
        rate = float(re.search(r"gold links aligned ([\d.]+)%", line).group(1)) / 100
        assert rate >= target, line
        assert "well-formed 100.00%" in line
