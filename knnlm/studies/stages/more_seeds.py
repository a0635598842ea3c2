"""More seeds for the headline pair: ω = 0 and the grid's best ω > 0, each trained at the extra seeds after the grid
(e.g. 5 seeds for the pair where the grid has 3), so that the pair's paired differences rest on more seeds than the
choice of ω was made on. Options (`[more-seeds]` in the study file):

    seeds = [3, 4]         # the extra seeds
    protocol = "paper"     # whose best ω: the paper protocol's (temperature 1) or the tuned one's

The best ω is chosen on the grid's seeds alone (as every stage chooses it): the extra runs cannot change it.
`headline.md` / `headline.json`: the pair's per-seed differences over all its seeds, mean ± std and 95 % t-interval;
the other stages' tables count the extra runs like the grid's."""

from __future__ import annotations

from ...artifacts import UserError, write_json, write_text
from ..statistics import PROTOCOL_METRIC, best_omega, omega_table, paired_differences, paired_markdown
from .base import Stage, StudyRun


class MoreSeeds(Stage):
    name = "more-seeds"

    def __init__(self, study, seeds: list[int] = (), protocol: str = "paper"):
        super().__init__(study)
        if not seeds or any(not isinstance(s, int) or s in study.seeds for s in seeds):
            raise UserError(f"[more-seeds]: seeds: expected seeds other than the grid's {study.seeds}, got {seeds!r}")
        if protocol not in PROTOCOL_METRIC:
            raise UserError(f"[more-seeds]: protocol: expected one of {', '.join(PROTOCOL_METRIC)}, got {protocol!r}")
        self.seeds, self.protocol = list(seeds), protocol

    def omega(self, records: list[dict]) -> float | None:
        table = omega_table(self.grid_records(records), self.study.regularizer)
        return best_omega(table, PROTOCOL_METRIC[self.protocol]) if 0.0 in table else None

    def after(self, run: StudyRun) -> None:
        if (omega := self.omega(run.records)) is None:
            return
        print(f"ω = 0 and ω = {omega:g} (best under the {self.protocol} protocol) at seeds {self.seeds}", flush=True)
        run.run([run.task(self.study.regularizer, o, seed) for seed in self.seeds for o in (0.0, omega)])

    def write(self, run: StudyRun) -> None:
        omega = self.omega(run.records)
        if omega is None:
            return
        pair = [r for r in run.records if r["regularizer"] == self.study.regularizer and r["omega"] in (0.0, omega)]
        diffs = paired_differences(pair, self.study.regularizer)
        if omega not in diffs:
            return
        write_json(run.results / "headline.json", {"omega": omega, "protocol": self.protocol,
                                                   "extra_seeds": self.seeds, "paired": diffs[omega]})
        write_text(run.results / "headline.md", f"The headline pair: ω = {omega:g} (the best ω > 0 under the "
                   f"{self.protocol} protocol, chosen on seeds {self.study.seeds}) against ω = 0, over every seed "
                   f"both have (extra seeds {self.seeds}).\n\n" + paired_markdown({omega: diffs[omega]}))
