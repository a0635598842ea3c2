"""Does the ω comparison depend on where the k grid stops? The study tunes k up to 1024 and every model picks
k = 1024, the largest. This evaluates finished study models again with k up to 4096, in folders of their own that
link to the study's checkpoints and datastores (the study's evaluations stay as they are), and writes the best
valid kNN-LM perplexity at each k for each model.

    python experiments/k_edge_check.py --study-runs runs/omega_study --out runs/k_edge_check \
        l2_omega0_seed0 l2_omega0.001_seed0
"""

import argparse
import shutil
from pathlib import Path

from knnlm.artifacts import read_json, write_json, write_text
from knnlm.config import apply_overrides, read_run_config, validate
from knnlm.evaluate import evaluate

K = [64, 128, 256, 512, 1024, 2048, 4096]


def linked_run(source: Path, dest: Path) -> Path:
    """A run folder whose checkpoints and datastore are the study run's own (symbolic links)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoints", "datastore"):
        link = dest / name
        if not link.exists():
            link.symlink_to((source / name).resolve(), target_is_directory=True)
    shutil.copy(source / "config.json", dest / "config.json")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study-runs", required=True, type=Path, help="the sweep's --out folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--results", type=Path, default=Path("results/omega_study"))
    ap.add_argument("runs", nargs="+", help="run names inside --study-runs")
    args = ap.parse_args()

    rows = {}
    for name in args.runs:
        run = linked_run(args.study_runs / name, args.out / name)
        cfg = apply_overrides(read_run_config(run), [f"eval.k_max={max(K)}", "eval.k=" + ",".join(map(str, K))])
        validate(cfg)
        summary = evaluate(run, cfg, "valid")
        grid = read_json(run / "eval" / "valid" / "tuning.json")
        rows[name] = {"best": {k: min((r for r in grid if r["k"] == k), key=lambda r: r["ppl"]) for k in K},
                      "chosen": {x: summary[x] for x in ("k", "temperature", "lambda", "knnlm_ppl")}}
    write_json(args.results / "k_edge_check.json", rows)
    lines = ["### Best valid kNN-LM perplexity at each k (temperature and λ tuned at that k)", "",
             "| model | " + " | ".join(f"k = {k}" for k in K) + " |", "|---" * (len(K) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row['best'][k]['ppl']:.2f}" for k in K) + " |")
    write_text(args.results / "k_edge_check.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
