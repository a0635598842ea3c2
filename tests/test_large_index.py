"""Index building for stores that do not fit in memory: IVF-PQ trained on a sample, filled in chunks from a
memory-mapped store, re-ranked with exact distances, saved and reused."""

import numpy as np
import pytest

from knnlm.search.faiss_index import FaissSearch, load_or_build_index

pytestmark = pytest.mark.slow  # tens of thousands of keys, IVF-PQ training


class ReadRecorder:
    """A memory-mapped key store that remembers the largest block of rows read at once."""

    def __init__(self, keys):
        self.keys, self.shape, self.largest = keys, keys.shape, 0

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, idx):
        rows = self.keys[idx]
        self.largest = max(self.largest, len(rows))
        return rows


def clustered_store(path, n=40000, d=32, clusters=200, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 4
    keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    for lo in range(0, n, 8192):
        m = min(8192, n - lo)
        keys[lo : lo + m] = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d))
    keys.flush()
    queries = centres[rng.integers(0, clusters, 300)] + rng.standard_normal((300, d))
    return np.load(path, mmap_mode="r"), queries.astype(np.float32)


def test_ivfpq_from_a_memory_mapped_store_in_chunks(tmp_path):
    keys, queries = clustered_store(tmp_path / "keys.npy")
    recorder = ReadRecorder(keys)
    index = FaissSearch.build(recorder, "IVF64,PQ16", train_size=8192, chunk=4096)
    assert recorder.largest <= 8192  # the training sample or one chunk at a time, never the whole store
    approx = FaissSearch(keys, "IVF64,PQ16", nprobe=16, index=index, rerank_factor=4)
    d, i = approx.search(queries, 64)
    ed, ei = FaissSearch(keys, "Flat").search(queries, 64)
    recall = np.mean([len(set(a) & set(b)) / 64 for a, b in zip(i, ei)])
    print(f"recall@64 = {recall:.3f}")
    assert recall >= 0.9
    # returned distances are exact, whatever PQ estimated
    exact = ((queries[:, None, :] - keys[i].astype(np.float32)) ** 2).sum(-1)
    assert np.allclose(d, exact, rtol=1e-4, atol=1e-3)


def test_index_is_saved_and_reused(tmp_path):
    keys, _ = clustered_store(tmp_path / "keys.npy", n=5000)
    first = load_or_build_index(tmp_path, keys, "IVF16,PQ8", "sha-a", train_size=4096)
    saved = tmp_path / "indexes" / "IVF16_PQ8"
    assert (saved / "meta.json").is_file() and (saved / "index.faiss").is_file()
    stamp = (saved / "index.faiss").stat().st_mtime_ns
    again = load_or_build_index(tmp_path, keys, "IVF16,PQ8", "sha-a")
    assert again.ntotal == first.ntotal == 5000 and (saved / "index.faiss").stat().st_mtime_ns == stamp
    load_or_build_index(tmp_path, keys, "IVF16,PQ8", "sha-b", train_size=4096)  # another model: rebuilt
    assert (saved / "index.faiss").stat().st_mtime_ns != stamp


def test_reranking_is_optional(tmp_path):
    keys, queries = clustered_store(tmp_path / "keys.npy", n=5000)
    index = FaissSearch.build(keys, "IVF16,PQ8", train_size=4096)
    pq_d, pq_i = FaissSearch(keys, "IVF16,PQ8", nprobe=16, index=index, rerank_factor=0).search(queries, 10)
    exact = ((queries[:, None, :] - keys[pq_i].astype(np.float32)) ** 2).sum(-1)
    assert not np.allclose(pq_d, exact, rtol=1e-3)  # PQ's own, approximate distances
