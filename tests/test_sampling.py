"""Sampling rules on hand-made logits, where the right answer can be worked out on paper."""

from __future__ import annotations

import numpy as np
import pytest

from models.sampling import InvalidParameterError, Sampler, SamplingParams

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.1]))


def test_greedy_takes_the_argmax():
    assert Sampler(SamplingParams())(LOGITS, []) == 0


def test_temperature_sharpens_and_flattens():
    cold = Sampler(SamplingParams(temperature=0.5)).probabilities(LOGITS, [])
    hot = Sampler(SamplingParams(temperature=2.0)).probabilities(LOGITS, [])
    expected_cold = np.array([0.5, 0.25, 0.15, 0.1]) ** 2 / np.sum(np.array([0.5, 0.25, 0.15, 0.1]) ** 2)
    np.testing.assert_allclose(cold, expected_cold)
    assert hot[3] > 0.1 > cold[3]


def test_top_k_keeps_the_k_best():
    p = Sampler(SamplingParams(temperature=1.0, top_k=2)).probabilities(LOGITS, [])
    np.testing.assert_allclose(p, [2 / 3, 1 / 3, 0, 0])


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.6, 2), (0.75, 2), (0.76, 3), (0.89, 3), (0.95, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    p = Sampler(SamplingParams(temperature=1.0, top_p=top_p)).probabilities(LOGITS, [])
    assert np.count_nonzero(p) == kept
    assert p.sum() == pytest.approx(1.0)


def test_repetition_penalty_lowers_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0])
    assert Sampler(SamplingParams())(logits, [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, [0]) == 1  # 2.0 / 1.2 < 1.9
    p = Sampler(SamplingParams(temperature=1.0, repetition_penalty=2.0)).probabilities(logits, [2])
    np.testing.assert_allclose(p, np.exp([2.0, 1.9, -2.0]) / np.exp([2.0, 1.9, -2.0]).sum())


def test_same_seed_same_draws_and_other_seeds_differ():
    s1 = Sampler(SamplingParams(temperature=1.0, seed=7))
    s2 = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [s1(LOGITS, []) for _ in range(50)] == [s2(LOGITS, []) for _ in range(50)]
    runs = {tuple(Sampler(SamplingParams(temperature=1.0, seed=s))(LOGITS, []) for _ in range(20)) for s in range(5)}
    assert len(runs) > 1


def test_draws_follow_the_distribution():
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([s(LOGITS, []) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.25, 0.15, 0.1], atol=0.03)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_k": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"repetition_penalty": 0},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"repetition_penalty": float("inf")},
        {"top_k": 1.5},
        {"seed": 1.5},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(InvalidParameterError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 1e-8, 1e30, 1e300, 1.7e308])
@pytest.mark.parametrize("penalty", [1e-300, 1.0, 1e300])
def test_any_finite_parameters_give_a_valid_token(temperature, penalty):
    """Scaled logits that overflow (a tiny temperature, a huge penalty) still give a distribution."""
    logits = np.array([3e38, -3e38, 0.0, 1.0, -np.inf, np.nan], dtype=np.float32)
    for top_k, top_p in ((0, 1.0), (2, 1e-9), (10**30, 0.5)):
        s = Sampler(SamplingParams(temperature, top_k, top_p, penalty, seed=-(2**80)))
        probs = s.probabilities(logits, [0, 3, 5])
        assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)
        assert 0 <= s(logits, [0, 3]) < logits.size


def test_a_tiny_temperature_is_greedy():
    assert {Sampler(SamplingParams(temperature=1e-300, seed=s))(LOGITS, []) for s in range(20)} == {0}


def test_seeds_fold_into_range():
    """Negative and huge seeds are accepted: a seed and the same seed mod 2**64 give the same draws."""
    a = Sampler(SamplingParams(temperature=1.0, seed=-1))
    b = Sampler(SamplingParams(temperature=1.0, seed=2**64 - 1))
    assert [a(LOGITS, []) for _ in range(30)] == [b(LOGITS, []) for _ in range(30)]
    c = Sampler(SamplingParams(temperature=1.0, seed=2**200))
    assert 0 <= c(LOGITS, []) < 4


def test_all_impossible_logits_still_give_a_token():
    assert 0 <= Sampler(SamplingParams(temperature=1.0))(np.full(4, -np.inf), []) < 4


def test_greedy_reads_nan_as_impossible():
    """The float32 fast path of greedy: a NaN (argmax would pick the first one) is never the token."""
    logits = np.array([0.5, np.nan, 2.0, np.nan], dtype=np.float32)
    assert Sampler(SamplingParams())(logits, []) == 2
    assert Sampler(SamplingParams())(np.array([np.inf, 1, np.inf], dtype=np.float32), []) == 0
