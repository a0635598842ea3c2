"""`held_out.md` / `held_out.json`: each protocol's kNN-LM perplexity when its λ, k and temperature are chosen on
valid's first half of tokens and reported on the second half (and on test), beside the choice made on the whole of
valid reported on the same second half: how much choosing among a grid on the reported tokens flatters a figure,
and whether a difference between ω and ω = 0 survives an honest choice.

From the records' `held_out` fields (`knnlm/studies/records.py`; runs evaluated since 2026-12-06); a study whose
records have none writes nothing."""

from __future__ import annotations

from ...artifacts import markdown_table, nan_to_null, write_json, write_text
from ...evaluate import PROTOCOLS
from ..statistics import cell, ci95, interval_cell, mean_std, runs_at
from .base import Stage, StudyRun

# per protocol: (label, value of a record)
COLUMNS = {
    "second_half": ("valid's 2nd half, chosen on its 1st half", lambda r, p: r["held_out"][p]["knnlm_ppl"]),
    "second_half_whole_choice": ("valid's 2nd half, chosen on all of valid",
                                 lambda r, p: r["held_out"][p]["whole_valid_choice_ppl"]),
    "test": ("test, chosen on valid's 1st half", lambda r, p: r.get("test", {}).get("held_out", {}).get(p)),
}


class HeldOut(Stage):
    name = "held-out"

    def write(self, run: StudyRun) -> None:
        regularizer = self.study.regularizer
        records = [r for r in run.records if r["regularizer"] == regularizer and r.get("held_out")]
        if not records:
            return
        base = {r["seed"]: r for r in runs_at(records, regularizer, 0.0)}
        table, rows = {}, []
        for omega in sorted({r["omega"] for r in records}):
            runs = runs_at(records, regularizer, omega)
            table[f"{omega:g}"] = entry = {}
            for p in PROTOCOLS:
                entry[p] = {}
                for col, (label, value) in COLUMNS.items():
                    xs = [value(r, p) for r in runs if value(r, p) is not None]
                    if not xs:
                        continue
                    diffs = [value(r, p) - value(base[r["seed"]], p) for r in runs
                             if omega > 0 and r["seed"] in base and value(r, p) is not None
                             and value(base[r["seed"]], p) is not None]
                    entry[p][col] = {"mean_std_n": [*mean_std(xs), len(xs)],
                                     "minus_omega0": {"per_seed": diffs, "mean_std_n": [*mean_std(diffs), len(diffs)],
                                                      "ci95": ci95(diffs)} if diffs else None}
                    d = entry[p][col]["minus_omega0"]
                    rows.append([f"{omega:g}", p, label, cell(*entry[p][col]["mean_std_n"]),
                                 cell(*d["mean_std_n"], signed=True) if d else "–",
                                 interval_cell(diffs) if d else "–", str(len(xs))])
        write_json(run.results / "held_out.json", nan_to_null(table))
        write_text(run.results / "held_out.md", markdown_table(
            f"Held-out choice, {self.study.title}: λ, k and temperature chosen on valid's first half of tokens, "
            "reported on its second half and on test, beside the choice made on all of valid (kNN-LM perplexity)",
            ["ω", "protocol", "reported on", "mean ± std", "Δ vs ω = 0 of the same seed", "95 % t-interval of Δ",
             "seeds"], rows,
            "The second row of each protocol has seen the tokens it reports (its choice was made on all of valid): "
            "its gap to the first row is how much that flatters the figure."))
