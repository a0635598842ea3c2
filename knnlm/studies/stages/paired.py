"""`paired.md` / `paired.json`: each ω > 0 of the grid against ω = 0 of the same seed (same initialisation and data
order), mean ± std of the per-seed differences, which the seed-to-seed spread of the table does not blur."""

from __future__ import annotations

from ...artifacts import write_json, write_text
from ..statistics import paired_differences, paired_markdown
from .base import Stage, StudyRun


class Paired(Stage):
    name = "paired"

    def write(self, run: StudyRun) -> None:
        diffs = paired_differences(run.records, self.study.regularizer)
        if diffs:
            write_text(run.results / "paired.md", paired_markdown(diffs))
            write_json(run.results / "paired.json", {f"{o:g}": v for o, v in diffs.items()})
