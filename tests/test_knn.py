import math

import numpy as np
import pytest
import torch

from knnlm import fastsearch
from knnlm.artifacts import UserError
from knnlm.knn import FaissSearch, TorchExactSearch, interpolate, knn_logprob, knn_logprob_grid, make_searcher, resolve_index

amx = pytest.mark.skipif(not fastsearch.available(), reason="no AMX CPU or no C++ compiler")


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # bf16 as on CPUs, fp16 as on GPUs
def test_torch_exact_search_equals_faiss_flat(data, dtype):
    keys, queries = data
    s = TorchExactSearch(keys, block=1000, dtype=dtype)  # several blocks, so candidates are merged across blocks
    d, i = s.search(queries, 20)
    fd, fi = FaissSearch(keys, "Flat").search(queries, 20)
    assert np.array_equal(i, fi)
    assert np.allclose(d, fd, rtol=1e-5, atol=1e-4)


def lm_like_keys(rng, n, d):
    """Keys shaped like LM activations: a large shared offset and very unequal scales per dimension."""
    scale = np.exp(rng.uniform(-2, 1.5, d))
    return (5 + rng.standard_normal((n, d)) * scale).astype(np.float16), scale


@amx
@pytest.mark.parametrize("n,d,m,k", [(5007, 100, 70, 20), (5007, 64, 33, 300), (40, 32, 5, 40), (2000, 256, 64, 1)])
def test_amx_exact_search_equals_brute_force(n, d, m, k):
    # Shapes off the kernel's tiles (n % 32, d % 32, m % 32 != 0), k = N, k = 1, and a margin that forces merging.
    rng = np.random.default_rng(n + d + k)
    keys, scale = lm_like_keys(rng, n, d)
    queries = (5 + rng.standard_normal((m, d)) * scale).astype(np.float32)
    s = fastsearch.AmxExactSearch(keys, query_block=32, key_chunk=64)  # several query blocks and key chunks
    dist, ids = s.search(queries, k)
    bd, bi = brute_force(keys, queries, k)
    assert np.array_equal(ids, bi)
    assert np.allclose(dist, bd, rtol=1e-5, atol=1e-4)


@amx
def test_amx_exact_search_reads_a_memory_map_and_matches_faiss(tmp_path):
    rng = np.random.default_rng(7)
    keys, scale = lm_like_keys(rng, 20000, 256)
    np.save(tmp_path / "keys.npy", keys)
    mm = np.load(tmp_path / "keys.npy", mmap_mode="r")
    queries = np.asarray(keys[rng.choice(len(keys), 100)], dtype=np.float32) + rng.standard_normal((100, 256)) * scale * 0.3
    d, i = make_searcher(mm, "amx-exact").search(queries, 64)
    fd, fi = FaissSearch(keys, "Flat").search(queries.astype(np.float32), 64)
    bd, bi = brute_force(keys, queries, 64)
    assert np.array_equal(i, bi)
    assert (i == fi).mean() > 0.999  # FAISS's own fp32 rounding may swap near-ties; brute force decides
    assert resolve_index("auto") == "amx-exact"


def test_ivf_pq_reranked_distances_are_exact(data):
    keys, queries = data
    # 4-bit codes: 16 centroids per sub-quantizer train in a fraction of a second (8-bit ones take seconds here)
    d, i = FaissSearch(keys, "IVF16,PQ4x4", nprobe=16, train_size=3000).search(queries, 10)
    exact = ((queries[:, None, :].astype(np.float64) - keys[i].astype(np.float64)) ** 2).sum(-1)
    assert np.allclose(d, exact, rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(d, axis=1) >= 0)


def _log_p_knn(d, v, target, tau):
    """log Σ_match exp(−d/τ) − log Σ exp(−d/τ), by numpy's logaddexp (finite wherever a neighbour matches)."""
    s = -d.astype(np.float64) / tau
    return np.logaddexp.reduce(s[v == target]) - np.logaddexp.reduce(s) if (v == target).any() else -math.inf


@pytest.mark.parametrize("scale", [50.0, 5000.0])  # 5000: exp(−d/τ) underflows, the log-probabilities must not
def test_knn_logprob_grid_equals_brute_force_numpy(scale):
    rng = np.random.default_rng(2)
    n, K, V = 30, 12, 7
    dists = np.sort(rng.uniform(0, scale, (n, K)), axis=1).astype(np.float32)
    vals = rng.integers(0, V, (n, K))
    targets = rng.integers(0, V, n)
    ks, taus = [1, 5, 12], [0.3, 1.0, 10.0]
    grid = knn_logprob_grid(dists, vals, targets, ks, taus, rows=7)  # row blocks that do not divide n
    for k in ks:
        for tau in taus:
            for j in range(n):
                want = _log_p_knn(dists[j, :k], vals[j, :k], targets[j], tau)
                got = grid[(k, tau)][j]
                assert got == want if want == -math.inf else math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
            assert np.allclose(knn_logprob(dists, vals, targets, k, tau), grid[(k, tau)], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="sorted"):
        knn_logprob_grid(dists[:, ::-1], vals, targets, [12], [1.0])


def test_lambda_zero_is_the_lm_exactly_and_mixing_is_linear_in_p():
    rng = np.random.default_rng(3)
    lm = np.log(rng.uniform(0.01, 1, 100)).astype(np.float32)
    knn = np.log(rng.uniform(0, 1, 100))
    knn[:10] = -np.inf
    assert np.array_equal(interpolate(lm, knn, 0.0), lm.astype(np.float64))
    mixed = interpolate(lm, knn, 0.25)
    assert np.allclose(np.exp(mixed), 0.25 * np.exp(knn) + 0.75 * np.exp(lm.astype(np.float64)))


@pytest.mark.parametrize("resident", [False, True])  # True: the GPU path (store copied to the device), run on the CPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_exact_search_on_lm_like_keys_equals_brute_force(dtype, resident):
    rng = np.random.default_rng(3)
    keys, scale = lm_like_keys(rng, 5007, 64)
    queries = (5 + rng.standard_normal((40, 64)) * scale).astype(np.float32)
    d, i = TorchExactSearch(keys, device="cpu", block=2000, dtype=dtype, resident=resident).search(queries, 300)
    bd, bi = brute_force(keys, queries, 300)
    assert np.allclose(d, bd, rtol=1e-5, atol=1e-4)
    # the same neighbours; two of them may swap places where fp32 distances tie (float64 tells them apart)
    assert all(set(a) == set(b) for a, b in zip(i, bi))
    d64 = ((queries[:, None, :].astype(np.float64) - keys[i].astype(np.float64)) ** 2).sum(-1)
    swapped = i != bi
    assert swapped.mean() < 0.01 and np.allclose(d64[swapped], bd[swapped], rtol=1e-6)


@amx
def test_amx_exact_refuses_a_store_larger_than_memory(monkeypatch):
    keys = np.zeros((1000, 64), dtype=np.float16)
    monkeypatch.setattr(fastsearch, "available_memory", lambda: 100_000)  # bytes: less than the 128 kB bf16 copy
    with pytest.raises(UserError, match="amx-exact needs .* use an IVF index"):
        fastsearch.AmxExactSearch(keys)
