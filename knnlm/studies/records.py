"""One run of a study and its record: train, build the datastore and evaluate by the same `run_pipeline` as
`knnlm run`, then keep its numbers in `RESULTS/runs/<name>.json` at once.

Commit the records: a stopped study continues from what is recorded and reuses finished models; a record made with
other evaluation settings (e.g. a wider k grid) is evaluated again from its trained model, and one made with other
training settings stops the study. Every table and figure of a study is computed from these records alone
(`knnlm/studies/statistics.py`, `knnlm/studies/stages/`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import safetensors
import torch

from ..artifacts import UserError, cpu_name, load_npy, read_json, write_json
from ..checkpoint import load_model
from ..config import Config, changed_settings, load_config
from ..evaluate import PAPER_TEMPERATURE, evaluate, protocol_rows
from ..pipeline import run_pipeline
from .study import Study


def run_name(regularizer: str, omega: float, seed: int) -> str:
    return f"{regularizer}_omega{omega:g}_seed{seed}"


def key_statistics(run: Path, cfg: Config) -> dict:
    """How the regularizer acted: key norms on valid, the key layer norm's gain and bias (a penalty on a LayerNorm
    output can be met by shrinking these two vectors instead of changing the representation), and a regularizer's
    learned temperature τ where it has one (`log_tau`, squared-distance units as the evaluation's), to set beside
    the tuned one."""
    q = load_npy(run / "eval" / "valid" / "query_keys.npy", mmap=True)
    sq = np.square(np.asarray(q[:50000], dtype=np.float32)).sum(1)
    model, _, meta = load_model(run)
    stats = {"key_sq_norm_mean": float(sq.mean()), "key_sq_norm_std": float(sq.std())}
    state = Path(meta["path"]) / "regularizer.safetensors"
    if state.is_file():
        with safetensors.safe_open(str(state), "pt") as f:  # read lazily: a MOCO queue is hundreds of MB
            if "log_tau" in f.keys():
                stats["knn_tau"] = math.exp(float(f.get_tensor("log_tau")))
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
        **({"held_out": held_out_figures(v["held_out"])} if v.get("held_out") else {}),
        "config": cfg.to_dict(),
    }
    record["test"] = test_figures(out / name, cfg, res.get("test"))
    write_json(record_path, record)
    if prune:
        prune_search(out / name / "eval" / "test")
        if omega > 0:
            prune_search(out / name / "eval" / "valid")
    return record


def held_out_figures(held: dict) -> dict:
    """What a record keeps of valid's held-out choice (`knnlm.evaluate.held_out_selection`): per protocol, the
    choice made on valid's first half, its perplexity on the second half, and the whole-valid choice's there."""
    return {"scored_on": held["scored_on"], "lm_ppl": held["lm_ppl"],
            **{p: {"choice": [c["lambda"], c["k"], c["temperature"]], "knnlm_ppl": c["knnlm_ppl"],
                   "whole_valid_choice_ppl": c["whole_valid_choice_ppl"]} for p, c in held["protocols"].items()}}


def test_figures(run: Path, cfg: Config, summary: dict | None = None) -> dict:
    """A run's test perplexities under each protocol's own choice of λ, k and temperature on valid. Kept in its
    record as soon as the model is evaluated, so that the test table needs no run folder later (a GPU's runs are
    gone with the machine). Nothing is chosen on test: the study's tables pick ω on valid alone."""
    t = summary or evaluate(run, cfg, "test", progress=False)
    return {"lm_ppl": t["lm_ppl"], "knnlm_ppl": t["protocols"]["tuned"]["knnlm_ppl"],
            "knnlm_ppl_paper": t["protocols"]["paper"]["knnlm_ppl"],
            "valid_choice": {p: [t["protocols"][p][x] for x in ("lambda", "k", "temperature")] for p in ("tuned", "paper")},
            "tokens": t["tokens"],
            # scored with the choices valid's first half made (summaries since 2026-12-06)
            **({"held_out": {p: c["knnlm_ppl"] for p, c in t["held_out"]["protocols"].items()}} if t.get("held_out") else {})}


def prune_search(folder: Path) -> None:
    """Remove a recorded run's saved valid neighbours (N × k_max ids and distances: 1.6 GB at 50,000 tokens and
    k_max 4096), keeping its summary and tuning grid; meta.json goes first, so the folder never looks complete."""
    for name in ("meta.json", "neighbors.npy", "distances.npy"):
        (folder / name).unlink(missing_ok=True)
