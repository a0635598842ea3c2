"""The GPU benchmark script runs on a CPU too: the suite runs it on the micro pipeline so that it is known to work
(and its recall check to be right) before a GPU is at hand."""

import json
import subprocess
import sys

from conftest import REPO, TINY
from test_small_pipeline import MICRO, micro_corpus


def test_gpu_benchmark_runs_on_a_cpu_and_checks_its_search_against_brute_force(tmp_path):
    corpus = micro_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--config", str(TINY), "--out", str(out),
           "--search-queries", "300", "--recall-queries", "50", f"data.path={corpus}", *MICRO, "eval.index=bf16-exact"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "gpu.json").read_text())
    s = record["search"]
    assert record["device"] == "CPU" and s["index"] == "bf16-exact" and s["k"] == 16
    assert s["recall"] == 1.0 and s["recall_queries"] == 50 and s["max_rel_distance_error"] < 1e-5
    assert s["queries_per_s_alone"] > 0 and s["queries_per_s_in_evaluation"] > 0
    assert set(s["torch_searches"]) == {"bf16-exact", "bf16-pruned"}
    assert all(v["recall"] == 1.0 and v["queries_per_s"] > 0 for v in s["torch_searches"].values())
    assert record["datastore"]["tokens_per_s"] > 0 and record["train"]["flops_per_token"] > 0
    assert set(record["stage_seconds"]) == {"train", "datastore", "evaluate_valid"}
    assert "Device: **CPU**" in (out / "gpu.md").read_text()
