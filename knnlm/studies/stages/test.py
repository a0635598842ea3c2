"""`test.md` / `test.json`: test perplexities of ω = 0 and of the best ω > 0 under each protocol (chosen on valid),
each run with its protocols' own λ, k and temperature from valid, and the per-seed differences against ω = 0.

Runs record their test figures as soon as they are evaluated (`knnlm/studies/records.py`), so the table needs no
run folder; a record made before that gets them from its run folder after the grid, or is left out."""

from __future__ import annotations

from ...artifacts import markdown_table, nan_to_null, write_json, write_text
from ...evaluate import PAPER_TEMPERATURE
from ..records import run_config, test_figures
from ..statistics import PROTOCOL_METRIC, best_omega, cell, mean_std, omega_table, over_seeds, runs_at
from .base import Stage, StudyRun

METRICS = {"test_lm_ppl": "lm_ppl", "test_knnlm_ppl": "knnlm_ppl", "test_knnlm_ppl_paper": "knnlm_ppl_paper"}


def valid_choice(record: dict) -> dict:
    return {"tuned": [record["lambda"], record["k"], record["temperature"]],
            "paper": [record["paper_lambda"], record["paper_k"], PAPER_TEMPERATURE]}


def tested(record: dict) -> bool:
    """Whether the record's test figures were made with its current valid choice."""
    return valid_choice(record) == record.get("test", {}).get("valid_choice")


class Test(Stage):
    name = "test"

    def best(self, records: list[dict]) -> dict[str, float]:
        """{protocol: its best ω > 0 on valid}; {} unless the grid has ω = 0 and some ω > 0."""
        table = omega_table(self.grid_records(records), self.study.regularizer)
        if 0.0 not in table or not any(o > 0 for o in table):
            return {}
        return {p: best_omega(table, metric) for p, metric in PROTOCOL_METRIC.items()}

    def after(self, run: StudyRun) -> None:
        """Test figures for the records that lack them (or have another valid choice), from their run folders."""
        omegas = {0.0, *self.best(run.records).values()}
        if len(omegas) == 1:
            return
        for r in run.records:
            if r["regularizer"] != self.study.regularizer or r["omega"] not in omegas or tested(r):
                continue
            folder = run.out / r["name"]
            if not (folder / "datastore" / "meta.json").is_file() or not (folder / "eval" / "valid" / "summary.json").is_file():
                continue
            print(f"== {r['name']}: test split", flush=True)
            cfg = run_config(self.study, r["regularizer"], r["omega"], r["seed"])
            run.update({**r, "test": test_figures(folder, cfg)})

    def write(self, run: StudyRun) -> None:
        best = self.best(run.records)
        if not best:
            return
        regularizer, omegas = self.study.regularizer, sorted({0.0, *best.values()})
        base = {r["seed"]: r["test"] for r in runs_at(run.records, regularizer, 0.0) if tested(r)}
        rows = {}
        for omega in omegas:
            runs = [r for r in runs_at(run.records, regularizer, omega) if tested(r)]
            if not runs:
                continue
            rows[f"{omega:g}"] = {
                **{m: mean_std([r["test"][f] for r in runs]) for m, f in METRICS.items()},
                "seeds": len(runs),
                "best_under": [p for p, o in best.items() if o == omega],
                "valid_choice": {r["name"]: r["test"]["valid_choice"] for r in runs},  # [λ, k, temperature] per protocol
                "minus_omega0": over_seeds({m: [r["test"][f] - base[r["seed"]][f] for r in runs if r["seed"] in base]
                                            for m, f in METRICS.items()}) if omega > 0 else {},
            }
        if not rows:
            return
        write_json(run.results / "test.json", nan_to_null(rows))
        cols = ("test_lm_ppl", "test_knnlm_ppl", "test_knnlm_ppl_paper")
        write_text(run.results / "test.md", markdown_table(
            f"Test perplexity, {self.study.title} (each protocol's λ, k, temperature chosen on valid; mean ± std over "
            "seeds; in brackets, the mean ± std of the per-seed differences against ω = 0 of the same seed)",
            ["ω", "chosen as the best ω > 0 by", "test LM", "test kNN-LM, tuned", "test kNN-LM, paper protocol", "seeds"],
            [[o, ", ".join(v["best_under"]) or "–",
              *(cell(*v[m], v["seeds"]) + (f" ({cell(*v['minus_omega0'][m], signed=True)})" if m in v["minus_omega0"] else "")
                for m in cols), str(v["seeds"])] for o, v in rows.items()]))
