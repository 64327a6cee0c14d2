"""Choosing the next token in numpy (serving.engine.sampling), held against the PyTorch reference."""

import numpy as np
import pytest
import torch

from model_src.decoding import SamplingConfig, filter_logits
from serving.domain import DecodeParams
from serving.engine.sampling import check_rows, choose, filtered_probs, log_softmax, token_logprob
from serving.errors import ModelFailure

VOCABS = (2, 7, 33, 500)


def _logits(vocab: int, seed: int, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=vocab) * scale  # (V,) float64


def _reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """model_src.decoding.filter_logits, then softmax: what PyTorch would sample from (float64)."""
    filtered = filter_logits(torch.from_numpy(logits)[None], SamplingConfig(temperature, top_k, top_p))  # (1, V)
    return torch.softmax(filtered, dim=-1)[0].numpy()


@pytest.mark.parametrize("vocab", VOCABS)
def test_log_softmax_matches_torch(vocab):
    for seed in range(5):
        logits = _logits(vocab, seed, scale=10.0)
        expected = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
        np.testing.assert_allclose(log_softmax(logits), expected, rtol=0, atol=1e-9)


def test_log_softmax_works_on_a_batch_and_on_float32():
    logits = np.random.default_rng(0).normal(size=(4, 9)).astype(np.float32) * 20  # (B, V)
    out = log_softmax(logits)
    assert out.dtype == np.float64 and out.shape == (4, 9)
    expected = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.5, 0, 1.0),  # temperature alone
    (1.0, 1, 1.0), (0.8, 5, 1.0), (1.0, 10_000, 1.0),  # top-k (over the vocabulary: no filter)
    (1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 0, 0.05),  # top-p
])
def test_filtered_probs_match_the_torch_reference(vocab, temperature, top_k, top_p):
    for seed in range(4):
        logits = _logits(vocab, seed)
        ours = filtered_probs(logits, DecodeParams(8, temperature, top_k, top_p))
        expected = _reference_probs(logits, temperature, top_k, top_p)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(ours > 0, expected > 0)  # the same tokens survive


def test_filtered_probs_with_top_k_and_top_p_together_match_the_torch_reference():
    # top_k 2 leaves 0.3 and 0.2, i.e. 0.6 and 0.4: top_p 0.5 keeps the first alone
    logits = np.log(np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]))
    np.testing.assert_allclose(filtered_probs(logits, DecodeParams(8, 1.0, 2, 0.5)), [1, 0, 0, 0, 0, 0, 0],
                               atol=1e-12)
    for seed in range(20):
        logits = _logits(100, seed)
        ours = filtered_probs(logits, DecodeParams(8, 1.3, 4, 0.6))
        np.testing.assert_allclose(ours, _reference_probs(logits, 1.3, 4, 0.6), rtol=0, atol=1e-9)


def test_top_p_keeps_the_token_that_crosses_it():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 needs the first two (0.5 alone falls short)
    logits = np.log(np.array([0.2, 0.5, 0.3]))
    probs = filtered_probs(logits, DecodeParams(8, 1.0, 0, 0.6))
    np.testing.assert_allclose(probs, [0.0, 0.625, 0.375], atol=1e-12)
    np.testing.assert_allclose(probs, _reference_probs(logits, 1.0, 0, 0.6), atol=1e-12)


def test_top_p_stops_at_a_nucleus_that_reaches_it_exactly():
    logits = np.array([0.0, -np.log(2), -np.log(2)])  # probabilities 0.5, 0.25, 0.25, exact in binary
    probs = filtered_probs(logits, DecodeParams(8, 1.0, 0, 0.75))
    np.testing.assert_allclose(probs, [2 / 3, 1 / 3, 0.0], atol=1e-12)
    np.testing.assert_allclose(probs, _reference_probs(logits, 1.0, 0, 0.75), atol=1e-12)


def test_top_k_keeps_ties_at_the_kth_value_like_the_reference():
    logits = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    probs = filtered_probs(logits, DecodeParams(8, 1.0, 2, 1.0))
    np.testing.assert_array_equal(probs > 0, [True, False, True, False, True])
    np.testing.assert_allclose(probs, _reference_probs(logits, 1.0, 2, 1.0), atol=1e-12)


@pytest.mark.parametrize("vocab", VOCABS)
def test_greedy_choice_is_argmax_and_its_logprob_is_log_softmax(vocab):
    for seed in range(5):
        logits = _logits(vocab, seed)
        token, logprob = choose(logits, DecodeParams(8), rng=None)
        assert token == int(np.argmax(logits))
        assert logprob == pytest.approx(log_softmax(logits)[token], abs=1e-12)


def test_no_generator_means_greedy_even_with_a_temperature():
    logits = _logits(33, 0)
    assert choose(logits, DecodeParams(8, temperature=1.0), rng=None)[0] == int(np.argmax(logits))


def test_sampled_logprob_is_before_temperature_and_filtering():
    logits = _logits(33, 1)
    params = DecodeParams(8, temperature=0.5, top_k=3)
    for _ in range(20):
        token, logprob = choose(logits, params, np.random.default_rng(7))
        assert logprob == pytest.approx(log_softmax(logits)[token], abs=1e-12)


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    logits = _logits(50, 2, scale=1.0)
    params = DecodeParams(8, temperature=1.2, top_k=20, top_p=0.95)

    def draws(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [choose(logits, params, rng)[0] for _ in range(64)]

    assert draws(123) == draws(123)
    assert draws(123) != draws(124)


def test_samples_stay_inside_the_filtered_support_and_follow_its_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = DecodeParams(8, temperature=1.0, top_k=3)
    rng = np.random.default_rng(0)
    counts = np.bincount([choose(logits, params, rng)[0] for _ in range(4000)], minlength=logits.size)
    assert counts[3:].sum() == 0
    np.testing.assert_allclose(counts / counts.sum(), filtered_probs(logits, params), atol=0.03)


def _rows(*rows):
    logits = np.array(rows, np.float32)  # (n, V)
    return log_softmax(logits), logits


def test_check_rows_accepts_finite_logits_and_a_token_ruled_out():
    check_rows(*_rows([0.0, -1e30, 1e30], [0.0, -np.inf, 1.0]), step=0)


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "infinite")])
def test_check_rows_names_what_is_wrong_and_the_step(bad, word):
    with pytest.raises(ModelFailure, match=rf"{word} logits .* output step 3"):
        check_rows(*_rows([0.0] * 10, [0.0] * 4 + [bad] + [0.0] * 5), step=3)


def test_check_rows_refuses_a_row_with_every_token_ruled_out():
    with pytest.raises(ModelFailure):
        check_rows(*_rows([0.0, 1.0], [-np.inf, -np.inf]), step=0)


def test_check_rows_reports_nan_when_both_nan_and_inf_are_present():
    with pytest.raises(ModelFailure, match="NaN"):
        check_rows(*_rows([np.inf, np.nan, 0.0]), step=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_greedy_and_sampled_choices_refuse_the_same_bad_logits(bad):
    logits = np.zeros(10, np.float32)
    logits[4] = bad
    for params, rng in ((DecodeParams(8), None), (DecodeParams(8, temperature=1.0), np.random.default_rng(0))):
        with pytest.raises(ModelFailure, match="output step 2"):
            choose(logits, params, rng, step=2)



@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.9), (5, 0.9)])
def test_the_smallest_temperature_on_large_logits_stays_finite(top_k, top_p):
    logits = np.random.default_rng(3).uniform(-50, 50, size=200)  # / 1e-3: logits of +-5e4
    probs = filtered_probs(logits, DecodeParams(8, temperature=1e-3, top_k=top_k, top_p=top_p))
    assert np.isfinite(probs).all()
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.argmax(probs) == np.argmax(logits)


def test_the_chosen_tokens_logprob_equals_the_full_log_softmax_and_refuses_bad_rows():
    logits = np.random.default_rng(3).standard_normal(58101).astype(np.float32) * 4
    logits[7] = -np.inf  # a ruled-out token is fine
    full = log_softmax(logits)
    for token in (0, int(np.argmax(logits)), 58100):
        assert token_logprob(logits, token) == pytest.approx(full[token], abs=1e-5)
    for bad in (np.nan, np.inf):
        broken = logits.copy()
        broken[11] = bad
        assert np.isnan(token_logprob(broken, 0))
    assert np.isnan(token_logprob(np.full(5, -np.inf, np.float32), 0))
