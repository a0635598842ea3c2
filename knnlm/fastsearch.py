"""knnlm's exact search on CPUs: low-precision products pick candidates, exact fp32 distances rank them.

FAISS's exact index (`IndexFlatL2`) runs at the fp32 matrix-product rate and spends much of a large-k search
keeping heaps. The kernels in `csrc/` fuse the two passes that matter:

1. candidate distances ||k||² − 2 q·k from low-precision products with fp32 accumulation, filtered against each
   query's running threshold while they are still in registers; each query keeps its `k + margin` best candidates;
2. exact fp32 distances from the stored float16 keys for those candidates; the k nearest are returned.

One kernel per instruction set, each its own shared library compiled with its own flags, all with one C signature
and the same bf16 key store (`csrc/exact_search.h` holds their common part):
- `amx` (`amx-exact`): AMX tile products of bf16 keys and queries (Intel Sapphire Rapids and later);
- `avx512` (`avx512-exact`): AVX-512 BF16 dot products (`vdpbf16ps`) of bf16 keys and queries (AMD Zen 4 and
  later, Intel Cooper Lake);
- `avx2` (`avx2-exact`): fp32 FMAs of fp32 queries and bf16 keys widened to fp32 (any x86-64 CPU since 2013).

Keys and queries are centered on the (sampled) mean key before rounding to bf16 (distances do not change; rounding errors
shrink with the vectors' norms). The margin absorbs what is left: `tests/test_knn.py` checks the neighbours equal
a float64 brute force, and `benchmarks/search.py` reports recall against FAISS and a float64 brute force.

A kernel is compiled on first use with the system's C++ compiler (about 2 s) and cached under `$KNNLM_CACHE/ext/`;
where the CPU lacks its instructions (/proc/cpuinfo) or there is no compiler, `available(kernel)` is False and
callers use another kernel or FAISS. `KNNLM_NO_AMX=1` (`KNNLM_NO_AVX512`, `KNNLM_NO_AVX2`) turns one off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import UserError, write_json
from .data import cache_root

CSRC = Path(__file__).with_name("csrc")
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")


@dataclass(frozen=True)
class Kernel:
    """One compiled variant of the search: what it is built from and with, and what it needs of the CPU."""

    name: str  # "avx512": eval.index "avx512-exact", C functions knnlm_avx512_{init,search}
    source: str  # in csrc/, beside the shared exact_search.h
    flags: tuple[str, ...]  # instruction sets it is compiled for: only these, so each builds with its own
    cpu_flags: frozenset[str]  # what /proc/cpuinfo must report for the library to be loaded at all
    dim_multiple: int  # dimensions padded to a multiple of this (AMX tiles are 32 bf16 wide)
    bf16_queries: bool  # queries rounded to bf16 (AMX, AVX-512 BF16) or kept fp32 (AVX2)

    @property
    def index(self) -> str:
        return f"{self.name}-exact"


KERNELS = {k.name: k for k in (  # fastest first: `auto` takes the first one the CPU runs
    Kernel("amx", "amx_search.cpp", ("-mavx512f", "-mavx512bf16", "-mf16c", "-mamx-tile", "-mamx-bf16"),
           frozenset({"amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "f16c"}), 32, True),
    Kernel("avx512", "avx512_search.cpp", ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mf16c", "-mfma"),
           frozenset({"avx512f", "avx512bw", "avx512_bf16", "f16c", "fma"}), 2, True),
    Kernel("avx2", "avx2_search.cpp", ("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"}), 2, False),
)}

# knnlm_<kernel>_search(queries, M, D, packed, norms, Np, qf32, keys16, N, Dx, k, C, nthreads, qblock, kchunk,
# out_d, out_i): one C signature for every kernel (tests/test_knn.py compares it with each source).
_p, _i64 = ctypes.c_void_p, ctypes.c_int64
SEARCH_ARGTYPES = (_p, _i64, _i64, _p, _p, _i64, _p, _p, _i64, _i64, _i64, _i64, ctypes.c_int, _i64, _i64, _p, _p)


def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo, after the colon ("" where there is none: not Linux)."""
    try:
        line = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith(field)), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags Linux reports for this CPU."""
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    return _cpuinfo("model name")


def cpu_has_amx() -> bool:
    return KERNELS["amx"].cpu_flags <= cpu_flags()


def _cache_dir() -> Path:
    return cache_root() / "ext"


def library_path(kernel: Kernel) -> Path:
    """Where the compiled kernel is cached: named by a digest of its sources and flags, so an edit recompiles."""
    text = (CSRC / kernel.source).read_bytes() + (CSRC / "exact_search.h").read_bytes()
    digest = hashlib.sha256(text + " ".join(COMMON_FLAGS + kernel.flags).encode()).hexdigest()[:16]
    return _cache_dir() / f"{Path(kernel.source).stem}-{digest}.so"


@functools.cache
def load_library(name: str = "amx") -> ctypes.CDLL | None:
    """The compiled kernel, or None where this machine cannot run it (CPU without its instructions, no compiler,
    no permission, or turned off by KNNLM_NO_<NAME>)."""
    kernel = KERNELS[name]
    if os.environ.get(f"KNNLM_NO_{name.upper()}") or not kernel.cpu_flags <= cpu_flags():
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    so = library_path(kernel)
    if not so.is_file():
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # compile aside, then rename: never half a library
                out = Path(tmp) / so.name
                done = subprocess.run([cxx, *COMMON_FLAGS, *kernel.flags, str(CSRC / kernel.source), "-o", str(out)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    warnings.warn(f"knnlm: could not compile {kernel.source}, not using {kernel.index}: "
                                  f"{done.stderr.strip()[:300]}")
                    return None
                os.replace(out, so)
        except OSError as e:  # a read-only or full cache folder
            warnings.warn(f"knnlm: could not build {so}, not using {kernel.index}: {e}")
            return None
    lib = ctypes.CDLL(str(so))
    if getattr(lib, f"knnlm_{name}_init")() != 1:  # AMX: Linux's permission; others: the CPU's own report
        return None
    search = getattr(lib, f"knnlm_{name}_search")
    search.argtypes = list(SEARCH_ARGTYPES)
    search.restype = None
    return lib


def available(kernel: str = "amx") -> bool:
    return load_library(kernel) is not None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def centering_vector(keys: np.ndarray, rows: int = 65536) -> torch.Tensor:
    """The mean of up to `rows` evenly spaced keys, fp32 (d,): what the low-precision searches subtract from keys
    and queries. Any vector leaves distances unchanged; one near the mean makes the vectors, and so their rounding
    errors, small. A sample spares a second pass over a large store."""
    step = max(1, len(keys) // rows)
    return torch.from_numpy(np.asarray(keys[::step], dtype=np.float64).mean(0).astype(np.float32))


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    """bf16 (round to nearest even) of an fp32 tensor, as the uint16 bit patterns the kernel reads."""
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


class CpuExactSearch:
    """Exact k-NN over a float16 key store (N, d) with one of the compiled kernels (`KERNELS`: "amx", "avx512",
    "avx2"), with the same interface as `knn.FaissSearch`.

    Memory: a bf16 copy of the keys (2 bytes per dimension) plus their norms; the float16 keys are read in place
    (a memory map stays a memory map). `margin` extra candidates per query are re-ranked exactly."""

    def __init__(self, keys: np.ndarray, kernel: str = "amx", margin: int = 32, margin_fraction: float = 1 / 16,
                 block: int = 262144, query_block: int = 1024, key_chunk: int = 1024):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = KERNELS[kernel]
        lib = load_library(kernel)
        if lib is None:
            raise RuntimeError(f"{self.kernel.index} search is not available on this machine")
        self._search = getattr(lib, f"knnlm_{kernel}_search")
        if keys.dtype != np.float16 or keys.ndim != 2:
            raise ValueError(f"keys: expected a 2-d float16 array, got {keys.dtype} {keys.shape}")
        self.N, self.d = keys.shape
        self.margin, self.margin_fraction = margin, margin_fraction
        self.query_block, self.key_chunk = query_block, key_chunk
        self.D = -(-self.d // self.kernel.dim_multiple) * self.kernel.dim_multiple  # padded dimensions
        Np = -(-self.N // 32) * 32  # whole units of 32 keys, the work the kernels split between threads
        need, free = Np * self.D * 2, available_memory()
        if free is not None and need > 0.8 * free:
            raise UserError(f"eval.index: {self.kernel.index} needs a {need / 2**30:.1f} GiB bf16 copy of the keys "
                            f"but only {free / 2**30:.1f} GiB of memory is available; use an IVF index "
                            f"(e.g. 'IVF4096,PQ64')")
        self.mean = centering_vector(keys)
        # Centered bf16 keys in groups of 16, dimension pair by dimension pair: (Np/16, D/2, 16 keys, 2). This is
        # the VNNI layout of AMX's B operand (whose 32-dimension chunks are 16 consecutive pairs) and the operand
        # of vdpbf16ps (16 keys x one pair per 64-byte vector). Written block by block (torch copies in parallel).
        packed = torch.zeros((Np // 16, self.D // 2, 16, 2), dtype=torch.bfloat16)
        norms = torch.full((Np,), float("inf"))  # padding rows are never selected
        block = block // 16 * 16
        for lo in range(0, self.N, block):
            x = torch.from_numpy(np.asarray(keys[lo : lo + block], dtype=np.float32)) - self.mean
            xb = torch.zeros((-(-len(x) // 16) * 16, self.D), dtype=torch.bfloat16)
            xb[: len(x), : self.d] = x
            norms[lo : lo + len(x)] = xb[: len(x)].float().pow(2).sum(1)  # ||k̃||² of the bf16 key the products use
            packed[lo // 16 : lo // 16 + len(xb) // 16] = xb.view(-1, 16, self.D // 2, 2).permute(0, 2, 1, 3)
        self.packed = packed.view(torch.int16).numpy().view(np.uint16)
        self.norms = norms.numpy()
        self.keys16 = keys if keys.flags.c_contiguous else np.ascontiguousarray(keys)  # exact distances, read in place

    def candidates(self, k: int) -> int:
        return min(self.N, k + max(self.margin, int(k * self.margin_fraction)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 < k <= self.N:
            raise ValueError(f"k: expected 1..{self.N}, got {k}")
        q32 = np.ascontiguousarray(queries, dtype=np.float32)
        M = len(q32)
        Mp = -(-M // 32) * 32
        centered = torch.from_numpy(q32) - self.mean
        if self.kernel.bf16_queries:
            qc = np.zeros((Mp, self.D), dtype=np.uint16)
            qc[:M, : self.d] = _bf16_bits(centered)
        else:
            qc = np.zeros((Mp, self.D), dtype=np.float32)
            qc[:M, : self.d] = centered.numpy()
        D = np.empty((M, k), dtype=np.float32)
        I = np.empty((M, k), dtype=np.int64)
        self._search(_ptr(qc), M, self.D, _ptr(self.packed), _ptr(self.norms), len(self.norms), _ptr(q32),
                     _ptr(self.keys16), self.N, self.d, k, self.candidates(k), torch.get_num_threads(),
                     self.query_block, self.key_chunk, _ptr(D), _ptr(I))
        return D, I


def lm_like_keys(n: int, d: int = 256, rank: int = 32, seed: int = 0, chunk: int = 262144) -> np.ndarray:
    """A synthetic float16 store (n, d) shaped like LM activations: a large common offset, a few strong directions
    of very unequal scale (a random rank-`rank` Gaussian) and weak isotropic noise. For calibration and benchmarks."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d)).astype(np.float32) * np.exp(rng.uniform(-1.5, 1.5, (rank, 1)))
    offset = (4 + rng.standard_normal(d)).astype(np.float32)
    keys = np.empty((n, d), dtype=np.float16)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        z = rng.standard_normal((m, rank), dtype=np.float32)
        keys[lo : lo + m] = offset + z @ basis / np.sqrt(rank) + 0.1 * rng.standard_normal((m, d), dtype=np.float32)
    return keys


def faster_than_flat(kernel: str, k: int = 1024, n: int = 131072, d: int = 256, queries: int = 256) -> bool:
    """Whether `kernel` answers k-NN queries faster than FAISS IndexFlatL2 on this machine: measured once, on a
    synthetic LM-like store of n keys with the threads torch uses, and remembered under $KNNLM_CACHE/ext/ (per
    kernel build, CPU and thread count). For kernels that are not faster everywhere (AVX2 against an AVX-512 BLAS)."""
    import faiss

    threads = torch.get_num_threads()
    what = f"{library_path(KERNELS[kernel]).name} {cpu_model()} {sorted(cpu_flags())} {threads} faiss " \
           f"{faiss.__version__} n={n} d={d} k={k}"
    record = _cache_dir() / f"vs-flat-{kernel}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.json"
    if record.is_file():
        try:
            timing = json.loads(record.read_text())
            return timing["kernel_qps"] > timing["flat_qps"]
        except (json.JSONDecodeError, KeyError):
            pass  # measure again
    keys = lm_like_keys(n, d, seed=1)
    rng = np.random.default_rng(2)
    q = keys[rng.choice(n, queries, replace=False)].astype(np.float32) + rng.standard_normal((queries, d), dtype=np.float32)
    faiss.omp_set_num_threads(threads)
    flat = faiss.IndexFlatL2(d)
    flat.add(keys.astype(np.float32))
    ours = CpuExactSearch(keys, kernel)
    best = {"kernel_qps": 0.0, "flat_qps": 0.0}
    for _ in range(2):  # interleaved, best of two: the machine's other load touches both alike
        for label, search in (("kernel_qps", ours.search), ("flat_qps", flat.search)):
            t = time.perf_counter()
            search(q, k)
            best[label] = max(best[label], queries / (time.perf_counter() - t))
    write_json(record, {**best, "measured": what})
    return best["kernel_qps"] > best["flat_qps"]


def best_kernel() -> str | None:
    """The kernel `eval.index = "auto"` uses on a CPU: AMX, else AVX-512 BF16, else AVX2 where it is measured
    faster than FAISS Flat; None: FAISS Flat."""
    for name in ("amx", "avx512"):
        if available(name):
            return name
    return "avx2" if available("avx2") and faster_than_flat("avx2") else None
