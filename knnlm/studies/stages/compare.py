"""Another regularizer against the grid's at the grid's best ω > 0 (the paper's MOCO against L2), same seeds:
`<other>_vs_<grid>.md` / `.json` / `.png`, with ω = 0 beside them. Options (the study's `[compare]` table):

    regularizer = "moco"                  # the other regularizer
    overrides = ["train.queue_len=8"]     # its own settings
    protocol = "paper"                    # whose best ω: the paper protocol's (temperature 1) or the tuned one's

With `knnlm sweep --early` its runs start beside the grid, at the best ω over the records so far (a machine with
room for more models at once: a GPU); should the full grid choose another ω, they are trained at that one too."""

from __future__ import annotations

from ...artifacts import UserError, markdown_table, write_json, write_text
from ...config import REGULARIZERS
from .. import plots
from ..statistics import LABELS, PPL_ROWS, PROTOCOL_METRIC, best_omega, cell, omega_table, ppl_over_seeds, runs_at
from .base import Stage, StudyRun


class Compare(Stage):
    name = "compare"

    def __init__(self, study, regularizer: str = "", overrides: list[str] = (), protocol: str = "paper"):
        super().__init__(study)
        if regularizer not in REGULARIZERS or regularizer == study.regularizer:
            raise UserError(f"[compare]: regularizer: expected one of {', '.join(REGULARIZERS)} other than the grid's "
                            f"{study.regularizer}, got {regularizer!r}")
        if protocol not in PROTOCOL_METRIC:
            raise UserError(f"[compare]: protocol: expected one of {', '.join(PROTOCOL_METRIC)}, got {protocol!r}")
        self.regularizer, self.overrides, self.protocol = regularizer, list(overrides), protocol

    def omega(self, records: list[dict]) -> float | None:
        table = omega_table(self.grid_records(records), self.study.regularizer)
        return best_omega(table, PROTOCOL_METRIC[self.protocol]) if 0.0 in table else None

    def tasks(self, run: StudyRun, omega: float) -> list[tuple]:
        return [run.task(self.regularizer, omega, seed, self.overrides) for seed in self.study.seeds]

    def beside(self, run: StudyRun) -> list[tuple]:
        omega = self.omega(run.records) if run.early else None
        if omega is None:
            return []
        print(f"{self.regularizer.upper()} at ω = {omega:g} (best ω > 0 under the {self.protocol} protocol over the "
              "records so far) beside the grid", flush=True)
        return self.tasks(run, omega)

    def after(self, run: StudyRun) -> None:
        # runs recorded already, e.g. with --early at the same ω, are taken from their records
        if (omega := self.omega(run.records)) is not None:
            run.run(self.tasks(run, omega))

    def write(self, run: StudyRun) -> None:
        omega, grid = self.omega(run.records), self.study.regularizer
        if omega is None:
            return
        groups = {grid: runs_at(run.records, grid, omega), self.regularizer: runs_at(run.records, self.regularizer, omega),
                  "none (ω = 0)": runs_at(run.records, grid, 0.0)}
        rows = {label: ppl_over_seeds(rs) for label, rs in groups.items() if rs}
        if self.regularizer not in rows:
            return
        metrics = [m for m in PPL_ROWS if all(m in v for v in rows.values())]
        title = f"{self.regularizer.upper()} vs {grid.upper()} at ω = {omega:g}, {self.study.title}"
        stem = run.results / f"{self.regularizer}_vs_{grid}"
        write_json(stem.with_suffix(".json"), {"omega": omega, "rows": rows})
        write_text(stem.with_suffix(".md"), markdown_table(
            f"{title} (mean ± std over seeds)", ["regularizer", *(LABELS[m] for m in metrics), "seeds"],
            [[reg, *(cell(*v[m]) for m in metrics), str(v["valid_lm_ppl"][2])] for reg, v in rows.items()]))
        plots.plot_regularizer_comparison(rows, stem.with_suffix(".png"), title)
