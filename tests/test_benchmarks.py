"""The GPU benchmark script runs on a CPU too: the suite runs it on the micro pipeline so that it is known to work
(and its recall check to be right) before a GPU is at hand."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from test_small_pipeline import MICRO, micro_corpus


@pytest.mark.slow  # a whole micro run (train, datastore, evaluation) in a subprocess: 65 s of the fast suite on a Zen 3
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


def test_each_machine_has_its_own_results_folder():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from common import RESULTS, machine_folder
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    amd = lambda family, model: {"model name": "AMD EPYC", "cpu family": str(family), "model": str(model), "flags": ""}
    assert [machine_folder(amd(25, 1)), machine_folder(amd(25, 17)), machine_folder(amd(26, 2))] == \
        ["amd-epyc-zen3", "amd-epyc-zen4", "amd-epyc-zen5"]
    assert machine_folder({"model name": "Intel(R) Xeon(R) Platinum", "cpu family": "6", "model": "143",
                           "flags": "avx2 amx_tile amx_bf16"}) == "intel-xeon-amx"
    assert machine_folder(gpu="NVIDIA H200") == "nvidia-h200"
    assert machine_folder({"model name": "Neoverse-N1", "cpu family": "8", "model": "1"}) == "neoverse-n1-family-8-model-1"
    # results/benchmarks holds one folder per machine and no loose figures
    assert all(p.is_dir() for p in RESULTS.iterdir()), sorted(p.name for p in RESULTS.iterdir() if not p.is_dir())
