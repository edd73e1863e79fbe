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
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(InvalidParameterError):
        SamplingParams(**kwargs)
