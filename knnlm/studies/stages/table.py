"""The grid's table (the paper's Table 1 form) and its figures against ω.

- `table.md` / `table.json`: rows train LM / valid LM / valid kNN-LM ppl (both protocols), tuned temperature and
  mean ‖r‖², columns ω, cells mean ± std over seeds;
- `figure1.png`: valid perplexity against ω, LM and kNN-LM with ± std bands;
- `ppl_by_k.png`: each ω's kNN-LM perplexity against k, under each protocol;
- `temperature_vs_norm.json` / `.png`: tuned temperature against mean squared key norm, one point per model, and
  the log-log fit.

A figure or fit needs two ω at least (knnlm/studies/plots.py): a study of one ω writes the table only.
"""

from __future__ import annotations

import numpy as np

from ...artifacts import nan_to_null, write_json, write_text
from .. import plots
from ..statistics import mean_std, omega_table, runs_at, table_markdown
from .base import Stage, StudyRun


class Table(Stage):
    name = "table"

    def write(self, run: StudyRun) -> None:
        study, records, results = self.study, run.records, run.results
        label = f"{study.regularizer.upper()} key regularizer, {study.title}"
        table = omega_table(records, study.regularizer)
        if not table:
            return
        write_text(results / "table.md", table_markdown(table, label))
        write_json(results / "table.json", {f"{o:g}": v for o, v in table.items()})
        plots.plot_omega_curve(table, results / "figure1.png", f"{label}: valid perplexity against ω")
        plots.plot_ppl_by_k(by_k_panels(records, study.regularizer, table), results / "ppl_by_k.png",
                            f"{label}: kNN-LM perplexity against k")
        points = [(r["key_sq_norm_mean"], r["temperature"], r["omega"]) for r in records
                  if r["regularizer"] == study.regularizer and "key_sq_norm_mean" in r]
        if len({p[2] for p in points}) >= plots.MIN_OMEGAS:  # a fit through one ω says nothing
            fit = temperature_fit(points)
            write_json(results / "temperature_vs_norm.json", nan_to_null(fit))  # keys of one scale: no fit (null)
            plots.plot_temperature_vs_norm(points, fit, results / "temperature_vs_norm.png",
                                           f"{label}: tuned temperature against key scale")


def by_k_panels(records: list[dict], regularizer: str, table: dict) -> dict:
    """{protocol panel: {ω: {k: (mean, std)}}}: how each ω's kNN-LM improves with k, over the k every seed's
    record has (records made before a curve was kept lack it)."""
    panels = {}
    for field, label in (("valid_knnlm_ppl_by_k", "tuned: temperature and λ tuned at each k"),
                         ("valid_knnlm_ppl_t1_by_k", "paper protocol's temperature 1: λ tuned at each k")):
        curves = {}
        for omega in table:
            rs = [r[field] for r in runs_at(records, regularizer, omega) if field in r]
            ks = set.intersection(*(set(map(int, r)) for r in rs)) if rs else set()
            if ks:
                curves[f"{omega:g}"] = {k: mean_std([r[str(k)] for r in rs]) for k in ks}
        if curves:
            panels[label] = curves
    return panels


def temperature_fit(points: list[tuple[float, float, float]]) -> dict:
    """log10 T = slope · log10 ‖r‖² + intercept over (mean ‖r‖², tuned T, ω) points: slope 1 is T ∝ ‖r‖²."""
    x, y = np.log10([p[0] for p in points]), np.log10([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1) if len(set(x)) > 1 else (float("nan"), float("nan"))
    return {"slope": float(slope), "intercept": float(intercept), "models": len(points),
            "ratio_T_over_sq_norm": {"min": float(min(p[1] / p[0] for p in points)),
                                     "max": float(max(p[1] / p[0] for p in points))},
            "points": [{"key_sq_norm_mean": p[0], "temperature": p[1], "omega": p[2]} for p in points]}
