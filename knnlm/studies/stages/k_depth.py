"""`k_depth.md` / `k_depth.json` / `k_depth.png`: beyond the whole-split grid's largest k, up to the whole datastore,
on a sample of each run's valid tokens (`knnlm/studies/depth.py`: brute force over every key).

The study's grid searches every valid and test token to eval.k_max; deeper costs hours a run on a CPU. Where the
tuned k is the grid's largest, this says how much lies beyond it: per run, the kNN-LM perplexity at every k up to
k = N (the whole datastore) on `tokens` evenly spaced valid tokens (the same positions for every run of a study),
temperature and λ tuned at each k on those tokens; per ω, the gain of k = N over k = eval.k_max on the same tokens,
and each ω against ω = 0 of the same seed at both. Options (`[k-depth]` in the study file): `tokens` (default 1000).
Needs the run folders (the datastore and valid's query keys, targets and LM scores, which `knnlm sweep --prune`
keeps); a record scored once keeps its figures."""

from __future__ import annotations

from ...artifacts import UserError, markdown_table, nan_to_null, write_json, write_text
from .. import plots
from ..depth import k_depth
from ..statistics import cell, interval_cell, mean_std, runs_at
from .base import Stage, StudyRun


NEEDS = ("datastore/keys.npy", "datastore/vals.npy", "eval/valid/query_keys.npy", "eval/valid/targets.npy",
         "eval/valid/lm_logprobs.npy")


def spread(xs: list[float]) -> list:
    """[mean, std, n]."""
    return [*mean_std(xs), len(xs)]


def ppl(value) -> float:
    """A depth curve's perplexity: by_k holds [perplexity, temperature, λ], t1_by_k the perplexity alone."""
    return value[0] if isinstance(value, list) else value


def at_whole_store(record: dict) -> float:
    return record["k_depth"]["by_k"][str(record["k_depth"]["datastore_size"])][0]


def depth_at(record: dict, k: int) -> float:
    """A record's sample perplexity (temperature and λ tuned) at the largest k of its depth curve not above k."""
    by_k = record["k_depth"]["by_k"]
    return by_k[str(max(int(x) for x in by_k if int(x) <= k))][0]


class KDepth(Stage):
    name = "k-depth"

    def __init__(self, study, tokens: int = 1000):
        super().__init__(study)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise UserError(f"[k-depth]: tokens: expected a positive whole number of valid tokens, got {tokens!r}")
        self.tokens = tokens

    def after(self, run: StudyRun) -> None:
        for r in list(run.records):
            if r.get("k_depth", {}).get("tokens_asked") == self.tokens:
                continue
            folder = run.out / r["name"]
            if not all((folder / f).is_file() for f in NEEDS):  # a GPU machine's run folders are gone with it
                continue
            print(f"-- {r['name']}: k depth on {self.tokens} valid tokens", flush=True)  # not a run: no "=="
            run.update({**r, "k_depth": {**k_depth(folder, self.tokens), "tokens_asked": self.tokens}})

    def write(self, run: StudyRun) -> None:
        records = [r for r in run.records if r.get("k_depth", {}).get("tokens_asked") == self.tokens]
        if not records:
            return
        table, rows, panels = {}, [], {"tuned: temperature and λ tuned at each k (sample)": {},
                                       "temperature 1, λ tuned at each k (sample)": {}}
        for reg in sorted({r["regularizer"] for r in records}):
            base = {r["seed"]: r for r in runs_at(records, reg, 0.0)} or \
                   {r["seed"]: r for r in runs_at(records, self.study.regularizer, 0.0)}
            for omega in sorted({r["omega"] for r in records if r["regularizer"] == reg}):
                rs = runs_at(records, reg, omega)
                k_max = rs[0]["config"]["eval"]["k_max"]  # the whole-split grid's largest k
                grid_end = [depth_at(r, k_max) for r in rs]
                whole = [at_whole_store(r) for r in rs]
                gain = [100 * (w / g - 1) for w, g in zip(whole, grid_end)]
                paired = [(r, base[r["seed"]]) for r in rs if (reg, omega) != (self.study.regularizer, 0.0)
                          and r["seed"] in base]
                d_end = [depth_at(a, k_max) - depth_at(b, k_max) for a, b in paired]
                d_all = [at_whole_store(a) - at_whole_store(b) for a, b in paired]
                label = f"{reg} {omega:g}" if reg != self.study.regularizer else f"{omega:g}"
                table[label] = {
                    "k_max": k_max, "seeds": len(rs), "tokens": rs[0]["k_depth"]["tokens"],
                    "lm_ppl": spread([r["k_depth"]["lm_ppl"] for r in rs]),
                    "at_k_max": spread(grid_end), "at_N": spread(whole),
                    "N_vs_k_max_percent": spread(gain),
                    "best_k": [r["k_depth"]["best_k"] for r in rs],
                    "temperature_at_N": [r["k_depth"]["by_k"][str(r["k_depth"]["datastore_size"])][1] for r in rs],
                    "minus_omega0_at_k_max": {"per_seed": d_end, "mean_std_n": spread(d_end)} if d_end else None,
                    "minus_omega0_at_N": {"per_seed": d_all, "mean_std_n": spread(d_all)} if d_all else None,
                }
                t = table[label]
                rows.append([label, f"{t['tokens']:,}", cell(*t["lm_ppl"]), f"{k_max:,}", cell(*t["at_k_max"]),
                             cell(*t["at_N"]), cell(*t["N_vs_k_max_percent"], signed=True),
                             ", ".join(f"{k:,}" for k in t["best_k"]),
                             cell(*t["minus_omega0_at_k_max"]["mean_std_n"], signed=True) + " " + interval_cell(d_end)
                             if d_end else "–",
                             cell(*t["minus_omega0_at_N"]["mean_std_n"], signed=True) + " " + interval_cell(d_all)
                             if d_all else "–", str(len(rs))])
                for (panel, curves), field in zip(panels.items(), ("by_k", "t1_by_k")):
                    ks = set.intersection(*(set(map(int, r["k_depth"][field])) for r in rs))
                    curves[label] = {k: mean_std([ppl(r["k_depth"][field][str(k)]) for r in rs]) for k in ks}
        write_json(run.results / "k_depth.json", nan_to_null({"tokens_asked": self.tokens, "rows": table,
                                                              "note": __doc__.split("\n\n")[1].strip()}))
        write_text(run.results / "k_depth.md", markdown_table(
            f"Beyond the grid's largest k, {self.study.title}: kNN-LM perplexity on {self.tokens:,} evenly spaced valid "
            "tokens by brute force over every key, temperature and λ tuned at each k on those tokens (mean ± std over "
            "seeds; Δ: per-seed differences against ω = 0 of the same seed, with their 95 % t-interval)",
            ["ω", "tokens", "LM", "grid's k_max", "at k_max", "at k = N (every key)", "N vs k_max, %",
             "best k per seed", "Δ vs ω = 0 at k_max", "Δ vs ω = 0 at N", "seeds"], rows,
            "A run's figures are chosen on the tokens they report: compare runs and k on them, not with the "
            "whole-split tables. `knnlm/studies/depth.py` says how they are computed."))
        plots.plot_ppl_by_k(panels, run.results / "k_depth.png",
                            f"{self.study.title}: k up to the whole datastore, {self.tokens:,} valid tokens")
