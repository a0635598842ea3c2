"""knnlm's exact search on CPUs with AMX: bf16 tile products pick candidates, exact fp32 distances rank them.

FAISS's exact index (`IndexFlatL2`) runs at the fp32 matrix-product rate. On CPUs with AMX (Intel Sapphire Rapids
and later) bf16 tile products run ~10x faster, but PyTorch rounds a bf16 product's output to bf16 and a blocked
search built from separate PyTorch ops spends its time writing and re-reading distance matrices. The kernel in
`csrc/amx_search.cpp` fuses the two passes that matter:

1. candidate distances ||k||² − 2 q·k from AMX tile products with fp32 accumulation, filtered against each query's
   running threshold while they are still in registers; each query keeps its `k + margin` best candidates;
2. exact fp32 distances from the stored float16 keys for those candidates; the k nearest are returned.

Keys and queries are centered on the (sampled) mean key before rounding to bf16 (distances do not change; rounding errors
shrink with the vectors' norms). The margin absorbs what is left: `tests/test_knn.py` checks the neighbours equal
an exact search, and `benchmarks/search.py` reports recall against FAISS and a float64 brute force.

The kernel is compiled on first use with the system's C++ compiler (about 2 s) and cached under
`$KNNLM_CACHE/ext/`; where there is no AMX or no compiler, `available()` is False and callers use FAISS.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .artifacts import UserError
from .data import cache_root

SOURCE = Path(__file__).with_name("csrc") / "amx_search.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-mavx512f", "-mavx512bf16", "-mf16c",
         "-mamx-tile", "-mamx-bf16"]


def cpu_has_amx() -> bool:
    try:
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "").split()
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "f16c"} <= set(flags)


def _cache_dir() -> Path:
    return cache_root() / "ext"


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where this machine cannot run it (no AMX, no compiler, no permission)."""
    if os.environ.get("KNNLM_NO_AMX") or not cpu_has_amx():
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    so = _cache_dir() / f"amx_search-{digest}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # compile aside, then rename: never half a library
            out = Path(tmp) / so.name
            done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                warnings.warn(f"knnlm: could not compile {SOURCE.name}, using FAISS: {done.stderr.strip()[:300]}")
                return None
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    if lib.knnlm_amx_init() != 1:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.knnlm_amx_search.argtypes = [p, i64, i64, p, p, i64, p, p, i64, i64, i64, i64, ctypes.c_int, i64, i64, p, p]
    lib.knnlm_amx_search.restype = None
    return lib


def available() -> bool:
    return load_library() is not None


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


class AmxExactSearch:
    """Exact k-NN over a float16 key store (N, d), with the same interface as `knn.FaissSearch`.

    Memory: a bf16 copy of the keys (2 bytes per dimension) plus their norms; the float16 keys are read in place
    (a memory map stays a memory map). `margin` extra candidates per query are re-ranked exactly."""

    def __init__(self, keys: np.ndarray, margin: int = 32, margin_fraction: float = 1 / 16, block: int = 262144,
                 query_block: int = 1024, key_chunk: int = 1024):
        self.lib = load_library()
        if self.lib is None:
            raise RuntimeError("AMX search is not available on this machine")
        if keys.dtype != np.float16 or keys.ndim != 2:
            raise ValueError(f"keys: expected a 2-d float16 array, got {keys.dtype} {keys.shape}")
        self.N, self.d = keys.shape
        self.margin, self.margin_fraction = margin, margin_fraction
        self.query_block, self.key_chunk = query_block, key_chunk
        self.D = -(-self.d // 32) * 32  # dimensions padded to whole 32-wide tiles
        Np = -(-self.N // 32) * 32
        need, free = Np * self.D * 2, available_memory()
        if free is not None and need > 0.8 * free:
            raise UserError(f"eval.index: amx-exact needs a {need / 2**30:.1f} GiB bf16 copy of the keys but only "
                            f"{free / 2**30:.1f} GiB of memory is available; use an IVF index (e.g. 'IVF4096,PQ64')")
        self.mean = centering_vector(keys)
        # Centered bf16 keys written straight into AMX's VNNI layout for the B operand:
        # (Np/16 key groups, D/32 chunks, 16 dimension pairs, 16 keys, 2), block by block (torch copies in parallel).
        packed = torch.zeros((Np // 16, self.D // 32, 16, 16, 2), dtype=torch.bfloat16)
        norms = torch.full((Np,), float("inf"))  # padding rows are never selected
        block = block // 16 * 16
        for lo in range(0, self.N, block):
            x = torch.from_numpy(np.asarray(keys[lo : lo + block], dtype=np.float32)) - self.mean
            xb = torch.zeros((-(-len(x) // 16) * 16, self.D), dtype=torch.bfloat16)
            xb[: len(x), : self.d] = x
            norms[lo : lo + len(x)] = xb[: len(x)].float().pow(2).sum(1)  # ||k̃||² of the bf16 key the products use
            packed[lo // 16 : lo // 16 + len(xb) // 16] = xb.view(-1, 16, self.D // 32, 16, 2).permute(0, 2, 3, 1, 4)
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
        qc = np.zeros((Mp, self.D), dtype=np.uint16)
        qc[:M, : self.d] = _bf16_bits(torch.from_numpy(q32) - self.mean)
        D = np.empty((M, k), dtype=np.float32)
        I = np.empty((M, k), dtype=np.int64)
        self.lib.knnlm_amx_search(_ptr(qc), M, self.D, _ptr(self.packed), _ptr(self.norms), len(self.norms),
                                  _ptr(q32), _ptr(self.keys16), self.N, self.d, k, self.candidates(k),
                                  torch.get_num_threads(), self.query_block, self.key_chunk, _ptr(D), _ptr(I))
        return D, I
