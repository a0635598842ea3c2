"""The representation analyses on small planted data: bucket table, Figure 2 bars, GMM split, `analyze` end to end.

Run: `OMP_NUM_THREADS=1 python -m pytest -q tests/test_analysis.py` (no training; a few seconds).
"""

import json
import math

import numpy as np
import pytest

from knnlm.analysis import (analyze, frequency_buckets, frequency_loss_histogram, frequency_ranks, gmm_loglik_split,
                            word_frequency_loss)
from knnlm.artifacts import UserError
from knnlm.knn import interpolate, perplexity

OUTPUTS = ("buckets.md", "buckets.json", "figure2_frequency_loss.png", "figure3_gmm_loglik.png", "gmm.json",
           "key_norms.png", "nn_distances.png", "extras.json", "summary.md")


def test_planted_frequency_pattern_shows_in_bucket_table():
    V = 12000
    rng = np.random.default_rng(0)
    train_counts = rng.permutation(np.arange(V, 0, -1))  # distinct counts, so ranks are known but not word ids
    ranks = frequency_ranks(train_counts)
    assert np.array_equal(train_counts[np.argsort(ranks)], np.arange(V, 0, -1))
    word_of_rank = np.argsort(ranks)
    # 50 tokens per bucket (a different number each, to see the counts): ranks drawn inside each bucket
    per_bucket = {(0, 100): 50, (100, 1000): 40, (1000, 10000): 30, (10000, V): 20}
    targets = np.concatenate([word_of_rank[rng.integers(lo, hi, n)] for (lo, hi), n in per_bucket.items()]).astype(np.int32)
    frequent = ranks[targets] < 100
    # planted: frequent words cost 1 nat under kNN-LM and 2 under the LM; the others 3 nats under both
    lm = np.where(frequent, -2.0, -3.0).astype(np.float32)
    knnlm = np.where(frequent, -1.0, -3.0)
    b = frequency_buckets(train_counts, targets, lm, knnlm)

    assert list(b["tokens"]) == [50, 40, 30, 20]
    assert list(b["rank_lo"]) == [0, 100, 1000, 10000] and list(b["rank_hi"]) == [100, 1000, 10000, -1]
    assert b["lm_ppl"][0] == math.exp(2.0) and b["knnlm_ppl"][0] == math.exp(1.0)
    assert np.all(b["lm_ppl"][1:] == math.exp(3.0)) and np.all(b["knnlm_ppl"][1:] == math.exp(3.0))
    assert b["relative_change"][0] == pytest.approx(math.exp(-1.0) - 1, rel=1e-12)
    assert np.all(b["relative_change"][1:] == 0)


def test_empty_bucket_has_nan_perplexity():
    b = frequency_buckets(np.array([5, 4, 3]), np.array([0, 2]), np.array([-1.0, -1.0]), np.array([-1.0, -1.0]),
                          edges=(1, 2))
    assert list(b["tokens"]) == [1, 0, 1] and np.isnan(b["lm_ppl"][1])


def test_figure2_bars_count_words_and_average_loss_per_token():
    train_counts = np.array([1000, 900, 5, 3, 0])
    targets = np.array([0, 0, 0, 1, 2, 3, 3, 4])
    losses = np.array([1.0, 1.0, 1.0, 3.0, 5.0, 6.0, 8.0, 9.0])
    w = word_frequency_loss(train_counts, targets, losses)
    assert list(w["words"]) == [0, 1, 2, 3, 4] and list(w["occurrences"]) == [3, 1, 1, 2, 1]
    assert list(w["accumulated_loss"]) == [3.0, 3.0, 5.0, 14.0, 9.0]
    counts, colour = frequency_loss_histogram(w["train_freq"], w["occurrences"], w["accumulated_loss"],
                                              np.array([1, 10, 100, 10000]))
    assert list(counts) == [2, 0, 2]  # the word unseen in training (count 0) falls outside every bin
    assert colour[0] == pytest.approx((5 + 14) / 3) and np.isnan(colour[1]) and colour[2] == pytest.approx(6 / 4)


def planted_keys(low_is_clustered: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    """400 keys in 4 tight clusters and 400 scattered ones in d = 8; losses mark which group is "low loss"."""
    centers = rng.uniform(-5, 5, (4, 8))
    clustered = centers[rng.integers(0, 4, 400)] + 0.05 * rng.standard_normal((400, 8))
    scattered = rng.uniform(-6, 6, (400, 8))
    keys = np.concatenate([clustered, scattered]).astype(np.float16)
    clustered_loss, scattered_loss = (0.5, 3.0) if low_is_clustered else (3.0, 0.5)
    return keys, np.repeat([clustered_loss, scattered_loss], 400)


@pytest.mark.parametrize("low_is_clustered", [True, False])
def test_gmm_gives_clustered_keys_higher_loglik(low_is_clustered):
    keys, losses = planted_keys(low_is_clustered, np.random.default_rng(1))
    s = gmm_loglik_split(keys, losses)  # threshold: the median loss, 1.75, between the two planted values
    assert s.threshold == 1.75 and len(s.loglik_high) == len(s.loglik_low) == 400
    assert s.difference == s.mean_low - s.mean_high
    assert (s.difference > 0) == low_is_clustered
    assert abs(s.difference) > 5  # tight clusters against uniform scatter in 8 dimensions: a wide gap


def test_gmm_difference_ignores_key_scale_and_subsamples():
    keys, losses = planted_keys(True, np.random.default_rng(2))
    s = gmm_loglik_split(keys, losses, threshold=1.0)
    small = gmm_loglik_split((keys.astype(np.float64) / 8), losses, threshold=1.0)  # an L2-shrunk model's keys
    assert small.mean_low == pytest.approx(s.mean_low + 8 * math.log(8), rel=1e-6)  # shifted by −d·log c
    assert small.difference == pytest.approx(s.difference, rel=1e-6)
    sub = gmm_loglik_split(keys, losses, threshold=1.0, max_points=300, seed=3)
    assert len(sub.loglik_high) + len(sub.loglik_low) == 300


def fabricate_run(folder, rng, key_scale: float, V=300, N=5000, n=800, d=8, K=16, k=8, lmbda=0.25):
    """A run folder with the evaluated artifacts `analyze` reads; Zipf-like word frequencies."""
    zipf = 1 / np.arange(1, V + 1)
    zipf /= zipf.sum()
    vals = rng.choice(V, N, p=zipf).astype(np.int32)
    targets = rng.choice(V, n, p=zipf).astype(np.int32)
    lm = rng.uniform(-8, -0.5, n).astype(np.float32)
    knn = np.where(rng.random(n) < 0.2, -np.inf, rng.uniform(-10, -0.1, n)).astype(np.float32)
    distances = np.sort(rng.exponential(key_scale, (n, K)), axis=1).astype(np.float32)
    distances[:5, 0] = 0  # exact duplicates of a training context happen
    arrays = {
        "targets": targets, "lm_logprobs": lm, "knn_logprobs": knn,
        "query_keys": (key_scale * rng.standard_normal((n, d))).astype(np.float16),
        "distances": distances, "neighbors": rng.integers(0, N, (n, K)).astype(np.int32),
    }
    (folder / "datastore").mkdir(parents=True)
    (folder / "eval" / "valid").mkdir(parents=True)
    np.save(folder / "datastore" / "vals.npy", vals)
    (folder / "datastore" / "meta.json").write_text(json.dumps({"N": N, "d": d}))
    for name, arr in arrays.items():
        np.save(folder / "eval" / "valid" / f"{name}.npy", arr)
    knnlm = interpolate(lm, knn, lmbda)
    summary = {"split": "valid", "tokens": n, "lm_ppl": perplexity(lm), "knnlm_ppl": perplexity(knnlm),
               "lambda": lmbda, "k": k, "temperature": 1.0}
    (folder / "eval" / "valid" / "summary.json").write_text(json.dumps(summary))
    return arrays, vals, summary


def test_analyze_end_to_end_on_fabricated_runs(tmp_path):
    rng = np.random.default_rng(0)
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    made = [fabricate_run(runs[0], rng, 1.0), fabricate_run(runs[1], rng, 0.1)]
    out = tmp_path / "analysis"
    analyze(out, runs, ["ω=0", "ω=0.001"])

    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    buckets = json.loads((out / "buckets.json").read_text())
    gmm = json.loads((out / "gmm.json").read_text())
    extras = json.loads((out / "extras.json").read_text())
    assert list(buckets) == list(gmm) == list(extras) == ["ω=0", "ω=0.001"]
    for label, (arrays, vals, summary) in zip(buckets, made):
        assert sum(b["tokens"] for b in buckets[label]["buckets"]) == summary["tokens"]
        # evaluate saves knn_logprobs as float32 after computing the summary in float64: agree to ~1e-7
        assert buckets[label]["all"]["knnlm_ppl"] == pytest.approx(summary["knnlm_ppl"], rel=1e-6)
        assert gmm[label]["n_high"] + gmm[label]["n_low"] == gmm[label]["scored_keys"] > 0
        fits = gmm[label]["difference_per_fit"]  # repeated fits: the first is the one tabled and plotted
        assert len(fits) == 3 and fits[0] == pytest.approx(gmm[label]["difference_low_minus_high"])
        assert gmm[label]["difference_mean"] == pytest.approx(np.mean(fits))
        # target-in-neighbours share against a direct computation
        found = (vals[arrays["neighbors"][:, : summary["k"]]] == arrays["targets"][:, None]).any(1)
        assert extras[label]["target_in_neighbors"] == pytest.approx(found.mean())
        assert extras[label]["nn_distance_median"] == pytest.approx(np.median(arrays["distances"][:, 0]))
    assert extras["ω=0.001"]["key_norm_mean"] < extras["ω=0"]["key_norm_mean"]  # keys planted 10× smaller
    summary_md = (out / "summary.md").read_text()
    assert "ω=0.001" in summary_md and "figure3_gmm_loglik.png" in summary_md

    analyze(tmp_path / "default_labels", runs, None, gmm_repeats=1)  # labels default to the run folder names
    assert list(json.loads((tmp_path / "default_labels" / "gmm.json").read_text())) == ["run_a", "run_b"]


def test_analyze_refuses_a_run_without_summary(tmp_path):
    rng = np.random.default_rng(0)
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    for r in runs:
        fabricate_run(r, rng, 1.0)
    (runs[1] / "eval" / "valid" / "summary.json").unlink()
    with pytest.raises(UserError, match="summary.json"):
        analyze(tmp_path / "analysis", runs, None)
    assert not (tmp_path / "analysis").exists()  # every run is checked before anything is written
    with pytest.raises(UserError, match="labels"):
        analyze(tmp_path / "analysis", runs[:1], ["a", "b"])
