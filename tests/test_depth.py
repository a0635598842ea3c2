"""k depth (knnlm/studies/depth.py and the study stage `k-depth`): p_kNN at every k up to the whole datastore by
brute force, against a float64 numpy reference, and the stage's table from hand-made records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from knnlm.artifacts import UserError
from knnlm.studies.depth import LAMBDAS, all_keys_logprobs, depth_ks, k_depth, sample_positions
from knnlm.studies.stages import make_stages
from knnlm.studies.study import Study


def reference(keys, vals, query, target, k, temperature):
    """log p_kNN(target) over the k nearest keys, float64 numpy, distances as (q − k)²."""
    dist = ((query.astype(np.float64) - keys.astype(np.float64)) ** 2).sum(1)
    near = np.argsort(dist, kind="stable")[:k]
    w = np.exp(-(dist[near] - dist[near].min()) / temperature)
    hit = vals[near] == target
    return np.log(w[hit].sum()) - np.log(w.sum()) if hit.any() else -np.inf


def test_every_k_up_to_the_whole_store_equals_a_float64_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 8)).astype(np.float16)
    vals = rng.integers(0, 5, 300)
    queries = rng.standard_normal((20, 8)).astype(np.float32)
    targets = rng.integers(0, 5, 20)
    targets[0] = 7  # carried by no key: −inf at every k
    ks, temperatures = depth_ks(300), (0.1, 1.0, 10.0)
    assert ks == [8, 16, 32, 64, 128, 256, 300]
    got = all_keys_logprobs(keys, vals, queries, targets, ks, temperatures, block=7)
    ref = np.array([[[reference(keys, vals, queries[i], targets[i], k, t) for k in ks] for t in temperatures]
                    for i in range(20)])
    assert np.all(np.isneginf(got[0])) and np.all(np.isneginf(ref[0]))
    np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-5, atol=1e-6)


def planted_run(folder):
    """A run folder as `knnlm sweep --prune` leaves it: datastore arrays and valid's query keys, targets and LM
    scores (no meta.json, no neighbours). Each query sits next to a key that carries its target."""
    rng = np.random.default_rng(1)
    (folder / "datastore").mkdir(parents=True)
    valid = folder / "eval" / "valid"
    valid.mkdir(parents=True)
    keys = rng.standard_normal((200, 4)).astype(np.float16)
    vals = rng.integers(0, 3, 200).astype(np.int32)
    np.save(folder / "datastore" / "keys.npy", keys)
    np.save(folder / "datastore" / "vals.npy", vals)
    queries = keys[:50].astype(np.float32) + 0.01
    targets = vals[:50].astype(np.int32)
    lm = np.full(50, np.log(0.2))
    for name, a in (("query_keys", queries.astype(np.float16)), ("targets", targets), ("lm_logprobs", lm)):
        np.save(valid / f"{name}.npy", a)
    return keys, vals, queries, targets, lm


def test_k_depth_reads_a_run_and_tunes_each_k(tmp_path):
    keys, vals, queries, targets, lm = planted_run(tmp_path)
    valid = tmp_path / "eval" / "valid"
    rec = k_depth(tmp_path, tokens=10, keep_logprobs=True, progress=False)
    sel = sample_positions(50, 10)
    assert rec["tokens"] == 10 and rec["of_evaluated_tokens"] == 50 and list(sel) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]
    assert list(rec["by_k"]) == ["8", "16", "32", "64", "128", "200"]
    # the best mixture at k = 8 by hand over the same grid (the queries as stored: float16)
    q16 = queries.astype(np.float16).astype(np.float32)
    best = (np.inf,)
    for t in rec["temperatures"]:
        knn = np.array([reference(keys, vals, q16[i], targets[i], 8, t) for i in sel])
        for lam in LAMBDAS:
            mixed = knn if lam == 1 else np.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm[sel])
            best = min(best, (float(np.exp(-mixed.mean())), t, lam))
    assert rec["by_k"]["8"] == pytest.approx(list(best), rel=1e-6)
    assert rec["by_k"]["8"][0] < float(np.exp(-lm.mean()))  # the planted neighbours help
    assert rec["best_k"] == min(map(int, rec["by_k"]), key=lambda k: rec["by_k"][str(k)][0])
    assert np.exp(-rec["mixed_logprobs"]["200"].mean()) == pytest.approx(rec["by_k"]["200"][0])
    (valid / "lm_logprobs.npy").unlink()
    with pytest.raises(Exception, match="lm_logprobs.npy is missing"):
        k_depth(tmp_path, tokens=10, progress=False)


def depth_record(omega, seed, at_grid_end, at_all, k_max=16, n=64):
    """A hand-made study record with a depth curve: k = 8, 16 (the grid's k_max), 32, 64 = N."""
    by_k = {"8": [at_grid_end + 3, 10.0, 0.3], "16": [at_grid_end, 10.0, 0.3], "32": [at_all + 1, 20.0, 0.4],
            "64": [at_all, 20.0, 0.4]}
    return {"name": f"l2_{omega:g}_s{seed}", "regularizer": "l2", "omega": omega, "seed": seed,
            "config": {"eval": {"k_max": k_max}},
            "k_depth": {"tokens": 50, "tokens_asked": 50, "of_evaluated_tokens": 100, "datastore_size": n,
                        "lm_ppl": 120.0, "by_k": by_k, "t1_by_k": {k: v[0] + 10 for k, v in by_k.items()},
                        "best_k": 64, "temperatures": [1.0, 10.0, 20.0]}}


def test_the_k_depth_stage_tables_the_gain_beyond_the_grid_and_pairs_seeds(tmp_path):
    study = Study(base="", omegas=[0.0, 0.01], seeds=[0, 1], regularizer="l2", stages=["k-depth"],
                  options={"k-depth": {"tokens": 50}})
    (stage,) = make_stages(study)
    records = [depth_record(0.0, 0, 100.0, 95.0), depth_record(0.0, 1, 102.0, 96.0),
               depth_record(0.01, 0, 99.0, 95.5), depth_record(0.01, 1, 100.0, 95.0)]
    stage.write(SimpleNamespace(records=records, results=tmp_path, out=tmp_path / "no-runs"))
    rows = json.loads((tmp_path / "k_depth.json").read_text())["rows"]
    gains = [100 * (95 / 100 - 1), 100 * (96 / 102 - 1)]
    assert rows["0"]["N_vs_k_max_percent"] == pytest.approx([np.mean(gains), np.std(gains, ddof=1), 2])
    assert rows["0"]["minus_omega0_at_N"] is None  # the reference itself
    assert rows["0.01"]["minus_omega0_at_k_max"]["per_seed"] == pytest.approx([-1.0, -2.0])
    assert rows["0.01"]["minus_omega0_at_N"]["per_seed"] == pytest.approx([0.5, -1.0])
    assert rows["0.01"]["temperature_at_N"] == [20.0, 20.0]
    md = (tmp_path / "k_depth.md").read_text()
    assert "at k = N (every key)" in md and "| 0.01 |" in md
    assert (tmp_path / "k_depth.png").is_file()
    stage.write(SimpleNamespace(records=[{**r, "k_depth": {**r["k_depth"], "tokens_asked": 10}} for r in records],
                                results=tmp_path / "other", out=tmp_path / "no-runs"))
    assert not (tmp_path / "other" / "k_depth.md").exists()  # records scored on another sample size are left out
    for bad in (0, "1000", 2.5):
        with pytest.raises(UserError, match=r"\[k-depth\]: tokens"):
            make_stages(Study(**{**vars(study), "options": {"k-depth": {"tokens": bad}}}))


def test_the_k_depth_stage_scores_pruned_run_folders_and_skips_missing_ones(tmp_path):
    planted_run(tmp_path / "runs" / "l2_omega0_seed0")
    study = Study(base="", omegas=[0.0], seeds=[0, 1], regularizer="l2", stages=["k-depth"],
                  options={"k-depth": {"tokens": 10}})
    (stage,) = make_stages(study)
    records = [{"name": "l2_omega0_seed0", "regularizer": "l2", "omega": 0.0, "seed": 0},
               {"name": "l2_omega0_seed1", "regularizer": "l2", "omega": 0.0, "seed": 1}]  # its folder is gone
    updated = {}
    run = SimpleNamespace(records=records, out=tmp_path / "runs", update=lambda r: updated.setdefault(r["name"], r))
    stage.after(run)
    assert list(updated) == ["l2_omega0_seed0"]
    depth = updated["l2_omega0_seed0"]["k_depth"]
    assert depth["tokens_asked"] == 10 and depth["tokens"] == 10 and depth["datastore_size"] == 200
    assert depth == {**k_depth(tmp_path / "runs" / "l2_omega0_seed0", 10, progress=False),
                     "tokens_asked": 10, "seconds": depth["seconds"]}
