"""What a stage is: one step of a study after its grid, named in the study file's `stages = [...]`.

A stage may train more runs (beside the grid, or after it from the grid's records) and writes its own tables and
figures from the records alone. The engine calls `write` of every stage after each finished run and once at the
end; `--tables-only` calls only that, so the committed tables are rewritten by the same code that wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ...artifacts import UserError
from ..study import Study


class StudyRun(Protocol):
    """What a stage sees of a running study (knnlm/studies/engine.py)."""
    study: Study
    out: Path  # the run folders (may be gone: a GPU machine's)
    results: Path  # the records (runs/) and tables
    records: list[dict]  # every record so far, sorted by (regularizer, ω, seed)
    early: bool  # start the stages' own runs beside the grid where they can be chosen from the records so far

    def task(self, regularizer: str, omega: float, seed: int, extra: list[str] = ()) -> tuple: ...
    def run(self, tasks: list[tuple]) -> None: ...
    def update(self, record: dict) -> None: ...


class Stage:
    """A stage's three steps, each a no-op unless the stage needs it. Options: the study file's table named after
    the stage, passed as keyword arguments to `__init__`."""

    name = ""

    def __init__(self, study: Study, **options):
        if options:
            raise UserError(f"[{self.name}]: unknown option(s) {sorted(options)}")
        self.study = study

    def beside(self, run: StudyRun) -> list[tuple]:
        """Runs to start with the grid."""
        return []

    def after(self, run: StudyRun) -> None:
        """Once the grid is recorded: runs (`run.run`) or evaluations chosen from its records."""

    def write(self, run: StudyRun) -> None:
        """Tables and figures under `run.results`, from `run.records` alone."""

    def grid_records(self, records: list[dict]) -> list[dict]:
        """The records of the grid's seeds: where a stage chooses the best ω, it chooses on these, so that seeds
        added later to the chosen pair (`more-seeds`) estimate it without changing the choice."""
        return [r for r in records if r["seed"] in self.study.seeds]
