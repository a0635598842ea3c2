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


def test_bound_survivors_counts_against_a_direct_count():
    """benchmarks/bound_survivors.py: with all d directions the bound is the exact distance, so k − 1 keys lie
    below the k-th (no ties in random floats); with fewer directions, shares only grow; each share equals a direct
    count of projected distances below the k-th exact one."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bound_survivors import survivors, work
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import numpy as np
    import torch

    from knnlm.search.key_geometry import centering_vector, principal_directions

    rng = np.random.default_rng(0)
    scales = np.arange(1, 17) ** -1.0
    keys = (rng.standard_normal((3000, 16)) * scales).astype(np.float16)
    queries = (rng.standard_normal((20, 16)) * scales).astype(np.float32)
    k = 50
    s = survivors(keys, queries, k, dims=(2, 4, 8, 16), block=700)
    assert s["final"][16] == pytest.approx((k - 1) / len(keys), abs=1 / len(keys))  # fp32: a near-tie may fall below
    shares = [s["final"][m] for m in (2, 4, 8, 16)]
    assert shares == sorted(shares, reverse=True) and shares[0] > 5 * shares[-1]  # a steep spectrum: 2 directions prune little
    assert s["guess_below_kth"] < 0.2 and all(s["guess"][m] >= s["final"][m] for m in (2, 4, 8, 16))  # the guess:
    # beyond the k-th distance for most queries; the running threshold in between
    assert all(s["final"][m] - 1e-9 <= s["running"][m] <= s["guess"][m] + 1e-9 for m in (2, 4, 8, 16))
    assert survivors(keys, queries, k, dims=(4, 16), running_block=3000)["running"][4] == pytest.approx(
        s["guess"][4])  # one block: the threshold is the guess throughout
    mean = centering_vector(keys).double().numpy()
    basis = principal_directions(keys, centering_vector(keys), 16).double().numpy()
    x, q = keys.astype(np.float64) - mean, queries.astype(np.float64) - mean
    exact = ((q[:, None] - x[None]) ** 2).sum(-1)
    kth = np.sort(exact, 1)[:, k - 1]
    proj = (((q @ basis[:, :4])[:, None] - (x @ basis[:, :4])[None]) ** 2).sum(-1)
    assert s["final"][4] == pytest.approx((proj < kth[:, None]).mean(), abs=2e-4)  # float32 against float64
    cost = work({8: 0.2, 16: 0.1, 64: 0.01}, 256)
    assert cost == pytest.approx({"one stage, m = 64": 64 + 2.56, "two stages, m1 = 8": 8 + 12.8 + 2.56,
                                  "two stages, m1 = 16": 16 + 6.4 + 2.56})


def test_index_build_times_each_of_autos_candidates_on_a_runs_store(tmp_path):
    """benchmarks/index_build.py: on a run's datastore and valid query keys it builds the searches at the old and
    the new block of rows (the same stores both ways), builds and times every search `auto` chooses among on this
    machine (the same names, in `auto`'s order), and writes both records."""
    import numpy as np

    from knnlm.search.auto import auto_candidates

    rng = np.random.default_rng(0)
    keys = (rng.standard_normal((3000, 32)) * np.arange(1, 33) ** -0.5).astype(np.float16)
    (tmp_path / "run" / "datastore").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "valid").mkdir(parents=True)
    np.save(tmp_path / "run" / "datastore" / "keys.npy", keys)
    np.save(tmp_path / "run" / "eval" / "valid" / "query_keys.npy", rng.standard_normal((500, 32)).astype(np.float16))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "index_build.py"), "--run", str(tmp_path / "run"),
                           "--queries", "64", "--k", "16", "--rounds", "1", "--out", str(out)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "index_build.json").read_text())
    assert [c["search"] for c in res["candidates"]] == list(auto_candidates(keys))
    assert res["N"] == 3000 and res["queries"] == 64
    assert res["same_store"] and all(res["same_store"].values()) and set(res["same_store"]) == set(
        res["build_seconds_by_block"])
    assert all(c["build_seconds"] > 0 and c["queries_per_s"] > 0 for c in res["candidates"])
    assert "Builds in all" in (out / "index_build.md").read_text()


def test_tuning_step_benchmark_times_both_ways_of_each_part_on_a_saved_search(tmp_path):
    """benchmarks/tuning_step.py: on a run's saved valid search it looks the neighbours' values up both ways and
    computes the p_kNN grid both ways (distances far enough apart that some exponents fall below MIN_EXPONENT),
    finds the same answers, and writes both records."""
    import numpy as np

    from knnlm.config import Config, save_config

    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    (run / "datastore").mkdir(parents=True)
    (run / "eval" / "valid").mkdir(parents=True)
    np.save(run / "datastore" / "vals.npy", rng.integers(0, 40, 5000).astype(np.int32))
    np.save(run / "eval" / "valid" / "neighbors.npy", rng.integers(0, 5000, (300, 64)).astype(np.int32))
    np.save(run / "eval" / "valid" / "distances.npy", np.sort(rng.uniform(0, 500, (300, 64)), 1).astype(np.float32))
    np.save(run / "eval" / "valid" / "targets.npy", rng.integers(0, 40, 300).astype(np.int32))
    save_config(Config(), run / "config.json")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tuning_step.py"), "--run", str(run),
                           "--rows", "200", "--rounds", "2", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "tuning_step.json").read_text())
    assert res["rows"] == 200 and res["neighbours"] == 64
    assert res["lookup"]["same"] is True and res["grid"]["same_to_the_bit"] is True
    for part in ("lookup", "grid"):
        assert len(res[part]["seconds"]) == 2 and all(len(s) == 2 and min(s) > 0 for s in res[part]["seconds"].values())
    assert max(res["grid"]["k"]) <= 64 and min(res["grid"]["temperatures"]) < 1
    assert "The grid:" in (out / "tuning_step.md").read_text()


@pytest.mark.slow  # a micro run, then the benchmark's own datastore and evaluation in subprocesses
def test_evaluation_benchmark_times_a_whole_split_and_its_lm_only_pass_agrees_with_the_evaluation(tmp_path):
    """benchmarks/evaluation.py on a micro run: one search per token, its LM-only pass gives the evaluation's LM
    perplexity (the same windows), tuning searches nothing, all λ at once equal one interpolation each; the run
    itself is left as it was."""
    from conftest import knnlm, snapshot

    corpus = micro_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    knnlm("run", "--config", TINY, "--out", run, f"data.path={corpus}", *MICRO)
    before = snapshot(run)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "evaluation.py"), "--run", str(run), "--config", str(TINY),
           "--out", str(out), f"data.path={corpus}", *MICRO]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "evaluation.json").read_text())
    s = res["evaluate"]["summary"]
    assert res["datastore"]["N"] == json.loads((run / "datastore" / "meta.json").read_text())["N"]
    assert s["searched_queries"] == s["tokens"] == res["lm_only"]["tokens"]
    assert res["lm_only"]["ppl"] == pytest.approx(s["lm_ppl"], rel=1e-5)
    assert [t["searches"] for t in res["tuning"]] == [0, 0]
    assert res["lambda_side_by_side"]["max_rel_diff"] < 1e-9
    assert snapshot(run) == before and "kNN-LM evaluation, whole valid" in (out / "evaluation.md").read_text()
