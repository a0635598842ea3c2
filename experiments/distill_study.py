"""The distillation study (issue 31): kNN-LM quality with no retrieval at inference?

    python experiments/distill_study.py experiments/distill_study.toml --out runs/distill_study
    python experiments/distill_study.py experiments/distill_study.toml --out runs/distill_study --tables-only
    python experiments/distill_study.py experiments/distill_study.toml --out runs/distill_study --seeds 0 --stages memory

A run folder does not outlive its machine: a stage whose seed's base (or targets) folder is gone makes it again on
the kind of device its record names, and goes on only if it reproduces the record (`rebuild`); a seed made on
another kind of device is skipped, with a line that says so, unless asked for with --seeds (then: an error).

For each seed, on the study's base config (the ω study's WikiText-2 configuration), one device, in this order:
  base      the LM (ω = 0): trained, datastore, valid and test evaluated (LM alone, kNN-LM: both protocols)
  targets   `knnlm targets` of the base: p_kNN of every training position, its own entry left out
  scratch   an LM trained from scratch with CE + β·KL toward the targets; its own datastore and kNN-LM; and mixed
            with the base as a memory model is (λ tuned on valid, no retrieval): Memory Decoder's recipe (a decoder
            trained on CE + KL, interpolated with the base LM) with a decoder as large as the base
  ensemble  the control of that pair: a second LM trained from scratch as the base is (CE alone, init seed
            seed + ENSEMBLE_SEED), mixed with the base the same way: what two LMs give without the targets
  finetune  the base fine-tuned with CE + β·KL; its own datastore and kNN-LM
  memory    a memory model (started from the base, KL alone as `memory_overrides` say) interpolated with the base
            at a λ tuned on valid, no retrieval; and the base's kNN on top of that pair
  control   the base fine-tuned as `finetune` but with CE alone (β = 0): what the extra steps give without the
            targets; its own kNN-LM, and mixed with the base as a memory model would be (an ensemble, no targets)

Each finished stage of a seed is recorded at once in RESULTS/runs/<seed>_<stage>.json (commit them: a stopped study
continues from its records and run folders); the tables (`distill.md` / `distill.json`) are written from the
records alone: each variant against the same seed's base, mean, std and 95 % t-interval of the paired differences,
n; the issue's two goals, seed by seed; each way of using the targets against the same seed's ensemble control; and
the costs (training and target-building time, evaluation tokens/s, bytes needed at inference); so is the
figure (`quality_vs_speed.png`: each model's perplexity against its evaluation speed), once a variant is recorded.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import tomllib
from pathlib import Path

from knnlm.artifacts import UserError, cpu_name, markdown_table, nan_to_null, read_json, write_json, write_text
from knnlm.config import check_same_model, load_config
from knnlm.evaluate import evaluate, evaluate_memory
from knnlm.pipeline import run_pipeline
from knnlm.studies.statistics import t_interval
from knnlm.targets import build_targets

# in the order they run for a seed: the scratch run, the way closest to the goal on seed 0 (+5.1 %), right after the
# targets, and the ensemble that controls its pair with the base; then the fine-tune, the memory model and the control
STAGES = ("base", "targets", "scratch", "ensemble", "finetune", "memory", "control")
NEEDS = {"targets": ("base",), "memory": ("base", "targets"), "finetune": ("base", "targets"),
         "scratch": ("base", "targets"), "ensemble": ("base",), "control": ("base",)}  # where each stage's inputs come from
ENSEMBLE_SEED = 1000  # the ensemble stage's second LM starts from seed + ENSEMBLE_SEED (the base: from seed)
# the second LMs mixed with the base as a memory model is, and how the tables name each pair's second member
PAIRS = {"scratch": "distilled-from-scratch LM", "ensemble": "second LM, CE alone (ensemble control)",
         "control": "CE-only fine-tune (ensemble control)"}
# the stages that train an LM with its own datastore, as the tables and the figure name them
LM_LABELS = {"base": "base", "scratch": "distilled from scratch", "finetune": "base fine-tuned with KL",
             "control": "base fine-tuned with CE only (control)"}


def lm_speeds(evaluated_split: dict) -> tuple[float, float]:
    """Tokens/s of an evaluated LM alone (its LM pass) and as a kNN-LM (the LM pass plus the search)."""
    tokens, sec = evaluated_split["tokens"], evaluated_split["seconds"]
    return tokens / sec["lm"], tokens / (sec["lm"] + sec["search"])


def load_study(path: Path) -> dict:
    study = tomllib.loads(path.read_text())
    for key in ("base", "overrides", "seeds", "distil_overrides", "finetune_overrides", "memory_overrides"):
        if key not in study:
            raise UserError(f"{path}: no {key!r} entry")
    study["base"] = str((path.parent / study["base"]).resolve())
    return study


def device() -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"cpu: {cpu_name()}"


def evaluated(run: Path, cfg) -> dict:
    """Valid and test figures of an evaluated run (test reuses valid's choices)."""
    out = {}
    for split in ("valid", "test"):
        s = evaluate(run, cfg, split, progress=False)
        out[split] = {"lm_ppl": s["lm_ppl"], "knnlm_ppl": s["protocols"]["tuned"]["knnlm_ppl"],
                      "knnlm_ppl_paper": s["protocols"]["paper"]["knnlm_ppl"],
                      "choice": {p: [s["protocols"][p][x] for x in ("lambda", "k", "temperature")] for p in ("tuned", "paper")},
                      "tokens": s["tokens"], "seconds": s["seconds"]}
    return out


def stage_settings(study: dict, stage: str) -> list[str]:
    """The overrides a stage adds to the study's own (`overrides` and the seed): what its record is made with."""
    return {"base": [], "targets": [], "scratch": study["distil_overrides"], "ensemble": [],
            "finetune": study["distil_overrides"] + study["finetune_overrides"],
            "control": study["finetune_overrides"], "memory": study["memory_overrides"]}[stage]


def check_record(record_path: Path, study: dict, stage: str) -> None:
    """Refuse a record made with other settings than the study now asks for its stage (no stale answer): the
    study's overrides and the stage's own (`stage_settings`), as far as the record kept them."""
    rec = read_json(record_path)
    made = rec.get("settings", {"overrides": study["overrides"], "stage": rec.get("overrides", stage_settings(study, stage))})
    made = {**made, "stage": [o for o in made["stage"] if not o.startswith("train.init_from=")]}
    if made != {"overrides": study["overrides"], "stage": stage_settings(study, stage)}:
        raise UserError(f"{record_path}: recorded with other settings ({made}) than the study now asks for its {stage} "
                        f"stage; move the record (and its run folder) out of the way to run it again")


def trained(summary: dict) -> dict:
    """What a record keeps of a training run: its time, and its loss terms in nats (LM, KL toward the targets) over
    the first and the last logged window (`penalty`): how far a model came toward the targets on the training set."""
    return {"train_seconds": summary["train_seconds"], **({"losses": summary["penalty"]} if "penalty" in summary else {})}


class MadeElsewhere(UserError):
    """A seed's recorded base or targets are gone here and were made on another kind of device: the seed's other
    stages can only be run there (or the whole seed again)."""


def differences(again: dict, record: dict, keys: tuple[str, ...], rel: float = 1e-6) -> list[str]:
    """The figures of `keys` (dotted paths) where a rebuilt artifact's `again` is not its record's to `rel`."""
    def get(d: dict, key: str) -> float:
        for part in key.split("."):
            d = d[part]
        return d

    return [f"{key} {get(again, key):.8g} (recorded {get(record, key):.8g})" for key in keys
            if not math.isclose(get(again, key), get(record, key), rel_tol=rel)]


REPRODUCED = {"base": tuple(f"{split}.{key}" for split in ("valid", "test") for key in ("lm_ppl", "knnlm_ppl", "knnlm_ppl_paper")),
              "targets": ("N", "mean_top_mass", "mean_rest")}  # what a rebuilt base or target set must reproduce


def rebuild(study: dict, out: Path, seed: int, stage: str, results: Path, needed_by: str) -> None:
    """Train seed `seed`'s base again (`stage` "base") or build its targets again ("targets") where its record is
    kept but its folder is gone (a run folder outside the repository does not outlive its machine), on the kind of
    device that made the record, and keep it only if it reproduces the record's figures (`REPRODUCED`, to 1e-6):
    only then do the stages recorded with the old folder pair with those made from the new one. Otherwise the
    rebuilt folder is set aside as `<name>.differs` and the study stops with one line."""
    base_run = out / f"base_seed{seed}"
    folder = base_run if stage == "base" else base_run / "targets"
    record_path = results / "runs" / f"seed{seed}_{stage}.json"
    record = read_json(record_path)
    if record.get("device") != device():
        raise MadeElsewhere(f"{folder}: seed {seed}'s {stage} is gone (its record is kept, made on {record.get('device')}) "
                        f"and its {needed_by} stage needs it; on this device ({device()}) it cannot be made again to "
                        f"pair with the seed's records: run the seed where they were made, or move seed{seed}_*.json "
                        "out of the records to train the seed again here")
    print(f"{folder}: gone; making seed {seed}'s {stage} again, to be kept if it reproduces {record_path.name}", flush=True)
    again = run_stage(study, out, seed, stage, results)
    if differs := differences(again, record, REPRODUCED[stage]):
        aside = folder.with_name(folder.name + ".differs")
        if aside.exists():
            shutil.rmtree(aside)
        folder.rename(aside)
        raise UserError(f"{record_path}: seed {seed}'s {stage} made again on this device differs from its record "
                        f"({'; '.join(differs)}), so the seed's recorded stages cannot be paired with new ones; the new "
                        f"folder is {aside}")


def run_stage(study: dict, out: Path, seed: int, stage: str, results: Path) -> dict:
    base_run = out / f"base_seed{seed}"
    common = [*study["overrides"], f"train.seed={seed}"]
    targets = f"train.distil_targets={base_run / 'targets'}"
    if stage != "base" and not (base_run / "datastore" / "meta.json").is_file():  # recorded, but its folder is gone
        rebuild(study, out, seed, "base", results, stage)
    if "targets" in NEEDS.get(stage, ()) and not (base_run / "targets" / "meta.json").is_file():
        rebuild(study, out, seed, "targets", results, stage)
    if stage == "base":
        cfg = load_config(study["base"], common)
        res = run_pipeline(cfg, base_run)
        return {**trained(res["train"]), **evaluated(base_run, cfg)}
    if stage == "targets":
        cfg = load_config(study["base"], common)
        meta = read_json(build_targets(base_run, cfg) / "meta.json")
        return {k: meta[k] for k in ("N", "k", "top", "temperature", "exclude", "seconds", "bytes", "mean_top_mass",
                                     "mean_rest", "search")}
    if stage in ("scratch", "finetune"):
        extra = stage_settings(study, stage) + ([f"train.init_from={base_run}"] if stage == "finetune" else [])
        cfg = load_config(study["base"], [*common, targets, *extra])
        run = out / f"{stage}_seed{seed}"
        res = run_pipeline(cfg, run)
        return {**trained(res["train"]), "overrides": extra, **evaluated(run, cfg),
                **({"as_memory": mixed_with(base_run, run, load_config(study["base"], common))} if stage == "scratch" else {})}
    if stage == "ensemble":  # trained only: it is scored beside the base, with the base's datastore
        extra = [f"train.seed={seed + ENSEMBLE_SEED}"]
        cfg = load_config(study["base"], [*common, *extra])
        second = out / f"ensemble_seed{seed}"
        summary = trained_once(second, cfg)
        return {**trained(summary), "overrides": extra, "as_memory": mixed_with(base_run, second, load_config(study["base"], common))}
    if stage == "control":
        extra = [*stage_settings(study, stage), f"train.init_from={base_run}"]
        cfg = load_config(study["base"], [*common, *extra])
        run = out / f"control_seed{seed}"
        res = run_pipeline(cfg, run)
        return {**trained(res["train"]), "overrides": extra, **evaluated(run, cfg),
                "as_memory": mixed_with(base_run, run, load_config(study["base"], common))}
    if stage == "memory":
        extra = [*stage_settings(study, stage), f"train.init_from={base_run}"]
        mem_cfg = load_config(study["base"], [*common, targets, *extra])
        mem = out / f"memory_seed{seed}"
        summary = trained_once(mem, mem_cfg)
        return {**trained(summary), "overrides": extra, **mixed_with(base_run, mem, load_config(study["base"], common))}
    raise AssertionError(stage)


def trained_once(run: Path, cfg) -> dict:
    """Train a model that is only scored beside the base (no datastore of its own), continuing from its checkpoints;
    a finished one is read, and one trained with other settings is refused (no stale model)."""
    from knnlm.pipeline import check_writable
    from knnlm.train import train

    check_writable(run)
    check_same_model(run, cfg)
    if (run / "train_summary.json").is_file():
        return read_json(run / "train_summary.json")
    return train(cfg, run, resume=(run / "checkpoints").is_dir())


def mixed_with(base_run: Path, second: Path, base_cfg) -> dict:
    """`second` as a memory model beside the base on valid and test: μ tuned on valid with no retrieval, then the
    base's kNN on top of the pair (`evaluate_memory`)."""
    return {split: evaluate_memory(base_run, second, base_cfg, split, progress=False) for split in ("valid", "test")}


def fmt(x: float) -> str:
    """A table's number; "–" where n = 1 leaves no std or interval."""
    return "–" if math.isnan(x) else f"{x:.2f}"


def tables(records: dict[str, dict], results: Path) -> dict:
    """Per-variant perplexities (valid and test, both protocols) and paired differences against the base kNN-LM."""
    seeds = sorted({int(name.split("_")[0][4:]) for name in records})
    rows = {}  # variant -> split -> list over seeds of (value, base kNN-LM tuned of the same seed)
    by_seed = {}  # split -> seed -> (variant -> value, base kNN-LM tuned)
    for seed in seeds:
        get = lambda stage: records.get(f"seed{seed}_{stage}")
        base = get("base")
        if base is None:
            continue
        for split in ("valid", "test"):
            anchor = base[split]["knnlm_ppl"]
            values = {"LM alone": base[split]["lm_ppl"],
                      "kNN-LM of the base (tuned)": base[split]["knnlm_ppl"],
                      "kNN-LM of the base (paper, T = 1)": base[split]["knnlm_ppl_paper"]}
            if (m := get("memory")) is not None:
                values["memory model alone (no retrieval)"] = m[split]["memory_model_ppl"]
                values["LM + memory model (no retrieval)"] = m[split]["lm_memory_ppl"]
                values["kNN-LM over LM + memory (tuned)"] = m[split]["protocols"]["tuned"]["knnlm_ppl"]
                values["kNN-LM over LM + memory (paper)"] = m[split]["protocols"]["paper"]["knnlm_ppl"]
            for stage, label in PAIRS.items():  # a second LM mixed with the base as a memory model is
                if (r := get(stage)) is not None and "as_memory" in r:
                    pair = r["as_memory"][split]
                    if stage == "ensemble":
                        values["second LM, CE alone, another init (no retrieval)"] = pair["memory_model_ppl"]
                    values[f"LM + {label} (no retrieval)"] = pair["lm_memory_ppl"]
                    values[f"kNN-LM over LM + {label} (tuned)"] = pair["protocols"]["tuned"]["knnlm_ppl"]
            for stage, label in ((st, LM_LABELS[st]) for st in ("scratch", "finetune", "control")):
                if (r := get(stage)) is not None:
                    values[f"{label}: LM alone (no retrieval)"] = r[split]["lm_ppl"]
                    values[f"{label}: kNN-LM (tuned)"] = r[split]["knnlm_ppl"]
                    values[f"{label}: kNN-LM (paper)"] = r[split]["knnlm_ppl_paper"]
            for label, v in values.items():
                rows.setdefault(label, {}).setdefault(split, []).append((v, anchor))
            by_seed.setdefault(split, {})[seed] = (values, anchor)
    table = {}
    for label, by_split in rows.items():
        table[label] = {}
        for split, pairs in by_split.items():
            mean, std, half, n = t_interval([v for v, _ in pairs])
            dmean, dstd, dhalf, _ = t_interval([v - a for v, a in pairs])
            table[label][split] = {"mean": mean, "std": std, "n": n, "vs_base_knnlm_tuned": {
                "mean": dmean, "std": dstd, "ci95_half_width": dhalf, "relative": dmean / (sum(a for _, a in pairs) / n)}}
    md = []
    for split in ("valid", "test"):
        body = [[label, fmt(t[split]["mean"]), fmt(t[split]["std"]),
                 f"{t[split]['vs_base_knnlm_tuned']['mean']:+.2f} ± {fmt(t[split]['vs_base_knnlm_tuned']['ci95_half_width'])}",
                 f"{100 * t[split]['vs_base_knnlm_tuned']['relative']:+.1f} %", str(t[split]["n"])]
                for label, t in table.items() if split in t]
        md.append(markdown_table(f"Distillation, {split} perplexity", ["model", "mean", "std",
                                 "Δ vs the same seed's base kNN-LM (tuned), ± 95 % t-interval", "relative", "n"], body))
    goal_md, goal_data = goal_tables(by_seed)
    md += goal_md
    costs = []  # each row names its record's device: times compare on one kind of device only
    for name, rec in sorted(records.items()):
        stage, on = name.split("_", 1)[1], rec.get("device", "–")
        if stage == "targets":
            costs.append([name, f"build {rec['seconds']:.0f} s", f"{rec['bytes'] / 2**20:.0f} MiB", "", "", on])
        elif stage in ("memory", "ensemble"):
            pair = rec["valid"] if stage == "memory" else rec["as_memory"]["valid"]
            costs.append([name, f"train {rec['train_seconds']:.0f} s", "", *pair_costs(pair), on])
        else:  # an LM with its own datastore: the LM alone, and its kNN-LM (the LM pass plus the search)
            lm, knn = lm_speeds(rec["valid"])
            costs.append([name, f"train {rec['train_seconds']:.0f} s", "", f"{lm:.0f} (LM) vs {knn:.0f} (kNN-LM)", "", on])
            if stage == "scratch" and "as_memory" in rec:
                costs.append([f"{name} beside the base", "", "", *pair_costs(rec["as_memory"]["valid"]), on])
    md.append(markdown_table("Costs", ["record", "time", "targets size", "valid tokens/s", "bytes at inference",
                                       "device"], costs))
    write_text(results / "distill.md", "\n".join(md))
    write_json(results / "distill.json", nan_to_null({"table": table, "seeds": seeds, **goal_data}))  # n = 1: no std (null)
    return table


# the ensemble control's rows: two plain LMs mixed, without and with the base's kNN on top
CONTROL_NO_RETRIEVAL = f"LM + {PAIRS['ensemble']} (no retrieval)"
CONTROL_RETRIEVAL = f"kNN-LM over LM + {PAIRS['ensemble']} (tuned)"


def trained_toward_targets(label: str) -> bool:
    """A row of a way to use the targets, with no retrieval or with the tuned kNN-LM on top (not a base row, not a
    control, not the paper protocol, not the memory model without the base it is made to be mixed with)."""
    return (("(no retrieval)" in label or "(tuned)" in label) and "control" not in label
            and "second LM" not in label and not label.startswith(("kNN-LM of the base", "memory model alone")))


def goal_tables(by_seed: dict) -> tuple[list[str], dict]:
    """The issue's goals, seed by seed from the records: with no retrieval, within 2 % of the same seed's base
    kNN-LM (tuned) on valid; with retrieval on top, below it by more than 2 std of the paired differences; and each
    target-trained row against the same seed's ensemble control (two plain LMs mixed, no retrieval; the base's kNN
    over them, tuned), the mean of the paired differences ± a 95 % t-interval: what the targets add beyond a second
    LM. n counts the seeds that have both. Returns the markdown tables and their data."""
    valid = by_seed.get("valid", {})
    labels = list(dict.fromkeys(lab for values, _ in valid.values() for lab in values if trained_toward_targets(lab)))
    goals, body = {}, []
    for label in labels:
        pairs = [(values[label], anchor) for values, anchor in valid.values() if label in values]
        deltas = [v - a for v, a in pairs]
        mean, std, _, n = t_interval(deltas)
        if "(no retrieval)" in label:
            relative = [d / a for d, (_, a) in zip(deltas, pairs)]
            met = all(r <= 0.02 for r in relative)
            goals[label] = {"goal": "within 2 % of the base kNN-LM", "relative_per_seed": relative, "met": met, "n": n}
            verdict = f"{'yes' if met else 'no'} ({', '.join(f'{100 * r:+.1f} %' for r in relative)})"
        else:
            met = None if n < 2 else bool(-mean > 2 * std)
            goals[label] = {"goal": "below the base kNN-LM by more than 2 std of the paired differences",
                            "mean": mean, "std": std, "met": met, "n": n}
            verdict = "– (n < 2)" if met is None else f"{'yes' if met else 'no'} ({mean:+.2f}; 2 std {2 * std:.2f})"
        body.append([label, goals[label]["goal"], verdict, str(n)])
    md = [markdown_table("The goals, valid (each seed against its own base kNN-LM, tuned)",
                         ["model", "goal", "met? (no retrieval: at every seed)", "n"], body)]
    controls = {}
    for split, seeds in by_seed.items():
        body = []
        for label in labels:
            control = CONTROL_NO_RETRIEVAL if "(no retrieval)" in label else CONTROL_RETRIEVAL
            deltas = [values[label] - values[control] for values, _ in seeds.values()
                      if label in values and control in values]
            if deltas:
                mean, std, half, n = t_interval(deltas)
                controls.setdefault(label, {})[split] = {"control": control, "mean": mean, "std": std,
                                                         "ci95_half_width": half, "n": n}
                body.append([label, control, f"{mean:+.2f} ± {fmt(half)}", fmt(std), str(n)])
        md.append(markdown_table(f"Against the ensemble control, {split} (what the targets add beyond a second LM)",
                                 ["model", "control", "Δ, ± 95 % t-interval", "std", "n"], body))
    return md, {"goals": goals, "vs_ensemble_control": controls}


def pair_costs(v: dict) -> list[str]:
    """Tokens/s and bytes at inference of the base with a second model beside it, against the base's kNN-LM."""
    speed, b = v["tokens_per_s"], v["inference_bytes"]
    return [f"{speed['lm_memory']:.0f} (LM + memory) vs {speed['knnlm']:.0f} (kNN-LM): "
            f"{speed['lm_memory'] / speed['knnlm']:.1f}×",
            f"{(b['lm'] + b['memory_model']) / 2**20:.0f} MiB vs {(b['lm'] + b['datastore']) / 2**20:.0f} MiB"]


def speed_points(records: dict[str, dict], split: str = "valid") -> dict[str, list[tuple[float, float]]]:
    """(tokens/s, perplexity) of each model on `split`, one point per seed, from the records' evaluation times: an
    LM alone runs the LM pass; a kNN-LM adds the search of its datastore; a memory model adds its own pass."""
    points: dict[str, list[tuple[float, float]]] = {}
    add = lambda label, speed, ppl: points.setdefault(label, []).append((speed, ppl))
    for name, rec in sorted(records.items()):
        stage = name.split("_", 1)[1]
        if stage in LM_LABELS:
            r, label = rec[split], LM_LABELS[stage]
            lm, knn = lm_speeds(r)
            add(f"{label}: LM alone", lm, r["lm_ppl"])
            add(f"{label}: kNN-LM (tuned)", knn, r["knnlm_ppl"])
        if stage == "memory":
            r, sec = rec[split], rec[split]["seconds"]
            add("LM + memory model (no retrieval)", r["tokens_per_s"]["lm_memory"], r["lm_memory_ppl"])
            add("kNN-LM over LM + memory (tuned)", r["tokens"] / (sec["lm"] + sec["memory_model"] + sec["search"]),
                r["protocols"]["tuned"]["knnlm_ppl"])
        if stage in ("scratch", "ensemble") and "as_memory" in rec:  # the control's pair: near the base, not drawn
            r = rec["as_memory"][split]
            add(f"LM + {PAIRS[stage]} (no retrieval)", r["tokens_per_s"]["lm_memory"], r["lm_memory_ppl"])
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path)
    p.add_argument("--out", type=Path, required=True, help="where the run folders go")
    p.add_argument("--results", type=Path, help="records and tables (default: results/distill_study)")
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES,
                   help="which stages to run (in the order of STAGES; default: all)")
    p.add_argument("--seeds", nargs="*", type=int, help="which of the study's seeds to run (default: all, in order)")
    a = p.parse_args(argv)
    try:
        study = load_study(a.study)
        results = a.results or Path(__file__).resolve().parent.parent / "results" / "distill_study"
        seeds = study["seeds"] if a.seeds is None else a.seeds
        if unknown := [s for s in seeds if s not in study["seeds"]]:
            raise UserError(f"--seeds: {unknown} not among the study's seeds {study['seeds']} ({a.study})")
        if not a.tables_only:
            for seed in seeds:  # every stage's inputs recorded or run before it, and its record current, checked
                for stage in a.stages:  # before anything runs
                    if (made := results / "runs" / f"seed{seed}_{stage}.json").is_file():
                        check_record(made, study, stage)
                    for need in NEEDS.get(stage, ()):
                        if need not in a.stages and not (results / "runs" / f"seed{seed}_{need}.json").is_file():
                            raise UserError(f"--stages: seed {seed}'s {stage} stage needs its {need} stage, which is "
                                            f"neither recorded nor asked for; add {need} to --stages")
        (results / "runs").mkdir(parents=True, exist_ok=True)
        if not a.tables_only:
            for seed in seeds:
                try:
                    for stage in [s for s in STAGES if s in a.stages]:
                        record = results / "runs" / f"seed{seed}_{stage}.json"
                        if record.is_file():
                            continue
                        t0 = time.time()  # wall_seconds: a base or targets made again first (`rebuild`) included
                        rec = run_stage(study, a.out, seed, stage, results)
                        write_json(record, {"seed": seed, "stage": stage, "device": device(),
                                            "wall_seconds": time.time() - t0, "settings": {
                                                "overrides": study["overrides"], "stage": stage_settings(study, stage)},
                                            **rec})
                        print(f"recorded {record}", flush=True)
                except MadeElsewhere as e:  # asked for by name: an error; among all the seeds: the others go on
                    if a.seeds is not None:
                        raise
                    print(f"distill_study: seed {seed} skipped: {e}", file=sys.stderr, flush=True)
        records = {f.stem: read_json(f) for f in sorted((results / "runs").glob("*.json"))}
        if records:
            tables(records, results)
            from knnlm.studies.plots import plot_quality_vs_speed

            devices = sorted({r["device"] for r in records.values() if "device" in r})
            points = speed_points(records)
            if any(not label.startswith("base:") for label in points):  # a variant beside the base: a comparison
                plot_quality_vs_speed(points, results / "quality_vs_speed.png",
                                      f"WikiText-2 valid (first 50,000 tokens): perplexity against evaluation speed; "
                                      f"the band: within 2 % of the base kNN-LM, the goal with no retrieval. "
                                      f"Device: {', '.join(devices)}", anchor="base: kNN-LM (tuned)")
    except UserError as e:
        print(f"distill_study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
