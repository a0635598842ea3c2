"""How close each model of the distillation study comes to p_kNN, on training text and on valid (issue 31).

    python experiments/distill_fit.py runs/distill_study --seed 0 --out results/distill_study/fit_seed0

KL(p_kNN || q) per token over the partition {p_kNN's top words, the rest}, the quantity the KL term trains
(`knnlm.distill.kl_to_targets`), for each model of one seed whose run folder is there (`MODELS`: the base LM, the
models trained toward the targets, and the controls trained with CE alone, which say how much of a model's approach
to p_kNN more CE training gives by itself):
- training text: the first `--tokens` training positions in blocks of the model's context, as training sees them,
  against the stored targets (`base_seed<S>/targets`: k = 1,024, the base's tuned temperature, own entry left out);
- valid: the first `--tokens` valid positions, against p_kNN of the same k and temperature computed from the base's
  saved valid search (its nearest `k` neighbours; no entry to leave out), kept to the same number of top words.
If a model comes as close to p_kNN on valid as on training text, its distance on valid is what it failed to learn;
if much farther on valid, it learned the training set's p_kNN without carrying it to new text.
Writes OUT.json and OUT.md. Needs the run folders (the study's `--out`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from knnlm.artifacts import cpu_name, markdown_table, write_json, write_text
from knnlm.checkpoint import load_model
from knnlm.data import block_positions, split_ids, token_stream
from knnlm.datastore import Datastore
from knnlm.distill import Targets, kl_to_targets
from knnlm.evaluate import load_search
from knnlm.models import corpus_for
from knnlm.targets import sparse_knn_distribution

MODELS = {"base": "base LM", "finetune": "fine-tuned with CE + KL", "memory": "memory model (KL alone)",
          "memory_kl_ce": "memory model (KL + CE, superseded)", "scratch": "distilled from scratch (CE + KL)",
          "control": "control: fine-tuned with CE alone", "ensemble": "control: a second LM, CE alone, another init"}


@torch.no_grad()
def mean_kl(model, stream: np.ndarray, n: int, target_of) -> float:
    """Mean KL over the first n positions of `stream`, scored in non-overlapping blocks of the model's context;
    `target_of(rows)` gives (words, probs, rest) of those positions."""
    T = model.cfg.context
    s = torch.from_numpy(stream.astype(np.int64))
    blocks = torch.arange(n // T)
    total, count = 0.0, 0
    for b in range(0, len(blocks), 16):
        ids = blocks[b : b + 16]
        rows = block_positions(ids, T, len(s))  # (B, T)
        out = model(s[rows])
        words, probs, rest = target_of(rows.reshape(-1))
        hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
        kl = kl_to_targets(model.word_logprobs(hidden, words.clamp_min(0)), words, probs, rest)
        total, count = total + float(kl.double().sum()), count + len(kl)
    return total / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="the distillation study's --out folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=49_920, help="positions of each text (a multiple of the context)")
    p.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md")
    a = p.parse_args(argv)
    base_run = a.runs / f"base_seed{a.seed}"
    targets = Targets(base_run / "targets")
    k, temperature, top = targets.meta["k"], targets.meta["temperature"], targets.meta["top"]
    base_model, cfg, _ = load_model(base_run)
    corpus = corpus_for(cfg)
    # the streams training and evaluation read: [<eos>] + ids, position i predicting token i + 1
    train, valid = (token_stream(split_ids(corpus, cfg, split), corpus.eos_id).numpy() for split in ("train", "valid"))

    # p_kNN of valid's positions from the base's saved search: nearest k neighbours, the targets' temperature and top
    _, search = load_search(base_run / "eval" / "valid")
    n = min(a.tokens, len(search["targets"]))
    if not np.array_equal(np.asarray(search["targets"][:n]), valid[1 : n + 1]):
        print(f"distill_fit: error: {base_run}/eval/valid does not follow the valid split's tokens", file=sys.stderr)
        return 2
    vals = Datastore(base_run / "datastore").vals
    # copies: the saved search is a read-only memory map
    dists = torch.from_numpy(np.array(search["distances"][:n, :k], dtype=np.float32))
    words_k = torch.from_numpy(np.asarray(vals[np.asarray(search["neighbors"][:n, :k])], dtype=np.int64))
    valid_p = [sparse_knn_distribution(dists[i : i + 4096], words_k[i : i + 4096], torch.ones_like(dists[i : i + 4096],
                                       dtype=torch.bool), temperature, top) for i in range(0, n, 4096)]
    v_words, v_probs, v_rest = (torch.cat([x[j] for x in valid_p]) for j in range(3))

    def valid_targets(rows):
        return v_words[rows], v_probs[rows].float(), v_rest[rows].float()

    rows, table = [], {}
    for name, label in MODELS.items():
        run = base_run if name == "base" else a.runs / f"{name}_seed{a.seed}"
        if not (run / "checkpoints").is_dir():
            continue
        if not (run / "train_summary.json").is_file():  # a model still training: its checkpoint is not the model
            print(f"distill_fit: {run} skipped: its training has not finished (no train_summary.json)", flush=True)
            continue
        model = base_model if name == "base" else load_model(run)[0]
        fit = {"train": mean_kl(model, train, min(a.tokens, len(train) - 1), targets.batch),
               "valid": mean_kl(model, valid, n, valid_targets)}
        table[name] = fit
        rows.append([label, f"{fit['train']:.3f}", f"{fit['valid']:.3f}", f"{fit['valid'] - fit['train']:+.3f}"])
        print(label, fit, flush=True)
    record = {"seed": a.seed, "k": k, "temperature": temperature, "top": top, "tokens": a.tokens, "valid_tokens": n,
              "device": f"cpu: {cpu_name()}", "kl_nats": table}
    write_json(a.out.with_suffix(".json"), record)
    write_text(a.out.with_suffix(".md"), markdown_table(
        f"KL(p_kNN ‖ model) in nats per token, seed {a.seed} (k = {k}, T = {temperature:g}, top {top} words + the "
        f"rest; first {a.tokens:,} training and {n:,} valid positions, blocks of the context)",
        ["model", "training text", "valid", "valid − training"], rows)
        + f"\n`python experiments/distill_fit.py RUNS --seed {a.seed} --out {a.out}`; {record['device']}.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
