"""The ω study: `knnlm sweep experiments/omega_study.toml --out runs/omega_study`.

One model per (regularizer, ω, seed): each is trained, its datastore built and its kNN-LM evaluated on valid
(λ, k, temperature tuned per model) by the same `run_pipeline` as `knnlm run`. Each finished run's numbers are
written at once to `RESULTS/runs/<name>.json` (commit them: a stopped sweep continues from what is recorded and
reuses finished models; a record made with other evaluation settings, e.g. a wider k grid, is evaluated again
from its trained model, and one made with other training settings stops the sweep). When every run of a stage
is done the sweep writes, under RESULTS:

- `table.md` / `table.json`: the paper's Table 1 form, rows train LM / valid LM / valid kNN-LM ppl, columns ω,
  cells mean ± std over seeds;
- `paired.md` / `paired.json`: each ω > 0 against ω = 0 of the same seed (same initialisation and data order),
  mean ± std of the per-seed differences, which the seed-to-seed spread of the table does not blur;
- `figure1.png`: valid perplexity against ω, LM and kNN-LM with ± std bands;
- `moco_vs_l2.md` / `.json` / `.png`: MOCO against L2 at the best ω > 0;
- `test.md` / `test.json`: test perplexities of the best ω and of ω = 0, λ, k, temperature chosen on valid.

The study file (TOML) names a base config and the grid:

    base = "../configs/wikitext-2.toml"       # relative to the study file
    overrides = ["train.epochs=6"]
    omegas = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
    seeds = [0, 1, 2]
    moco = true                               # also train MOCO at the best ω > 0 (same seeds)

An objectives study (`experiments/objectives_study.toml`) adds other training objectives, each with the weights to
try on the first seed, and a side-by-side benchmark of their cost per training step:

    objectives = { knn = [0.01, 0.1, 1.0] }   # the best weight (tuned protocol) then runs on the other seeds
    step_benchmark = "../results/benchmarks/amd-epyc-zen5/training.json"

and writes `objectives.md` / `.json` / `.png` (each objective's best weight against ω = 0 of the same seed).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from .artifacts import UserError, cpu_name, kill_point, load_npy, markdown_table, nan_to_null, read_json, write_json, write_text
from .checkpoint import load_model
from .config import REGULARIZERS, Config, changed_settings, load_config
from .evaluate import PAPER_TEMPERATURE, evaluate, paper_k, protocol_rows, tuning_arrays
from .knn import knn_logprob, perplexities
from .pipeline import run_pipeline
from .plots import (plot_omega_curve, plot_paired_objectives, plot_ppl_by_k, plot_regularizer_comparison,
                    plot_temperature_vs_norm)


@dataclass
class Study:
    base: str
    omegas: list[float]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    moco: bool = True
    moco_overrides: list[str] = field(default_factory=list)
    results: str = ""  # where the committed numbers go (default results/<study name>)
    title: str = "WikiText-2"  # what the tables and figures say the study is about
    # other training objectives (train.regularizer name -> weights tried on the first seed); the best weight under
    # the tuned protocol is then trained on the other seeds and compared with ω = 0 of the same seed
    objectives: dict[str, list[float]] = field(default_factory=dict)
    # the objectives' cost per training step against ω = 0: a `benchmarks/training.py --regularizers` JSON, measured
    # side by side in one run (the runs' own training times differ by 2× between sessions of one machine)
    step_benchmark: str = ""


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _strings(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


# each study key: what it must be, and the check
_STUDY_TYPES = [
    ("base", "a config file path", lambda x: isinstance(x, str) and x != ""),
    ("omegas", "a non-empty list of numbers >= 0", lambda x: isinstance(x, list) and x != [] and all(_number(v) and v >= 0 for v in x)),
    ("seeds", "a non-empty list of integers >= 0", lambda x: isinstance(x, list) and x != [] and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)),
    ("overrides", "a list of section.key=value strings", _strings),
    ("moco", "true or false", lambda x: isinstance(x, bool)),
    ("moco_overrides", "a list of section.key=value strings", _strings),
    ("results", "a folder path", lambda x: isinstance(x, str)),
    ("title", "a string", lambda x: isinstance(x, str)),
    ("step_benchmark", "a benchmarks/training.py JSON path", lambda x: isinstance(x, str)),
    ("objectives", "a table of regularizer = [weights]", lambda x: isinstance(x, dict) and all(isinstance(v, list) and all(_number(w) for w in v) for v in x.values())),
]


def load_study(path: Path) -> Study:
    if not path.is_file():
        raise UserError(f"{path}: study file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not a valid TOML study ({e})") from None
    known = set(Study.__dataclass_fields__)
    if unknown := set(raw) - known:
        raise UserError(f"{path}: unknown study key(s) {sorted(unknown)} (expected {sorted(known)})")
    for key, expect, ok in _STUDY_TYPES:
        if key in raw and not ok(raw[key]):
            raise UserError(f"{path}: {key}: expected {expect}, got {raw[key]!r}")
    if "base" not in raw or "omegas" not in raw or "seeds" not in raw:
        raise UserError(f"{path}: a study needs base, omegas and seeds")
    study = Study(**raw)
    study.base = str((path.parent / study.base).resolve())
    if study.step_benchmark:
        study.step_benchmark = str((path.parent / study.step_benchmark).resolve())
        if not Path(study.step_benchmark).is_file():
            raise UserError(f"{path}: step_benchmark: {study.step_benchmark} not found (a benchmarks/training.py "
                            "--regularizers JSON)")
    for name, weights in study.objectives.items():
        if name not in REGULARIZERS or not weights or any(not w > 0 for w in weights):
            raise UserError(f"{path}: objectives.{name}: expected a regularizer of {', '.join(REGULARIZERS)} "
                            "with a non-empty list of weights > 0")
    return study


def run_name(regularizer: str, omega: float, seed: int) -> str:
    return f"{regularizer}_omega{omega:g}_seed{seed}"


def key_statistics(run: Path, cfg: Config) -> dict:
    """How the regularizer acted: key norms on valid, the key layer norm's gain and bias (a penalty on a LayerNorm
    output can be met by shrinking these two vectors instead of changing the representation), and the `knn` losses'
    learned temperature τ (squared-distance units, as the evaluation's), to set beside the tuned one."""
    q = load_npy(run / "eval" / "valid" / "query_keys.npy", mmap=True)
    sq = np.square(np.asarray(q[:50000], dtype=np.float32)).sum(1)
    model, _, meta = load_model(run)
    stats = {"key_sq_norm_mean": float(sq.mean()), "key_sq_norm_std": float(sq.std())}
    if cfg.train.regularizer in ("knn", "knn-memory"):
        state = safetensors.torch.load_file(str(Path(meta["path"]) / "regularizer.safetensors"))
        stats["knn_tau"] = math.exp(float(state["log_tau"]))
    ln = model.key_module()
    if ln is not None:
        stats["ln_gain_abs_mean"] = float(ln.weight.detach().abs().mean())
        stats["ln_gain_sq_sum"] = float(ln.weight.detach().pow(2).sum())
        stats["ln_bias_sq_sum"] = float(ln.bias.detach().pow(2).sum())
    return stats


def best_by(grid: list[dict], key: str) -> dict[str, float]:
    """The best perplexity at each value of `key` ("k" or "temperature") of tuning-grid rows, the others tuned."""
    best: dict[str, float] = {}
    for row in grid:
        v = f"{row[key]:g}"
        best[v] = min(best.get(v, math.inf), row["ppl"])
    return best


def protocol_curves(grid: list[dict], cfg: Config) -> dict[str, dict[str, float]]:
    """What a record keeps of its tuning grid, for both protocols:
    - `valid_knnlm_ppl_by_k`: the best perplexity at every k of eval.k (temperature and λ tuned at that k);
    - `valid_knnlm_ppl_t1_by_k`: at temperature 1 (the paper protocol's), the best over λ at every k;
    - `valid_knnlm_ppl_by_temperature`: the best over eval.k and λ at every temperature."""
    ks = set(cfg.eval.k)
    return {"valid_knnlm_ppl_by_k": best_by(protocol_rows(grid, cfg, "tuned"), "k"),
            "valid_knnlm_ppl_t1_by_k": best_by([r for r in grid if r["temperature"] == PAPER_TEMPERATURE], "k"),
            "valid_knnlm_ppl_by_temperature": best_by([r for r in grid if r["k"] in ks], "temperature")}


def run_config(study: Study, regularizer: str, omega: float, seed: int, extra: list[str] = ()) -> Config:
    """The configuration of one run of the study: its base and overrides, then the run's own settings."""
    return load_config(study.base, [*study.overrides, *extra, f"train.regularizer={regularizer}",
                                    f"train.omega={omega}", f"train.seed={seed}"])


RECORD_FIELDS = ("valid_knnlm_ppl_paper", "valid_knnlm_ppl_t1_by_k", "valid_knnlm_ppl_by_temperature")


def recorded(study: Study, out: Path, results: Path, regularizer: str, omega: float, seed: int,
             extra: list[str] = ()) -> dict | None:
    """The run's record if it exists and is up to date (same settings, every field of both protocols)."""
    record_path = results / "runs" / f"{run_name(regularizer, omega, seed)}.json"
    if not record_path.is_file():
        return None
    record = read_json(record_path, "study record")
    cfg = run_config(study, regularizer, omega, seed, extra)
    if changed_settings(record.get("config", {}), cfg.to_dict()) or not all(f in record for f in RECORD_FIELDS):
        return None
    return record


def run_one(study: Study, out: Path, results: Path, regularizer: str, omega: float, seed: int,
            extra: list[str] = (), progress: bool = True, prune: bool = False) -> dict:
    """Train/datastore/evaluate one model unless its record exists; write the record as soon as it is done."""
    name = run_name(regularizer, omega, seed)
    record_path = results / "runs" / f"{name}.json"
    cfg = run_config(study, regularizer, omega, seed, extra)
    if record_path.is_file():
        record = read_json(record_path, "study record")
        changed = changed_settings(record.get("config", {}), cfg.to_dict())
        if not changed and all(f in record for f in RECORD_FIELDS):
            return record
        if not changed:
            changed = ["eval.protocols"]  # recorded before both protocols were: evaluated again
        if any(not c.startswith("eval.") for c in changed):
            raise UserError(f"{record_path}: recorded with other settings ({', '.join(changed)}); "
                            "move the record away to redo the run")
        model_kept = (out / name / "train_summary.json").is_file()
        print(f"== {name}: {'evaluating again' if model_kept else 'training again (its run folder is gone)'} "
              f"({', '.join(changed)} changed)", flush=True)
    else:
        print(f"== {name}", flush=True)
    res = run_pipeline(cfg, out / name, progress=progress)
    v = res["valid"]
    paper = v["protocols"]["paper"]
    record = {
        "name": name, "regularizer": regularizer, "omega": omega, "seed": seed,
        "train_lm_ppl": res["train"]["train_ppl"], "valid_lm_ppl": v["lm_ppl"],
        "valid_knnlm_ppl": v["knnlm_ppl"],  # the tuned protocol (λ, k, temperature tuned on valid)
        "lambda": v["lambda"], "k": v["k"], "temperature": v["temperature"],
        "valid_knnlm_ppl_paper": paper["knnlm_ppl"],  # temperature 1, k = 1024, λ tuned on valid
        "paper_lambda": paper["lambda"], "paper_k": paper["k"],
        "target_in_neighbors": v["target_in_neighbors"], "epochs": res["train"]["epochs"],
        # how strong the penalty is, in the LM loss's nats, at the start and end of training (runs since 2026-12-06)
        **({"penalty": res["train"]["penalty"]} if res["train"].get("penalty") else {}),
        **protocol_curves(read_json(out / name / "eval" / "valid" / "tuning.json", "tuning grid"), cfg),
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu: " + cpu_name(),
        "seconds": {**res["seconds"], "train_compute": res["train"]["train_seconds"]},
        **key_statistics(out / name, cfg),
        "config": cfg.to_dict(),
    }
    record["test"] = test_figures(out / name, cfg, res.get("test"))
    write_json(record_path, record)
    if prune:
        prune_search(out / name / "eval" / "test")
        if omega > 0:
            prune_search(out / name / "eval" / "valid")
    return record


def test_figures(run: Path, cfg: Config, summary: dict | None = None) -> dict:
    """A run's test perplexities under each protocol's own choice of λ, k and temperature on valid. Kept in its
    record as soon as the model is evaluated, so that the test table needs no run folder later (a GPU's runs are
    gone with the machine). Nothing is chosen on test: the study's tables pick ω on valid alone."""
    t = summary or evaluate(run, cfg, "test", progress=False)
    return {"lm_ppl": t["lm_ppl"], "knnlm_ppl": t["protocols"]["tuned"]["knnlm_ppl"],
            "knnlm_ppl_paper": t["protocols"]["paper"]["knnlm_ppl"],
            "valid_choice": {p: [t["protocols"][p][x] for x in ("lambda", "k", "temperature")] for p in ("tuned", "paper")},
            "tokens": t["tokens"]}


def prune_search(folder: Path) -> None:
    """Remove a recorded run's saved valid neighbours (N × k_max ids and distances: 1.6 GB at 50,000 tokens and
    k_max 4096), keeping its summary and tuning grid; meta.json goes first, so the folder never looks complete."""
    for name in ("meta.json", "neighbors.npy", "distances.npy"):
        (folder / name).unlink(missing_ok=True)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# the rows of the study tables: LM perplexities and the kNN-LM under both evaluation protocols
PPL_ROWS = ("train_lm_ppl", "valid_lm_ppl", "valid_knnlm_ppl", "valid_knnlm_ppl_paper")
LABELS = {"train_lm_ppl": "Train ppl LM", "valid_lm_ppl": "Valid ppl LM",
          "valid_knnlm_ppl": "Valid ppl kNN-LM, tuned (λ, k, temperature tuned on valid)",
          "valid_knnlm_ppl_paper": "Valid ppl kNN-LM, paper protocol (temperature 1, k = 1024, λ tuned)",
          "temperature": "Tuned temperature", "key_sq_norm_mean": "Mean ‖r‖² (valid keys)"}


def _over_seeds(values: dict[str, list[float]]) -> dict[str, list]:
    """{metric: [mean, std, n]} of each metric's per-seed values."""
    return {m: [*_mean_std(xs), len(xs)] for m, xs in values.items() if xs}


def _ppl_over_seeds(runs: list[dict], metrics=PPL_ROWS) -> dict[str, list]:
    """{metric: [mean, std, n]} over these runs, of each metric every run records (records made before a metric
    was recorded lack it)."""
    return _over_seeds({m: [r[m] for r in runs] for m in metrics if runs and all(m in r for r in runs)})


def _runs(records: list[dict], regularizer: str, omega: float) -> list[dict]:
    return [r for r in records if r["regularizer"] == regularizer and r["omega"] == omega]


def omega_table(records: list[dict], regularizer: str = "l2") -> dict:
    """{omega: {metric: [mean, std, n]}} over seeds."""
    return {omega: _ppl_over_seeds(_runs(records, regularizer, omega), (*PPL_ROWS, "temperature", "key_sq_norm_mean"))
            for omega in sorted({r["omega"] for r in records if r["regularizer"] == regularizer})}


def _cell(mean: float, std: float, n: int, signed: bool = False) -> str:
    """mean ± std over n seeds; a single seed has no spread to show."""
    if not math.isfinite(mean):
        return "n/a"
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{m} ± {std:.2f}" if n > 1 else m


def table_markdown(table: dict, title: str) -> str:
    omegas = list(table)
    rows = [[label] + [_cell(*table[o][m]) if m in table[o] else "–" for o in omegas] for m, label in LABELS.items()
            if any(m in table[o] for o in omegas)]
    rows.append(["seeds"] + [str(table[o]["valid_lm_ppl"][2]) for o in omegas])
    return markdown_table(title, [""] + [f"ω = {o:g}" for o in omegas], rows,
                          "Cells: mean ± std over seeds (sample std, n − 1). Both kNN-LM rows come from the same "
                          "search of each model's valid tokens.")


PAIRED_METRICS = ("valid_lm_ppl", "valid_knnlm_ppl", "valid_knnlm_ppl_paper")
PAIRED_LABELS = {"valid_lm_ppl": "valid LM", "valid_knnlm_ppl": "kNN-LM, tuned",
                 "valid_knnlm_ppl_paper": "kNN-LM, paper protocol"}


def paired_differences(records: list[dict], regularizer: str = "l2") -> dict:
    """{omega: {metric: [mean, std, n], "per_seed": {metric: {seed: difference}}, "mixed_devices": [seed, ...]}} of
    (run at ω) − (run at ω = 0 with the same seed), over the seeds that have both. `mixed_devices` lists the seeds
    whose two runs were trained on different kinds of device (a CPU and a GPU draw different dropout masks from the
    same seed, so such a pair shares the initialisation and data order but not the masks)."""
    runs = {(r["omega"], r["seed"]): r for r in records if r["regularizer"] == regularizer}
    diffs = {}
    for omega in sorted({o for o, _ in runs if o > 0}):
        pairs = {s: (runs[(omega, s)], runs[(0.0, s)]) for o, s in sorted(runs) if o == omega and (0.0, s) in runs}
        metrics = [m for m in PAIRED_METRICS if all(m in a and m in b for a, b in pairs.values())]
        if pairs:
            per_seed = {m: {str(s): a[m] - b[m] for s, (a, b) in pairs.items()} for m in metrics}
            mixed = [str(s) for s, (a, b) in pairs.items() if _device_kind(a) != _device_kind(b)]
            diffs[omega] = {**_over_seeds({m: list(v.values()) for m, v in per_seed.items()}), "per_seed": per_seed,
                            "mixed_devices": mixed}
    return diffs


def _device_kind(record: dict) -> str:
    """"cuda" or "cpu" from a record's device field ("cuda: NVIDIA H200", "cpu: AMD EPYC"); "" where unrecorded."""
    return str(record.get("device", "")).split(":")[0]


def paired_markdown(diffs: dict) -> str:
    rows = []
    for omega, d in diffs.items():
        for m, label in PAIRED_LABELS.items():
            if m in d:
                mixed = set(d.get("mixed_devices", []))
                seeds = ", ".join(f"{v:+.2f}" + ("†" if s in mixed else "") for s, v in d["per_seed"][m].items())
                rows.append([f"{omega:g}", label, _cell(*d[m], signed=True), seeds, str(d[m][2])])
    note = ("† the two runs of this seed were trained on different kinds of device (CPU and GPU): the same"
            " initialisation and data order, different dropout masks." if any(d.get("mixed_devices") for d in diffs.values())
            else "")
    return markdown_table("Against ω = 0 of the same seed (perplexity difference; negative = ω > 0 is better)",
                          ["ω", "perplexity", "mean ± std of the differences", "per seed", "seeds"], rows, note)


def best_omega(table: dict, metric: str = "valid_knnlm_ppl") -> float | None:
    """The ω > 0 with the lowest mean valid kNN-LM perplexity under a protocol's metric."""
    positive = [o for o in table if o > 0 and metric in table[o]]
    return min(positive, key=lambda o: table[o][metric][0]) if positive else None


def write_tables(records: list[dict], results: Path, study: Study) -> dict:
    table = omega_table(records, "l2")
    if not table:
        return table
    write_text(results / "table.md", table_markdown(table, f"L2 key regularizer, {study.title}"))
    write_json(results / "table.json", {f"{o:g}": v for o, v in table.items()})
    diffs = paired_differences(records, "l2")
    if diffs:
        write_text(results / "paired.md", paired_markdown(diffs))
        write_json(results / "paired.json", {f"{o:g}": v for o, v in diffs.items()})
    several = len(table) > 1  # a figure against ω needs more than one ω (a study of other objectives has only ω = 0)
    if several:
        plot_omega_curve(table, results / "figure1.png", f"L2 key regularizer, {study.title}: valid perplexity against ω")
    # how each ω's kNN-LM improves with k, under each protocol (records made before a curve was kept lack it)
    panels = {}
    for field_, label in (("valid_knnlm_ppl_by_k", "tuned: temperature and λ tuned at each k"),
                          ("valid_knnlm_ppl_t1_by_k", "paper protocol's temperature 1: λ tuned at each k")):
        curves = {}
        for omega in table:
            rs = [r[field_] for r in _runs(records, "l2", omega) if field_ in r]
            ks = set.intersection(*(set(map(int, r)) for r in rs)) if rs else set()
            if ks:
                curves[f"{omega:g}"] = {k: _mean_std([r[str(k)] for r in rs]) for k in ks}
        if curves:
            panels[label] = curves
    if panels and several:
        plot_ppl_by_k(panels, results / "ppl_by_k.png", f"L2 key regularizer, {study.title}: kNN-LM perplexity against k")
    points = [(r["key_sq_norm_mean"], r["temperature"], r["omega"]) for r in records
              if r["regularizer"] == "l2" and "key_sq_norm_mean" in r]
    if len(points) >= 2 and len({p[2] for p in points}) > 1:  # a fit through one ω says nothing
        x, y = np.log10([p[0] for p in points]), np.log10([p[1] for p in points])
        slope, intercept = np.polyfit(x, y, 1) if len(set(x)) > 1 else (float("nan"), float("nan"))
        fit = {"slope": float(slope), "intercept": float(intercept), "models": len(points),
               "ratio_T_over_sq_norm": {"min": float(min(p[1] / p[0] for p in points)),
                                        "max": float(max(p[1] / p[0] for p in points))},
               "points": [{"key_sq_norm_mean": p[0], "temperature": p[1], "omega": p[2]} for p in points]}
        write_json(results / "temperature_vs_norm.json", nan_to_null(fit))  # keys of one scale: no fit (null)
        plot_temperature_vs_norm(points, fit, results / "temperature_vs_norm.png",
                                 f"L2 key regularizer, {study.title}: tuned temperature against key scale")
    return table


# ---------------------------------------------------------------------------------------------------------------
# running many models: one after another, or several at once (`--jobs`, e.g. several trainings sharing one GPU)

def _run_task(task: tuple) -> dict:
    *args, threads, prune = task
    torch.set_num_threads(threads)
    try:
        return run_one(*args, progress=False, prune=prune)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this worker may idle while others still search: leave them the memory


class Runner:
    """Runs `run_one` tasks in order, `jobs` at a time in their own processes (spawned: CUDA does not survive a
    fork), and starts none after the deadline (`--stop-after`): a stopped sweep continues from its records."""

    def __init__(self, jobs: int = 1, stop_after: float = 0.0, threads: int = 0, prune: bool = False):
        self.jobs, self.t0, self.stop_after = max(1, jobs), time.time(), stop_after
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.jobs)
        self.prune, self.skipped = prune, 0

    def out_of_time(self) -> bool:
        return bool(self.stop_after) and time.time() - self.t0 > self.stop_after

    def run(self, tasks: list[tuple], done) -> None:
        """Run the tasks; call `done(record)` in this process as each finishes. Tasks already recorded are taken
        from their records whatever the deadline."""
        todo = []
        for task in tasks:
            rec = recorded(*task)
            if rec is not None:
                done(rec)
            else:
                todo.append(task)
        tasks = todo
        if self.jobs == 1:
            for i, task in enumerate(tasks):
                if self.out_of_time():
                    self.skipped += len(tasks) - i
                    return
                done(run_one(*task, prune=self.prune))
                kill_point("sweep", i + 1)
            return
        pending, running = list(tasks), set()
        with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                while pending or running:
                    while pending and len(running) < self.jobs and not self.out_of_time():
                        running.add(pool.submit(_run_task, (*pending.pop(0), self.threads, self.prune)))
                    if not running:
                        break
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done(f.result())
            finally:
                self.skipped += len(pending)
                for f in running:
                    f.cancel()


def run_sweep(study_path: str | Path, out: Path, overrides: list[str] = (), jobs: int = 1, stop_after: float = 0.0,
              threads: int = 0, prune: bool = False, results: str | None = None, tables_only: bool = False,
              moco_early: bool = False) -> None:
    """Run a study (see the top of this file); `tables_only`: rewrite its tables and figures from the recorded runs
    and train nothing (e.g. after the table code changed, or with records copied from another machine);
    `moco_early`: start the MOCO runs beside the grid, at the best ω > 0 of the paper protocol over the records so
    far (a machine with room for more models at once: a GPU); should the full grid choose another ω, MOCO is
    trained at that one too."""
    study_path = Path(study_path)
    study = load_study(study_path)
    study.overrides = [*study.overrides, *overrides]
    # default: results/<study name> beside the experiments/ folder the study file sits in, wherever the command runs
    results = Path(results or (study_path.parent / study.results if study.results else
                               study_path.resolve().parent.parent / "results" / study_path.stem))
    (results / "runs").mkdir(parents=True, exist_ok=True)
    load_config(study.base, study.overrides)  # fail early on a bad base config or override
    runner = Runner(jobs, stop_after, threads, prune)

    records = [read_json(p) for p in sorted((results / "runs").glob("*.json"))]
    if tables_only:
        write_tables(records, results, study)
        write_rescale_control(records, out, results, study)
        if study.objectives:
            write_objectives(records, best_weights(study, records), results, study)
        return

    def done(rec: dict) -> None:
        nonlocal records
        if rec in records:
            return  # read from its record: already in the tables (written once below, after the grid)
        records = _replace(records, rec)
        write_tables(records, results, study)
        if study.objectives:  # the weights so far on the first seed, each objective's best so far against ω = 0
            write_objectives(records, best_weights(study, records), results, study)
        write_rescale_control(records, out, results, study)  # as soon as a pair with its ω = 0 neighbours exists

    # seed-major order: a stopped study already has every ω at the first seeds
    grid = [(study, out, results, "l2", omega, seed) for seed in study.seeds for omega in study.omegas]
    early = []
    if moco_early and study.moco:  # MOCO beside the grid, at the best ω > 0 of the paper protocol so far
        so_far = omega_table(records, "l2")
        omega = best_omega(so_far, "valid_knnlm_ppl_paper") if 0.0 in so_far else None
        if omega is not None:
            print(f"MOCO at ω = {omega:g} (best ω > 0 under the paper protocol over the records so far) beside the grid",
                  flush=True)
            early = [(study, out, results, "moco", omega, seed, study.moco_overrides) for seed in study.seeds]
    # an objectives study's weights on its first seed need no ω = 0 record: they run beside the grid
    weights = objective_tasks(study, out, results)
    runner.run(grid + early + weights, done)
    table = write_tables(records, results, study)
    if study.objectives and not runner.skipped:
        run_objectives(study, out, results, runner, lambda: records, done)
    if runner.skipped:
        print(f"stopped after {stop_after:g} s: {runner.skipped} runs not started; rerun the same command to continue",
              flush=True)
        return

    if all(o > 0 for o in table) or not any(o > 0 for o in table):
        return
    best = {"tuned": best_omega(table, "valid_knnlm_ppl"), "paper": best_omega(table, "valid_knnlm_ppl_paper")}
    # the test split first: a few minutes, against ~30 for each MOCO run
    records = write_test_results(study, out, results, records, best)
    write_rescale_control(records, out, results, study)
    if study.moco:
        # MOCO at the ω > 0 that the paper protocol favours: where the paper saw its regularizers help (runs
        # recorded already, e.g. by --moco-early at the same ω, are taken from their records; none starts late)
        runner.run([(study, out, results, "moco", best["paper"], seed, study.moco_overrides) for seed in study.seeds],
                   lambda rec: (done(rec), write_moco_comparison(records, best["paper"], results, study)))
        write_moco_comparison(records, best["paper"], results, study)
        if runner.skipped:
            print(f"stopped after {stop_after:g} s: {runner.skipped} MOCO runs not started; rerun to continue", flush=True)


def _valid_choice(record: dict) -> dict:
    return {"tuned": [record["lambda"], record["k"], record["temperature"]],
            "paper": [record["paper_lambda"], record["paper_k"], PAPER_TEMPERATURE]}


def _replace(records: list[dict], rec: dict) -> list[dict]:
    return [r for r in records if r["name"] != rec["name"]] + [rec]


def write_moco_comparison(records: list[dict], omega: float, results: Path, study: Study) -> None:
    groups = {"l2": _runs(records, "l2", omega), "moco": _runs(records, "moco", omega),
              "none (ω = 0)": _runs(records, "l2", 0.0)}
    rows = {label: _ppl_over_seeds(rs) for label, rs in groups.items() if rs}
    if "moco" not in rows:
        return
    metrics = [m for m in PPL_ROWS if all(m in v for v in rows.values())]
    write_json(results / "moco_vs_l2.json", {"omega": omega, "rows": rows})
    write_text(results / "moco_vs_l2.md", markdown_table(
        f"MOCO vs L2 at ω = {omega:g}, {study.title} (mean ± std over seeds)",
        ["regularizer", *(LABELS[m] for m in metrics), "seeds"],
        [[reg, *(_cell(*v[m]) for m in metrics), str(v["valid_lm_ppl"][2])] for reg, v in rows.items()]))
    plot_regularizer_comparison(rows, results / "moco_vs_l2.png", f"MOCO vs L2 at ω = {omega:g}, {study.title}")


def test_records(study: Study, out: Path, results: Path, records: list[dict], wanted) -> list[dict]:
    """The records, those that `wanted(record)` with their test figures: a record made before runs kept them gets
    them now from its run folder (and is rewritten); one whose folder is gone keeps none and is left out of the
    test table."""
    done = []
    for r in records:
        if wanted(r) and _valid_choice(r) != r.get("test", {}).get("valid_choice"):
            run = out / r["name"]
            if not (run / "datastore" / "meta.json").is_file() or not (run / "eval" / "valid" / "summary.json").is_file():
                continue
            print(f"== {r['name']}: test split", flush=True)
            extra = study.moco_overrides if r["regularizer"] == "moco" else []
            r = {**r, "test": test_figures(run, run_config(study, r["regularizer"], r["omega"], r["seed"], extra))}
            write_json(results / "runs" / f"{r['name']}.json", r)
        done.append(r)
    return done


def write_test_results(study: Study, out: Path, results: Path, records: list[dict], best: dict) -> list[dict]:
    """Test perplexities of ω = 0 and of the best ω > 0 of each protocol (chosen on valid), each run with its
    protocols' own λ, k, temperature from valid; and the per-seed differences against ω = 0. Returns the records,
    with test figures where they were added."""
    omegas = sorted({0.0, *best.values()})
    records = test_records(study, out, results, records, lambda r: r["regularizer"] == "l2" and r["omega"] in omegas)
    metrics = {"test_lm_ppl": "lm_ppl", "test_knnlm_ppl": "knnlm_ppl", "test_knnlm_ppl_paper": "knnlm_ppl_paper"}
    base = {r["seed"]: r["test"] for r in _runs(records, "l2", 0.0) if "test" in r}
    rows = {}
    for omega in omegas:
        runs = [r for r in _runs(records, "l2", omega) if "test" in r]
        if not runs:
            continue
        rows[f"{omega:g}"] = {
            **{m: _mean_std([r["test"][f] for r in runs]) for m, f in metrics.items()},
            "seeds": len(runs),
            "best_under": [p for p, o in best.items() if o == omega],
            "valid_choice": {r["name"]: r["test"]["valid_choice"] for r in runs},  # [λ, k, temperature] per protocol
            "minus_omega0": _over_seeds({m: [r["test"][f] - base[r["seed"]][f] for r in runs if r["seed"] in base]
                                         for m, f in metrics.items()}) if omega > 0 else {},
        }
    if not rows:
        return records
    write_json(results / "test.json", nan_to_null(rows))
    cols = ("test_lm_ppl", "test_knnlm_ppl", "test_knnlm_ppl_paper")
    write_text(results / "test.md", markdown_table(
        f"Test perplexity, {study.title} (each protocol's λ, k, temperature chosen on valid; mean ± std over seeds; "
        "in brackets, the mean ± std of the per-seed differences against ω = 0 of the same seed)",
        ["ω", "chosen as the best ω > 0 by", "test LM", "test kNN-LM, tuned", "test kNN-LM, paper protocol", "seeds"],
        [[o, ", ".join(v["best_under"]) or "–",
          *(_cell(*v[m], v["seeds"]) + (f" ({_cell(*v['minus_omega0'][m], signed=True)})" if m in v["minus_omega0"] else "")
            for m in cols), str(v["seeds"])] for o, v in rows.items()]))
    return records


def rescaled_ppl(arrays: tuple, cfg: Config, temperature: float) -> float:
    """Valid kNN-LM perplexity of a run at k = 1024 (the paper protocol's k) and a given temperature, λ tuned, from
    its saved neighbours (`tuning_arrays(run, "valid")`). Dividing distances by T is what scaling every key (stored
    and query) by 1/√T does."""
    targets, lm, dists, nvals = arrays
    knn = knn_logprob(dists, nvals, targets, paper_k(cfg), temperature)
    return min(perplexities(lm, knn, cfg.eval.lmbda))


def write_rescale_control(records: list[dict], out: Path, results: Path, study: Study) -> None:
    """The rescaling control: does a uniform rescaling of the ω = 0 model's keys give what ω > 0 gives at
    temperature 1?

    For each ω > 0 and seed, the ω = 0 model of the same seed is evaluated at T = ‖r_0‖² / ‖r_ω‖² (mean squared key
    norms on valid), which is temperature 1 after scaling its keys to the regularized model's scale. `recovered` is
    (ppl_0(T=1) − ppl_0(T)) / (ppl_0(T=1) − ppl_ω(T=1)): the share of the temperature-1 gain of ω > 0 that the
    rescaling alone gives. Needs the ω = 0 runs' saved neighbours (their run folders); a pair computed before from
    the same records keeps its figures, also where its ω = 0 folder is gone since (e.g. trained on a GPU machine)."""
    base = {r["seed"]: r for r in _runs(records, "l2", 0.0)}
    pairs = [(r, base[r["seed"]]) for r in records if r["regularizer"] == "l2" and r["omega"] > 0 and r["seed"] in base
             and all(f in x for x in (r, base[r["seed"]]) for f in ("key_sq_norm_mean", "valid_knnlm_ppl_paper"))]
    want = {r["name"]: [r0["name"], r["key_sq_norm_mean"], r0["key_sq_norm_mean"]] for r, r0 in pairs}
    path = results / "rescale.json"
    old = read_json(path, "rescaling control") if path.is_file() else {}
    if old.get("inputs") == want:
        return
    per_run, loaded = {}, {}  # loaded: one ω = 0 run's saved neighbours (1.6 GB), read once for all its pairs
    for r, r0 in sorted(pairs, key=lambda p: p[1]["name"]):
        run0 = out / r0["name"]
        if old.get("inputs", {}).get(r["name"]) == want[r["name"]]:  # computed before from the same records; its
            per_run[r["name"]] = old["per_run"][r["name"]]            # ω = 0 folder may be gone (another machine's)
            continue
        if not (run0 / "eval" / "valid" / "meta.json").is_file() or not (run0 / "datastore" / "meta.json").is_file():
            continue
        cfg = run_config(study, "l2", 0.0, r0["seed"])
        T = r0["key_sq_norm_mean"] / r["key_sq_norm_mean"]
        if r0["name"] not in loaded:
            loaded = {r0["name"]: tuning_arrays(run0, "valid")}
        p0_T = rescaled_ppl(loaded[r0["name"]], cfg, T)
        p0_1, pw_1 = r0["valid_knnlm_ppl_paper"], r["valid_knnlm_ppl_paper"]
        gain = p0_1 - pw_1
        per_run[r["name"]] = {"omega": r["omega"], "seed": r["seed"], "temperature_match": T,
                              "omega0_t1": p0_1, "omega0_rescaled": p0_T, "omega_t1": pw_1,
                              "omega0_tuned": r0["valid_knnlm_ppl"], "omega_tuned": r["valid_knnlm_ppl"],
                              "recovered": (p0_1 - p0_T) / gain if gain > 0 else float("nan")}
    if not per_run:
        return
    summary = {}
    for omega in sorted({v["omega"] for v in per_run.values()}):
        vs = [v for v in per_run.values() if v["omega"] == omega]
        summary[f"{omega:g}"] = _over_seeds({m: [v[m] for v in vs] for m in
                                             ("temperature_match", "omega0_t1", "omega0_rescaled", "omega_t1", "recovered")})
    write_json(path, nan_to_null({"inputs": {n: want[n] for n in per_run}, "per_run": per_run, "summary": summary,
                                  "note": write_rescale_control.__doc__.split("\n\n")[1].strip()}))  # undefined: null
    write_text(results / "rescale.md", markdown_table(
        f"Rescaling control, {study.title}: the ω = 0 model at the temperature that matches ω's key scale "
        "(k = 1024, λ tuned; mean ± std over seeds)",
        ["ω", "T = ‖r_0‖²/‖r_ω‖²", "ω = 0 at T = 1", "ω = 0 rescaled (at T)", "ω at T = 1",
         "share of ω's T = 1 gain recovered", "seeds"],
        [[o, *(_cell(*v[m]) for m in ("temperature_match", "omega0_t1", "omega0_rescaled", "omega_t1", "recovered")),
          str(v["omega0_t1"][2])] for o, v in summary.items()],
        "Cells: perplexity on the valid tokens the study evaluates. `share recovered` = (ω=0 at T=1 − ω=0 rescaled) / "
        "(ω=0 at T=1 − ω at T=1); 1 means a plain rescaling of the unregularized keys gives all of ω's gain at "
        "temperature 1; it is undefined (nan) where ω does not beat ω = 0 at temperature 1."))


# ---------------------------------------------------------------------------------------------------------------
# other objectives against ω = 0 (issue: training with kNN in mind that still helps once the temperature is tuned)

def objective_tasks(study: Study, out: Path, results: Path) -> list[tuple]:
    """Each objective's weights on the first seed, taken in turn (each objective's first weight, then each one's
    second, ...): a study stopped part-way has tried every objective."""
    ws = list(study.objectives.items())
    return [(study, out, results, name, weights[i], study.seeds[0])
            for i in range(max((len(w) for _, w in ws), default=0)) for name, weights in ws if i < len(weights)]


def run_objectives(study: Study, out: Path, results: Path, runner: Runner, current, done) -> None:
    """Each objective's weights on the first seed, then its best weight (tuned protocol) on the other seeds."""
    rest = study.seeds[1:]
    runner.run(objective_tasks(study, out, results), done)  # recorded beside the grid unless stopped
    if runner.skipped:
        return
    best = best_weights(study, current())
    runner.run([(study, out, results, name, w, seed) for name, w in best.items() for seed in rest], done)
    write_objectives(current(), best, results, study)


def best_weights(study: Study, records: list[dict]) -> dict[str, float]:
    """Each objective's weight with the lowest tuned kNN-LM perplexity on the first seed, among those recorded."""
    best = {}
    for name, ws in study.objectives.items():
        tried = [r for r in records if r["regularizer"] == name and r["seed"] == study.seeds[0] and r["omega"] in ws]
        if tried:
            best[name] = min(tried, key=lambda r: r["valid_knnlm_ppl"])["omega"]
    return best


def step_costs(path: str) -> tuple[dict[str, float], str]:
    """({regularizer: seconds per training step / that of ω = 0}, the machine) from a `benchmarks/training.py
    --regularizers` JSON; ({}, "") without one."""
    if not path:
        return {}, ""
    bench = read_json(path, "training benchmark")
    try:
        steps = {row["regularizer"]: row["seconds_per_step"] for row in bench["objectives"] if "regularizer" in row}
        machine = bench["machine"].get("gpu") or f"{bench['machine']['cpu']}, {bench['machine']['cores']} cores"
        return {name: t / steps["none"] for name, t in steps.items() if name != "none"}, machine
    except (KeyError, TypeError, AttributeError, ZeroDivisionError):
        raise UserError(f"{path}: expected the JSON of `benchmarks/training.py --regularizers` (a row per "
                        "regularizer, `none` among them)") from None


def write_objectives(records: list[dict], best: dict[str, float], results: Path, study: Study) -> None:
    """objectives.md / .json / .png: every weight on the first seed, and each objective's best weight against ω = 0
    of the same seed over all seeds (both protocols, the LM, and the cost per training step against ω = 0 from the
    study's `step_benchmark`)."""
    base = {r["seed"]: r for r in _runs(records, "l2", 0.0)}
    first = study.seeds[0]
    cost, machine = step_costs(study.step_benchmark)
    rows, out = [], {"best": best, "weights": {}, "paired": {}, "step_cost_vs_omega0": cost, "step_cost_machine": machine}
    for name, weights in study.objectives.items():
        for w in weights:
            r = next((r for r in records if r["regularizer"] == name and r["omega"] == w and r["seed"] == first), None)
            if r is not None:
                out["weights"][f"{name} {w:g}"] = {m: r[m] for m in PPL_ROWS}
    for name, w in best.items():
        pairs = [(r, base[r["seed"]]) for r in _runs(records, name, w) if r["seed"] in base]
        if not pairs:
            continue
        per_seed = {m: [a[m] - b[m] for a, b in pairs] for m in PAIRED_METRICS}
        # the runs' own training times, only between runs of one kind of device (a CPU run against an H200 one says
        # nothing); kept in the JSON, not the table: they include whatever else the machine ran at the time
        time_ratio = [a["seconds"]["train_compute"] / b["seconds"]["train_compute"] - 1 for a, b in pairs
                      if _device_kind(a) == _device_kind(b)] or [float("nan")]
        lm_rel = [a["valid_lm_ppl"] / b["valid_lm_ppl"] - 1 for a, b in pairs]
        d = {**_over_seeds(per_seed), "train_time_vs_omega0": list(_mean_std(time_ratio)), "lm_relative": list(_mean_std(lm_rel)),
             "weight": w, "devices": sorted({str(x.get("device", "not recorded")) for pair in pairs for x in pair}),
             "seeds": [a["seed"] for a, _ in pairs], "per_seed": per_seed,
             "mixed_devices": [a["seed"] for a, b in pairs if _device_kind(a) != _device_kind(b)],
             "absolute": _ppl_over_seeds([a for a, _ in pairs])}
        mean, std, n = d["valid_knnlm_ppl"]
        d["goal_met"] = bool(n >= 3 and mean < -2 * std and abs(d["lm_relative"][0]) <= 0.01)
        out["paired"][name] = d
        rows.append([name, f"{w:g}", _cell(*d["absolute"]["valid_lm_ppl"]), _cell(*d["absolute"]["valid_knnlm_ppl"]),
                     _cell(*d["absolute"]["valid_knnlm_ppl_paper"]), _cell(*d["valid_lm_ppl"], signed=True),
                     _cell(*d["valid_knnlm_ppl"], signed=True), _cell(*d["valid_knnlm_ppl_paper"], signed=True),
                     f"{cost[name]:.2f}×" if name in cost else "n/a",
                     str(n) + ("†" if d["mixed_devices"] else ""), "yes" if d["goal_met"] else "no"])
    write_json(results / "objectives.json", nan_to_null(out))
    weight_rows = [[k, *(_cell(v[m], 0, 1) for m in PPL_ROWS)] for k, v in out["weights"].items()]
    write_text(results / "objectives.md", markdown_table(
        f"Objectives against ω = 0 of the same seed, {study.title} (mean ± std over seeds)",
        ["objective", "weight", "valid LM", "kNN-LM tuned", "kNN-LM paper", "Δ LM", "Δ kNN-LM tuned", "Δ kNN-LM paper",
         "training step vs ω = 0", "seeds", "goal met"], rows,
        "Δ: the objective's run minus ω = 0 of the same seed (negative = better). Goal: Δ kNN-LM tuned below −2 std "
        "of the paired differences over ≥ 3 seeds, with the LM within 1 %. †: some pairs were trained on different "
        "kinds of device (same initialisation and data order, other dropout masks: a device's own offset, see the "
        "README). Training step: seconds per step with the objective over seconds without (ω = 0), measured side "
        f"by side on {machine or 'no machine: the study names no step_benchmark'} "
        f"({'/'.join(Path(study.step_benchmark).parts[-2:]) if study.step_benchmark else 'n/a'}).")
        + "\n" + markdown_table(f"Every weight on seed {first}", ["objective, weight", *(LABELS[m] for m in PPL_ROWS)],
                                 weight_rows))
    if out["paired"]:
        plot_paired_objectives(out["paired"], results / "objectives.png",
                               f"Objectives against ω = 0 of the same seed, {study.title}")


# ---------------------------------------------------------------------------------------------------------------
# one run trained on two devices (`knnlm twins`): a device's own effect, to weigh pairs across devices

def _records_by_name(folders: list[Path]) -> dict[str, dict]:
    """{run name: record} over study-record folders; a folder listed earlier wins."""
    found = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: expected a folder of study records (<name>.json)")
        for path in sorted(Path(folder).glob("*.json")):
            record = read_json(path, "study record")
            if isinstance(record, dict) and "name" in record and "valid_lm_ppl" in record:
                found.setdefault(record["name"], record)
    return found


def device_twins(first: list[Path], second: list[Path]) -> dict:
    """Runs recorded in both sets of folders with the same training settings on two different devices: per run,
    the first set's record minus the second's (valid LM and kNN-LM under both protocols), and mean ± std over runs.
    Training settings must match (evaluation settings may differ: the pairs are compared on the metrics both have)."""
    a, b = _records_by_name(first), _records_by_name(second)
    twins = {}
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.get("device") == y.get("device"):
            continue
        if any(not c.startswith("eval.") for c in changed_settings(y.get("config", {}), x.get("config", {}))):
            continue
        twins[name] = {"devices": [x.get("device", ""), y.get("device", "")],
                       **{m: x[m] - y[m] for m in PAIRED_METRICS if m in x and m in y}}
    over = _over_seeds({m: [t[m] for t in twins.values() if m in t] for m in PAIRED_METRICS})
    return {"runs": twins, "mean_std_n": over}


def twins_markdown(twins: dict) -> str:
    rows = [[name, *t["devices"], *(f"{t[m]:+.2f}" if m in t else "" for m in PAIRED_LABELS)]
            for name, t in twins["runs"].items()]
    over = twins["mean_std_n"]
    rows.append(["mean ± std", "", "", *(_cell(*over[m], signed=True) if m in over else "" for m in PAIRED_LABELS)])
    return markdown_table("One run trained on two devices (same settings and seed): first − second",
                          ["run", "first device", "second device", *(f"Δ {v}" for v in PAIRED_LABELS.values())], rows,
                          "Same initialisation and data order; a CPU and a GPU draw different dropout masks from the "
                          "same seed and round differently, so a difference is the device's own effect plus noise.")
