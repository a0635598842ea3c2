"""The one registry of search backends: every name `eval.index` accepts besides `auto` and FAISS factory strings.

`names.NAMED_INDEXES` repeats the names for `knnlm.config`, which imports no search code (tests/test_structure.py
checks that the two agree); `auto` (`resolve_index`, `auto.choose_exact_search`), `make_searcher`, the evaluation's
`EXACT` and the benchmarks read this list. Registry order is preference order: without a store to time them on,
`auto` takes the first backend of this device that runs here and is marked `unprobed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import UserError
from ..distributed import default_device
from . import cpu_kernels
from .base import Searcher
from .cpu_kernels import KERNELS, CpuExactSearch, Kernel
from .faiss_index import FaissSearch, faiss_installed, load_or_build_index
from .key_geometry import project_dims, staged_dims, variance_dims
from .torch_search import TorchExactSearch, TorchPrunedSearch

Variants = dict[str, Callable[[], Searcher]]  # what `auto` times on a store, by name, each built on demand


@dataclass(frozen=True)
class Backend:
    """A search backend as `eval.index` names it."""

    name: str  # the eval.index value
    build: Callable[[np.ndarray], Searcher]  # a searcher over a store's keys (N, d) float16
    exact: bool  # exact neighbours and distances: no re-ranking, and sharded across ranks under torchrun
    device: str  # where `auto` considers it: "cpu" or "cuda" (named explicitly, it runs wherever it runs here)
    runs_here: Callable[[], bool] = lambda: True
    needs: Callable[[], str] = lambda: ""  # what it needs that this machine lacks, for the error if it does not run
    auto_variants: Callable[[np.ndarray], Variants] | None = None  # timed by `auto` on a store; None: never chosen
    group: str = ""  # of the backends sharing a group, `auto` times only the first that runs here
    unprobed: Callable[[], bool] = lambda: False  # `auto` may take it without timing it (no store yet)


def _kernel_needs(kernel: Kernel) -> str:
    missing = sorted(kernel.cpu_flags - cpu_kernels.cpu_flags())
    return (f"a CPU with {', '.join(sorted(kernel.cpu_flags))} and a C++ compiler"
            + (f" (this CPU lacks {', '.join(missing)})" if missing else ""))


def _kernel_variants(keys: np.ndarray, name: str) -> Variants:
    """A kernel's pruned search projected onto its default number of principal directions and onto as many as hold
    90 % of the keys' variance, each also with a staged scan where the kernel has one (`staged_dims`), and its
    margin search."""
    kernel = KERNELS[name]
    out: Variants = {}
    for m in sorted({project_dims(keys.shape[1]), variance_dims(keys)[0]}):
        out[f"{kernel.index}, pruned, m = {m}"] = lambda m=m: CpuExactSearch(keys, name, prune=True, dims=m)
        first = staged_dims(m)
        if kernel.staged and first:
            out[f"{kernel.index}, pruned, m = {m}, first {first}"] = \
                lambda m=m, first=first: CpuExactSearch(keys, name, prune=True, dims=m, first=first)
    out[f"{kernel.index}, margin"] = lambda: CpuExactSearch(keys, name, prune=False)
    return out


def _kernel_backend(kernel: Kernel) -> Backend:
    """`amx-exact`, `avx512-exact`, `avx2-exact`; one not faster than FAISS Flat everywhere (AVX2) is taken without a
    probe only where `faster_than_flat` measured it so."""
    unprobed = (lambda: cpu_kernels.faster_than_flat(kernel.name)) if kernel.timed_against_flat else (lambda: True)
    return Backend(kernel.index, lambda keys: CpuExactSearch(keys, kernel.name), exact=True, device="cpu",
                   runs_here=lambda: cpu_kernels.available(kernel.name), needs=lambda: _kernel_needs(kernel),
                   auto_variants=lambda keys: _kernel_variants(keys, kernel.name), group="cpu kernels",
                   unprobed=unprobed)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    *(_kernel_backend(kernel) for kernel in KERNELS.values()),  # fastest first
    Backend("bf16-exact", TorchExactSearch, exact=True, device="cuda",
            auto_variants=lambda keys: {"bf16-exact": lambda: TorchExactSearch(keys)}, unprobed=lambda: True),
    Backend("bf16-pruned", TorchPrunedSearch, exact=True, device="cuda",
            auto_variants=lambda keys: {"bf16-pruned": lambda: TorchPrunedSearch(keys)}),
    Backend("Flat", lambda keys: FaissSearch(keys, "Flat"), exact=True, device="cpu", runs_here=faiss_installed,
            needs=lambda: "FAISS: pip install 'knnlm[faiss]'",
            auto_variants=lambda keys: {"Flat": lambda: FaissSearch(keys, "Flat")}, unprobed=lambda: True),
)}
EXACT = tuple(name for name, b in BACKENDS.items() if b.exact)  # searches whose neighbours and distances are exact


def resolve_index(name: str) -> str:
    """The backend an `eval.index` string names: `auto` without a store resolved to this machine's first preferred
    backend; a named backend this machine cannot run refused, saying why; a FAISS factory string as it is."""
    name = name.strip()
    if name == "auto":
        device = default_device().type
        for b in BACKENDS.values():
            if b.device == device and b.runs_here() and b.unprobed():
                return b.name
        raise UserError("eval.index: 'auto' found no search this machine runs; install FAISS: "
                        "pip install 'knnlm[faiss]'")
    backend = BACKENDS.get(name)
    if backend is not None and not backend.runs_here():
        raise UserError(f"eval.index: {name!r} needs {backend.needs()}; use 'auto' or another backend")
    return name


def make_searcher(keys: np.ndarray, index: str, nprobe: int = 32, ds_folder: Path | None = None,
                  model_sha256: str = "", rerank_factor: int = 2) -> Searcher:
    """The searcher an `eval.index` string names over keys (N, d); approximate FAISS indexes are cached beside the
    datastore. `rerank_factor` 0 keeps an approximate index's own (e.g. PQ) distances."""
    name = resolve_index(index)
    if name in BACKENDS:
        return BACKENDS[name].build(keys)
    if ds_folder is not None:
        built = load_or_build_index(ds_folder, keys, name, model_sha256)
        return FaissSearch(keys, name, nprobe=nprobe, index=built, rerank_factor=rerank_factor)
    return FaissSearch(keys, name, nprobe=nprobe, rerank_factor=rerank_factor)
