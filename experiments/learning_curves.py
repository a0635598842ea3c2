"""Learning curves of trained runs: train and valid perplexity at the end of each epoch (`train.curves = true`).

    python experiments/learning_curves.py RUN [RUN ...] --out results/memorizing/pilot

For each run, reads RUN/metrics.jsonl (the epoch rows) and RUN/train_summary.json, and writes OUT.json (the
curves, the epoch of the best valid perplexity and train/valid there, the run's config and where it was trained),
OUT.md (one table per run) and OUT.png (perplexity against epoch, log scale, one colour per run; solid train,
dashed valid; the marker is the best valid epoch). The question the curves answer (issue 33): at the checkpoint of
the best valid perplexity, is train perplexity at most half the valid one, i.e. has the model memorized its
training set the way the paper's model (train 20, valid 76) had?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from knnlm.artifacts import cpu_name, markdown_table, read_json, write_json, write_text


def curve(run: Path) -> dict:
    """The epoch rows of one run (those with both perplexities) and its best valid epoch."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    epochs = [r for r in rows if "valid_ppl" in r and "train_ppl" in r]
    if not epochs:
        raise SystemExit(f"{run}/metrics.jsonl: no epoch row with train_ppl (train it with train.curves=true)")
    best = min(epochs, key=lambda r: r["valid_ppl"])
    summary = read_json(run / "train_summary.json") if (run / "train_summary.json").is_file() else {}
    config = read_json(run / "config.json")
    return {"run": run.name, "epochs": [{k: r[k] for k in ("epoch", "step", "train_ppl", "valid_ppl")} for r in epochs],
            "best": {"epoch": best["epoch"], "train_ppl": best["train_ppl"], "valid_ppl": best["valid_ppl"],
                     "train_over_valid": best["train_ppl"] / best["valid_ppl"]},
            "train_seconds": summary.get("train_seconds"), "device": summary.get("device"),
            "data": config["data"], "model": config["model"],
            "train": {k: config["train"][k] for k in ("epochs", "batch_size", "lr", "warmup_steps", "omega", "seed")}}


def draw(curves: list[dict], path: Path, machine: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, c in enumerate(curves):
        colour = f"C{i}"
        x = [e["epoch"] for e in c["epochs"]]
        ax.plot(x, [e["train_ppl"] for e in c["epochs"]], "-o", color=colour, ms=3, label=f"{c['run']}: train")
        ax.plot(x, [e["valid_ppl"] for e in c["epochs"]], "--o", color=colour, ms=3, label=f"{c['run']}: valid")
        ax.plot([c["best"]["epoch"]], [c["best"]["valid_ppl"]], "*", color=colour, ms=12)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (log scale; blocks of the model's context, eval mode)")
    ax.set_title(f"Learning curves; ★ = best valid epoch\n{machine}", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path, help="OUT.json, OUT.md and OUT.png are written")
    a = p.parse_args()
    curves = [curve(run) for run in a.runs]
    machine = cpu_name()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out.with_suffix(".json"), {"cpu": machine, "runs": curves})
    md = []
    for c in curves:
        rows = [[f"{e['epoch']:g}", f"{e['train_ppl']:.2f}", f"{e['valid_ppl']:.2f}",
                 f"{e['train_ppl'] / e['valid_ppl']:.2f}" + (" ← best valid" if e["epoch"] == c["best"]["epoch"] else "")]
                for e in c["epochs"]]
        note = (f"{c['data'].get('max_train_tokens') or 'all'} training tokens; d_model {c['model']['d_model']}, "
                f"{c['model']['n_layers']} layers, dropout {c['model']['dropout']}; trained in "
                f"{c['train_seconds'] or 0:.0f} s on {c['device'] or machine}. Perplexity over blocks of the context "
                f"(eval mode), train on as many tokens as valid.")
        md.append(markdown_table(f"{c['run']}: train and valid perplexity by epoch", ["epoch", "train", "valid",
                                 "train / valid"], rows, note))
    write_text(a.out.with_suffix(".md"), "\n".join(md))
    if len(curves[0]["epochs"]) >= 2:  # a curve needs two epochs at least
        draw(curves, a.out.with_suffix(".png"), machine)
    print("\n".join(md))


if __name__ == "__main__":
    main()
