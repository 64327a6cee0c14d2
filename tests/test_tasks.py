"""Built-in tasks and user corpora: deterministic, disjoint splits; bad corpora refused with their line."""

import datetime as dt

import pytest

from model_src.tasks import CorpusError, _date_formats, dates_task, load_task, read_tsv, reverse_task
from model_src.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, save_tokenizer


def test_dates_are_deterministic_and_split_by_date():
    a, b = dates_task(seed=3, n_train=500, n_eval=200), dates_task(seed=3, n_train=500, n_eval=200)
    assert a == b
    train_dates = {t for _, t in a.train}
    assert not train_dates & {t for _, t in a.test}
    assert not train_dates & {t for _, t in a.validation}
    for src, tgt in a.test[:50]:
        dt.date.fromisoformat(tgt)
        assert src


def test_dates_cover_years_1000_to_2999_and_hold_out_whole_years():
    t = dates_task(seed=0, n_train=4000, n_eval=400)
    year = lambda pairs: {int(tgt[:4]) for _, tgt in pairs}  # noqa: E731
    in_window = lambda y: 1950 <= y <= 2049  # noqa: E731
    far_train = {y for y in year(t.train) if not in_window(y)}
    held = year(t.extra_tests["test_years"])
    assert held and not held & far_train and not any(in_window(y) for y in held)  # years never seen in training
    assert min(far_train) < 1200 and max(far_train) > 2800 and len(far_train) > 1000  # the whole range trains
    assert 0.4 < sum(not in_window(y) for y in (int(tgt[:4]) for _, tgt in t.train)) / len(t.train) < 0.6
    assert all(in_window(y) for y in year(t.test))  # `test` stays the two-digit window, as it always was
    assert "14/07/89" not in _date_formats(dt.date(1789, 7, 14))  # two-digit years only inside 1950-2049
    assert "le 14 juillet 1789" in _date_formats(dt.date(1789, 7, 14))


def test_date_formats_cover_languages_and_the_issue_examples():
    forms = _date_formats(dt.date(2021, 3, 3))
    assert "3rd of March 2021" in forms and "03/03/21" in forms
    assert "mercredi 3 mars 2021" in forms  # 3 March 2021 was a Wednesday
    assert "3. März 2021" in forms and "3 de marzo de 2021" in forms


def test_reverse_splits_are_disjoint_strings():
    t = reverse_task(seed=1, n_train=3000, n_eval=200)
    assert all(tgt == src[::-1] and 1 <= len(src) <= 16 for src, tgt in t.train[:100])
    assert not {s for s, _ in t.train} & {s for s, _ in t.test}


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'nope'.*dates"):
        load_task("nope")


def test_tsv_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\nno tab here\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.tsv:2: expected 'source<TAB>target'"):
        read_tsv(bad)
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty"):
        read_tsv(empty)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizers_round_trip_through_json(tmp_path, kind):
    texts = ["hello world", "mardi 3 mars 2021", "2021-03-02"] * 20
    tok = CharTokenizer.from_texts(texts) if kind == "char" else BPETokenizer.from_texts(texts, vocab_size=300)
    save_tokenizer(tok, tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    for text in texts[:3]:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(again.encode(text)) == text
    assert again.vocab_size == tok.vocab_size
    assert tok.to_dict()["specials"] == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
