import math

import numpy as np
import pytest

from knnlm.knn import FaissSearch, TorchExactSearch, interpolate, knn_logprob


def brute_force(keys, queries, k):
    d = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    keys = (rng.standard_normal((3000, 16)) * 2).astype(np.float16)
    queries = (rng.standard_normal((50, 16)) * 2).astype(np.float16)
    return keys, queries


def test_faiss_flat_equals_brute_force(data):
    keys, queries = data
    d, i = FaissSearch(keys, "Flat").search(queries, 20)
    bd, bi = brute_force(keys, queries, 20)
    assert np.array_equal(i, bi)
    assert np.allclose(d, bd, rtol=1e-4, atol=1e-3)


def test_bf16_exact_search_equals_faiss_flat(data):
    keys, queries = data
    s = TorchExactSearch(keys, block=1000)  # several blocks, so candidates are merged across blocks
    d, i = s.search(queries, 20)
    fd, fi = FaissSearch(keys, "Flat").search(queries, 20)
    assert np.array_equal(i, fi)
    assert np.allclose(d, fd, rtol=1e-5, atol=1e-4)


def test_ivf_pq_reranked_distances_are_exact(data):
    keys, queries = data
    d, i = FaissSearch(keys, "IVF16,PQ4", nprobe=16, train_size=3000).search(queries, 10)
    exact = ((queries[:, None, :].astype(np.float64) - keys[i].astype(np.float64)) ** 2).sum(-1)
    assert np.allclose(d, exact, rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(d, axis=1) >= 0)


def test_knn_logprob_equals_brute_force_numpy():
    rng = np.random.default_rng(2)
    n, K, V = 30, 12, 7
    dists = np.sort(rng.uniform(0, 50, (n, K)), axis=1).astype(np.float32)
    vals = rng.integers(0, V, (n, K))
    targets = rng.integers(0, V, n)
    for k, tau in [(12, 10.0), (5, 1.0), (1, 3.0)]:
        got = knn_logprob(dists, vals, targets, k, tau)
        for j in range(n):
            w = np.exp(-dists[j, :k].astype(np.float64) / tau)
            p = w[vals[j, :k] == targets[j]].sum() / w.sum()
            assert (got[j] == -math.inf) if p == 0 else math.isclose(got[j], math.log(p), rel_tol=1e-9)


def test_lambda_zero_is_the_lm_exactly_and_mixing_is_linear_in_p():
    rng = np.random.default_rng(3)
    lm = np.log(rng.uniform(0.01, 1, 100)).astype(np.float32)
    knn = np.log(rng.uniform(0, 1, 100))
    knn[:10] = -np.inf
    assert np.array_equal(interpolate(lm, knn, 0.0), lm.astype(np.float64))
    mixed = interpolate(lm, knn, 0.25)
    assert np.allclose(np.exp(mixed), 0.25 * np.exp(knn) + 0.75 * np.exp(lm.astype(np.float64)))
