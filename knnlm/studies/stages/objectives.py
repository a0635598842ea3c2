"""Other training objectives against ω = 0 of the grid (training with kNN in mind that still helps once the
temperature is tuned): `objectives.md` / `.json` / `.png`. Options (the study's `[objectives]` table):

    weights = { knn = [0.01, 0.1, 1.0] }    # train.regularizer -> the weights to try on the first seed
    step_benchmark = "../results/benchmarks/amd-epyc-zen5/training.json"

Each objective's weights run on the first seed beside the grid (each objective's first weight, then each one's
second, ...: a study stopped part-way has tried every objective); its best weight under the tuned protocol then
runs on the other seeds and is compared with ω = 0 of the same seed. `step_benchmark`: the objectives' cost per
training step against ω = 0, a `benchmarks/training.py --regularizers` JSON measured side by side in one run (the
runs' own training times differ by 2× between sessions of one machine)."""

from __future__ import annotations

import math
from pathlib import Path

from ...artifacts import UserError, markdown_table, nan_to_null, read_json, write_json, write_text
from ...config import REGULARIZERS
from .. import plots
from ..statistics import (LABELS, PAIRED_METRICS, PPL_ROWS, cell, device_kind, mean_std, over_seeds, ppl_over_seeds,
                          runs_at)
from .base import Stage, StudyRun


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


class Objectives(Stage):
    name = "objectives"

    def __init__(self, study, weights: dict[str, list[float]] = None, step_benchmark: str = ""):
        super().__init__(study)
        for name, ws in (weights or {}).items():
            if name not in REGULARIZERS or not isinstance(ws, list) or not ws or \
                    any(isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)) for w in ws):
                raise UserError(f"[objectives]: weights.{name}: expected a regularizer of {', '.join(REGULARIZERS)} "
                                "with a non-empty list of weights > 0")
        self.weights = weights or {}
        self.step_benchmark = str(Path(study.folder, step_benchmark).resolve()) if step_benchmark else ""
        if self.step_benchmark and not Path(self.step_benchmark).is_file():
            raise UserError(f"[objectives]: step_benchmark: {self.step_benchmark} not found (a benchmarks/training.py "
                            "--regularizers JSON)")

    def beside(self, run: StudyRun) -> list[tuple]:
        ws = list(self.weights.items())
        return [run.task(name, weights[i], self.study.seeds[0])
                for i in range(max((len(w) for _, w in ws), default=0)) for name, weights in ws if i < len(weights)]

    def after(self, run: StudyRun) -> None:
        run.run([run.task(name, w, seed) for name, w in self.best(run.records).items() for seed in self.study.seeds[1:]])

    def best(self, records: list[dict]) -> dict[str, float]:
        """Each objective's weight with the lowest tuned kNN-LM perplexity on the first seed, among those recorded."""
        best = {}
        for name, ws in self.weights.items():
            tried = [r for r in records if r["regularizer"] == name and r["seed"] == self.study.seeds[0] and r["omega"] in ws]
            if tried:
                best[name] = min(tried, key=lambda r: r["valid_knnlm_ppl"])["omega"]
        return best

    def write(self, run: StudyRun) -> None:
        """Every weight on the first seed, and each objective's best weight against ω = 0 of the same seed over all
        seeds (both protocols, the LM, and the cost per training step against ω = 0 from `step_benchmark`)."""
        records, study, best = run.records, self.study, self.best(run.records)
        base = {r["seed"]: r for r in runs_at(records, study.regularizer, 0.0)}
        first = study.seeds[0]
        cost, machine = step_costs(self.step_benchmark)
        rows, out = [], {"best": best, "weights": {}, "paired": {}, "step_cost_vs_omega0": cost, "step_cost_machine": machine}
        for name, weights in self.weights.items():
            for w in weights:
                r = next((r for r in records if r["regularizer"] == name and r["omega"] == w and r["seed"] == first), None)
                if r is not None:
                    out["weights"][f"{name} {w:g}"] = {m: r[m] for m in PPL_ROWS}
        for name, w in best.items():
            pairs = [(r, base[r["seed"]]) for r in runs_at(records, name, w) if r["seed"] in base]
            if not pairs:
                continue
            per_seed = {m: [a[m] - b[m] for a, b in pairs] for m in PAIRED_METRICS}
            # the runs' own training times, only between runs of one kind of device (a CPU run against an H200 one
            # says nothing); kept in the JSON, not the table: they include whatever else the machine ran at the time
            time_ratio = [a["seconds"]["train_compute"] / b["seconds"]["train_compute"] - 1 for a, b in pairs
                          if device_kind(a) == device_kind(b)] or [float("nan")]
            lm_rel = [a["valid_lm_ppl"] / b["valid_lm_ppl"] - 1 for a, b in pairs]
            d = {**over_seeds(per_seed), "train_time_vs_omega0": list(mean_std(time_ratio)), "lm_relative": list(mean_std(lm_rel)),
                 "weight": w, "devices": sorted({str(x.get("device", "not recorded")) for pair in pairs for x in pair}),
                 "seeds": [a["seed"] for a, _ in pairs], "per_seed": per_seed,
                 "mixed_devices": [a["seed"] for a, b in pairs if device_kind(a) != device_kind(b)],
                 "absolute": ppl_over_seeds([a for a, _ in pairs])}
            mean, std, n = d["valid_knnlm_ppl"]
            d["goal_met"] = bool(n >= 3 and mean < -2 * std and abs(d["lm_relative"][0]) <= 0.01)
            out["paired"][name] = d
            rows.append([name, f"{w:g}", cell(*d["absolute"]["valid_lm_ppl"]), cell(*d["absolute"]["valid_knnlm_ppl"]),
                         cell(*d["absolute"]["valid_knnlm_ppl_paper"]), cell(*d["valid_lm_ppl"], signed=True),
                         cell(*d["valid_knnlm_ppl"], signed=True), cell(*d["valid_knnlm_ppl_paper"], signed=True),
                         f"{cost[name]:.2f}×" if name in cost else "n/a",
                         str(n) + ("†" if d["mixed_devices"] else ""), "yes" if d["goal_met"] else "no"])
        if not out["weights"]:
            return
        write_json(run.results / "objectives.json", nan_to_null(out))
        weight_rows = [[k, *(cell(v[m], 0, 1) for m in PPL_ROWS)] for k, v in out["weights"].items()]
        write_text(run.results / "objectives.md", markdown_table(
            f"Objectives against ω = 0 of the same seed, {study.title} (mean ± std over seeds)",
            ["objective", "weight", "valid LM", "kNN-LM tuned", "kNN-LM paper", "Δ LM", "Δ kNN-LM tuned", "Δ kNN-LM paper",
             "training step vs ω = 0", "seeds", "goal met"], rows,
            "Δ: the objective's run minus ω = 0 of the same seed (negative = better). Goal: Δ kNN-LM tuned below −2 std "
            "of the paired differences over ≥ 3 seeds, with the LM within 1 %. †: some pairs were trained on different "
            "kinds of device (same initialisation and data order, other dropout masks: a device's own offset, see the "
            "README). Training step: seconds per step with the objective over seconds without (ω = 0), measured side "
            f"by side on {machine or 'no machine: the study names no step_benchmark'} "
            f"({'/'.join(Path(self.step_benchmark).parts[-2:]) if self.step_benchmark else 'n/a'}).")
            + "\n" + markdown_table(f"Every weight on seed {first}", ["objective, weight", *(LABELS[m] for m in PPL_ROWS)],
                                     weight_rows))
        if out["paired"]:
            plots.plot_paired_objectives(out["paired"], run.results / "objectives.png",
                                         f"Objectives against ω = 0 of the same seed, {study.title}")
