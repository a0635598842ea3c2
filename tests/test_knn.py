import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm.artifacts import UserError, read_json
from knnlm.config import Config, validate
from knnlm.datastore import neighbour_values
from knnlm.knn import (KnnScores, KnnTable, grid_table, interpolate, knn_logprob, knn_logprob_grid, knn_logprobs_full,
                       perplexities, perplexity)
from knnlm.search import auto, base, cpu_kernels, faiss_index, key_geometry, torch_search
from knnlm.search.faiss_index import FaissSearch
from knnlm.search.registry import EXACT, make_searcher, resolve_index
from knnlm.search.torch_search import TorchExactSearch

# every compiled CPU kernel, skipped with the reason where this machine cannot run it (e.g. no AMX)
KERNELS = [pytest.param(name, marks=pytest.mark.skipif(
    not cpu_kernels.available(name),
    reason=f"{name}: the CPU lacks {', '.join(sorted(k.cpu_flags - cpu_kernels.cpu_flags())) or 'nothing'}"
           f" (or there is no C++ compiler)")) for name, k in cpu_kernels.KERNELS.items()]
CXX = shutil.which(os.environ.get("CXX", "g++"))  # the compiler cpu_kernels uses
# every search of every kernel: (kernel, prune, projected dimensions, first stage): the margin search, the pruned
# search with its default projection, with a projection far smaller than d (weak bounds: most keys tested exactly),
# and where the kernel has one, the staged scan (a first stage of 2 directions: most (query, 32 keys) go on; and of 6)
MODES = [pytest.param((p.values[0], prune, dims, first), marks=p.marks, id=f"{p.values[0]}-{label}")
         for p in KERNELS for prune, dims, first, label in (
             (False, None, None, "margin"), (True, None, None, "pruned"), (True, 8, None, "pruned8"),
             *(((True, None, 2, "staged2"), (True, 8, 6, "staged8-6")) if cpu_kernels.KERNELS[p.values[0]].staged
               else ()))]
# (every kernel has both searches: exact_search.h's KNNLM_ENTRY_POINTS, test_kernel_signature_matches_argtypes)


def cpu_search(keys, mode, **kw):
    kernel, prune, dims, first = mode
    return cpu_kernels.CpuExactSearch(keys, kernel, prune=prune, dims=dims, first=first, **kw)


def brute_force(keys, queries, k, rows=64):
    """The k nearest keys by float64 differences (stable: ties by index), `rows` queries at a time."""
    keys64 = np.asarray(keys, dtype=np.float64)
    d = np.concatenate([((np.asarray(queries[lo : lo + rows], dtype=np.float64)[:, None, :] - keys64[None]) ** 2).sum(-1)
                        for lo in range(0, len(queries), rows)])
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def assert_exact_neighbours(keys, queries, dist, ids, k):
    """ids and distances of an exact search against the float64 brute force: the same ids, except where two keys'
    distances tie to fp32 precision (then the ranks' float64 distances still agree); distances to 1e-5 relative."""
    bd, bi = brute_force(keys, queries, k)
    assert ids.shape == bi.shape and dist.dtype == np.float32
    assert all(len(set(row)) == k for row in ids)  # k distinct keys per query
    d64 = ((np.asarray(queries, dtype=np.float64)[:, None, :] - np.asarray(keys, dtype=np.float64)[ids]) ** 2).sum(-1)
    assert np.allclose(dist, bd, rtol=1e-5, atol=1e-5)
    swapped = ids != bi
    assert swapped.mean() < 0.01 and np.allclose(d64[swapped], bd[swapped], rtol=1e-6, atol=1e-6)


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


def low_rank_keys(rng, n, d, rank=8):
    """Keys as LM activations look: a large common mean, a few strong directions of unequal scale, weak noise."""
    basis = rng.standard_normal((rank, d)) * np.exp(rng.uniform(-1.5, 1.5, (rank, 1)))
    return (4 + rng.standard_normal(d) + rng.standard_normal((n, rank)) @ basis + 0.1 * rng.standard_normal((n, d))
            ).astype(np.float16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,d,m,k", [(5007, 100, 70, 20), (5007, 64, 33, 300), (40, 32, 5, 40), (2000, 256, 64, 1),
                                     (1001, 37, 19, 1001)])
def test_cpu_exact_search_equals_brute_force(mode, n, d, m, k):
    # Shapes off the kernels' tiles (n % 32, d % 32, m % 32 != 0; d odd), k = N, k = 1, and a small key chunk and
    # query block, so candidates are merged across threads, chunks and blocks.
    rng = np.random.default_rng(n + d + k)
    keys, scale = lm_like_keys(rng, n, d)
    queries = (5 + rng.standard_normal((m, d)) * scale).astype(np.float32)
    dist, ids = cpu_search(keys, mode, query_block=32, key_chunk=64).search(queries, k)
    assert_exact_neighbours(keys, queries, dist, ids, k)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_exact_search_on_low_rank_keys_with_near_neighbours(mode):
    # queries near stored keys, as an LM's are: the k nearest are close together, where bf16 products err most
    rng = np.random.default_rng(11)
    keys = low_rank_keys(rng, 3001, 96)
    queries = keys[rng.choice(len(keys), 45)].astype(np.float32) + 0.05 * rng.standard_normal((45, 96))
    s = cpu_search(keys, mode, query_block=32, key_chunk=96)
    assert ("pruned" if mode[1] else "margin") in s.describe()  # what the evaluation records as its search
    threads = torch.get_num_threads()
    try:
        for k, t in [(1, 1), (64, 1), (64, 3)]:  # 3 threads: uneven shares of the keys, candidates merged across them
            torch.set_num_threads(t)
            dist, ids = s.search(queries, k)
            assert_exact_neighbours(keys, queries, dist, ids, k)
    finally:
        torch.set_num_threads(threads)


PRUNED = [m for m in MODES if m.values[0][1]]


@pytest.mark.parametrize("mode", PRUNED)
def test_pruned_search_when_the_sampled_guess_is_too_small_searches_again(mode):
    # The pruning starts from a guess of the k-th distance taken from every 16th key. Planted: a tight cluster around
    # the queries. (a) 60 cluster keys, all at sampled positions: the guess lies inside the cluster, but k = 300
    # reaches beyond it, so fewer than k keys lie within the guess and every query is searched again from +inf.
    # (b) 960 cluster keys at every position: the sample's guess is beyond the true 300th: no query twice.
    rng = np.random.default_rng(3)
    for rows, fallbacks in ((np.arange(60) * 16, 20), (np.arange(960), 0)):
        keys = low_rank_keys(rng, 4800, 64).astype(np.float32)
        centre = keys[0].copy()
        keys[rows] = centre + 0.01 * rng.standard_normal((len(rows), 64))
        keys = keys.astype(np.float16)
        queries = centre + 0.01 * rng.standard_normal((20, 64)).astype(np.float32)
        s = cpu_search(keys, mode, query_block=32, key_chunk=64)
        dist, ids = s.search(queries, 300)
        assert s.fallbacks == fallbacks
        assert_exact_neighbours(keys, queries, dist, ids, 300)


@pytest.mark.parametrize("kernel", [p for p in KERNELS if cpu_kernels.KERNELS[p.values[0]].staged])
def test_staged_scan_answers_as_the_one_stage_search(kernel):
    # a store of rank 2 plus weak noise, a first stage of 2 of 16 directions: at every k, from 1 to N, the answers
    # are those of the one-stage pruned search, bit for bit, and of float64
    rng = np.random.default_rng(7)
    keys = low_rank_keys(rng, 6000, 48, rank=2)
    queries = keys[rng.choice(6000, 40, replace=False)].astype(np.float32) + 0.05 * rng.standard_normal((40, 48))
    one = cpu_kernels.CpuExactSearch(keys, kernel, prune=True, dims=16)
    staged = cpu_kernels.CpuExactSearch(keys, kernel, prune=True, dims=16, first=2)
    assert "the first 2 scanned first" in staged.describe()
    for k in (1, 50, 700, 6000):
        d1, i1 = one.search(queries, k)
        d2, i2 = staged.search(queries, k)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
        assert_exact_neighbours(keys, queries, d2, i2, k)
    for first in (0, 3, 16, 40):  # not a first stage: none, odd, all m directions, more than m
        with pytest.raises(ValueError, match="first: a staged scan needs"):
            cpu_kernels.CpuExactSearch(keys, kernel, prune=True, dims=16, first=first)
    with pytest.raises(ValueError, match="first: a staged scan needs"):
        cpu_kernels.CpuExactSearch(keys, kernel, prune=False, first=2)


def test_a_kernel_without_a_staged_scan_refuses_a_first_stage():
    plain = [name for name, k in cpu_kernels.KERNELS.items() if not k.staged and cpu_kernels.available(name)]
    if not plain:
        pytest.skip("every kernel this CPU runs has a staged scan")
    keys = low_rank_keys(np.random.default_rng(8), 500, 32)
    with pytest.raises(ValueError, match="first: a staged scan needs"):
        cpu_kernels.CpuExactSearch(keys, plain[0], prune=True, dims=16, first=4)


@pytest.mark.parametrize("mode", PRUNED)
def test_pruned_search_from_a_given_bound(mode):
    # any bound at or above the true k-th distance gives the exact answer (the bound itself, or far above it)
    rng = np.random.default_rng(4)
    keys = low_rank_keys(rng, 3000, 48)
    queries = keys[:25].astype(np.float32) + 0.05 * rng.standard_normal((25, 48))
    bd, _ = brute_force(keys, queries, 100)
    s = cpu_search(keys, mode)
    for start in (bd[:, -1] * (1 + 1e-4), bd[:, -1] * 3, np.full(25, np.inf)):
        dist, ids = s.search(queries, 100, start=start)
        assert_exact_neighbours(keys, queries, dist, ids, 100)
    with pytest.raises(ValueError, match="start: expected one bound per query"):
        s.search(queries, 100, start=np.ones(3))


@pytest.mark.parametrize("mode", MODES)
def test_cpu_exact_search_with_duplicate_keys_returns_tied_neighbours(mode):
    # every key stored 4 times: approximate distances tie exactly, across threads' shares and compactions; any of the
    # tied copies is a right answer, so each rank's float64 distance must be the truth's, with k distinct ids
    rng = np.random.default_rng(5)
    keys = np.repeat(low_rank_keys(rng, 700, 48), 4, axis=0)[rng.permutation(2800)]
    queries = keys[:30].astype(np.float32) + 0.1 * rng.standard_normal((30, 48))
    dist, ids = cpu_search(keys, mode, query_block=32, key_chunk=64).search(queries, 150)
    bd, _ = brute_force(keys, queries, 150)
    d64 = ((queries[:, None, :].astype(np.float64) - keys[ids].astype(np.float64)) ** 2).sum(-1)
    assert all(len(set(row)) == 150 for row in ids)
    assert np.allclose(d64, bd, rtol=1e-6, atol=1e-6) and np.allclose(dist, bd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cpu_exact_search_reads_a_memory_map_and_matches_faiss(tmp_path, kernel):
    rng = np.random.default_rng(7)
    keys, scale = lm_like_keys(rng, 8000, 256)
    np.save(tmp_path / "keys.npy", keys)
    mm = np.load(tmp_path / "keys.npy", mmap_mode="r")
    queries = np.asarray(keys[rng.choice(len(keys), 40)], dtype=np.float32) + rng.standard_normal((40, 256)) * scale * 0.3
    d, i = make_searcher(mm, f"{kernel}-exact").search(queries, 64)
    fd, fi = FaissSearch(keys, "Flat").search(queries.astype(np.float32), 64)
    assert_exact_neighbours(keys, queries, d, i, 64)
    assert (i == fi).mean() > 0.999  # FAISS's own fp32 rounding may swap near-ties; brute force decides


def _ctype(c_type: str):
    return ctypes.c_void_p if "*" in c_type else {"int64_t": ctypes.c_int64, "int": ctypes.c_int,
                                                 "double": ctypes.c_double}[c_type.split()[-1]]


def _params(source: str, function: str) -> tuple:
    """The ctypes of `function`'s parameters in C `source` (a macro's continuation backslashes dropped)."""
    params = re.search(rf"\bvoid {function}\(([^)]*)\)", source.replace("\\\n", "\n")).group(1)
    return tuple(_ctype(re.sub(r"\s*\b\w+$", "", p.strip())) for p in params.split(","))  # each name dropped


@pytest.mark.parametrize("kernel", cpu_kernels.KERNELS)
def test_kernel_signature_matches_argtypes(kernel):
    # ctypes trusts argtypes blindly: a parameter added on one side only would shift every argument after it.
    # Every kernel's entry points come from exact_search.h's KNNLM_ENTRY_POINTS(name, query type).
    source = (cpu_kernels.CSRC / cpu_kernels.KERNELS[kernel].source).read_text()
    assert re.search(rf"\bint knnlm_{kernel}_init\(\)", source)
    assert re.search(rf"^KNNLM_ENTRY_POINTS\({kernel}, (uint16_t|float)\)$", source, re.M)
    header = (cpu_kernels.CSRC / "exact_search.h").read_text()
    assert _params(header, "knnlm_##NAME##_search") == cpu_kernels.SEARCH_ARGTYPES
    assert _params(header, "knnlm_##NAME##_pruned") == cpu_kernels.PRUNED_ARGTYPES


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("kernel", [k for k in cpu_kernels.KERNELS if not cpu_kernels.available(k)])
def test_each_kernel_compiles_with_its_own_flags_only(kernel):
    # Each kernel builds with its own flags only (AVX-512 without AMX's, AVX2 without AVX-512's), on any CPU: those
    # this CPU runs were just built and loaded that way by cpu_kernels.available; the others are compiled here.
    k = cpu_kernels.KERNELS[kernel]
    done = subprocess.run([CXX, "-fsyntax-only", *cpu_kernels.COMMON_FLAGS, *k.flags, str(cpu_kernels.CSRC / k.source)],
                          capture_output=True, text=True)
    if done.returncode != 0 and "unrecognized command-line option" in done.stderr:
        pytest.skip(f"this compiler does not know {kernel}'s flags: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr


def test_the_kernel_cache_is_keyed_on_the_sources_not_their_folder(tmp_path, monkeypatch):
    kernel = cpu_kernels.KERNELS["avx2"]
    before = cpu_kernels.library_path(kernel)
    copy = tmp_path / "csrc"
    shutil.copytree(cpu_kernels.CSRC, copy)
    monkeypatch.setattr(cpu_kernels, "CSRC", copy)
    assert cpu_kernels.library_path(kernel) == before  # the same sources elsewhere: the same library
    (copy / "exact_search.h").write_text((copy / "exact_search.h").read_text() + "\n// edited\n")
    assert cpu_kernels.library_path(kernel) == before  # an edit under a running process: its library stays
    cpu_kernels.kernel_sources.cache_clear()  # as a new process would read them
    assert cpu_kernels.library_path(kernel) != before  # an edit of the shared header recompiles


@pytest.mark.skipif(not cpu_kernels.available("avx2"), reason="needs the AVX2 kernel (a CPU with AVX2 and a compiler)")
def test_a_kernel_compiled_after_its_sources_were_edited_is_built_from_them_as_imported(tmp_path, monkeypatch):
    # a running job's Python has the argument lists of the sources it imported with: an edit of the files under it
    # (a broken header here) must not reach the library it compiles at first use
    copy = tmp_path / "csrc"
    shutil.copytree(cpu_kernels.CSRC, copy)
    monkeypatch.setattr(cpu_kernels, "CSRC", copy)
    monkeypatch.setenv("KNNLM_CACHE", str(tmp_path / "cache"))
    cpu_kernels.kernel_sources.cache_clear()
    cpu_kernels.kernel_sources(copy)  # "import"
    (copy / "exact_search.h").write_text("#error edited while a job ran\n")
    cpu_kernels.load_library.cache_clear()
    try:
        assert cpu_kernels.load_library("avx2") is not None
        assert cpu_kernels.library_path(cpu_kernels.KERNELS["avx2"]).is_file()
    finally:
        cpu_kernels.load_library.cache_clear()
        cpu_kernels.kernel_sources.cache_clear()


def test_auto_picks_the_fastest_exact_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for runs, avx2_faster, want in [({"amx", "avx512", "avx2"}, True, "amx-exact"),
                                    ({"avx512", "avx2"}, False, "avx512-exact"),
                                    ({"avx2"}, True, "avx2-exact"), ({"avx2"}, False, "Flat"), (set(), True, "Flat")]:
        monkeypatch.setattr(cpu_kernels, "available", lambda name, runs=runs: name in runs)
        monkeypatch.setattr(cpu_kernels, "faster_than_flat", lambda name, f=avx2_faster: f)
        assert resolve_index("auto") == want
    for name in cpu_kernels.KERNELS:  # an explicit kernel the CPU cannot run is refused, saying why
        with pytest.raises(UserError, match=f"'{name}-exact' needs a CPU with .* and a C\\+\\+ compiler"):
            resolve_index(f"{name}-exact")


def test_auto_without_faiss_chooses_among_knnlms_own_searches(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed (an extra)
    keys = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float16)
    monkeypatch.setattr(cpu_kernels, "available", lambda name: name == "avx2")
    assert cpu_kernels.faster_than_flat("avx2")  # no FAISS Flat to lose to
    assert resolve_index("auto") == "avx2-exact"
    names = list(auto.auto_candidates(keys))
    assert names and all(n.startswith("avx2-exact") for n in names)
    monkeypatch.setattr(cpu_kernels, "available", lambda name: False)  # no kernel either: say what to install
    with pytest.raises(UserError, match=r"pip install 'knnlm\[faiss\]'"):
        resolve_index("auto")
    with pytest.raises(UserError, match=r"pip install 'knnlm\[faiss\]'"):
        auto.auto_candidates(keys)


def test_exact_backend_names_pass_config_validation():
    for name in EXACT:
        cfg = Config()
        cfg.eval.index = name
        validate(cfg)


@pytest.mark.skipif(not cpu_kernels.available("avx2"), reason="the AVX2 kernel cannot run here")
def test_faster_than_flat_is_measured_once_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNLM_CACHE", str(tmp_path))
    first = cpu_kernels.faster_than_flat("avx2", k=16, n=4096, d=32, queries=32)
    assert len(list((tmp_path / "ext").glob("vs-flat-avx2-*.json"))) == 1
    monkeypatch.setattr(cpu_kernels, "CpuExactSearch", None)  # a second measurement would fail
    assert cpu_kernels.faster_than_flat("avx2", k=16, n=4096, d=32, queries=32) == first


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


def test_a_table_of_the_grid_answers_as_every_neighbour_does():
    """`KnnTable` (eval.k_store < eval.k_max): built a block of tokens at a time from all K neighbours, then keeping
    only the first 4, it gives the same log p_kNN as `KnnScores` over all K, bit for bit on the grid and for any
    temperature at k <= 4 off it, the same shares of targets among the k nearest, the same halves; it refuses what it
    no longer holds."""
    rng = np.random.default_rng(5)
    n, K, V = 300, 24, 12
    dists = np.sort(rng.uniform(5, 9, (n, K)), 1).astype(np.float32)
    vals = rng.integers(0, V, (n, K))
    targets = rng.integers(0, V, n)
    vals[::7] = (targets[::7, None] + 1 + rng.integers(0, V - 1, (len(targets[::7]), K))) % V  # some carry no target
    ks, taus = [2, 8, 24], [0.5, 1.0, 4.0]
    full = KnnScores(dists, vals, targets)
    blocks = [grid_table(dists[lo : lo + 64], vals[lo : lo + 64], targets[lo : lo + 64], ks, taus) for lo in range(0, n, 64)]
    table = KnnTable(np.concatenate([b[0] for b in blocks]), ks, taus, np.concatenate([b[1] for b in blocks]), K,
                     dists[:, :4], vals[:, :4], targets)
    assert table.stored == K and full.stored == K
    grid = [(k, t) for k in ks for t in taus]
    want, got = full.at(grid), table.at(grid)
    assert all(np.array_equal(want[p], got[p]) for p in want)  # bit for bit: the same computation
    for k in (1, 2, 3, 4, 8, 24):
        assert table.target_in_neighbors(k) == full.target_in_neighbors(k)
    mixed = table.at([(2, 1.0), (3, 1.0), (2, 2.5), (3, 2.5)])  # (3, ·), (·, 2.5): off the grid, from the 4 stored
    assert all(np.allclose(mixed[p], full.logprob(*p), rtol=0, atol=1e-12) for p in mixed)
    half = table.rows(150, 300)
    assert np.allclose(half.logprob(8, 4.0), full.rows(150, 300).logprob(8, 4.0), rtol=1e-13, atol=0)  # sums
    # grouped by the grid's k: equal to the last bits
    assert half.target_in_neighbors(8) == full.rows(150, 300).target_in_neighbors(8)
    assert table.answers(24, 1.0) and table.answers(3, 7.0) and not table.answers(8, 7.0) and not table.answers(16, 1.0)
    with pytest.raises(ValueError, match="not in the saved grid"):
        table.logprob(8, 7.0)
    with pytest.raises(ValueError, match="not in the saved grid"):
        table.at([(16, 1.0)])


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
    # exponents raised to MIN_EXPONENT (at scale 5000 most are far below it) leave every value as it was
    unraised = knn_logprob_grid(dists, vals, targets, ks, taus, rows=7, min_exponent=None)
    assert all(np.array_equal(grid[key], unraised[key]) for key in grid)
    with pytest.raises(ValueError, match="sorted"):
        knn_logprob_grid(dists[:, ::-1], vals, targets, [12], [1.0])


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_neighbour_values_are_the_rows_values_and_padding_matches_no_target(tmp_path, id_dtype):
    """`neighbour_values` gathers as numpy's fancy indexing does, from a memory map too; a padded answer (id -1, an
    IVF probe that found fewer neighbours; distance inf) gives -1, where numpy's indexing gives the last row's value,
    so p_kNN over a padded row is p_kNN over its real neighbours, also when the target is that last row's value."""
    rng = np.random.default_rng(4)
    vals = rng.integers(0, 50, 1000).astype(np.int32)
    vals[-1] = 99  # the last row's value, which no other row carries
    np.save(tmp_path / "vals.npy", vals)
    stored = np.load(tmp_path / "vals.npy", mmap_mode="r")
    ids = rng.integers(0, 999, (37, 64)).astype(id_dtype)
    got = neighbour_values(stored, ids)
    assert got.dtype == np.int32 and got.shape == ids.shape and np.array_equal(got, vals[ids])
    dists = np.sort(rng.uniform(0, 10, ids.shape), axis=1).astype(np.float32)
    ids[:, 60:], dists[:, 60:] = -1, np.inf
    padded = neighbour_values(stored, ids)
    assert (padded[:, 60:] == -1).all() and np.array_equal(padded[:, :60], vals[ids[:, :60]])
    targets = np.full(37, 99)
    targets[::2] = padded[::2, 7]  # half the rows: a real neighbour carries the target
    ids[1, 5] = 999  # and one row's 6th neighbour is the last row itself
    padded = neighbour_values(stored, ids)
    whole = knn_logprob(dists, padded, targets, 64, 1.0)
    real = knn_logprob(dists[:, :60], padded[:, :60], targets, 60, 1.0)
    assert np.allclose(whole, real, rtol=1e-12, atol=0) and np.isfinite(whole[::2]).all() and np.isfinite(whole[1])
    assert (whole[3::2] == -np.inf).all()  # no real neighbour carries 99: −inf, where numpy's pads gave NaN
    assert neighbour_values(stored, np.zeros((0, 8), id_dtype)).shape == (0, 8)


def test_full_vocabulary_knn_distribution_is_the_brute_force_one():
    # the API's next-token p_kNN over all V tokens, against numpy's bincount of the softmax weights; the target's
    # entry is what knn_logprob computes
    rng = np.random.default_rng(5)
    B, k, V, tau = 6, 9, 20, 3.0
    dists = np.sort(rng.uniform(0, 30, (B, k)), axis=1).astype(np.float32)
    vals = rng.integers(0, V, (B, k)).astype(np.int32)
    got = knn_logprobs_full(dists, vals, V, tau)
    assert got.shape == (B, V) and got.dtype == torch.float64
    for b in range(B):
        w = np.exp(-dists[b].astype(np.float64) / tau)
        want = np.bincount(vals[b], weights=w / w.sum(), minlength=V)
        np.testing.assert_allclose(got[b].exp().numpy(), want, atol=1e-12)
        assert np.all(np.isneginf(got[b].numpy()[want == 0]))  # tokens no neighbour carries
    targets = vals[:, 0]
    np.testing.assert_allclose(got[np.arange(B), targets].numpy(), knn_logprob(dists, vals, targets, k, tau), atol=1e-9)
    # padded answers (value −1 at distance inf, as an IVF probe that found fewer gives them) are no neighbours
    padded_d = np.concatenate([dists, np.full((B, 3), np.inf, np.float32)], 1)
    padded_v = np.concatenate([vals, np.full((B, 3), -1, np.int32)], 1)
    assert torch.equal(knn_logprobs_full(padded_d, padded_v, V, tau), got)


def test_perplexities_over_all_lambdas_equal_one_interpolation_each():
    rng = np.random.default_rng(4)
    n = 1000
    lm = np.log(rng.uniform(0.001, 1, n)).astype(np.float32)
    knn = np.log(rng.uniform(0, 1, n))
    knn[:50] = -np.inf  # no neighbour matches
    lm[50:60], knn[50:60] = -800.0, -900.0  # both underflow exp: the shift by max(lm, knn) must keep them finite
    lambdas = [0.0, 0.05, 0.25, 0.5, 0.95, 1.0]
    got = perplexities(lm, knn, lambdas, rows=300)  # row blocks that do not divide n
    for lam, g in zip(lambdas, got):
        want = perplexity(interpolate(lm, knn, lam))
        assert g == want if lam in (0.0, 1.0) else math.isclose(g, want, rel_tol=1e-12), lam
    assert got[-1] == math.inf and got[0] == perplexity(lm)


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


@pytest.mark.parametrize("kernel", KERNELS)
def test_cpu_exact_refuses_a_store_larger_than_memory(monkeypatch, kernel):
    keys = np.zeros((1000, 64), dtype=np.float16)
    monkeypatch.setattr(cpu_kernels, "available_memory", lambda: 100_000)  # bytes: less than the 128 kB bf16 copy
    with pytest.raises(UserError, match=f"{kernel}-exact needs .* use an IVF index"):
        cpu_kernels.CpuExactSearch(keys, kernel)


@pytest.mark.slow  # torchrun: end to end
def test_sharded_search_over_two_gloo_ranks_equals_one_process(tmp_path):
    """Two processes under torchrun, each holding half the store, give one process's exact neighbours, with every
    exact backend this machine runs (CPU kernels it cannot run are tested, and skipped with a reason, above)."""
    backends = ["Flat", "bf16-exact", "bf16-pruned"] + [k.index for name, k in cpu_kernels.KERNELS.items()
                                                        if cpu_kernels.available(name)]
    ks = [1, 37, 1600]  # 1600: more than one rank's shard of 1500/1501 keys
    worker = Path(__file__).parent / "workers" / "sharded_search.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), ",".join(backends), ",".join(map(str, ks))],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert (int(r0["lo"]), int(r0["hi"]), int(r1["lo"]), int(r1["hi"])) == (0, 1500, 1500, 3001)
    store = key_geometry.lm_like_keys(3071, d=48, seed=0)
    keys = store[:3001]
    queries = store[3001:].astype(np.float32) + np.random.default_rng(1).normal(0, 0.05, (70, 48)).astype(np.float32)
    for backend in backends:
        for k in ks:
            d, i = r0[f"{backend}_{k}_d"], r0[f"{backend}_{k}_i"]
            assert np.array_equal(i, r1[f"{backend}_{k}_i"]) and np.array_equal(d, r1[f"{backend}_{k}_d"])  # both ranks
            assert_exact_neighbours(keys, queries, d, i, k)
            one_d, one_i = base.merge_nearest(*make_searcher(keys, backend).search(queries, k), k)  # ties ordered by id
            assert np.array_equal(i, one_i), (backend, k)
            assert np.allclose(d, one_d, rtol=1e-6), (backend, k)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_search_merges_the_ranks_answers_into_one_process_answer(monkeypatch, world):
    """`ShardedSearch` without processes: each rank's answer (padded where its shard holds fewer than k keys) is
    what `all_gather` carries; merged, the ranks give the exact neighbours of the whole store (the torchrun test
    above does the same across real processes)."""
    from knnlm.search import sharded

    store = key_geometry.lm_like_keys(1101, d=24, seed=3)
    keys, queries = store[:1031], store[1031:].astype(np.float32)
    searches = [sharded.ShardedSearch(keys, lambda rows: make_searcher(rows, "Flat"), rank=r, world=world)
                for r in range(world)]
    assert [(s.lo, s.hi) for s in searches] == [sharded.shard_rows(len(keys), r, world) for r in range(world)]
    assert searches[0].lo == 0 and searches[-1].hi == len(keys)
    for k in (1, 37, 400):  # 400: more than a shard of 343/344 keys holds
        sent = []  # pass 1: what each rank puts into all_gather (distances, then ids)
        monkeypatch.setattr(sharded.dist, "all_gather", lambda parts, mine: sent.append(mine.clone()))
        for s in searches:
            s.search(queries, k)
        calls = iter(range(2 * world))  # pass 2: every rank receives all ranks' distances, then all their ids
        monkeypatch.setattr(sharded.dist, "all_gather",
                            lambda parts, mine: [p.copy_(x) for p, x in zip(parts, sent[next(calls) % 2::2])])
        answers = [s.search(queries, k) for s in searches]
        for d, i in answers:
            assert_exact_neighbours(keys, queries, d, i, k)
            assert np.array_equal(i, answers[0][1]) and np.array_equal(d, answers[0][0])

def test_merge_nearest_orders_by_distance_then_id():
    d = np.array([[3.0, 1.0, 2.0, 1.0, np.inf]], dtype=np.float32)
    i = np.array([[7, 9, 4, 2, -1]])
    md, mi = base.merge_nearest(d, i, 4)
    assert mi.tolist() == [[2, 9, 4, 7]] and md.tolist() == [[1.0, 1.0, 2.0, 3.0]]


def test_faiss_cpu_on_a_cuda_machine_searches_on_the_cpu(data, monkeypatch):
    # faiss-cpu has the GPU function names but no GPUs: a CUDA machine must not make FaissSearch move its index
    import types

    assert not faiss_index.gpu_faiss(types.SimpleNamespace(get_num_gpus=lambda: 0))
    assert faiss_index.gpu_faiss(types.SimpleNamespace(get_num_gpus=lambda: 2))
    assert not faiss_index.gpu_faiss(types.SimpleNamespace())  # a build without the GPU functions at all
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine with faiss-cpu installed
    keys, queries = data
    d, i = FaissSearch(keys, "Flat").search(queries.astype(np.float32), 10)
    assert_exact_neighbours(keys, queries, d, i, 10)


@pytest.mark.parametrize("n,d,k", [(5007, 100, 20), (3001, 64, 300), (700, 32, 700), (4000, 256, 1)])
def test_torch_pruned_search_equals_brute_force(n, d, k):
    # the GPU's pruned search run on the CPU (bf16 products): shapes off any tile, k = N, k = 1, LM-like keys
    rng = np.random.default_rng(n + k)
    keys, scale = lm_like_keys(rng, n, d)
    queries = np.asarray(keys[rng.choice(n, 40)], dtype=np.float32) + rng.standard_normal((40, d)) * scale * 0.2
    s = torch_search.TorchPrunedSearch(keys, device="cpu", block=1024)
    dist, ids = s.search(queries, k, rows=16)
    assert_exact_neighbours(keys, queries, dist, ids, k)


def test_torch_pruned_search_widens_a_guess_that_was_too_small():
    # the planted cluster of the CPU kernels' test: 60 keys at sampled positions, so the sample's guess of the
    # 300th distance lies inside the cluster and every query needs a second, wider pass; exact all the same
    rng = np.random.default_rng(3)
    keys = low_rank_keys(rng, 4800, 64).astype(np.float32)
    centre = keys[0].copy()
    keys[np.arange(60) * 16] = centre + 0.01 * rng.standard_normal((60, 64))
    keys = keys.astype(np.float16)
    queries = centre + 0.01 * rng.standard_normal((20, 64)).astype(np.float32)
    s = torch_search.TorchPrunedSearch(keys, device="cpu", block=512)
    dist, ids = s.search(queries, 300)
    assert s.fallbacks == 20
    assert_exact_neighbours(keys, queries, dist, ids, 300)
    dist, ids = s.search(queries, 30)
    assert_exact_neighbours(keys, queries, dist, ids, 30)


def test_query_batches_are_sized_to_free_memory():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert base.query_rows(cpu, 65536) == 1024
    # 80 GB free, a quarter of it for 65,536-key blocks at 16 bytes a pair: 19,073 rows, capped at 16,384
    assert base.query_rows(gpu, 65536, free=80 * 10**9) == 16384
    assert base.query_rows(gpu, 65536, free=4 * 10**9) == 896  # 953 rounded down to a multiple of 64
    assert base.query_rows(gpu, 65536, free=10**6) == 64  # a GPU nearly full: the smallest batch, still progress


def test_max_norm_bound_is_never_below_the_float64_norm():
    """The fp32 bound the pruned searches' rounding analysis uses in place of a float64 pass: never below the exact
    largest row norm (float64 of the same fp32 values), on rows built to make fp32 sums
    lose: many equal terms, one huge term among tiny ones, wide rows, bf16 rows. Tight: the factor is the proof's
    2 (d + 2) u over the fp32 result, and nothing more."""
    rng = np.random.default_rng(11)
    cases = [torch.full((3, 4096), 1 + 2.0**-10), torch.from_numpy(rng.standard_normal((500, 1024)).astype(np.float32)),
             torch.cat([torch.full((2, 1), 3e3), torch.full((2, 2047), 1e-3)], 1),
             torch.from_numpy((rng.standard_normal((64, 256)) * np.logspace(-3, 3, 256)).astype(np.float32)),
             torch.from_numpy(rng.standard_normal((100, 64)).astype(np.float32)).to(torch.bfloat16)]
    for x in cases:
        exact = float(x.double().norm(dim=1).max())
        bound = key_geometry.max_norm_bound(x)
        assert exact <= bound <= exact * (1 + 3 * (x.shape[1] + 2) * 2.0**-24)
    assert key_geometry.max_norm_bound(torch.empty((0, 8))) == 0.0


def test_variance_dims_follow_a_planted_spectrum():
    rng = np.random.default_rng(3)
    scale = np.array([10.0] * 8 + [1.0] * 56)  # 8 directions of variance 100, 56 of variance 1: 800 of 856
    rotation, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    keys = ((rng.standard_normal((20000, 64)) * scale) @ rotation.T + 3).astype(np.float16)
    m, held = key_geometry.variance_dims(keys, share=0.9)
    assert m == 16 and held == pytest.approx(808 / 856, abs=0.01)  # 8 needed, rounded up to a multiple of 16
    assert key_geometry.variance_dims(keys, share=0.99)[0] == 64  # the flat part: nearly every direction
    flat = rng.standard_normal((20000, 64)).astype(np.float16)  # isotropic: 90 % needs ≈ 58 of 64
    assert key_geometry.variance_dims(flat, share=0.9)[0] == 64


def test_auto_takes_the_fastest_probe_and_remembers_why(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((3000, 32)).astype(np.float16)
    names = list(auto.auto_candidates(keys))
    assert names[0] == "Flat"  # never slower than FAISS Flat: it is always a candidate, timed first and in full
    for fastest in names:
        rates = {n: (900.0 if n == fastest else 100.0 + i) for i, n in enumerate(names)}
        measured = []

        def measure(searcher, queries, k, rates=rates, measured=measured):  # candidates are timed in their order
            if not measured or len(queries) == 128:  # the first is timed on 1,024 queries; the others on 128 first
                measured.append([names[len(measured)], 0])
            measured[-1][1] = len(queries)
            return rates[measured[-1][0]]

        folder = tmp_path / fastest.replace(" ", "_").replace(",", "")
        folder.mkdir()
        chosen = auto.choose_exact_search(keys, 10, folder, "sha", measure=measure)
        assert [n for n, _ in measured] == names  # every candidate timed, in order
        full = [n for n, q in measured if q == 1024]  # in full: the first, and any within half of the best so far
        assert fastest in full and full == [n for i, n in enumerate(names) if i == 0 or n == fastest or
                                            rates[n] >= max(rates[m] for m in names[:i]) / 2]
        (path,) = folder.glob("auto-search-*.json")  # named by the store's identity
        record = read_json(path)
        assert chosen.auto_reason == record["reason"]
        assert base.CountingSearch(chosen).auto_reason == record["reason"]  # what evaluate writes to meta.json
        from knnlm.search.sharded import ShardedSearch

        assert ShardedSearch(keys, lambda rows: chosen, rank=0, world=1).auto_reason == record["reason"]
        assert record["choice"] == fastest and record["reason"].startswith(f"{fastest}: 900 q/s")
        d, i = chosen.search(np.asarray(keys[:5], dtype=np.float32), 10)
        assert_exact_neighbours(keys, np.asarray(keys[:5], dtype=np.float32), d, i, 10)
        # remembered: a second call measures nothing; another k measures again
        again = auto.choose_exact_search(keys, 10, folder, "sha", measure=lambda *a: pytest.fail("measured again"))
        assert again.describe() == chosen.describe()
        measured.clear()
        auto.choose_exact_search(keys, 20, folder, "sha", measure=measure)
        assert [n for n, _ in measured] == names
        other = keys.copy()  # other keys of the same shape and model (e.g. a benchmark's stores): measured again
        other[len(keys) // 1024 * 7] += np.float16(1)  # one probe row differs
        measured.clear()
        auto.choose_exact_search(other, 10, folder, "sha", measure=measure)
        assert [n for n, _ in measured] == names


def test_auto_probes_on_the_queries_it_is_given_and_keeps_that_choice_apart(tmp_path, monkeypatch):
    """Given the queries of a search (an evaluation's split), `auto` times its candidates on evenly spaced rows of
    them, not on stored keys; its record says so, and a choice made on stored keys is not taken for queries (nor the
    reverse). Fewer queries than a probe holds: stored keys, as without queries."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((3000, 32)).astype(np.float16)
    queries = rng.standard_normal((2048, 32)).astype(np.float32) + 5  # unlike every key: where each probe row came from
    seen = []

    def measure(searcher, probe, k):
        seen.append(np.array(probe))
        return 100.0

    chosen = auto.choose_exact_search(keys, 10, tmp_path, "sha", measure=measure, probe_queries=queries)
    assert seen and all(np.array_equal(p, queries[::2][: len(p)]) for p in seen)  # every 2nd of 2,048: 1,024 rows
    assert "probe of 1024 queries" in chosen.auto_reason
    (path,) = tmp_path.glob("auto-search-*.json")
    assert read_json(path)["identity"]["probe"] == "queries"
    seen.clear()
    auto.choose_exact_search(keys, 10, tmp_path, "sha", measure=measure)  # stored keys: measured again, apart
    assert seen and all(np.array_equal(p, keys[:: len(keys) // 1024][: len(p)].astype(np.float32)) for p in seen)
    assert len(list(tmp_path.glob("auto-search-*.json"))) == 2
    seen.clear()
    few = auto.choose_exact_search(keys, 10, tmp_path, "sha", measure=measure, probe_queries=queries[:100])
    assert not seen and "probe of 1024 stored keys" in few.auto_reason  # too few to probe on: the stored keys' choice
    again = auto.choose_exact_search(keys, 10, tmp_path, "sha", measure=lambda *a: pytest.fail("measured again"),
                                     probe_queries=queries)
    assert again.auto_reason == chosen.auto_reason
    d, i = again.search(queries[:5], 10)
    assert_exact_neighbours(keys, queries[:5], d, i, 10)


def test_auto_on_a_gpu_chooses_between_the_torch_searches_by_their_probe(tmp_path, monkeypatch):
    """The GPU's decision (`bf16-exact` against `bf16-pruned`), made on the CPU: `auto` as it runs where the device
    is CUDA (the searches themselves built on this CPU) times exactly those two, takes the faster (planted rates),
    records why, and the chosen search is exact against brute force."""
    monkeypatch.setattr(auto, "default_device", lambda: torch.device("cuda"))
    rng = np.random.default_rng(5)
    keys = (rng.standard_normal((4000, 32)) * np.linspace(4, 0.1, 32)).astype(np.float16)  # a steep spectrum
    names = list(auto.auto_candidates(keys))
    assert names == ["bf16-exact", "bf16-pruned"]
    queries = np.asarray(keys[:7], dtype=np.float32) + 0.01
    for fastest in names:
        def measure(searcher, probe, k, fastest=fastest):
            return 800.0 if searcher.describe().startswith(fastest) else 200.0

        folder = tmp_path / fastest
        folder.mkdir()
        chosen = auto.choose_exact_search(keys, 16, folder, "sha", measure=measure)
        assert chosen.describe().startswith(fastest) and chosen.auto_reason.startswith(f"{fastest}: 800 q/s")
        assert read_json(next(folder.glob("auto-search-*.json")))["identity"]["device"] == "cuda"
        d, i = chosen.search(queries, 16)
        assert_exact_neighbours(keys, queries, d, i, 16)
