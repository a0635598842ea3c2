"""FAISS indexes by `index_factory` string (`Flat`, `IVF4096,PQ32`, ...), and their cache beside the datastore.

FAISS is an optional dependency (`pip install 'knnlm[faiss]'`), imported here only, and only when an index is used.
Approximate indexes are re-ranked with exact distances read from the stored keys, as kNN-LM found helpful.

Shapes: n queries, N stored keys, d dimensions, k neighbours.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..artifacts import UserError, atomic_dir, optional_import, read_json, write_json
from .base import exact_sq_distances


def import_faiss():
    """The `faiss` module, or a one-line error naming the extra that installs it."""
    return optional_import("faiss", "faiss", "FAISS indexes (eval.index = Flat or a factory string)")


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def gpu_faiss(faiss) -> bool:
    """Whether this FAISS build can search on a GPU: faiss-cpu on a CUDA machine has the GPU names but no GPUs."""
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:
        return False


class FaissSearch:
    """A FAISS index built from an `index_factory` string, for stores of any size.

    Approximate indexes (IVF, PQ, ...) are trained on a random sample of the keys and filled chunk by chunk from the
    memory-mapped store, so memory holds the index plus one chunk, never the keys. Their answers are re-ranked with
    exact distances read from the stored keys: `rerank_factor * k` candidates are fetched and the k nearest kept.
    With `faiss-gpu` installed and a GPU present, the index is searched on all GPUs.
    """

    auto_reason: str | None = None  # set by `auto` (search/auto.py)

    def __init__(self, keys: np.ndarray, factory: str, nprobe: int = 32, train_size: int = 262144, chunk: int = 16384,
                 seed: int = 0, rerank_factor: int = 2, index=None):
        faiss = import_faiss()

        self.keys, self.factory, self.rerank_factor = keys, factory, rerank_factor
        self.exact = factory.strip() == "Flat"
        self.index = index if index is not None else self.build(keys, factory, train_size, chunk, seed)
        try:
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        except RuntimeError:
            pass  # not an IVF index
        if gpu_faiss(faiss):
            self.index = faiss.index_cpu_to_all_gpus(self.index)

    @staticmethod
    def build(keys: np.ndarray, factory: str, train_size: int = 262144, chunk: int = 16384, seed: int = 0):
        """The index over keys, trained on a sample of `train_size` of them and filled `chunk` keys at a time (small
        chunks build Flat faster than chunks of 262,144: benchmarks/index_build.py)."""
        faiss = import_faiss()

        N, d = keys.shape
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_L2)
        except RuntimeError as e:
            raise UserError(f"eval.index: FAISS cannot build {factory!r} ({str(e).splitlines()[0]})") from None
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(N, size=min(N, train_size), replace=False))
            index.train(np.asarray(keys[sample], dtype=np.float32))
        for lo in range(0, N, chunk):
            index.add(np.asarray(keys[lo : lo + chunk], dtype=np.float32))
        return index

    def describe(self) -> str:
        if self.exact:
            return "FAISS Flat"
        return f"FAISS {self.factory}" + (f", {self.rerank_factor}k candidates re-ranked exactly" if self.rerank_factor else "")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.exact or self.rerank_factor == 0:  # Flat is exact; rerank_factor 0: the index's own distances
            return self.index.search(q, k)
        _, i = self.index.search(q, min(k * self.rerank_factor, self.index.ntotal))
        missing = i < 0  # an IVF probe that found fewer candidates pads with -1
        exact = exact_sq_distances(torch.from_numpy(q), self.keys, torch.from_numpy(np.where(missing, 0, i).astype(np.int64)))
        exact[torch.from_numpy(missing)] = math.inf
        d, order = exact.topk(k, dim=1, largest=False)
        return d.numpy(), np.take_along_axis(i, order.numpy(), 1)


def load_or_build_index(ds_folder: Path, keys: np.ndarray, factory: str, model_sha256: str, **build) -> object:
    """A trained, filled approximate index for a datastore, saved under DATASTORE/indexes/ and reused.

    Building IVF-PQ over a large store takes hours: it is written once (FAISS's own format, no pickle) with a
    meta.json naming the factory string and the datastore it indexes, and read back on later evaluations."""
    faiss = import_faiss()

    folder = Path(ds_folder) / "indexes" / "".join(c if c.isalnum() else "_" for c in factory)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = read_json(meta_path, "index meta")
        if meta.get("factory") == factory and meta.get("model_sha256") == model_sha256 and meta.get("N") == len(keys):
            return faiss.read_index(str(folder / "index.faiss"))
    t0 = time.time()
    index = FaissSearch.build(keys, factory, **build)
    with atomic_dir(folder) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        write_json(tmp / "meta.json", {"factory": factory, "N": len(keys), "d": keys.shape[1],
                                       "model_sha256": model_sha256, "seconds": time.time() - t0})
    return index

