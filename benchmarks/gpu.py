"""Issue 18's figures on one GPU, side by side, in one script of about 5 minutes (a device session is 15):

    python benchmarks/gpu.py [--config configs/wikitext-2.toml] [--run DIR] [--out results/benchmarks] [overrides ...]

1. the whole `knnlm run` of the config in a fresh run folder (train, datastore, full-valid evaluation): wall time
   and each stage's seconds (target on one H100/H200: ≤ 2 minutes);
2. the datastore's rate in tokens/s (target ≥ 1M) and training's: tokens/s, and model FLOP/s (torch's flop counter
   over one forward + backward of a training batch) against the device's measured bf16 matrix-product rate;
3. the exact search the evaluation ran (`eval.index`, `bf16-exact` on a GPU): queries/s at k_max over the whole
   valid split (target ≥ 50,000 at k = 1024), re-timed alone on up to 20,000 of the valid queries, and its recall
   against a float64 brute force on 256 of them (tie-aware; and the largest relative distance error);
   Beside it, both exact searches in PyTorch: `bf16-exact` (margin; `auto` on a GPU) and `bf16-pruned`;
4. FAISS Flat on the same store and queries: on the CPU (2,000 queries) and on the GPU when faiss has GPUs.
Writes results/benchmarks/gpu.{json,md}, naming the device. Runs on a CPU too, with the same code: the test suite
runs it on a tiny configuration, so the script is known to work before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import default_out, bf16_matmul_tflops, brute_force, write_results
from knnlm.config import load_config
from knnlm.data import epoch_order, num_train_blocks, token_stream, train_batch
from knnlm.datastore import Datastore
from knnlm.distributed import default_device
from knnlm.evaluate import searcher_for
from knnlm.lm import autocast
from knnlm.models import build_model, corpus_for
from knnlm.pipeline import run_pipeline
from knnlm.regularizers import make_regularizer
from knnlm.search.faiss_index import gpu_faiss
from knnlm.search.registry import make_searcher
from knnlm.train import Objective

TARGETS = {"search_qps": 50_000, "datastore_tokens_per_s": 1_000_000, "run_seconds": 120}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_flops_per_token(cfg, vocab_size: int, device: torch.device) -> float:
    """Model FLOPs of one training step (forward + backward, as executed: the adaptive softmax is credited only for
    the bands it computes) per token, on one batch of the training split."""
    corpus = corpus_for(cfg)
    s = token_stream(corpus.splits["train"], corpus.eos_id)
    blocks = epoch_order(num_train_blocks(len(corpus.splits["train"]), cfg.model.context), 0, 0)[: cfg.train.batch_size]
    inputs, targets = (x.to(device) for x in train_batch(s, blocks, cfg.model.context))
    model = build_model(cfg.model, vocab_size).to(device)
    objective = Objective(model, make_regularizer(cfg.train, model, model.vocab_size, model.key_dim).to(device))
    with FlopCounterMode(display=False) as fc:
        with autocast(device, cfg.train.bf16):
            lm, r, _ = objective(inputs, targets)  # (the KL term: 0 without distillation targets)
        (lm + cfg.train.omega * r).backward()
    return fc.get_total_flops() / inputs.numel()


def tie_aware_recall(keys: np.ndarray, queries: np.ndarray, found: np.ndarray, kth: np.ndarray) -> float:
    """The share of found neighbours (n, k) that belong among the k nearest: distinct, and no farther (float64) than
    the brute force's k-th distance `kth` (n,). Keys at a tied distance are equally right."""
    q = queries.astype(np.float64)
    right = 0
    for row, ids in enumerate(found):
        d = ((np.asarray(keys[np.sort(ids)], dtype=np.float64) - q[row]) ** 2).sum(1)
        right += int(np.sum(d <= kth[row] + 1e-9 * (1 + kth[row]))) if len(set(ids.tolist())) == len(ids) else 0
    return right / found.size


def timed_search(searcher, queries: np.ndarray, k: int, device: torch.device, batch: int = 4096) -> float:
    """Queries/s of `searcher` at k (after one warm-up batch)."""
    searcher.search(queries[: min(batch, len(queries))], k)
    sync(device)
    t = time.perf_counter()
    for lo in range(0, len(queries), batch):
        searcher.search(queries[lo : lo + batch], k)
    sync(device)
    return len(queries) / (time.perf_counter() - t)


def faiss_flat(keys: np.ndarray, queries: np.ndarray, k: int) -> dict:
    """FAISS Flat's queries/s on the CPU and, where this faiss has GPUs, on them; None where not installed."""
    try:
        import faiss
    except ImportError:
        return {"cpu": None, "gpu": None, "note": "faiss is not installed"}
    index = faiss.IndexFlatL2(keys.shape[1])
    for lo in range(0, len(keys), 262144):
        index.add(np.asarray(keys[lo : lo + 262144], dtype=np.float32))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out = {"cpu_queries": min(2000, len(q)), "cpu_threads": faiss.omp_get_max_threads()}
    t = time.perf_counter()
    index.search(q[: out["cpu_queries"]], k)
    out["cpu"] = out["cpu_queries"] / (time.perf_counter() - t)
    out["gpu"] = None
    if gpu_faiss(faiss):
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        gpu_index.search(q[:1024], k)  # warm-up
        t = time.perf_counter()
        gpu_index.search(q, k)
        out["gpu"] = len(q) / (time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/wikitext-2.toml")
    p.add_argument("--run", help="a fresh run folder (default: a temporary one, removed afterwards)")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    p.add_argument("--name", default="gpu", help="writes OUT/NAME.json and OUT/NAME.md")
    p.add_argument("--search-queries", type=int, default=20000)
    p.add_argument("--recall-queries", type=int, default=256)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    device = default_device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory(prefix="knnlm-gpu-bench-") as tmp:
        run = Path(a.run) if a.run else Path(tmp) / "run"
        if run.exists() and any(run.iterdir()):
            sys.exit(f"gpu.py: error: --run {run}: expected a new or empty folder (the whole run is timed)")
        print(f"[1/4] knnlm run of {a.config} on {name}", flush=True)
        t = time.perf_counter()
        results = run_pipeline(cfg, run)
        run_seconds = time.perf_counter() - t

        print("[2/4] training FLOPs and the device's matrix-product rate", flush=True)
        ds = Datastore(run / "datastore")
        corpus = corpus_for(cfg)
        flops_per_token = training_flops_per_token(cfg, corpus.vocab_size, device)
        big = device.type == "cuda"
        peak = bf16_matmul_tflops(*(8192, 8192, 8192) if big else (1024, 2048, 1024), reps=20 if big else 5,
                                  device=str(device))
        train_tps = results["train"]["tokens_per_s"]

        print("[3/4] the evaluation's search: rate and recall against a float64 brute force", flush=True)
        ev = run / "eval" / "valid"
        meta = results["valid"]
        queries = np.load(ev / "query_keys.npy", mmap_mode="r")
        neighbors = np.load(ev / "neighbors.npy", mmap_mode="r")
        distances = np.load(ev / "distances.npy", mmap_mode="r")
        k = neighbors.shape[1]
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(len(queries), size=min(a.recall_queries, len(queries)), replace=False))
        bd, bi = brute_force(ds.keys, np.asarray(queries[sample]), k, device)
        bd = np.maximum(bd, 0)  # the norm expansion can dip below 0 for a key equal to its query
        found = np.asarray(neighbors[sample])
        recall = tie_aware_recall(ds.keys, np.asarray(queries[sample]), found, bd[:, -1])
        rel_err = float(np.max(np.abs(np.asarray(distances[sample]) - bd) / np.maximum(bd, 1e-12)))
        searcher = searcher_for(ds, cfg)
        alone = np.asarray(queries[: a.search_queries], dtype=np.float32)
        search_qps_alone = timed_search(searcher, alone, k, device)
        del searcher
        # the exact searches in PyTorch side by side: the margin search (`auto` on a GPU) and the pruned one
        torch_searches = {}
        for index in ("bf16-exact", "bf16-pruned"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            s_ = make_searcher(ds.keys, index)
            _, found_i = s_.search(np.asarray(queries[sample], dtype=np.float32), k)
            torch_searches[index] = {"queries_per_s": timed_search(s_, alone, k, device),
                                     "recall": tie_aware_recall(ds.keys, np.asarray(queries[sample]), found_i, bd[:, -1]),
                                     "fallbacks": getattr(s_, "fallbacks", None)}
            del s_
        if device.type == "cuda":
            torch.cuda.empty_cache()

        print("[4/4] FAISS Flat on the same store", flush=True)
        flat = faiss_flat(ds.keys, alone, k)

    stages = results["seconds"]
    ev_seconds = meta["seconds"]
    record = {
        "device": name, "config": a.config, "overrides": a.overrides,
        "run_seconds": run_seconds, "stage_seconds": stages,
        "train": {"tokens_per_s": train_tps, "flops_per_token": flops_per_token,
                  "model_tflops": train_tps * flops_per_token / 1e12, "peak_tflops": peak,
                  "mfu_vs_bf16": train_tps * flops_per_token / 1e12 / peak["bfloat16"],
                  "steps": results["train"]["steps"]},
        "datastore": {"keys": len(ds), "seconds": stages["datastore"],
                      "tokens_per_s": len(ds) / stages["datastore"] if stages["datastore"] else None},
        "search": {"index": meta["index"], "k": k, "queries": meta["tokens"], "seconds": ev_seconds["search"],
                   "queries_per_s_in_evaluation": meta["tokens"] / ev_seconds["search"],
                   "queries_per_s_alone": search_qps_alone, "alone_queries": len(alone),
                   "recall": recall, "recall_queries": len(sample), "max_rel_distance_error": rel_err,
                   "torch_searches": torch_searches},
        "faiss_flat": flat,
        "valid": {"lm_ppl": meta["lm_ppl"], "knnlm_ppl": meta["knnlm_ppl"],
                  "knnlm_ppl_paper": meta["protocols"]["paper"]["knnlm_ppl"]},
        "targets": TARGETS,
    }
    s, d = record["search"], record["datastore"]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    md = [f"Device: **{name}**. `knnlm run` of `{a.config}` {' '.join(a.overrides)} in a fresh folder, then the "
          f"evaluation's search re-timed alone and checked against a float64 brute force.", "",
          "| figure | measured | target (one H100/H200) |", "|---|---|---|",
          f"| whole `knnlm run` (train {results['train']['steps']} steps, datastore, full-valid evaluation) | "
          f"{run_seconds:.0f} s | ≤ {TARGETS['run_seconds']} s |",
          f"| training | {train_tps:,.0f} tokens/s, {record['train']['model_tflops']:.2f} model TFLOP/s = "
          f"{100 * record['train']['mfu_vs_bf16']:.1f} % of the measured bf16 rate ({peak['bfloat16']:.1f} TFLOP/s) | |",
          f"| datastore ({len(ds):,} keys) | {fmt(d['tokens_per_s'], ',.0f')} tokens/s | ≥ {TARGETS['datastore_tokens_per_s']:,} |",
          f"| exact search `{s['index']}`, k = {k}, in the evaluation ({s['queries']:,} queries) | "
          f"{s['queries_per_s_in_evaluation']:,.0f} queries/s | ≥ {TARGETS['search_qps']:,} at k = 1024 |",
          f"| the same search alone ({len(alone):,} queries) | {search_qps_alone:,.0f} queries/s | |",
          f"| its recall against float64 brute force ({len(sample)} queries) | {recall:.4f} "
          f"(largest relative distance error {rel_err:.1e}) | 1.0 |",
          *[f"| `{name}` alone, k = {k} | {v['queries_per_s']:,.0f} queries/s, recall {v['recall']:.4f} | "
            f"≥ {TARGETS['search_qps']:,} at k = 1024 |" for name, v in torch_searches.items()],
          f"| FAISS Flat, CPU ({flat.get('cpu_threads', '?')} threads, {flat.get('cpu_queries', 0):,} queries) | "
          f"{fmt(flat['cpu'], ',.0f')} queries/s | |",
          f"| FAISS Flat, GPU | {fmt(flat['gpu'], ',.0f')} queries/s | |", "",
          f"Stage seconds: " + ", ".join(f"{key} {v:.0f}" for key, v in stages.items() if v is not None)
          + f". Valid perplexity: LM {meta['lm_ppl']:.2f}, kNN-LM tuned {meta['knnlm_ppl']:.2f}, "
          f"paper protocol {record['valid']['knnlm_ppl_paper']:.2f}."]
    write_results(a.out, a.name, record, md)
    print("\n".join(md))
    for name, r in [("the evaluation's search", recall), *((n, v["recall"]) for n, v in torch_searches.items())]:
        if not math.isclose(r, 1.0):
            sys.exit(f"gpu.py: error: {name}'s recall is {r}, not 1.0")


if __name__ == "__main__":
    main()
