"""The lexical baseline that alignments are compared with where no gold exists (imported Marian, user corpora),
checked against the word links a sentence generator knows to be true."""

from __future__ import annotations

from bench.marian_alignment import corpus
from model_repository.alignment import Link
from model_src.lexical import DiceLexicon, agreement, word_indices


def test_the_lexical_baseline_finds_the_generators_word_links():
    lexicon = DiceLexicon((s, t) for s, t, _ in corpus(5000, 1))
    both = mine = truth = 0
    for source, target, gold in corpus(300, 2):  # held out: another seed
        found = word_indices(lexicon.align(source, target), source, target)
        both, mine, truth = both + len(found & set(gold)), mine + len(found), truth + len(gold)
    assert both / mine >= 0.98 and both / truth >= 0.98, (both, mine, truth)


def test_competitive_linking_takes_the_strongest_pair_first_and_each_word_once():
    lexicon = DiceLexicon([("the cat", "le chat"), ("the dog", "le chien"), ("a cat", "un chat"),
                           ("the cat sleeps", "le chat dort")] * 3)
    assert lexicon.dice("cat", "chat") == 1.0 and lexicon.dice("the", "chat") < 1.0
    links = lexicon.align("The cat!", "le chat.")  # case and edge punctuation do not matter; offsets are the words'
    assert links == [Link(0, 3, 0, 2), Link(4, 8, 3, 8)]
    assert lexicon.align("the the", "le") == [Link(0, 3, 0, 2)]  # each word linked once
    assert lexicon.align("zebra", "zèbre") == []  # never seen together: no link
    assert agreement(links, links[:1]) == (1, 2, 1)
