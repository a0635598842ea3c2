"""The rescaling control (`rescale.md` / `rescale.json`): does a uniform rescaling of the ω = 0 model's keys give
what ω > 0 gives at temperature 1?

For each ω > 0 and seed, the ω = 0 model of the same seed is evaluated at T = ‖r_0‖² / ‖r_ω‖² (mean squared key
norms on valid), which is temperature 1 after scaling its keys to the regularized model's scale. `recovered` is
(ppl_0(T=1) − ppl_0(T)) / (ppl_0(T=1) − ppl_ω(T=1)): the share of the temperature-1 gain of ω > 0 that the
rescaling alone gives. Needs the ω = 0 runs' saved neighbours (their run folders); a pair computed before from
the same records keeps its figures, also where its ω = 0 folder is gone since (e.g. trained on a GPU machine)."""

from __future__ import annotations

from ...artifacts import UserError, markdown_table, nan_to_null, read_json, write_json, write_text
from ...config import Config
from ...evaluate import paper_k, tuning_arrays
from ...knn import perplexities
from ..records import run_config
from ..statistics import cell, over_seeds, runs_at
from .base import Stage, StudyRun

COLUMNS = ("temperature_match", "omega0_t1", "omega0_rescaled", "omega_t1", "recovered")


def rescaled_ppl(arrays: tuple, cfg: Config, temperature: float) -> float:
    """Valid kNN-LM perplexity of a run at k = 1024 (the paper protocol's k) and a given temperature, λ tuned, from
    its saved neighbours (`tuning_arrays(run, "valid")`: LM log-probs and `KnnScores`). Dividing distances by T is what
    scaling every key (stored and query) by 1/√T does."""
    lm, scores = arrays
    if not scores.answers(paper_k(cfg), temperature):  # a table (eval.k_store) holds other temperatures at this k
        raise UserError(f"rescaling control: k = {paper_k(cfg)} at temperature {temperature:.4g} needs that many "
                        f"neighbours stored per token; the ω = 0 run stores {scores.distances.shape[1]} "
                        f"(set eval.k_store to {paper_k(cfg)} or more)")
    knn = scores.logprob(paper_k(cfg), temperature)
    return min(perplexities(lm, knn, cfg.eval.lmbda))


class Rescale(Stage):
    name = "rescale"

    def write(self, run: StudyRun) -> None:
        reg, records = self.study.regularizer, run.records
        base = {r["seed"]: r for r in runs_at(records, reg, 0.0)}
        pairs = [(r, base[r["seed"]]) for r in records if r["regularizer"] == reg and r["omega"] > 0 and r["seed"] in base
                 and all(f in x for x in (r, base[r["seed"]]) for f in ("key_sq_norm_mean", "valid_knnlm_ppl_paper"))]
        want = {r["name"]: [r0["name"], r["key_sq_norm_mean"], r0["key_sq_norm_mean"]] for r, r0 in pairs}
        path = run.results / "rescale.json"
        old = read_json(path, "rescaling control") if path.is_file() else {}
        if old.get("inputs") == want:
            return
        per_run, loaded = {}, {}  # loaded: one ω = 0 run's saved neighbours (1.6 GB), read once for all its pairs
        for r, r0 in sorted(pairs, key=lambda p: p[1]["name"]):
            run0 = run.out / r0["name"]
            if old.get("inputs", {}).get(r["name"]) == want[r["name"]]:  # computed before from the same records; its
                per_run[r["name"]] = old["per_run"][r["name"]]            # ω = 0 folder may be gone (another machine's)
                continue
            if not (run0 / "eval" / "valid" / "meta.json").is_file() or not (run0 / "datastore" / "meta.json").is_file():
                continue
            T = r0["key_sq_norm_mean"] / r["key_sq_norm_mean"]
            if r0["name"] not in loaded:
                loaded = {r0["name"]: tuning_arrays(run0, "valid")}
            p0_T = rescaled_ppl(loaded[r0["name"]], run_config(self.study, reg, 0.0, r0["seed"]), T)
            p0_1, pw_1 = r0["valid_knnlm_ppl_paper"], r["valid_knnlm_ppl_paper"]
            gain = p0_1 - pw_1
            per_run[r["name"]] = {"omega": r["omega"], "seed": r["seed"], "temperature_match": T,
                                  "omega0_t1": p0_1, "omega0_rescaled": p0_T, "omega_t1": pw_1,
                                  "omega0_tuned": r0["valid_knnlm_ppl"], "omega_tuned": r["valid_knnlm_ppl"],
                                  "recovered": (p0_1 - p0_T) / gain if gain > 0 else float("nan")}
        if not per_run:
            return
        summary = {}
        for omega in sorted({v["omega"] for v in per_run.values()}):
            vs = [v for v in per_run.values() if v["omega"] == omega]
            summary[f"{omega:g}"] = over_seeds({m: [v[m] for v in vs] for m in COLUMNS})
        write_json(path, nan_to_null({"inputs": {n: want[n] for n in per_run}, "per_run": per_run, "summary": summary,
                                      "note": __doc__.split("\n\n")[1].strip()}))  # undefined: null
        write_text(run.results / "rescale.md", markdown_table(
            f"Rescaling control, {self.study.title}: the ω = 0 model at the temperature that matches ω's key scale "
            "(k = 1024, λ tuned; mean ± std over seeds)",
            ["ω", "T = ‖r_0‖²/‖r_ω‖²", "ω = 0 at T = 1", "ω = 0 rescaled (at T)", "ω at T = 1",
             "share of ω's T = 1 gain recovered", "seeds"],
            [[o, *(cell(*v[m]) for m in COLUMNS), str(v["omega0_t1"][2])] for o, v in summary.items()],
            "Cells: perplexity on the valid tokens the study evaluates. `share recovered` = (ω=0 at T=1 − ω=0 rescaled) / "
            "(ω=0 at T=1 − ω at T=1); 1 means a plain rescaling of the unregularized keys gives all of ω's gain at "
            "temperature 1; it is undefined (nan) where ω does not beat ω = 0 at temperature 1."))
