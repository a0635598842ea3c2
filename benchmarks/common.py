"""What every benchmark records beside its figures: the command, the machine, and a JSON + Markdown writer."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from knnlm.artifacts import atomic_path, cpu_name, cpuinfo_fields, write_json

RESULTS = Path(__file__).resolve().parent.parent / "results" / "benchmarks"


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_folder(fields: dict[str, str] | None = None, gpu: str | None = None) -> str:
    """The folder of results/benchmarks/ that holds this machine's figures: the GPU (e.g. nvidia-h200), else the CPU
    by vendor and core generation where its family and model say it (amd-epyc-zen3/4/5, intel-xeon-amx), else the
    CPU's name with its family and model (a virtual machine may name the CPU no better than "AMD EPYC")."""
    if gpu is None and fields is None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    if gpu:
        return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    fields = cpuinfo_fields() if fields is None else fields
    name, flags = fields.get("model name", "cpu"), set(fields.get("flags", "").split())
    family, model = int(fields.get("cpu family", -1)), int(fields.get("model", -1))
    if "AMD" in name:
        # family 25 (Zen 3 and Zen 4): Zen 4 at models 0x10-0x1f, 0x60-0x7f, 0xa0-0xaf; family 26: Zen 5
        zen = {26: "zen5"}.get(family) or ("zen4" if family == 25 and (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F
                                                                          or 0xA0 <= model <= 0xAF) else
                                           "zen3" if family == 25 else None)
        if zen:
            return f"amd-epyc-{zen}" if "EPYC" in name else f"amd-{zen}"
    if "Intel" in name and "amx_tile" in flags:
        return "intel-xeon-amx" if "Xeon" in name else "intel-amx"
    return re.sub(r"[^a-z0-9]+", "-", f"{name} family {family} model {model}".lower()).strip("-")


def default_out() -> str:
    """Where a benchmark writes by default: this machine's folder under results/benchmarks/."""
    return str(RESULTS / machine_folder())


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int, device: str | torch.device = "cpu",
                block: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest keys of each query in float64 arithmetic, nearest first, the store read a block at a time:
    squared distances (n, k) and ids (n, k). The truth every benchmark's recall is measured against."""
    q = torch.from_numpy(np.asarray(queries, dtype=np.float64)).to(device)
    best_d = torch.empty((len(q), 0), dtype=torch.float64, device=device)
    best_i = torch.empty((len(q), 0), dtype=torch.long, device=device)
    for lo in range(0, len(keys), block):
        x = torch.from_numpy(np.asarray(keys[lo : lo + block], dtype=np.float64)).to(device)
        d = q.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1)[None] - 2 * q @ x.t()
        best_d, sel = torch.cat([best_d, d], 1).topk(min(k, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
        best_i = torch.cat([best_i, torch.arange(lo, lo + len(x), device=device).expand(len(q), -1)], 1).gather(1, sel)
    return best_d.cpu().numpy(), best_i.cpu().numpy()


def bf16_matmul_tflops(m: int = 1024, n: int = 8192, k: int = 1024, reps: int = 20, device: str = "cpu") -> dict:
    """The machine's measured matrix-product rate, bf16 and fp32, in TFLOP/s (output buffer reused), on `device`."""
    out = {}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        c = torch.empty(m, n, dtype=dtype, device=device)
        torch.mm(a, b, out=c)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync()
        out[str(dtype).split(".")[1]] = 2 * m * n * k * reps / (time.perf_counter() - t) / 1e12
    return out


def write_results(out_dir: str | Path, name: str, record: dict, markdown: list[str]) -> None:
    """results/benchmarks/NAME.json and NAME.md, each replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(sys.argv), "machine": machine(), **record}
    write_json(out_dir / f"{name}.json", record)
    with atomic_path(out_dir / f"{name}.md") as tmp:
        tmp.write_text(f"`{record['command']}` on {record['machine']['cpu']} ({record['machine']['cores']} cores)\n\n"
                       + "\n".join(markdown) + "\n")
