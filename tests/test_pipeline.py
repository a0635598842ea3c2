"""The README pipeline on the tiny config, the datastore's pairing, resume, and bad input: end to end on
WikiText-2, so marked slow (the same checks in-process on a synthetic corpus: tests/test_small_pipeline.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, fails, knnlm, snapshot
from knnlm.checkpoint import latest_checkpoint, load_model
from knnlm.data import EOS, load_corpus, token_stream
from knnlm.lm import autocast

slow = pytest.mark.slow


def own_copy(run, tmp_path):
    """The tiny run in a folder of the test's own, for a test that writes into it."""
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@slow
def test_readme_pipeline_tiny(tiny_run):
    out, stdout = tiny_run
    assert "valid kNN-LM ppl" in stdout
    *table, closing = stdout.strip().splitlines()[-12:]
    assert closing == f"results: {out / 'results.json'}"  # a command ends by saying where it wrote its results
    table = [line for line in table if line.startswith("|")]
    assert len(table) > 5 and len({len(line) for line in table}) == 1  # an aligned table
    v = json.loads((out / "eval" / "valid" / "summary.json").read_text())
    assert v["tokens"] == 10000 and v["knnlm_ppl"] < v["lm_ppl"]
    assert v["searched_queries"] == v["tokens"]  # one search per token; the tuning grid reuses it
    for name in ("targets", "query_keys", "lm_logprobs", "knn_logprobs", "neighbors", "distances"):
        assert (out / "eval" / "valid" / f"{name}.npy").is_file()
    meta = json.loads((out / "datastore" / "meta.json").read_text())
    assert meta["N"] == 100000 and meta["keys_dtype"] == "float16" and meta["key_site"] == "ffn_input"
    # the summary's perplexities follow from the saved per-token arrays
    lm = np.load(out / "eval" / "valid" / "lm_logprobs.npy")
    knn = np.load(out / "eval" / "valid" / "knn_logprobs.npy").astype(np.float64)
    lam = v["lambda"]
    mixed = np.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm) if 0 < lam < 1 else lm
    assert np.isclose(np.exp(-mixed.mean()), v["knnlm_ppl"], rtol=1e-5)


@slow
def test_datastore_pairs_key_t_with_token_t_plus_1(tiny_run):
    out, _ = tiny_run
    corpus = load_corpus()
    ids = corpus.splits["train"][:100000]
    vals = np.load(out / "datastore" / "vals.npy")
    assert vals.dtype == np.int32 and np.array_equal(vals, ids)  # row i: key of context ≤ i, value = token i (its next)
    # keys are the model's own `Output.key` at those positions: recompute a window directly
    model, cfg, _ = load_model(out)
    keys = np.load(out / "datastore" / "keys.npy", mmap_mode="r")
    s = token_stream(ids, corpus.vocab.index(EOS))
    with torch.no_grad(), autocast("cpu", True):  # as the datastore writer: bf16 where the CPU has it
        key = model(s[None, :64]).key[0]  # first window: positions 0..63
    assert torch.allclose(torch.from_numpy(np.asarray(keys[:64], dtype=np.float32)), key.float(), atol=0.05, rtol=0.02)


@slow
def test_evaluate_reuses_the_search_and_a_what_if_leaves_the_runs_choice(tiny_run, tmp_path):
    out = own_copy(tiny_run[0], tmp_path)
    valid = out / "eval" / "valid"
    before = (valid / "neighbors.npy").stat().st_mtime_ns
    kept = {n: (valid / n).read_bytes() for n in ("summary.json", "tuning.json", "knn_logprobs.npy")}
    proc = knnlm("evaluate", "--out", out, "--json", "--lmbda", "0")
    res = json.loads(proc.stdout)
    assert (valid / "neighbors.npy").stat().st_mtime_ns == before
    assert res["knnlm_ppl"] == res["lm_ppl"] and "what_if" in res  # λ = 0 is the LM exactly
    proc = knnlm("evaluate", "--out", out, "--json", "--k", "8", "--lmbda", "0.25")
    assert json.loads(proc.stdout)["k"] == 8
    res = json.loads(knnlm("evaluate", "--out", out, "--json", "--temperature", "2.5").stdout)
    assert res["temperature"] == 2.5 and "what_if" in res
    assert {n: (valid / n).read_bytes() for n in kept} == kept  # the run's tuned choice is untouched
    # on test: the valid choice by default; a what-if uses the given settings and leaves the test summary alone
    test = json.loads(knnlm("evaluate", "--out", out, "--json", "--split", "test").stdout)
    valid_summary = json.loads(kept["summary.json"])
    assert (test["k"], test["lambda"]) == (valid_summary["k"], valid_summary["lambda"])
    # and test is also scored with the choices valid's first half made (issue 33's held-out selection)
    halves = valid_summary["held_out"]
    assert halves["chosen_on"] == [0, halves["scored_on"][0]] and halves["scored_on"][1] == valid_summary["tokens"]
    for p, c in halves["protocols"].items():
        t = test["held_out"]["protocols"][p]
        assert (t["k"], t["temperature"], t["lambda"]) == (c["k"], c["temperature"], c["lambda"])
        if (c["k"], c["temperature"], c["lambda"]) == (test["protocols"][p]["k"], test["protocols"][p]["temperature"],
                                                       test["protocols"][p]["lambda"]):
            assert t["knnlm_ppl"] == pytest.approx(test["protocols"][p]["knnlm_ppl"], rel=1e-9)
    saved = (out / "eval" / "test" / "summary.json").read_bytes()
    res = json.loads(knnlm("evaluate", "--out", out, "--json", "--split", "test", "--k", "8", "--lmbda", "0.5").stdout)
    assert (res["k"], res["lambda"]) == (8, 0.5) and "what_if" in res
    assert (out / "eval" / "test" / "summary.json").read_bytes() == saved
    again = json.loads(knnlm("evaluate", "--out", out, "--json", "--split", "test").stdout)
    untimed = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731 (tuning is timed in each call)
    assert untimed(again) == untimed(json.loads(saved))
    assert {k: v for k, v in again["seconds"].items() if k != "tuning"} == \
        {k: v for k, v in json.loads(saved)["seconds"].items() if k != "tuning"}  # the search's own times: reused


def test_tuned_values_at_an_open_end_of_their_grid_are_reported():
    from knnlm.config import Config
    from knnlm.evaluate import grid_edges

    cfg = Config()
    cfg.eval.k, cfg.eval.temperature = [8, 64, 256], [0.3, 1.0, 3.0]
    assert grid_edges({"k": 64, "temperature": 1.0, "lambda": 1.0}, cfg) == []  # λ's grid is all of [0, 1]
    assert len(grid_edges({"k": 256, "temperature": 3.0, "lambda": 0.2}, cfg)) == 2
    assert "eval.temperature" in grid_edges({"k": 8, "temperature": 0.3, "lambda": 0.2}, cfg)[0]
    cfg.eval.k = [256]  # a single value is a choice, not a grid
    assert grid_edges({"k": 256, "temperature": 1.0, "lambda": 0.2}, cfg) == []


@pytest.mark.parametrize("k_max,k,temperature,best", [
    (64, [8, 16, 32, 64], [0.3, 1.0, 3.0, 10.0, 30.0], {"k": 64, "temperature": 0.3}),  # the tiny config's grids
    (1024, [8, 64, 256], [0.1, 1.0, 100.0], {"k": 256, "temperature": 100.0}),
])
def test_the_advice_at_a_grid_edge_is_a_valid_override_that_makes_the_choice_interior(k_max, k, temperature, best):
    """Each grid-edge warning names the overrides that widen the grid; applied, they validate (eval.k_max raised
    where it bounds k) and the tuned value is no longer at an edge."""
    from knnlm.config import Config, apply_overrides, validate
    from knnlm.evaluate import grid_edges

    cfg = Config()
    cfg.eval.k_max, cfg.eval.k, cfg.eval.temperature = k_max, k, temperature
    edges = grid_edges({**best, "lambda": 0.2}, cfg)
    assert len(edges) == 2
    overrides = [o for edge in edges for o in edge.split("(widen it: ")[1].rstrip(")").split()]
    wider = apply_overrides(cfg, overrides)
    validate(wider)
    assert grid_edges({**best, "lambda": 0.2}, wider) == []


@slow
def test_the_command_line_warns_exactly_when_the_summary_lists_a_grid_edge(tiny_run, tmp_path):
    from knnlm.config import Config
    from knnlm.evaluate import grid_edges

    out = own_copy(tiny_run[0], tmp_path)
    proc = knnlm("evaluate", "--out", out, "--json", "eval.k=8,16", "eval.temperature=0.5,1000")
    summary = json.loads(proc.stdout)
    cfg = Config()
    cfg.eval.k, cfg.eval.temperature = [8, 16], [0.5, 1000.0]
    assert summary["grid_edges"] == grid_edges(summary, cfg) != []  # a 2-value temperature grid has only ends
    assert ("warning:" in proc.stderr) == bool(summary["grid_edges"])


@slow
def test_storing_fewer_neighbours_keeps_the_grids_scores_and_the_same_results(tiny_run, tmp_path):
    """eval.k_store = 8 of k_max = 64: the search keeps 8 neighbours per token and the grid's scores from all 64
    (`KnnTable`); valid's choices, perplexities, held-out halves and test are those of the run's full evaluation
    (up to the last bits of a sum grouped otherwise); a what-if within the 8 stored neighbours is answered, one
    beyond them and off the grid is refused in one line; asking again reuses the saved search."""
    run = tiny_run[0]
    out = own_copy(run, tmp_path)
    shutil.rmtree(out / "eval")  # a full search would answer too (every neighbour answers any grid): search anew
    new = json.loads(knnlm("evaluate", "--out", out, "--json", "eval.k_store=8").stdout)
    old = json.loads((run / "eval" / "valid" / "summary.json").read_text())
    valid = out / "eval" / "valid"
    meta = json.loads((valid / "meta.json").read_text())
    n = meta["tokens"]
    assert meta["k_store"] == 8 and meta["grid"]["k"] == [8, 16, 32, 64] and meta["k_max"] == 64
    assert np.load(valid / "neighbors.npy").shape == (n, 8) and np.load(valid / "target_rank.npy").shape == (n,)
    assert np.load(valid / "knn_grid.npy").shape == (n, 4, len(meta["grid"]["temperature"]))
    for p in ("tuned", "paper"):
        a, b = new["protocols"][p], old["protocols"][p]
        assert (a["k"], a["temperature"], a["lambda"]) == (b["k"], b["temperature"], b["lambda"])
        assert a["knnlm_ppl"] == pytest.approx(b["knnlm_ppl"], rel=1e-12)
        assert a["target_in_neighbors"] == b["target_in_neighbors"]
        assert new["held_out"]["protocols"][p]["knnlm_ppl"] == pytest.approx(old["held_out"]["protocols"][p]["knnlm_ppl"],
                                                                            rel=1e-12)
    test_new = json.loads(knnlm("evaluate", "--out", out, "--json", "--split", "test", "eval.k_store=8").stdout)
    test_old = json.loads(knnlm("evaluate", "--out", own_copy_as(run, tmp_path, "full"), "--json", "--split", "test").stdout)
    assert test_new["knnlm_ppl"] == pytest.approx(test_old["knnlm_ppl"], rel=1e-12)
    what_if = json.loads(knnlm("evaluate", "--out", out, "--json", "--k", "4", "--temperature", "2.5",
                               "eval.k_store=8").stdout)  # within the stored 8: computed from them
    assert what_if["k"] == 4 and what_if["temperature"] == 2.5 and "what_if" in what_if
    fails(knnlm("evaluate", "--out", out, "--temperature", "2.5", "eval.k_store=8", check=False), "tuning grid",
          "eval.k_store")  # k = 16 at 2.5: neither on the grid nor within the 8 stored
    before = (valid / "knn_grid.npy").stat().st_mtime_ns
    again = json.loads(knnlm("evaluate", "--out", out, "--json", "eval.k_store=8").stdout)
    assert (valid / "knn_grid.npy").stat().st_mtime_ns == before and again["knnlm_ppl"] == new["knnlm_ppl"]


def own_copy_as(run, tmp_path, name):
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def _weights(run):
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


RESUME = ["data.max_train_tokens=20000", "data.max_eval_tokens=2000", "model.context=32", "model.dropout=0.1",
          "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=10", "train.warmup_steps=5"]


@slow
@pytest.mark.wikitext
def test_killed_and_resumed_training_ends_with_the_same_weights(tmp_path):
    full = tmp_path / "full"
    knnlm("train", "--config", TINY, "--out", full, *RESUME)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "knnlm.cli", "train", "--config", str(TINY), "--out", str(killed),
                           *RESUME], cwd=REPO, capture_output=True,
                          env={**os.environ, "TQDM_DISABLE": "1", "KNNLM_KILL_AT": "train:25"})  # knnlm.artifacts.kill_point
    assert proc.returncode == -signal.SIGKILL
    step_killed = json.loads((latest_checkpoint(killed) / "meta.json").read_text())["step"]
    assert step_killed == 20
    knnlm("train", "--config", TINY, "--out", killed, "--resume", *RESUME)
    a, b = _weights(full), _weights(killed)
    assert step_killed < json.loads((latest_checkpoint(full) / "meta.json").read_text())["step"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_bad_input_gives_one_line_and_changes_nothing(tiny_run, tmp_path):
    out, _ = tiny_run
    before = snapshot(out)
    fails(knnlm("run", "--config", TINY, "--out", tmp_path / "x", f"data.path={tmp_path / 'missing'}", check=False),
           "missing", "data folder not found")
    (tmp_path / "empty").mkdir()
    fails(knnlm("run", "--config", TINY, "--out", tmp_path / "x", f"data.path={tmp_path / 'empty'}", check=False),
           "no corpus files")
    fails(knnlm("evaluate", "--out", out, "--lmbda", "1.5", check=False), "--lmbda", "[0, 1]")
    fails(knnlm("evaluate", "--out", out, "--k", "200000", check=False), "larger than the datastore")
    fails(knnlm("evaluate", "--out", out, "eval.lmbda=0.2,-0.1", check=False), "eval.lmbda")
    fails(knnlm("train", "--config", TINY, "--out", out, check=False), "--resume")
    assert snapshot(out) == before


@slow
def test_datastore_from_another_model_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    other = tmp_path / "other"
    knnlm("train", "--config", TINY, "--out", other, "data.max_train_tokens=5000", "train.epochs=1")
    shutil.copytree(out / "datastore", other / "datastore")  # a copy: a symlinked run entry is refused on its own
    before = snapshot(out / "datastore")
    fails(knnlm("evaluate", "--out", other, check=False), "another model")
    assert snapshot(out / "datastore") == before


def _brute_knnlm_ppl(lm, dists, nvals, targets, k, temperature, lmbda):
    """kNN-LM perplexity in float64, straight from the definition: softmax(−d / T) over the k nearest, summed over
    the neighbours that carry the target, mixed with the LM's probability."""
    d = dists[:, :k].astype(np.float64)
    w = np.exp(-(d - d[:, :1]) / temperature)
    p_knn = (w * (nvals[:, :k] == targets[:, None])).sum(1) / w.sum(1)
    return float(np.exp(-np.mean(np.log(lmbda * p_knn + (1 - lmbda) * np.exp(lm)))))


def test_held_out_selection_chooses_on_valid_first_half_and_scores_its_second_half_as_a_brute_force_does():
    """Issue 33: each protocol's (k, temperature, λ) chosen on the first half of valid's tokens, scored on the second
    half, against a float64 brute force over the same grid. The halves are planted to want different temperatures
    (the target is the nearest neighbour in the first half, one of the 16 at random in the second), so the choice
    made on all of valid is not the first half's, and both are scored on the second half."""
    from knnlm.config import Config
    from knnlm.evaluate import PROTOCOLS, choose, grid_logprobs, held_out_selection, tune
    from knnlm.knn import KnnScores

    rng = np.random.default_rng(0)
    n, K, V = 600, 16, 50
    targets = rng.integers(0, V, n)
    nvals = rng.integers(0, V, (n, K))
    h = n // 2
    nvals[:h, 0] = targets[:h]  # first half: the nearest neighbour is right (a low temperature is best)
    nvals[h:][np.arange(n - h), rng.integers(0, K, n - h)] = targets[h:]  # second half: anywhere among the 16
    dists = np.sort(rng.uniform(10, 14, (n, K)), 1).astype(np.float32)
    lm = np.log(rng.uniform(0.002, 0.05, n))
    cfg = Config()
    cfg.eval.k_max, cfg.eval.k = K, [2, 4, 16]
    cfg.eval.temperature, cfg.eval.lmbda = [0.1, 0.3, 1.0, 3.0, 10.0], [0.1, 0.3, 0.5, 0.7, 0.9]
    scores = KnnScores(dists, nvals, targets)
    whole = {p: choose(tune(lm, scores, cfg), cfg, p) for p in PROTOCOLS}
    held = held_out_selection(lm, scores, cfg, whole)
    assert held["chosen_on"] == [0, h] and held["scored_on"] == [h, n]
    second = slice(h, n)
    assert held["lm_ppl"] == pytest.approx(float(np.exp(-lm[second].mean())), rel=1e-12)
    settings = {"tuned": [(k, t) for k in cfg.eval.k for t in cfg.eval.temperature], "paper": [(K, 1.0)]}
    for p, pairs in settings.items():
        ppl_first = {(k, t, lam): _brute_knnlm_ppl(lm[:h], dists[:h], nvals[:h], targets[:h], k, t, lam)
                     for k, t in pairs for lam in cfg.eval.lmbda}
        k, t, lam = min(ppl_first, key=ppl_first.get)
        got = held["protocols"][p]
        assert (got["k"], got["temperature"], got["lambda"]) == (k, t, lam), p
        assert got["first_half_ppl"] == pytest.approx(ppl_first[(k, t, lam)], rel=1e-6)
        assert got["knnlm_ppl"] == pytest.approx(_brute_knnlm_ppl(lm[second], dists[second], nvals[second],
                                                                  targets[second], k, t, lam), rel=1e-6)
        w = whole[p]
        assert got["whole_valid_choice_ppl"] == pytest.approx(_brute_knnlm_ppl(
            lm[second], dists[second], nvals[second], targets[second], w["k"], w["temperature"], w["lambda"]), rel=1e-6)
    tuned = held["protocols"]["tuned"]
    assert (tuned["k"], tuned["temperature"]) != (whole["tuned"]["k"], whole["tuned"]["temperature"])  # as planted
    assert tuned["knnlm_ppl"] > tuned["whole_valid_choice_ppl"]  # the choice that saw the second half flatters it
    # as `evaluate` calls it: the whole split's log p_kNN computed once, each half its rows, nothing scored again
    knn = grid_logprobs(scores, cfg)
    scores.at = lambda *a, **kw: pytest.fail("log p_kNN computed again")
    again = held_out_selection(lm, scores, cfg, {p: choose(tune(lm, scores, cfg, knn), cfg, p) for p in PROTOCOLS}, knn)
    for p in PROTOCOLS:
        a, b = again["protocols"][p], held["protocols"][p]
        assert (a["k"], a["temperature"], a["lambda"]) == (b["k"], b["temperature"], b["lambda"])
        assert [a[x] for x in ("knnlm_ppl", "first_half_ppl", "whole_valid_choice_ppl")] == pytest.approx(
            [b[x] for x in ("knnlm_ppl", "first_half_ppl", "whole_valid_choice_ppl")], rel=1e-12)
