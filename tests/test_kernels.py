"""Every reference kernel against a straightforward formula, on odd sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels import reference as K
from kernels.backend import UnknownBackendError, select_backend
from models.rope import plain_inv_freq

rng = np.random.default_rng(0)


def test_rmsnorm_formula():
    x, w = rng.standard_normal((3, 7)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    expected = [[x[t, i] / math.sqrt(sum(v * v for v in x[t]) / 7 + 1e-5) * w[i] for i in range(7)] for t in range(3)]
    np.testing.assert_allclose(K.rmsnorm(x, w, 1e-5), expected, rtol=1e-5)


def test_linear_is_weight_times_vector():
    x, w = rng.standard_normal((2, 5)), rng.standard_normal((3, 5))
    expected = [[sum(w[o, i] * x[t, i] for i in range(5)) for o in range(3)] for t in range(2)]
    np.testing.assert_allclose(K.linear(x, w.T), expected, rtol=1e-12)  # linear takes W^T


@pytest.mark.parametrize("start", [0, 11])
def test_rope_is_a_complex_rotation_of_each_pair(start):
    T, heads, E, theta = 5, 3, 6, 10000.0
    x = rng.standard_normal((T, heads, E)).astype(np.float32)
    cos, sin = K.rope_tables(np.arange(start, start + T), plain_inv_freq(theta, E))
    out = K.rope(x, cos, sin)
    for t in range(T):
        for h in range(heads):
            for i in range(E // 2):
                z = complex(x[t, h, 2 * i], x[t, h, 2 * i + 1])
                r = z * complex(
                    math.cos((start + t) * theta ** (-2 * i / E)), math.sin((start + t) * theta ** (-2 * i / E))
                )
                assert out[t, h, 2 * i] == pytest.approx(r.real, abs=1e-5)
                assert out[t, h, 2 * i + 1] == pytest.approx(r.imag, abs=1e-5)


@pytest.mark.parametrize("T,start,H,G,E", [(1, 6, 6, 2, 5), (4, 3, 6, 3, 7), (5, 0, 3, 3, 4), (3, 0, 9, 3, 64)])
def test_attention_against_a_loop_over_queries(T, start, H, G, E):
    S = start + T
    q = rng.standard_normal((T, H, E)).astype(np.float32)
    k, v = rng.standard_normal((S, G, E)).astype(np.float32), rng.standard_normal((S, G, E)).astype(np.float32)
    out = K.attention(q, k, v, start)
    for t in range(T):
        for h in range(H):
            g = h // (H // G)  # query head h reads key/value head g
            visible = start + t + 1
            scores = np.array([q[t, h] @ k[s, g] / math.sqrt(E) for s in range(visible)])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            np.testing.assert_allclose(out[t, h], sum(p[s] * v[s, g] for s in range(visible)), rtol=1e-5, atol=1e-6)


def test_swiglu_formula():
    D, F = 5, 9
    x = rng.standard_normal((2, D))
    wg, wu, wd = rng.standard_normal((F, D)), rng.standard_normal((F, D)), rng.standard_normal((D, F))
    silu = lambda a: a / (1 + math.exp(-a))  # noqa: E731
    hidden = [[silu(wg[f] @ x[t]) * (wu[f] @ x[t]) for f in range(F)] for t in range(2)]
    expected = [[sum(wd[o, f] * hidden[t][f] for f in range(F)) for o in range(D)] for t in range(2)]
    np.testing.assert_allclose(K.swiglu(x, wg.T, wu.T, wd.T), expected, rtol=1e-10)


def test_softmax_is_stable_and_normalised():
    p = K.softmax(np.array([[1000.0, 1001.0, -np.inf]]))
    np.testing.assert_allclose(p, [[1 / (1 + math.e), math.e / (1 + math.e), 0.0]])


def test_float32_stays_float32():
    """A float64 scalar sneaking in would silently double the cost of every matmul after it."""
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    k = rng.standard_normal((5, 2, 8)).astype(np.float32)
    assert K.attention(q, k, k, 3).dtype == np.float32
    cos, sin = K.rope_tables(np.arange(2), plain_inv_freq(1e4, 8))
    assert K.rope(q, cos, sin).dtype == np.float32
    assert K.rmsnorm(q, np.ones(8, np.float32), 1e-5).dtype == np.float32


def test_backend_selection():
    with pytest.raises(UnknownBackendError, match="available: cpu, cuda, numpy"):
        select_backend("tpu")
