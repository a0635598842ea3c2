"""What the distillation loss costs per training step: CE alone, CE + β·KL with each tail band's normalizer as one
logsumexp over the whole (tokens × band words) logits, and with `knnlm.model.BandLogSumExp` (blocks of rows that stay
in cache, recomputed in the backward).

    python benchmarks/distil_step.py [--config configs/wikitext-2.toml] [--steps 4] [--top 32]

One knnlm training step as `knnlm train` takes it (forward, loss, backward, AdamW; autocast as the trainer sets it)
on real WikiText-2 batches; the KL targets are planted: each position's `--top` words drawn from the training
split's unigram distribution (so the bands they fall in are as frequent as real targets'), with random
probabilities. The three are timed in turns, best of `--steps` each, side by side in one process. Writes
OUT/distil_step.{json,md} (default: this machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import default_out, write_results
from knnlm.config import load_config
from knnlm.data import epoch_order, num_train_blocks, token_stream, train_batch
from knnlm.distill import kl_to_targets
from knnlm.lm import autocast, native_bf16
from knnlm.model import BandLogSumExp
from knnlm.models import build_model, corpus_for


def whole_logsumexp(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The band normalizer before BandLogSumExp: the whole (N, n) logits at once."""
    return torch.logsumexp((z @ weight.t()).float(), dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/wikitext-2.toml")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=32)
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    cfg = load_config(a.config)
    corpus = corpus_for(cfg)
    train = corpus.splits["train"]
    s = token_stream(train, corpus.eos_id)
    bs, T = cfg.train.batch_size, cfg.model.context
    order = epoch_order(num_train_blocks(len(train), T), 0, 0)
    inputs, targets = train_batch(s, order[:bs], T)
    rng = np.random.default_rng(0)
    words = torch.from_numpy(np.asarray(train)[rng.integers(0, len(train), (bs * T, a.top))].astype(np.int64))
    probs = torch.from_numpy(rng.dirichlet(np.ones(a.top + 1), bs * T).astype(np.float32))
    probs, rest = probs[:, :-1].contiguous(), probs[:, -1].contiguous()
    torch.manual_seed(0)
    model = build_model(cfg.model, corpus.vocab_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = cfg.train.bf16 and native_bf16("cpu")  # what `autocast` does with train.bf16 on this CPU
    apply = BandLogSumExp.apply

    def step(kl: bool) -> None:
        with autocast("cpu", cfg.train.bf16):  # as the trainer: on only where the CPU multiplies bf16
            out = model(inputs)
            h = out.hidden.reshape(-1, out.hidden.shape[-1])
            loss = -model.target_logprob(h, targets.reshape(-1)).mean()
            if kl:
                loss = loss + kl_to_targets(model.word_logprobs(h, words), words, probs, rest).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ways = {"CE only": (False, apply), "CE + KL, whole-band logsumexp": (True, whole_logsumexp),
            "CE + KL, BandLogSumExp (blocks of rows)": (True, apply)}
    best = {name: float("inf") for name in ways}
    for timed in [False] + [True] * a.steps:  # the first round warms up, then best of --steps
        for name, (kl, normalizer) in ways.items():
            BandLogSumExp.apply = normalizer
            t = time.perf_counter()
            step(kl)
            if timed:
                best[name] = min(best[name], time.perf_counter() - t)
    BandLogSumExp.apply = apply
    ce = best["CE only"]
    rows = [{"step": n, "seconds_per_step": sec, "kl_seconds": sec - ce} for n, sec in best.items()]
    old, new = rows[1]["kl_seconds"], rows[2]["kl_seconds"]
    md = [f"One training step of `{a.config}` ({bs} x {T} tokens, vocabulary {corpus.vocab_size:,}, bands "
          f"{model.softmax.emb.edges}), KL toward {a.top} planted top words per position, bf16 autocast "
          f"{'on' if bf16 else 'off'}; best of {a.steps} each, in turns.", "",
          "| step | seconds per step | KL's share (s) |", "|---|---|---|"]
    md += [f"| {r['step']} | {r['seconds_per_step']:.3f} | {r['kl_seconds']:.3f} |" for r in rows]
    md += ["", f"The KL term costs {old / max(new, 1e-9):.1f}x less with BandLogSumExp; a distillation step "
               f"{rows[1]['seconds_per_step'] / rows[2]['seconds_per_step']:.2f}x faster."]
    for line in md[-4:]:
        print(line)
    write_results(a.out, "distil_step", {"config": a.config, "top": a.top, "bf16": bf16, "rows": rows,
                                         "kl_speedup": old / max(new, 1e-9)}, md)


if __name__ == "__main__":
    main()
