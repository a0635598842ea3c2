"""The studies (knnlm/studies/): the tables' arithmetic on hand-made records (fast), then a tiny study end to end
(slow): every stage writes its outputs, and a rerun reuses what is recorded and what is trained."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors import safe_open

from conftest import REPO, TINY, engine_studies, fails, knnlm, snapshot
from knnlm.artifacts import UserError, cpu_name
from knnlm.config import changed_settings
from knnlm.studies import plots
from knnlm.studies.engine import run_sweep
from knnlm.studies.stages import make_stages
from knnlm.studies.stages.objectives import Objectives
from knnlm.studies.stages.table import Table
from knnlm.studies.statistics import best_omega, omega_table, paired_differences, paired_markdown, table_markdown
from knnlm.studies.study import Study, load_study
from knnlm.studies.twins import device_twins

slow = pytest.mark.slow


def record(omega, seed, knnlm_ppl, lm_ppl, regularizer="l2"):
    return {"regularizer": regularizer, "omega": omega, "seed": seed, "valid_knnlm_ppl": knnlm_ppl,
            "valid_lm_ppl": lm_ppl, "train_lm_ppl": lm_ppl - 20, "valid_knnlm_ppl_paper": knnlm_ppl + 5}


def written(stage, records, results):
    """A stage's tables and figures from hand-made records, as a study would write them."""
    stage.write(SimpleNamespace(records=records, results=results, out=results / "no-runs"))


def test_tables_on_hand_made_records():
    records = [record(0.0, 0, 100, 110), record(0.0, 1, 102, 112), record(0.01, 0, 97, 111), record(0.01, 1, 98, 114),
               record(0.1, 0, 99, 115), record(0.01, 0, 50, 60, regularizer="moco")]  # ω = 0.1: seed 0 only
    table = omega_table(records, "l2")
    assert list(table) == [0.0, 0.01, 0.1]  # MOCO's record is not in the L2 table
    assert table[0.0]["valid_knnlm_ppl"] == pytest.approx([101, math.sqrt(2), 2])  # sample std of 100, 102
    assert table[0.01]["valid_lm_ppl"] == pytest.approx([112.5, math.sqrt(4.5), 2])
    assert table[0.1]["valid_knnlm_ppl"] == [99, 0.0, 1]
    md = table_markdown(table, "t")
    assert "| 101.00 ± 1.41 | 97.50 ± 0.71 | 99.00 |" in md  # one seed: no spread shown
    assert best_omega(table) == 0.01 and best_omega({0.0: table[0.0]}) is None
    paired = paired_differences(records, "l2")  # (ω, seed) − (0, seed), over the seeds that have both
    assert paired[0.01]["valid_knnlm_ppl"] == pytest.approx([-3.5, math.sqrt(0.5), 2])
    assert paired[0.01]["per_seed"]["valid_lm_ppl"] == {"0": 1, "1": 2}
    assert paired[0.1]["valid_knnlm_ppl"] == [-1, 0.0, 1]
    assert paired[0.01]["mixed_devices"] == [] and "†" not in paired_markdown(paired)
    records[1]["device"], records[3]["device"] = "cpu: AMD EPYC", "cuda: NVIDIA H200"  # ω = 0.01, seed 1 on a GPU,
    # its ω = 0 on a CPU: marked, still paired
    paired = paired_differences(records, "l2")
    assert paired[0.01]["mixed_devices"] == ["1"] and paired[0.01]["valid_knnlm_ppl"][2] == 2
    md = paired_markdown(paired)
    assert "+1.00, +2.00†" in md and "† the two runs of this seed were trained on different kinds of device" in md


def test_written_tables_and_figures_from_hand_made_records(tmp_path):
    # tuned temperatures exactly proportional to the mean squared key norm: the log-log fit is slope 1, T = ‖r‖²/100
    records = [{**record(omega, seed, ppl, ppl + 10), "key_sq_norm_mean": norm, "temperature": norm / 100,
                "valid_knnlm_ppl_by_k": {"8": ppl + 2, "16": ppl}}
               for omega, seed, ppl, norm in [(0.0, 0, 100, 1000.0), (0.0, 1, 102, 1000.0), (0.01, 0, 97, 100.0),
                                              (0.01, 1, 98, 100.0), (0.1, 0, 99, 10.0)]]
    study = Study(base="", omegas=[0.0, 0.01, 0.1], seeds=[0, 1], regularizer="l2")
    for stage in make_stages(Study(**{**vars(study), "stages": ["table", "paired"]})):
        written(stage, records, tmp_path)
    table = omega_table(records, "l2")
    assert json.loads((tmp_path / "table.json").read_text()) == {f"{o:g}": v for o, v in table.items()}
    assert json.loads((tmp_path / "paired.json").read_text())["0.01"]["valid_knnlm_ppl"] == pytest.approx(
        [-3.5, math.sqrt(0.5), 2])
    fit = json.loads((tmp_path / "temperature_vs_norm.json").read_text())
    assert fit["slope"] == pytest.approx(1.0) and fit["intercept"] == pytest.approx(-2.0) and fit["models"] == 5
    for name in ("table.md", "paired.md", "figure1.png", "ppl_by_k.png", "temperature_vs_norm.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_a_study_of_one_omega_writes_its_table_and_no_figure_against_omega(tmp_path):
    # an objectives study's grid is ω = 0 alone: a curve, a by-k comparison or a fit through one ω says nothing
    records = [{**record(0.0, seed, 100 + seed, 110), "key_sq_norm_mean": 1000.0 + seed, "temperature": 10.0,
                "valid_knnlm_ppl_by_k": {"8": 103, "16": 101}} for seed in (0, 1, 2)]
    written(Table(Study(base="", omegas=[0.0], seeds=[0, 1, 2], regularizer="l2")), records, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json", "table.md"]
    table = omega_table(records, "l2")
    assert plots.plot_omega_curve(table, tmp_path / "f.png", "t") is False
    assert plots.plot_ppl_by_k({"tuned": {"0": {8: (1.0, 0.0)}}}, tmp_path / "k.png", "t") is False
    assert plots.plot_temperature_vs_norm([(1.0, 1.0, 0.0), (2.0, 2.0, 0.0)], {}, tmp_path / "t.png", "t") is False
    assert not any(tmp_path.glob("*.png"))


def test_objectives_table_takes_step_cost_from_the_benchmark_and_run_times_only_on_one_kind_of_device(tmp_path):
    def run(reg, w, seed, knn, lm, device, seconds):
        return {**record(w, seed, knn, lm, regularizer=reg), "device": device, "seconds": {"train_compute": seconds}}
    bench = tmp_path / "bench" / "training.json"  # what benchmarks/training.py --regularizers writes
    bench.parent.mkdir()
    bench.write_text(json.dumps({"machine": {"cpu": "AMD EPYC", "cores": 2, "gpu": None}, "objectives": [
        {"name": "knnlm, none", "regularizer": "none", "seconds_per_step": 0.4},
        {"name": "knnlm, knn", "regularizer": "knn", "seconds_per_step": 0.9}, {"name": "HF GPT-2"}]}))
    study = Study(base="", omegas=[0.0], seeds=[0, 1, 2], regularizer="l2", folder=str(tmp_path))
    stage = Objectives(study, weights={"knn": [0.1, 1.0]}, step_benchmark="bench/training.json")
    records = [run("l2", 0.0, s, 100 + s, 110, "cuda: NVIDIA H200", 100) for s in (0, 1, 2)]
    records += [run("knn", 1.0, 0, 90, 110, "cpu: AMD EPYC", 900), run("knn", 0.1, 0, 95, 110, "cuda: NVIDIA H200", 150),
                run("knn", 1.0, 1, 93, 111, "cuda: NVIDIA H200", 200), run("knn", 1.0, 2, 94, 110, "cuda: NVIDIA H200", 300)]
    assert stage.best(records) == {"knn": 1.0}  # the lowest tuned kNN-LM perplexity on seed 0
    written(stage, records, tmp_path)
    out = json.loads((tmp_path / "objectives.json").read_text())["paired"]["knn"]
    d = [90 - 100, 93 - 101, 94 - 102]
    assert out["valid_knnlm_ppl"] == pytest.approx([np.mean(d), np.std(d, ddof=1), 3])
    assert out["mixed_devices"] == [0] and out["weight"] == 1.0
    assert out["devices"] == ["cpu: AMD EPYC", "cuda: NVIDIA H200"]  # named in the figure's title
    assert out["train_time_vs_omega0"][0] == pytest.approx(np.mean([1.0, 2.0]))  # seed 0's CPU run left out
    md = (tmp_path / "objectives.md").read_text()
    assert "3†" in md and "| 2.25× |" in md and "side by side on AMD EPYC, 2 cores (bench/training.json)" in md
    assert json.loads((tmp_path / "objectives.json").read_text())["step_cost_vs_omega0"] == {"knn": pytest.approx(2.25)}
    bench.write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="training.json: expected the JSON of `benchmarks/training.py --regularizers`"):
        written(stage, records, tmp_path)


def test_twins_pair_one_run_across_devices_and_skip_same_device_copies_and_other_training_settings(tmp_path):
    def put(folder, name, lm, device, lr=0.001):
        (tmp_path / folder).mkdir(exist_ok=True)
        rec = {**record(0.0, 0, lm - 10, lm), "name": name, "device": device,
               "config": {"train": {"lr": lr}, "eval": {"k": [8]}}}
        (tmp_path / folder / f"{name}.json").write_text(json.dumps(rec))
    put("cpu", "a", 110, "cpu: AMD EPYC")
    put("cpu", "b", 112, "cpu: AMD EPYC")
    put("cpu", "c", 120, "cpu: AMD EPYC", lr=0.01)  # other training settings: not a twin
    put("cpu", "d", 130, "cuda: NVIDIA H200")  # one device on both sides: not a twin
    put("cpu2", "a", 999, "cpu: AMD EPYC")  # a later folder loses to an earlier one
    put("gpu", "a", 109, "cuda: NVIDIA H200")
    put("gpu", "b", 109.5, "cuda: NVIDIA H200")
    put("gpu", "c", 119, "cuda: NVIDIA H200")
    put("gpu", "d", 130, "cuda: NVIDIA H200")
    twins = device_twins([tmp_path / "cpu", tmp_path / "cpu2"], [tmp_path / "gpu"])
    assert list(twins["runs"]) == ["a", "b"]
    assert twins["runs"]["b"]["valid_lm_ppl"] == pytest.approx(2.5)
    assert twins["mean_std_n"]["valid_knnlm_ppl"] == pytest.approx([1.75, np.std([1, 2.5], ddof=1), 2])
    proc = knnlm("twins", "--first", tmp_path / "cpu", "--second", tmp_path / "gpu", "--out", tmp_path / "t")
    assert "| b | cpu: AMD EPYC | cuda: NVIDIA H200 | +2.50 |" in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text()) == twins
    fails(knnlm("twins", "--first", tmp_path / "gpu", "--second", tmp_path / "gpu", check=False), "no run is recorded")
    fails(knnlm("twins", "--first", tmp_path / "nope", "--second", tmp_path / "gpu", check=False),
          "nope", "expected a folder of study records")


def test_records_name_the_cpu_with_its_family_and_model():
    # two AMD EPYC machines of this project: the same bare name, Zen 4 (family 25) and Zen 5 (family 26)
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n" \
           "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\nmodel name\t: other\n"
    assert cpu_name(zen4) == "AMD EPYC (family 25, model 17)"  # the first processor's block
    assert cpu_name(zen4.replace(": 25", ": 26").replace(": 17", ": 2")) == "AMD EPYC (family 26, model 2)"
    assert cpu_name("processor\t: 0\nmodel name\t: Some ARM core\n") == "Some ARM core"  # no family to add


def test_changed_settings_names_what_differs_and_ignores_settings_a_record_lacks():
    recorded = {"eval": {"k": [8, 16], "lmbda": [0.25]}, "train": {"lr": 0.001}}
    current = {"eval": {"k": [8, 16, 32], "lmbda": [0.25], "rerank": True}, "train": {"lr": 0.001}, "new": {"x": 1}}
    assert changed_settings(recorded, current) == ["eval.k"]
    assert changed_settings(recorded, {**current, "train": {"lr": 0.01}}) == ["eval.k", "train.lr"]

OVERRIDES = ["data.max_train_tokens=20000", "data.max_eval_tokens=2000", "model.context=32", "train.batch_size=8",
             "train.epochs=1", "train.warmup_steps=2", "eval.k_max=16", "eval.k=4,16"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    path = root / "study.toml"
    path.write_text(f'base = "{TINY}"\noverrides = {json.dumps(OVERRIDES)}\nomegas = [0.0, 0.01]\nseeds = [0, 1]\n'
                    f'results = "{root / "results"}"\nstages = ["table", "paired", "test", "rescale", "compare", "k-depth"]\n'
                    f'[k-depth]\ntokens = 20\n'
                    f'[compare]\nregularizer = "moco"\noverrides = ["train.queue_len=4", "train.momentum=0.9"]\n')
    knnlm("sweep", path, "--out", root / "runs", "--jobs", "2")  # two models at a time, each in its own process
    before = snapshot(root / "runs")
    yield path, root / "runs", root / "results"
    # the tests' own copies share its arrays and weights (hard links): none of them may have written into one
    assert snapshot(root / "runs") == before
    shutil.rmtree(root)  # 120 MB (MOCO's per-word queues): CI's disk is not large


def link_or_copy(src, dst):
    """Arrays and weights as hard links where the file system allows: knnlm writes those into a new folder or file
    and renames it into place, never into an existing one, so a linked copy is a copy. Everything else (logs that
    training appends to, records a test edits) is copied."""
    if Path(src).suffix in (".npy", ".safetensors"):
        try:
            return os.link(src, dst)
        except OSError:
            pass
    shutil.copy2(src, dst)


def own_copy(study, tmp_path):
    """The study in a folder of the test's own, so that a test that reruns it changes nothing another test reads."""
    path, runs, results = study
    root = tmp_path / "study"
    shutil.copytree(runs, root / "runs", copy_function=link_or_copy)
    shutil.copytree(results, root / "results")
    (root / "study.toml").write_text(path.read_text().replace(str(results), str(root / "results")))
    return root / "study.toml", root / "runs", root / "results"


@slow
def test_sweep_writes_every_stage_and_tables_are_mean_and_std_of_the_records(study):
    _, runs, results = study
    records = {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert sorted(records) == sorted(f"{reg}_omega{o}_seed{s}" for reg, o in
                                     [("l2", "0"), ("l2", "0.01"), ("moco", "0.01")] for s in (0, 1))
    for name in ("table.md", "table.json", "paired.md", "paired.json", "figure1.png", "ppl_by_k.png", "moco_vs_l2.md",
                 "moco_vs_l2.json", "moco_vs_l2.png", "test.md", "test.json", "rescale.md", "rescale.json",
                 "temperature_vs_norm.png", "temperature_vs_norm.json", "k_depth.md", "k_depth.json"):
        assert (results / name).stat().st_size > 0, name
    # the k-depth stage scored every run, MOCO's too, on the same 20 valid tokens, up to the whole datastore
    for name, r in records.items():
        depth = r["k_depth"]
        assert depth["tokens_asked"] == depth["tokens"] == 20 and str(depth["datastore_size"]) in depth["by_k"]
        assert depth["datastore_size"] == json.loads((runs / name / "datastore" / "meta.json").read_text())["N"]
    assert set(json.loads((results / "k_depth.json").read_text())["rows"]) == {"0", "0.01", "moco 0.01"}
    table = json.loads((results / "table.json").read_text())
    for omega in ("0", "0.01"):
        xs = [records[f"l2_omega{omega}_seed{s}"]["valid_knnlm_ppl"] for s in (0, 1)]
        mean, std, n = table[omega]["valid_knnlm_ppl"]
        assert n == 2 and mean == pytest.approx(np.mean(xs)) and std == pytest.approx(np.std(xs, ddof=1))
        assert f"{mean:.2f} ± {std:.2f}" in (results / "table.md").read_text()
    # the paired table: each ω > 0 minus ω = 0 of the same seed
    paired = json.loads((results / "paired.json").read_text())
    d = [records[f"l2_omega0.01_seed{s}"]["valid_knnlm_ppl"] - records[f"l2_omega0_seed{s}"]["valid_knnlm_ppl"] for s in (0, 1)]
    assert set(paired) == {"0.01"} and paired["0.01"]["valid_knnlm_ppl"] == pytest.approx([np.mean(d), np.std(d, ddof=1), 2])
    d = [records[f"l2_omega0.01_seed{s}"]["valid_knnlm_ppl_paper"] - records[f"l2_omega0_seed{s}"]["valid_knnlm_ppl_paper"] for s in (0, 1)]
    assert paired["0.01"]["valid_knnlm_ppl_paper"] == pytest.approx([np.mean(d), np.std(d, ddof=1), 2])
    assert paired["0.01"]["per_seed"]["valid_knnlm_ppl_paper"] == pytest.approx({"0": d[0], "1": d[1]})
    # each record's perplexity is the best of its curve over k, and that curve comes from the run's tuning grid
    for name, r in records.items():
        grid = json.loads((runs / name / "eval" / "valid" / "tuning.json").read_text())
        assert r["valid_knnlm_ppl_by_k"] == {str(k): min(g["ppl"] for g in grid if g["k"] == k) for k in (4, 16)}
        assert r["valid_knnlm_ppl"] == pytest.approx(min(r["valid_knnlm_ppl_by_k"].values()))
    # MOCO runs are MOCO runs, at the best (only) ω > 0, and record the queue settings they were trained with
    moco = records["moco_omega0.01_seed0"]
    assert moco["config"]["train"]["regularizer"] == "moco" and moco["config"]["train"]["queue_len"] == 4
    # test perplexities reuse valid's λ / k / temperature for each model
    test = json.loads((results / "test.json").read_text())
    assert set(test) == {"0", "0.01"} and test["0"]["seeds"] == 2
    for s in (0, 1):
        valid = json.loads((runs / f"l2_omega0.01_seed{s}" / "eval" / "valid" / "summary.json").read_text())
        tst = json.loads((runs / f"l2_omega0.01_seed{s}" / "eval" / "test" / "summary.json").read_text())
        assert (tst["lambda"], tst["k"], tst["temperature"]) == (valid["lambda"], valid["k"], valid["temperature"])
        for p in ("tuned", "paper"):  # each protocol's own choice from valid
            assert [tst["protocols"][p][x] for x in ("lambda", "k", "temperature")] == \
                [valid["protocols"][p][x] for x in ("lambda", "k", "temperature")]
        assert valid["protocols"]["paper"]["temperature"] == 1.0 and valid["protocols"]["paper"]["k"] == 16  # k_max < 1024
    assert test["0.01"]["valid_choice"] == {n: {"tuned": [r["lambda"], r["k"], r["temperature"]],
                                                "paper": [r["paper_lambda"], r["paper_k"], 1.0]}
                                            for n, r in records.items() if n.startswith("l2_omega0.01_")}
    # every run keeps its test figures in its record (a GPU's run folders are gone later); the table is made of them
    for n, r in records.items():
        tst = json.loads((runs / n / "eval" / "test" / "summary.json").read_text())
        assert r["test"]["lm_ppl"] == tst["lm_ppl"] and r["test"]["tokens"] == tst["tokens"]
        assert r["test"]["knnlm_ppl"] == tst["protocols"]["tuned"]["knnlm_ppl"]
        assert r["test"]["knnlm_ppl_paper"] == tst["protocols"]["paper"]["knnlm_ppl"]
    for m, f in (("test_knnlm_ppl", "knnlm_ppl"), ("test_knnlm_ppl_paper", "knnlm_ppl_paper")):
        d = [records[f"l2_omega0.01_seed{s}"]["test"][f] - records[f"l2_omega0_seed{s}"]["test"][f] for s in (0, 1)]
        assert test["0.01"]["minus_omega0"][m] == pytest.approx([np.mean(d), np.std(d, ddof=1), 2])


@slow
def test_test_figures_are_added_to_old_records_from_their_run_folders_and_left_out_without_them(study, tmp_path):
    path, runs, results = own_copy(study, tmp_path)
    old = results / "runs" / "l2_omega0_seed0.json"
    before = json.loads(old.read_text())
    old.write_text(json.dumps({k: v for k, v in before.items() if k != "test"}))  # recorded before runs kept their test figures
    gone = results / "runs" / "l2_omega0_seed1.json"
    gone.write_text(json.dumps({k: v for k, v in json.loads(gone.read_text()).items() if k != "test"}))
    shutil.rmtree(runs / "l2_omega0_seed1")  # ... and trained on a machine that is gone
    proc = knnlm("sweep", path, "--out", runs)
    assert "== l2_omega0_seed0: test split" in proc.stdout and proc.stdout.count("== ") == 1
    assert json.loads(old.read_text())["test"] == before["test"]  # the same figures from the same saved model
    test = json.loads((results / "test.json").read_text())
    assert test["0"]["seeds"] == 1 and test["0.01"]["seeds"] == 2 and test["0.01"]["minus_omega0"]["test_lm_ppl"][2] == 1


@slow
def test_rerun_reuses_records_and_trained_models(study, tmp_path):
    path, runs, results = own_copy(study, tmp_path)
    lost = results / "runs" / "l2_omega0.01_seed1.json"
    before = json.loads(lost.read_text())
    lost.unlink()  # as if the sweep had been killed after training this model but before recording it
    others = snapshot(results / "runs")
    checkpoints = snapshot(runs / "l2_omega0.01_seed1" / "checkpoints")
    test_before = (results / "test.json").read_bytes()
    proc = knnlm("sweep", path, "--out", runs)
    assert "== l2_omega0.01_seed1" in proc.stdout and proc.stdout.count("== ") == 1  # only the missing one ran
    assert (results / "test.json").read_bytes() == test_before  # the same choices: the test split is not redone
    assert snapshot(runs / "l2_omega0.01_seed1" / "checkpoints") == checkpoints  # not retrained
    after = json.loads(lost.read_text())
    assert after["valid_knnlm_ppl"] == before["valid_knnlm_ppl"]
    assert {k: v for k, v in snapshot(results / "runs").items() if k != lost.name} == others


@slow
def test_changed_evaluation_settings_reevaluate_records_and_other_changes_are_refused(study, tmp_path):
    path, runs, results = own_copy(study, tmp_path)
    names = sorted(p.stem for p in (results / "runs").glob("*.json"))
    checkpoints = {n: snapshot(runs / n / "checkpoints") for n in names}
    proc = knnlm("sweep", path, "--out", runs, "eval.k=4,8")
    assert proc.stdout.count("evaluating again (eval.k changed)") == len(names) == 6
    # the test split follows what valid now chooses
    test = json.loads((results / "test.json").read_text())
    for row in test.values():
        for n, choice in row["valid_choice"].items():
            r = json.loads((results / "runs" / f"{n}.json").read_text())
            assert choice["tuned"] == [r["lambda"], r["k"], r["temperature"]] and choice["tuned"][1] in (4, 8)
            tst = json.loads((runs / n / "eval" / "test" / "summary.json").read_text())
            assert [tst["lambda"], tst["k"], tst["temperature"]] == choice["tuned"]
    for n in names:
        assert snapshot(runs / n / "checkpoints") == checkpoints[n]  # the models are reused, not retrained
        record = json.loads((results / "runs" / f"{n}.json").read_text())
        grid = json.loads((runs / n / "eval" / "valid" / "tuning.json").read_text())
        # the tuned grid, plus the paper protocol's k (k_max = 16 here) at every temperature
        assert record["config"]["eval"]["k"] == [4, 8] and {row["k"] for row in grid} == {4, 8, 16}
        assert record["valid_knnlm_ppl"] == pytest.approx(min(row["ppl"] for row in grid if row["k"] in (4, 8)))
        assert record["valid_knnlm_ppl_paper"] == pytest.approx(
            min(row["ppl"] for row in grid if row["k"] == 16 and row["temperature"] == 1.0))

    before = snapshot(results)
    proc = knnlm("sweep", path, "--out", runs, "eval.k=4,8", "train.lr=0.001", check=False)
    fails(proc, "l2_omega0_seed0.json", "train.lr", "move the record away")
    assert snapshot(results) == before


def _numpy_ppl_at(run, k, temperature, lambdas):
    """kNN-LM perplexity from a run's saved neighbours, computed directly: p_kNN(w) = Σ_{j<k, v_j = w} exp(−d_j / T) /
    Σ_{j<k} exp(−d_j / T) in float64 log space, mixed with the LM at each λ; the best λ."""
    ev = run / "eval" / "valid"
    d = np.load(ev / "distances.npy")[:, :k].astype(np.float64) / temperature
    vals = np.load(run / "datastore" / "vals.npy")[np.load(ev / "neighbors.npy")[:, :k]]
    targets, lm = np.load(ev / "targets.npy"), np.load(ev / "lm_logprobs.npy").astype(np.float64)
    total = np.logaddexp.reduce(-d, axis=1)
    hit = np.logaddexp.reduce(np.where(vals == targets[:, None], -d, -np.inf), axis=1)
    knn = hit - total
    best = math.inf
    for lam in lambdas:
        with np.errstate(divide="ignore"):  # λ = 1: log(1 − λ) = −inf, the LM term drops out
            mixed = lm if lam == 0 else np.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm)
        best = min(best, float(np.exp(-mixed.mean())))
    return best


@slow
def test_temperature_one_figures_equal_a_direct_numpy_computation_from_the_saved_neighbours(study):
    _, runs, results = study
    lambdas = [round(0.05 * i, 2) for i in range(21)]
    for name in ("l2_omega0_seed0", "l2_omega0_seed1"):  # ω = 0 runs keep their neighbours
        r = json.loads((results / "runs" / f"{name}.json").read_text())
        for k in (4, 16):
            assert r["valid_knnlm_ppl_t1_by_k"][str(k)] == pytest.approx(_numpy_ppl_at(runs / name, k, 1.0, lambdas), rel=1e-9)
        assert r["valid_knnlm_ppl_paper"] == pytest.approx(_numpy_ppl_at(runs / name, 16, 1.0, lambdas), rel=1e-9)
        assert r["valid_knnlm_ppl"] == pytest.approx(_numpy_ppl_at(runs / name, r["k"], r["temperature"], lambdas), rel=1e-9)
        # both protocols' choices come from the one search of the run: one query per valid token
        meta = json.loads((runs / name / "eval" / "valid" / "meta.json").read_text())
        summary = json.loads((runs / name / "eval" / "valid" / "summary.json").read_text())
        assert meta["searched_queries"] == meta["tokens"] == summary["tokens"]
        assert set(summary["protocols"]) == {"tuned", "paper"}


@slow
def test_rescaling_control_equals_the_omega0_model_at_the_matching_temperature(study):
    _, runs, results = study
    rescale = json.loads((results / "rescale.json").read_text())
    lambdas = [round(0.05 * i, 2) for i in range(21)]
    assert set(rescale["per_run"]) == {"l2_omega0.01_seed0", "l2_omega0.01_seed1"}
    for name, row in rescale["per_run"].items():
        r = json.loads((results / "runs" / f"{name}.json").read_text())
        r0 = json.loads((results / "runs" / f"l2_omega0_seed{r['seed']}.json").read_text())
        T = r0["key_sq_norm_mean"] / r["key_sq_norm_mean"]
        assert row["temperature_match"] == pytest.approx(T)
        assert row["omega0_rescaled"] == pytest.approx(_numpy_ppl_at(runs / r0["name"], 16, T, lambdas), rel=1e-9)
        assert row["omega_t1"] == r["valid_knnlm_ppl_paper"] and row["omega0_t1"] == r0["valid_knnlm_ppl_paper"]


@slow
def test_moco_early_trains_moco_beside_the_grid_at_the_best_paper_omega_so_far(study, tmp_path):
    path, runs, results = own_copy(study, tmp_path)
    for s in (0, 1):
        (results / "runs" / f"moco_omega0.01_seed{s}.json").unlink()
    (results / "runs" / "l2_omega0.01_seed1.json").unlink()  # the grid is not complete: MOCO starts beside it
    proc = knnlm("sweep", path, "--out", runs, "--early")
    assert "MOCO at ω = 0.01 (best ω > 0 under the paper protocol over the records so far) beside the grid" in proc.stdout
    assert proc.stdout.count("== ") == 3 and all((results / "runs" / f"moco_omega0.01_seed{s}.json").is_file() for s in (0, 1))
    assert (results / "moco_vs_l2.md").is_file()


@slow
def test_rescaling_control_keeps_pairs_whose_omega0_folder_is_gone_unless_their_inputs_changed(study, tmp_path):
    path, runs, results = own_copy(study, tmp_path)
    before = json.loads((results / "rescale.json").read_text())
    shutil.rmtree(runs / "l2_omega0_seed0")  # as if trained on a GPU machine that was given back
    changed = {**before, "inputs": {**before["inputs"], "l2_omega0.01_seed1": ["changed"]}}  # forces a recompute
    (results / "rescale.json").write_text(json.dumps(changed))
    knnlm("sweep", path, "--out", runs, "--tables-only")
    after = json.loads((results / "rescale.json").read_text())
    assert after["per_run"] == before["per_run"] and after["inputs"] == before["inputs"]  # same saved neighbours
    # a pair whose inputs changed and whose ω = 0 folder is gone cannot be recomputed: it is dropped, not kept stale
    r = results / "runs" / "l2_omega0.01_seed0.json"
    r.write_text(json.dumps({**json.loads(r.read_text()), "key_sq_norm_mean": 1.0}))
    knnlm("sweep", path, "--out", runs, "--tables-only")
    assert set(json.loads((results / "rescale.json").read_text())["per_run"]) == {"l2_omega0.01_seed1"}


@slow
@pytest.mark.wikitext
def test_objectives_study_compares_the_best_weight_with_omega0_of_the_same_seed(tmp_path):
    path = tmp_path / "objectives.toml"
    path.write_text(f'base = "{TINY}"\noverrides = {json.dumps(OVERRIDES)}\nomegas = [0.0]\nseeds = [0, 1]\n'
                    f'results = "{tmp_path / "results"}"\nstages = ["table", "objectives"]\n'
                    f'[objectives]\nweights = {{ knn = [0.1, 1.0], knn-memory = [0.1] }}\n')
    knnlm("sweep", path, "--out", tmp_path / "runs")
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")}
    # both weights on the first seed, the best (tuned protocol) on the second
    best = min((1.0, 0.1), key=lambda w: records[f"knn_omega{w:g}_seed0"]["valid_knnlm_ppl"])
    assert sorted(records) == sorted(["l2_omega0_seed0", "l2_omega0_seed1", "knn_omega0.1_seed0", "knn_omega1_seed0",
                                      f"knn_omega{best:g}_seed1", "knn-memory_omega0.1_seed0", "knn-memory_omega0.1_seed1"])
    out = json.loads((tmp_path / "results" / "objectives.json").read_text())
    assert out["best"] == {"knn": best, "knn-memory": 0.1}
    d = [records[f"knn_omega{best:g}_seed{s}"]["valid_knnlm_ppl"] - records[f"l2_omega0_seed{s}"]["valid_knnlm_ppl"] for s in (0, 1)]
    assert out["paired"]["knn"]["valid_knnlm_ppl"] == pytest.approx([np.mean(d), np.std(d, ddof=1), 2])
    assert out["paired"]["knn"]["goal_met"] is False  # two seeds can never meet a goal that asks for three
    assert records["knn_omega1_seed0"]["config"]["train"]["regularizer"] == "knn"
    # each knn record keeps the temperature its loss learned, from the run's last checkpoint
    for name, r in records.items():
        assert ("knn_tau" in r) == name.startswith(("knn_", "knn-memory_"))
        if "knn_tau" in r:
            last = max((tmp_path / "runs" / name / "checkpoints").glob("step_*"))
            with safe_open(last / "regularizer.safetensors", "np") as f:
                assert r["knn_tau"] == pytest.approx(math.exp(f.get_tensor("log_tau")), rel=1e-6)
    for name in ("objectives.md", "objectives.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0


@slow
def test_a_sweep_killed_within_and_between_runs_ends_with_the_same_records(study, tmp_path, monkeypatch):
    """Killed inside a run's training and right after a run is recorded, the rerun ends where an uninterrupted sweep
    ends: the same records (times aside), from the same models."""
    path, _, results = study
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread, as each of the fixture's two jobs had
    root = tmp_path / "killed"
    root.mkdir()
    mine = root / "study.toml"
    study_text = path.read_text().split("[compare]")[0]  # no MOCO runs
    mine.write_text(study_text.replace(str(results), str(root / "results"))
                    .replace("seeds = [0, 1]", "seeds = [0]").replace('"rescale", "compare"', '"rescale"'))
    for point in ("train:5", "sweep:1"):  # within the first run; after the first run is recorded
        proc = subprocess.run([sys.executable, "-m", "knnlm.cli", "sweep", str(mine), "--out", str(root / "runs")],
                              cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1", "KNNLM_KILL_AT": point})
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
    assert [p.stem for p in (root / "results" / "runs").glob("*.json")] == ["l2_omega0_seed0"]
    knnlm("sweep", mine, "--out", root / "runs")
    timed = ("seconds", "device")
    untimed = lambda r: {k: ({**v, "seconds": None} if k == "k_depth" else v) for k, v in r.items() if k not in timed}
    for name in ("l2_omega0_seed0", "l2_omega0.01_seed0"):
        got = json.loads((root / "results" / "runs" / f"{name}.json").read_text())
        want = json.loads((results / "runs" / f"{name}.json").read_text())
        assert untimed(got) == untimed(want), name


@pytest.mark.parametrize("line,expect", [
    ('omegas = "0.1"', "omegas: expected a non-empty list of numbers >= 0"),
    ("omegas = [-1.0]", "omegas"),
    ("seeds = [0.5]", "seeds: expected a non-empty list of integers"),
    ("seeds = []", "seeds"),
    ("regularizer = \"nope\"", "regularizer: expected one of"),
    ("overrides = [1]", "overrides"),
    ("stages = \"table\"", "stages: expected a list of stage names"),
    ("objectives = { knn = [0.1] }", "unknown study key"),  # a stage's table needs the stage in `stages`
])
def test_a_study_file_is_type_checked(tmp_path, line, expect):
    values = {"base": f'"{TINY}"', "omegas": "[0.0]", "seeds": "[0]"}
    key = line.split("=")[0].strip()
    values[key] = line.split("=", 1)[1].strip()
    path = tmp_path / "study.toml"
    path.write_text("\n".join(f"{k} = {v}" for k, v in values.items()) + "\n")
    with pytest.raises(UserError, match=expect):
        load_study(path)


def test_a_stage_checks_its_options(tmp_path):
    base = f'base = "{TINY}"\nomegas = [0.0]\nseeds = [0]\n'
    for text, expect in ((base + 'stages = ["nope"]\n', "unknown stage 'nope'"),
                         (base + 'stages = ["compare"]\n[compare]\nregularizer = "l2"\n', "other than the grid's l2"),
                         (base + 'stages = ["objectives"]\n[objectives]\nweights = { knn = ["a"] }\n', "weights.knn"),
                         (base + 'stages = ["table"]\n[table]\nwidth = 3\n', "unknown option")):
        (tmp_path / "s.toml").write_text(text)
        with pytest.raises(UserError, match=expect):
            make_stages(load_study(tmp_path / "s.toml"))


def test_the_committed_studies_pass_the_checks():
    study = load_study(REPO / "experiments" / "omega_study.toml")
    assert study.title and study.omegas and study.seeds and study.regularizer == "l2"
    for path in engine_studies():
        assert make_stages(load_study(path))


def test_tables_only_rewrites_the_tables_from_the_records_and_trains_nothing(tmp_path):
    study = tmp_path / "experiments" / "s.toml"
    study.parent.mkdir()
    study.write_text(f'base = "{TINY}"\nomegas = [0.0, 0.01]\nseeds = [0]\nstages = ["table", "paired"]\n')
    results = tmp_path / "results" / "s"  # the default: results/<study> beside experiments/
    (results / "runs").mkdir(parents=True)
    for omega, ppl, norm in ((0.0, 100, 1000.0), (0.01, 97, 100.0)):
        rec = {**record(omega, 0, ppl, ppl + 10), "key_sq_norm_mean": norm, "temperature": norm / 100,
               "valid_knnlm_ppl_by_k": {"8": ppl + 2, "16": ppl}, "name": f"l2_omega{omega:g}_seed0"}
        (results / "runs" / f"{rec['name']}.json").write_text(json.dumps(rec))
    run_sweep(study, tmp_path / "runs", tables_only=True)
    assert "| 100.00 | 97.00 |" in (results / "table.md").read_text()
    assert "-3.00" in (results / "paired.md").read_text()
    assert not (tmp_path / "runs").exists()  # no run was started


def test_t_interval_is_students_at_95_percent():
    """Against the t table: t(0.975, 2) = 4.3027, t(0.975, 4) = 2.7764; one value has no interval."""
    from knnlm.studies.statistics import ci95, interval_cell, t_interval

    mean, std, half, n = t_interval([1.0, 2.0, 3.0])
    assert (mean, std, n) == (2.0, 1.0, 3) and half == pytest.approx(4.3027 / 3 ** 0.5, rel=1e-4)
    xs = [-7.84, -7.58, -7.84, -7.7, -7.9]
    mean, std, half, n = t_interval(xs)
    assert half == pytest.approx(2.7764 * np.std(xs, ddof=1) / 5 ** 0.5, rel=1e-4)
    assert ci95(xs) == pytest.approx([mean - half, mean + half])
    assert ci95([3.0]) is None and interval_cell([3.0]) == "–" and interval_cell([1.0, 2.0, 3.0]) == "[-0.48, +4.48]"


def test_held_out_stage_pairs_the_first_half_choice_with_omega0(tmp_path):
    """The `held-out` stage from hand-made records: each protocol's second-half and test perplexities under the
    first half's choice, the whole-valid choice's on the second half, and their differences against ω = 0 of the
    same seed with a t-interval; records without held-out figures give no table."""
    from scipy import stats

    def held(rec, second, whole, test):
        rec["held_out"] = {"scored_on": [25000, 50000], "lm_ppl": 120.0,
                           **{p: {"choice": [0.25, 1024, 1.0], "knnlm_ppl": second + i,
                                  "whole_valid_choice_ppl": whole + i} for i, p in enumerate(("tuned", "paper"))}}
        rec["test"] = {"held_out": {"tuned": test, "paper": test + 1}}
        return rec

    study = Study(base="", omegas=[0.0, 0.01], seeds=[0, 1, 2], regularizer="l2", stages=["held-out"])
    (stage,) = make_stages(study)
    written(stage, [record(0.0, 0, 100, 110)], tmp_path)  # no held-out figures: nothing written
    assert not (tmp_path / "held_out.md").exists()
    zero = [(100.0, 99.0, 106.0), (101.0, 100.5, 107.0), (99.0, 98.0, 105.5)]
    plus = [(98.0, 97.5, 104.0), (100.0, 99.0, 106.5), (97.5, 96.0, 104.5)]
    records = [held(record(0.0, s, 0, 0), *v) for s, v in enumerate(zero)] + \
              [held(record(0.01, s, 0, 0), *v) for s, v in enumerate(plus)]
    written(stage, records, tmp_path)
    table = json.loads((tmp_path / "held_out.json").read_text())
    second = table["0.01"]["tuned"]["second_half"]
    d = np.subtract([v[0] for v in plus], [v[0] for v in zero])
    assert second["mean_std_n"] == pytest.approx([np.mean([v[0] for v in plus]), np.std([v[0] for v in plus], ddof=1), 3])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert second["minus_omega0"]["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert table["0.01"]["paper"]["test"]["minus_omega0"]["per_seed"] == pytest.approx(
        np.subtract([v[2] + 1 for v in plus], [v[2] + 1 for v in zero]))
    assert table["0"]["tuned"]["second_half_whole_choice"]["minus_omega0"] is None  # ω = 0 is the reference
    md = (tmp_path / "held_out.md").read_text()
    assert "valid's 2nd half, chosen on its 1st half" in md and "test, chosen on valid's 1st half" in md


def test_more_seeds_trains_the_grid_choice_at_extra_seeds_and_no_stage_lets_them_change_it(tmp_path):
    from knnlm.studies.stages.more_seeds import MoreSeeds

    study = Study(base="", omegas=[0.0, 0.01, 0.1], seeds=[0, 1, 2], regularizer="l2",
                  stages=["more-seeds", "compare", "test"],
                  options={"more-seeds": {"seeds": [3, 4]}, "compare": {"regularizer": "moco"}})
    more, compare, test = make_stages(study)
    grid = [record(0.0, s, 100 + s, 110) for s in range(3)] + [record(0.01, s, 98 + s, 111) for s in range(3)] + \
           [record(0.1, s, 99 + s, 112) for s in range(3)]  # paper protocol: 0.01 is the best ω > 0 on seeds 0-2
    extra = [record(0.1, 3, 50, 112), record(0.0, 3, 101, 110), record(0.01, 3, 97, 111)]  # 0.1's seed 3 would flip it
    records = grid + extra
    assert more.omega(records) == compare.omega(records) == 0.01 and test.best(records) == {"tuned": 0.01, "paper": 0.01}
    asked = []
    more.after(SimpleNamespace(records=records, task=lambda reg, omega, seed: (reg, omega, seed), run=asked.extend))
    assert sorted(asked) == sorted(("l2", o, s) for s in (3, 4) for o in (0.0, 0.01))
    written(more, records, tmp_path)
    head = json.loads((tmp_path / "headline.json").read_text())
    d = [98 + s - (100 + s) for s in range(3)] + [97 - 101]
    assert head["omega"] == 0.01 and head["paired"]["valid_knnlm_ppl_paper"] == pytest.approx(
        [np.mean(d), np.std(d, ddof=1), 4])
    assert "95 % t-interval" in (tmp_path / "headline.md").read_text()
    for bad in ({"seeds": [2, 3]}, {"seeds": []}, {"seeds": [3], "protocol": "best"}):
        with pytest.raises(UserError, match=r"\[more-seeds\]"):
            MoreSeeds(study, **bad)
