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
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifacts import UserError, load_npy, read_json, write_json, write_text
from .config import Config, load_config


@dataclass
class Study:
    base: str
    omegas: list[float]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    moco: bool = True
    moco_overrides: list[str] = field(default_factory=list)
    results: str = ""  # where the committed numbers go (default results/<study name>)


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
    study = Study(**raw)
    study.base = str((path.parent / study.base).resolve())
    if not study.omegas or not study.seeds:
        raise UserError(f"{path}: omegas and seeds must be non-empty")
    return study


def run_name(regularizer: str, omega: float, seed: int) -> str:
    return f"{regularizer}_omega{omega:g}_seed{seed}"


def key_statistics(run: Path, cfg: Config) -> dict:
    """How the regularizer acted: key norms on valid, and the key layer norm's gain and bias (a penalty on a
    LayerNorm output can be met by shrinking these two vectors instead of changing the representation)."""
    from .checkpoint import load_model

    q = load_npy(run / "eval" / "valid" / "query_keys.npy", mmap=True)
    sq = np.square(np.asarray(q[:50000], dtype=np.float32)).sum(1)
    model, _, _ = load_model(run)
    stats = {"key_sq_norm_mean": float(sq.mean()), "key_sq_norm_std": float(sq.std())}
    ln = model.key_module()
    if ln is not None:
        stats["ln_gain_abs_mean"] = float(ln.weight.detach().abs().mean())
        stats["ln_gain_sq_sum"] = float(ln.weight.detach().pow(2).sum())
        stats["ln_bias_sq_sum"] = float(ln.bias.detach().pow(2).sum())
    return stats


def best_by_k(grid: list[dict]) -> dict[str, float]:
    """The best perplexity at each k of a tuning grid (temperature and λ tuned at that k)."""
    best: dict[str, float] = {}
    for row in grid:
        k = str(row["k"])
        best[k] = min(best.get(k, math.inf), row["ppl"])
    return best


def run_config(study: Study, regularizer: str, omega: float, seed: int, extra: list[str] = ()) -> Config:
    """The configuration of one run of the study: its base and overrides, then the run's own settings."""
    return load_config(study.base, [*study.overrides, *extra, f"train.regularizer={regularizer}",
                                    f"train.omega={omega}", f"train.seed={seed}"])


def run_one(study: Study, out: Path, results: Path, regularizer: str, omega: float, seed: int,
            extra: list[str] = ()) -> dict:
    """Train/datastore/evaluate one model unless its record exists; write the record as soon as it is done."""
    from .cli import run_pipeline

    name = run_name(regularizer, omega, seed)
    record_path = results / "runs" / f"{name}.json"
    cfg = run_config(study, regularizer, omega, seed, extra)
    if record_path.is_file():
        record = read_json(record_path, "study record")
        changed = changed_settings(record.get("config", {}), cfg.to_dict())
        if not changed:
            return record
        if any(not c.startswith("eval.") for c in changed):
            raise UserError(f"{record_path}: recorded with other settings ({', '.join(changed)}); "
                            "move the record away to redo the run")
        model_kept = (out / name / "train_summary.json").is_file()
        print(f"== {name}: {'evaluating again' if model_kept else 'training again (its run folder is gone)'} "
              f"({', '.join(changed)} changed)", flush=True)
    else:
        print(f"== {name}", flush=True)
    res = run_pipeline(cfg, out / name)
    v = res["valid"]
    record = {
        "name": name, "regularizer": regularizer, "omega": omega, "seed": seed,
        "train_lm_ppl": res["train"]["train_ppl"], "valid_lm_ppl": v["lm_ppl"], "valid_knnlm_ppl": v["knnlm_ppl"],
        "lambda": v["lambda"], "k": v["k"], "temperature": v["temperature"],
        "target_in_neighbors": v["target_in_neighbors"], "epochs": res["train"]["epochs"],
        "valid_knnlm_ppl_by_k": best_by_k(read_json(out / name / "eval" / "valid" / "tuning.json", "tuning grid")),
        "seconds": {**res["seconds"], "train_compute": res["train"]["train_seconds"]},
        **key_statistics(out / name, cfg),
        "config": cfg.to_dict(),
    }
    write_json(record_path, record)
    return record


def changed_settings(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """The `section.key` settings whose values differ; settings a record lacks (added to knnlm since) count as
    unchanged. Only evaluation settings may change under a finished run: its model is reused."""
    changed = []
    for key, value in current.items():
        if key not in recorded:
            continue
        if isinstance(value, dict) and isinstance(recorded[key], dict):
            changed += changed_settings(recorded[key], value, f"{prefix}{key}.")
        elif recorded[key] != value:
            changed.append(f"{prefix}{key}")
    return changed


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


PPL_ROWS = ("train_lm_ppl", "valid_lm_ppl", "valid_knnlm_ppl")


def _over_seeds(values: dict[str, list[float]]) -> dict[str, list]:
    """{metric: [mean, std, n]} of each metric's per-seed values."""
    return {m: [*_mean_std(xs), len(xs)] for m, xs in values.items()}


def _ppl_over_seeds(runs: list[dict]) -> dict[str, list]:
    """{metric: [mean, std, n]} of train LM, valid LM and valid kNN-LM perplexity over these runs."""
    return _over_seeds({m: [r[m] for r in runs] for m in PPL_ROWS})


def _runs(records: list[dict], regularizer: str, omega: float) -> list[dict]:
    return [r for r in records if r["regularizer"] == regularizer and r["omega"] == omega]


def omega_table(records: list[dict], regularizer: str = "l2") -> dict:
    """{omega: {metric: [mean, std, n]}} over seeds."""
    return {omega: _ppl_over_seeds(_runs(records, regularizer, omega))
            for omega in sorted({r["omega"] for r in records if r["regularizer"] == regularizer})}


def _cell(mean: float, std: float, n: int, signed: bool = False) -> str:
    """mean ± std over n seeds; a single seed has no spread to show."""
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{m} ± {std:.2f}" if n > 1 else m


def table_markdown(table: dict, title: str) -> str:
    labels = {"train_lm_ppl": "Train ppl LM", "valid_lm_ppl": "Valid ppl LM", "valid_knnlm_ppl": "Valid ppl kNN-LM"}
    omegas = list(table)
    head = "| | " + " | ".join(f"ω = {o:g}" for o in omegas) + " |"
    lines = [f"### {title}", "", head, "|---" * (len(omegas) + 1) + "|"]
    for m, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(_cell(*table[o][m]) for o in omegas) + " |")
    lines.append("| seeds | " + " | ".join(str(table[o]["valid_lm_ppl"][2]) for o in omegas) + " |")
    return "\n".join(lines) + "\n"


def paired_differences(records: list[dict], regularizer: str = "l2") -> dict:
    """{omega: {metric: [mean, std, n]}} of (run at ω) − (run at ω = 0 with the same seed), over the seeds that
    have both."""
    runs = {(r["omega"], r["seed"]): r for r in records if r["regularizer"] == regularizer}
    diffs = {}
    for omega in sorted({o for o, _ in runs if o > 0}):
        pairs = [(runs[(omega, s)], runs[(0.0, s)]) for o, s in sorted(runs) if o == omega and (0.0, s) in runs]
        if pairs:
            diffs[omega] = _over_seeds({m: [a[m] - b[m] for a, b in pairs] for m in ("valid_lm_ppl", "valid_knnlm_ppl")})
    return diffs


def paired_markdown(diffs: dict) -> str:
    lines = ["### Against ω = 0 of the same seed (mean ± std of the per-seed differences; negative = better)", "",
             "| ω | valid LM | valid kNN-LM | seeds |", "|---|---|---|---|"]
    for omega, d in diffs.items():
        lines.append(f"| {omega:g} | {_cell(*d['valid_lm_ppl'], signed=True)} | {_cell(*d['valid_knnlm_ppl'], signed=True)} "
                     f"| {d['valid_lm_ppl'][2]} |")
    return "\n".join(lines) + "\n"


def best_omega(table: dict) -> float | None:
    """The ω > 0 with the lowest mean valid kNN-LM perplexity."""
    positive = [o for o in table if o > 0]
    return min(positive, key=lambda o: table[o]["valid_knnlm_ppl"][0]) if positive else None


def write_tables(records: list[dict], results: Path) -> dict:
    from .plots import plot_omega_curve, plot_ppl_by_k

    table = omega_table(records, "l2")
    if not table:
        return table
    write_text(results / "table.md", table_markdown(table, "L2 activation regularization on WikiText-2 (mean ± std over seeds)"))
    write_json(results / "table.json", {f"{o:g}": v for o, v in table.items()})
    diffs = paired_differences(records, "l2")
    if diffs:
        write_text(results / "paired.md", paired_markdown(diffs))
        write_json(results / "paired.json", {f"{o:g}": v for o, v in diffs.items()})
    plot_omega_curve(table, results / "figure1.png", "L2 regularizer: valid perplexity against ω")
    # how each ω's kNN-LM improves with k (records made before this was recorded have no curve)
    curves = {}
    for omega in table:
        rs = [r["valid_knnlm_ppl_by_k"] for r in records
              if r["regularizer"] == "l2" and r["omega"] == omega and "valid_knnlm_ppl_by_k" in r]
        ks = set.intersection(*(set(map(int, r)) for r in rs)) if rs else set()
        if ks:
            curves[f"{omega:g}"] = {k: _mean_std([r[str(k)] for r in rs]) for k in ks}
    if curves:
        plot_ppl_by_k(curves, results / "ppl_by_k.png", "L2 regularizer: kNN-LM perplexity against k")
    return table


def run_sweep(study_path: str | Path, out: Path, overrides: list[str] = ()) -> None:
    study_path = Path(study_path)
    study = load_study(study_path)
    study.overrides = [*study.overrides, *overrides]
    results = Path(study.results) if study.results else Path("results") / study_path.stem
    (results / "runs").mkdir(parents=True, exist_ok=True)
    load_config(study.base, study.overrides)  # fail early on a bad base config or override

    records = [read_json(p) for p in sorted((results / "runs").glob("*.json"))]
    # seed-major order: a stopped study already has every ω at the first seeds
    for seed in study.seeds:
        for omega in study.omegas:
            records = _replace(records, run_one(study, out, results, "l2", omega, seed))
            write_tables(records, results)
    table = write_tables(records, results)

    best = best_omega(table)
    if best is None:
        return
    # the test split first: a few minutes, against ~30 for each MOCO run
    inputs = {o: _runs(records, "l2", o) for o in (0.0, best)}
    if not _test_done(results, inputs):
        write_test_results(study, out, results, inputs)
    if study.moco:
        for seed in study.seeds:
            records = _replace(records, run_one(study, out, results, "moco", best, seed, study.moco_overrides))
            write_moco_comparison(records, best, results)


def _valid_choice(record: dict) -> list:
    return [record["lambda"], record["k"], record["temperature"]]


def _test_done(results: Path, inputs: dict[float, list[dict]]) -> bool:
    """Whether test.json already holds these runs with the λ, k, temperature their records now choose on valid
    (a re-evaluated record may have chosen others)."""
    if not (results / "test.json").is_file():
        return False
    rows = read_json(results / "test.json", "test results")
    want = {f"{o:g}": {r["name"]: _valid_choice(r) for r in rs} for o, rs in inputs.items()}
    return {o: v.get("valid_choice") for o, v in rows.items()} == want


def _replace(records: list[dict], rec: dict) -> list[dict]:
    return [r for r in records if r["name"] != rec["name"]] + [rec]


def write_moco_comparison(records: list[dict], omega: float, results: Path) -> None:
    from .plots import plot_regularizer_comparison

    groups = {"l2": _runs(records, "l2", omega), "moco": _runs(records, "moco", omega),
              "none (ω = 0)": _runs(records, "l2", 0.0)}
    rows = {label: _ppl_over_seeds(rs) for label, rs in groups.items() if rs}
    write_json(results / "moco_vs_l2.json", {"omega": omega, "rows": rows})
    lines = [f"### MOCO vs L2 at ω = {omega:g} (mean ± std over seeds)", "",
             "| regularizer | train LM | valid LM | valid kNN-LM | seeds |", "|---|---|---|---|---|"]
    for reg, v in rows.items():
        lines.append(f"| {reg} | " + " | ".join(_cell(*v[m]) for m in PPL_ROWS)
                     + f" | {v['valid_lm_ppl'][2]} |")
    write_text(results / "moco_vs_l2.md", "\n".join(lines) + "\n")
    plot_regularizer_comparison(rows, results / "moco_vs_l2.png", f"MOCO vs L2 at ω = {omega:g}")


def write_test_results(study: Study, out: Path, results: Path, inputs: dict[float, list[dict]]) -> None:
    """Test perplexities of the records of ω = 0 and the best ω, once, with λ, k, temperature chosen on valid."""
    from .evaluate import evaluate

    rows = {}
    for omega, runs in inputs.items():
        per_seed, choice = [], {}
        for r in runs:
            run = out / r["name"]
            if not (run / "datastore" / "meta.json").is_file():
                continue
            cfg = run_config(study, r["regularizer"], omega, r["seed"])
            per_seed.append(evaluate(run, cfg, "test", progress=False))
            choice[r["name"]] = _valid_choice(r)
        if per_seed:
            rows[f"{omega:g}"] = {
                "test_lm_ppl": _mean_std([s["lm_ppl"] for s in per_seed]),
                "test_knnlm_ppl": _mean_std([s["knnlm_ppl"] for s in per_seed]),
                "seeds": len(per_seed),
                "valid_choice": choice,  # each run's λ, k, temperature from valid, as used on test
            }
    write_json(results / "test.json", rows)
    lines = ["### Test perplexity (λ, k, temperature chosen on valid; mean ± std over seeds)", "",
             "| ω | test LM | test kNN-LM | seeds |", "|---|---|---|---|"]
    for o, v in rows.items():
        lines.append(f"| {o} | {_cell(*v['test_lm_ppl'], v['seeds'])} | {_cell(*v['test_knnlm_ppl'], v['seeds'])} | {v['seeds']} |")
    write_text(results / "test.md", "\n".join(lines) + "\n")

