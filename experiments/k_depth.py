"""How deep must k go? The kNN-LM perplexity at every k up to the whole datastore, on a sample of one evaluated
run's valid tokens, by brute force over every key (`knnlm/studies/depth.py` says how; a study's `k-depth` stage
does the same for each of its runs).

    python experiments/k_depth.py RUN --tokens 1000 --out results/memorizing/k_depth
    python experiments/k_depth.py --redraw results/memorizing/k_depth     # OUT.md and OUT.png from OUT.json alone

Writes OUT.json (the depth record, with each k's 95 % paired-bootstrap interval of its perplexity over the best k's),
OUT.md (a table) and OUT.png (perplexity against k, log scales, both protocols).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from knnlm.artifacts import markdown_table, read_json, write_json, write_text
from knnlm.studies.depth import k_depth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, nargs="?")
    p.add_argument("--tokens", type=int, default=1000, help="evenly spaced tokens of the evaluated valid split")
    p.add_argument("--out", type=Path, help="OUT.json, OUT.md and OUT.png are written")
    p.add_argument("--redraw", type=Path, help="write OUT.md and OUT.png again from OUT.json")
    a = p.parse_args()
    if a.redraw:
        draw(read_json(a.redraw.with_suffix(".json"), "k depth record"), a.redraw)
        return
    if a.run is None or a.out is None:
        p.error("RUN and --out are needed (or --redraw OUT)")
    rec = k_depth(a.run, a.tokens, keep_logprobs=True)
    mixed = rec.pop("mixed_logprobs")  # per k: the tokens' log-probabilities at its own choice
    best = str(rec["best_k"])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, rec["tokens"], (2000, rec["tokens"]))
    rec["vs_best_k_ci95"] = {k: [float(x) for x in np.quantile(np.exp(mixed[best][idx].mean(1) - lp[idx].mean(1)),
                                                               [0.025, 0.975])] for k, lp in mixed.items()}
    rec["command"] = f"python experiments/k_depth.py {a.run} --tokens {a.tokens} --out {a.out}"
    rec["run"] = str(a.run)
    write_json(a.out.with_suffix(".json"), rec)
    draw(rec, a.out)


def draw(rec: dict, out: Path) -> None:
    """OUT.md and OUT.png from a depth record."""
    run = rec.get("run") or rec["command"].split()[2]  # records made before "run" was kept name it in the command
    N, name = rec["datastore_size"], Path(run).name
    write_text(out.with_suffix(".md"), markdown_table(
        f"kNN-LM valid perplexity by k up to the whole datastore, `{run}` ({rec['tokens']:,} evenly spaced tokens "
        f"of {rec['of_evaluated_tokens']:,} evaluated; {N:,} keys; LM alone {rec['lm_ppl']:.2f}; brute force over "
        "every key)",
        ["k", "tuned (T, λ at this k)", "T", "λ", "ppl / ppl at the best k, 95 % CI", "T = 1 (λ tuned)"],
        [[f"{int(k):,}" + (" (N)" if int(k) == N else ""), f"{v[0]:.2f}", f"{v[1]:g}", f"{v[2]:g}",
          "[{:.4f}, {:.4f}]".format(*rec["vs_best_k_ci95"][k]), f"{rec['t1_by_k'][k]:.2f}"]
         for k, v in rec["by_k"].items()],
        f"Best k: {rec['best_k']:,}. Temperatures {rec['temperatures'][0]:g}–{rec['temperatures'][-1]:g} "
        f"({len(rec['temperatures'])} values), λ 0.05–1 by 0.05, chosen on these tokens (a little optimistic); the "
        "interval is a paired bootstrap over tokens (2,000 resamples), each k at its own choice. "
        f"`{rec['command']}` on {rec['cpu']} ({rec['seconds']:.0f} s)."))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    ks = [int(k) for k in rec["by_k"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [v[0] for v in rec["by_k"].values()], "o-", ms=3, label="temperature and λ tuned at each k")
    ax.plot(ks, list(rec["t1_by_k"].values()), "s--", ms=3, label="temperature 1, λ tuned")
    ax.axhline(rec["lm_ppl"], color="gray", lw=1, label="LM alone")
    ax.axvline(N, color="gray", lw=0.5, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k (neighbours, log scale; dotted: the whole datastore)")
    ax.set_ylabel("valid perplexity (log scale)")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
    ax.set_title(f"{name}: {rec['tokens']:,} valid tokens, {N:,} keys; {rec['cpu']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
