"""Domain adaptation by datastore: a WikiText-2 model evaluated on another text with and without that text's datastore.

    python experiments/vim_help_corpus.py --out data/vim-help
    knnlm train --config configs/wikitext-2-small.toml --out runs/wt2-small        # 12-45 min on a Zen 3 core
    python experiments/domain_adaptation.py --run runs/wt2-small --domain data/vim-help
    python experiments/domain_adaptation.py --tables-only                          # the table from the record

On the domain's valid split (read with the model's own vocabulary, its unseen words as <unk>) it reports the LM
alone, the kNN-LM with the run's own WikiText-2 datastore, and the kNN-LM with a datastore of the domain's training
split (`knnlm datastore --name`), each under both protocols of `knnlm evaluate` (tuned; temperature 1). Every step
is a `knnlm` command, run and timed here; the record (domain_adaptation.json: numbers, commands, seconds, CPU, the
domain's source digests) and the table generated from it (domain_adaptation.md) go to results/domain_adaptation/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from knnlm.artifacts import UserError, cpu_name, markdown_table, read_json, write_json, write_text
from knnlm.checkpoint import latest_meta
from knnlm.config import apply_overrides, from_dict, read_run_config
from knnlm.evaluate import place_for
from knnlm.knn import interpolate

RESULTS = Path(__file__).resolve().parent.parent / "results" / "domain_adaptation"
NAME = "vim-help"  # the domain datastore's name in the run


def knnlm(*args: str) -> tuple[dict, float, str]:
    """Run one `knnlm` command (its --json record), timed; the command as a user would type it."""
    cmd = ["knnlm", *args, "--json"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "knnlm.cli", *args, "--json"], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.time() - t0
    sys.stderr.write(proc.stderr[-2000:])
    if proc.returncode != 0:
        raise UserError(f"{shlex.join(cmd)} failed ({proc.returncode})")
    return json.loads(proc.stdout), seconds, shlex.join(cmd)


def protocols(summary: dict) -> dict:
    return {p: {key: v[key] for key in ("knnlm_ppl", "lambda", "k", "temperature", "target_in_neighbors")}
            for p, v in summary["protocols"].items()}


def without_unk(run: Path, domain: Path) -> dict:
    """Perplexities over the valid tokens that are not <unk> (a tenth of the domain's text: a datastore of the domain
    learns where its <unk> fall, which the LM alone never could), from the saved per-token arrays of each evaluation
    at its tuned λ, k and temperature (chosen over all tokens)."""
    cfg = read_run_config(run)
    unk = read_json(run / "vocab.json", "vocabulary").index("<unk>")
    out = {}
    for key, name in (("wikitext2_datastore", None), ("domain_datastore", NAME)):
        folder = place_for(run, apply_overrides(cfg, [f"data.path={domain}"]) if name is None else cfg, name).folder("valid")
        targets, lm = np.load(folder / "targets.npy"), np.load(folder / "lm_logprobs.npy").astype(np.float64)
        knn = np.load(folder / "knn_logprobs.npy").astype(np.float64)
        keep = targets != unk
        lmbda = read_json(folder / "summary.json")["lambda"]
        out["tokens"], out["lm_ppl"] = int(keep.sum()), float(np.exp(-lm[keep].mean()))
        out[key] = {"knnlm_ppl": float(np.exp(-interpolate(lm, knn, lmbda)[keep].mean())), "lambda": lmbda}
    return out


def run_example(run: Path, domain: Path) -> dict:
    steps = {}
    if not (run / "datastore" / "meta.json").is_file():
        steps["datastore_wikitext2"] = knnlm("datastore", "--out", str(run))
    steps["datastore_domain"] = knnlm("datastore", "--out", str(run), "--name", NAME, f"data.path={domain}")
    steps["evaluate_wikitext2_datastore"] = knnlm("evaluate", "--out", str(run), f"data.path={domain}")
    steps["evaluate_domain_datastore"] = knnlm("evaluate", "--out", str(run), "--datastore", NAME)
    wt2, dom = steps["evaluate_wikitext2_datastore"][0], steps["evaluate_domain_datastore"][0]
    ckpt = latest_meta(run)  # the model the datastores and evaluations used (training may have been stopped early)
    planned = from_dict(ckpt["config"], ckpt["path"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [m for m in metrics if "valid_ppl" in m and m["step"] <= ckpt["step"]]
    ds_meta = {"wikitext-2": read_json(run / "datastore" / "meta.json", "datastore meta"),
               NAME: read_json(run / "datastores" / NAME / "datastore" / "meta.json", "datastore meta")}
    sources = domain / "SOURCES.json"
    return {
        "question": "does a datastore of a domain's text adapt a WikiText-2 kNN-LM to it, with no training?",
        "cpu": cpu_name(), "threads": os.cpu_count(),
        "run": str(run), "config": "configs/wikitext-2-small.toml", "domain": str(domain),
        "domain_sources": {"file": str(sources), "sha256": hashlib.sha256(sources.read_bytes()).hexdigest(),
                           **{k: v for k, v in read_json(sources).items() if k != "files"},
                           "files": len(read_json(sources)["files"])},
        "model": {"checkpoint": ckpt["path"], "step": ckpt["step"], "train_seconds": read_json(Path(ckpt["path"]) / "state.json").get("elapsed"),
                  "planned_epochs": planned.train.epochs,
                  "wikitext2_valid_ppl_blocks": valid[-1]["valid_ppl"] if valid else None,
                  "wikitext2_valid_ppl_step": valid[-1]["step"] if valid else None},
        "datastores": {name: {"keys": m["N"], "corpus": m["corpus"], "oov_rate": m.get("oov_rate"),
                              "seconds": m["seconds"]} for name, m in ds_meta.items()},
        "domain_valid": {"tokens": dom["tokens"], "oov_rate": dom["oov_rate"], "lm_ppl": dom["lm_ppl"],
                         "wikitext2_datastore": protocols(wt2), "domain_datastore": protocols(dom)},
        "domain_valid_without_unk": without_unk(run, domain),
        "commands": {step: {"command": cmd, "seconds": round(sec, 1)} for step, (_, sec, cmd) in steps.items()},
    }


def table(record: dict) -> str:
    v = record["domain_valid"]
    rows = [["LM alone", "—", f"{v['lm_ppl']:.2f}", "—", "—", "—"]]
    for label, key, store in (("WikiText-2 (the run's own)", "wikitext2_datastore", "wikitext-2"),
                              (f"{NAME} (the domain's train split)", "domain_datastore", NAME)):
        keys = record["datastores"][store]["keys"]
        for p, name in (("tuned", "tuned"), ("paper", "temperature 1")):
            c = v[key][p]
            rows.append([f"kNN-LM, {label}", f"{keys:,}", f"{c['knnlm_ppl']:.2f}", name,
                         f"{c['lambda']}, {c['k']}, {c['temperature']:g}", f"{100 * c['target_in_neighbors']:.1f}%"])
    note = (f"Perplexity of the {v['tokens']:,} tokens of the domain's valid split ({100 * v['oov_rate']:.2f}% <unk>: "
            f"words the WikiText-2 vocabulary lacks); λ, k and temperature chosen on that split under each protocol. "
            f"{record['cpu']}; the model of {record['config']} at training step {record['model']['step']:,}. "
            f"Record: results/domain_adaptation/domain_adaptation.json.")
    u = record.get("domain_valid_without_unk")
    if u:
        note += (f"\n\nOver the {u['tokens']:,} valid tokens that are not <unk> (the tuned protocol's choice, made over all "
                 f"tokens): LM alone {u['lm_ppl']:.2f}, WikiText-2 datastore {u['wikitext2_datastore']['knnlm_ppl']:.2f}, "
                 f"{NAME} datastore {u['domain_datastore']['knnlm_ppl']:.2f}.")
    return markdown_table("Domain adaptation by datastore: a WikiText-2 model on Vim's help files",
                          ["", "datastore keys", "valid ppl", "protocol", "λ, k, temperature", "target in the k"],
                          rows, note)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/wt2-small", help="a trained WikiText-2 run folder")
    p.add_argument("--domain", default="data/vim-help", help="the domain's corpus folder")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--tables-only", action="store_true", help="rewrite the table from the record; run nothing")
    p.add_argument("--add-without-unk", action="store_true",
                   help="add the perplexities without <unk> targets to the record from the run's saved arrays")
    args = p.parse_args()
    out = Path(args.results)
    try:
        if args.tables_only:
            record = read_json(out / "domain_adaptation.json", "domain-adaptation record")
            if args.add_without_unk:  # a record made before it was computed: from the run's saved arrays, no search
                record["domain_valid_without_unk"] = without_unk(Path(args.run), Path(args.domain))
                write_json(out / "domain_adaptation.json", record)
        else:
            record = run_example(Path(args.run), Path(args.domain))
            write_json(out / "domain_adaptation.json", record)
        text = table(record)
        write_text(out / "domain_adaptation.md", text)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
