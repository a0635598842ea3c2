"""kNN-LM evaluation of a whole split as a user runs it, against LM-only evaluation; tuning cost; peak memory.

    python benchmarks/evaluation.py --run runs/wt2 [--config configs/wikitext-2.toml] [--split valid] [--index auto]
                                    [KEY=VALUE ...]   # overrides of --config, as `knnlm run` takes them

In one run, on a scratch copy of RUN (its checkpoints copied: a run refuses a linked folder; RUN is never
modified), with the datastore and evaluation settings of --config (as `knnlm run --config` uses them; the run's own
config.json may be older):
1. `knnlm datastore` into the copy (subprocess): wall time and peak resident memory, against keys.npy's size;
2. `knnlm evaluate` of the whole split (subprocess): wall time, its parts, peak resident memory, and the number of
   queries sent to the search (must equal the number of tokens: one search per token);
3. LM-only evaluation of the same split (the same sliding windows, no keys, no search): wall time, and the ratio;
4. tuning from the saved neighbours: a subset of the grid (k 16–256, temperatures 1–30, λ 0.1–0.4, as far as
   --config's grid has them) and the full default grid, with the number of searches they cause (must be 0); and the
   λ part of the default grid side by side, one interpolation per λ against `perplexities` (all λ of a
   (k, temperature) at once), with the largest relative difference.
Writes results/benchmarks/<machine>/evaluation.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import default_out, write_results
from knnlm import knn
from knnlm.search.cpu_kernels import CpuExactSearch
from knnlm.search.faiss_index import FaissSearch
from knnlm.search.torch_search import TorchExactSearch
from knnlm.checkpoint import load_model
from knnlm.config import apply_overrides, load_config
from knnlm.data import token_stream
from knnlm.datastore import Datastore, stride_of
from knnlm.evaluate import tune, tuning_arrays, tuning_grid
from knnlm.models import corpus_for
from knnlm.scoring import score_stream


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/wt2")
    p.add_argument("--config", default="configs/wikitext-2.toml")
    p.add_argument("--split", default="valid")
    p.add_argument("--index", default="auto")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of --config (e.g. data.path=DIR)")
    a = p.parse_args()
    run = Path(a.run).resolve()
    knnlm_cmd = [sys.executable, "-m", "knnlm.cli"]
    res: dict = {"run": str(a.run), "config": a.config, "overrides": a.overrides, "split": a.split, "index": a.index}
    config = str(Path(a.config).resolve())
    with tempfile.TemporaryDirectory(dir=run.parent) as tmp:
        scratch = Path(tmp) / "run"
        scratch.mkdir()
        shutil.copy(run / "config.json", scratch / "config.json")
        shutil.copytree(run / "checkpoints", scratch / "checkpoints")

        # 1. datastore building
        ds = rusage_run(knnlm_cmd + ["datastore", "--config", config, "--out", str(scratch), *a.overrides])
        keys_bytes = (scratch / "datastore" / "keys.npy").stat().st_size
        res["datastore"] = {**ds, "keys_bytes": keys_bytes, "rss_over_keys": ds["max_rss_bytes"] / keys_bytes,
                            "N": Datastore(scratch / "datastore").meta["N"]}
        print(f"datastore: {ds['seconds']:.0f} s, peak RSS {ds['max_rss_bytes'] / 2**30:.2f} GiB "
              f"(keys {keys_bytes / 2**30:.2f} GiB)", flush=True)

        # 2. kNN-LM evaluation of the whole split
        ev = rusage_run(knnlm_cmd + ["evaluate", "--config", config, "--out", str(scratch), "--split", a.split,
                                     *a.overrides, "data.max_eval_tokens=0", f"eval.index={a.index}"])
        summary = json.loads((scratch / "eval" / a.split / "summary.json").read_text())
        res["evaluate"] = {**ev, "rss_over_keys": ev["max_rss_bytes"] / keys_bytes, "summary": summary}
        print(f"kNN-LM evaluation: {ev['seconds']:.0f} s, parts {summary['seconds']}, "
              f"{summary['searched_queries']} queries searched for {summary['tokens']} tokens", flush=True)

        # 3. LM-only evaluation of the same split, in this process
        cfg = load_config(config, [*a.overrides, "data.max_eval_tokens=0"])
        corpus = corpus_for(cfg)
        t = time.perf_counter()
        model, train_cfg, _ = load_model(scratch)
        s = token_stream(corpus.splits[a.split], corpus.eos_id)
        lp = np.concatenate([x[2].numpy() for x in score_stream(model, s, stride_of(train_cfg), cfg.datastore.batch_size,
                                                                 train_cfg.train.bf16, want_keys=False)])
        lm_seconds = time.perf_counter() - t
        res["lm_only"] = {"seconds": lm_seconds, "tokens": len(lp), "ppl": float(np.exp(-lp.astype(np.float64).mean()))}
        res["knnlm_over_lm_only"] = ev["seconds"] / lm_seconds
        print(f"LM-only evaluation: {lm_seconds:.0f} s; kNN-LM / LM-only = {res['knnlm_over_lm_only']:.2f}", flush=True)

        # 4. tuning from the saved neighbours
        lm, scores = tuning_arrays(scratch, a.split)
        res["tuning"] = []
        ks, temperatures = tuning_grid(cfg)  # a small grid: the settings of 5 k, 4 temperatures and 5 λ of the full one
        within = lambda wanted, grid: ",".join(f"{x:g}" for x in wanted if x in grid) or ",".join(f"{x:g}" for x in grid[:1])
        grids = {"subset": [f"eval.k={within((16, 32, 64, 128, 256), ks)}",
                            f"eval.temperature={within((1, 3, 10, 30), temperatures)}",
                            f"eval.lmbda={within((0.1, 0.2, 0.25, 0.3, 0.4), cfg.eval.lmbda)}"],
                 "default grid": []}
        searches = [0]  # tuning must not search: count every query any backend is asked
        for backend in (FaissSearch, TorchExactSearch, CpuExactSearch):
            original = backend.search

            def counted(self, queries, k, *rest, _original=original, **kw):
                searches[0] += len(queries)
                return _original(self, queries, k, *rest, **kw)

            backend.search = counted
        for name, overrides in grids.items():
            c = apply_overrides(copy.deepcopy(cfg), overrides)
            before = searches[0]
            t = time.perf_counter()
            rows = tune(lm, scores, c)
            res["tuning"].append({"grid": name, "settings": len(rows), "seconds": time.perf_counter() - t,
                                  "searches": searches[0] - before, "best_ppl": min(r["ppl"] for r in rows)})
            print(f"tuning {name}: {res['tuning'][-1]}", flush=True)
        # the λ part of the default grid side by side: one interpolation per λ against all λ at once (`perplexities`)
        grid = scores.at([(k, t) for k in ks for t in temperatures])
        lambdas = cfg.eval.lmbda
        t = time.perf_counter()
        each = [knn.perplexity(knn.interpolate(lm, x, lam)) for x in grid.values() for lam in lambdas]
        t_each = time.perf_counter() - t
        t = time.perf_counter()
        together = [p for x in grid.values() for p in knn.perplexities(lm, x, lambdas)]
        t_together = time.perf_counter() - t
        finite = np.isfinite(each)
        res["lambda_side_by_side"] = {
            "settings": len(each), "one_at_a_time_seconds": t_each, "perplexities_seconds": t_together,
            "speedup": t_each / t_together,
            "max_rel_diff": float(np.max(np.abs(np.asarray(together)[finite] / np.asarray(each)[finite] - 1)))}
        print(f"λ side by side: {res['lambda_side_by_side']}", flush=True)

    e, sm = res["evaluate"], res["evaluate"]["summary"]
    md = ["| step | wall time | peak RSS | notes |", "|---|---|---|---|",
          f"| datastore ({res['datastore']['N']:,} keys) | {res['datastore']['seconds']:.0f} s | "
          f"{res['datastore']['max_rss_bytes'] / 2**30:.2f} GiB | keys.npy {keys_bytes / 2**30:.2f} GiB on disk |",
          f"| kNN-LM evaluation, whole {a.split} ({sm['tokens']:,} tokens, index {sm['index']}) | **{e['seconds']:.0f} s** | "
          f"{e['max_rss_bytes'] / 2**30:.2f} GiB | LM {sm['seconds']['lm']:.0f} s, index {sm['seconds']['index']:.0f} s, "
          f"search {sm['seconds']['search']:.0f} s, tuning {sm['seconds'].get('tuning', float('nan')):.0f} s; "
          f"{sm['searched_queries']:,} queries searched; "
          f"LM ppl {sm['lm_ppl']:.2f} → kNN-LM {sm['knnlm_ppl']:.2f} |",
          f"| LM-only evaluation, same split | {res['lm_only']['seconds']:.0f} s | | ratio kNN-LM / LM-only "
          f"**{res['knnlm_over_lm_only']:.2f}** |"]
    for t in res["tuning"]:
        md.append(f"| tuning, {t['grid']} | {t['seconds']:.1f} s | | {t['settings']} settings, {t['searches']} searches |")
    lam = res["lambda_side_by_side"]
    md.append(f"| λ of the default grid, one interpolation each → all λ of a (k, T) at once | {lam['one_at_a_time_seconds']:.1f} → "
              f"{lam['perplexities_seconds']:.1f} s | | **{lam['speedup']:.1f}×**, {lam['settings']} settings, "
              f"largest relative difference {lam['max_rel_diff']:.1e} |")
    write_results(a.out, "evaluation", res, md)
    print("\n".join(md))


def rusage_run(cmd: list[str]) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    with tempfile.TemporaryFile() as log:  # not a pipe: a full pipe buffer (progress bars) would block the child
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t
        log.seek(0)
        err = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed: {err.strip()[-500:]}")
    return {"seconds": seconds, "max_rss_bytes": usage.ru_maxrss * 1024}


if __name__ == "__main__":
    main()
