"""Training throughput: knnlm's model and loop against a same-size Hugging Face GPT-2 written the default way.

    python benchmarks/training.py [--config configs/wikitext-2.toml] [--steps 15]

Both train on the same WikiText-2 batches (batch_size x context tokens per step) with AdamW and gradient clipping:
- knnlm: adaptive input + tied adaptive softmax, bf16 autocast, the L2 key regularizer on (as in the ω study);
- GPT-2: `transformers.GPT2LMHeadModel` of the same width, depth, heads, FFN size and context, full softmax over the
  vocabulary, fp32 (what a user gets by default), and the same with bf16 autocast.
Model FLOPs per step are counted by `torch.utils.flop_counter` over one forward + backward (the matrix products
actually executed, so the adaptive softmax is credited only for the bands it computes); utilization is against the
machine's measured bf16 (and fp32) matrix-product rate. Then the same knnlm step with each training objective
(`--regularizers`) against ω = 0: what each costs per step. Writes results/benchmarks/<machine>/training.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import default_out, bf16_matmul_tflops, write_results
from knnlm.config import load_config
from knnlm.data import epoch_order, num_train_blocks, token_stream, train_batch
from knnlm.lm import autocast
from knnlm.models import build_model, corpus_for
from knnlm.regularizers import make_regularizer
from knnlm.train import Objective


def knnlm_step(cfg, vocab_size: int):
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size)
    reg = make_regularizer(cfg.train, model, model.vocab_size, model.key_dim, block=cfg.model.context)
    objective = Objective(model, reg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(inputs, targets):
        with autocast("cpu", True):
            lm, r, _ = objective(inputs, targets)  # (the KL term: 0 without distillation targets)
        loss = lm + cfg.train.omega * r
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        reg.after_step(model, inputs, targets)  # MOCO's momentum encoder, knn-memory's memory: part of the step

    return model, step


def gpt2_step(cfg, vocab_size: int, bf16: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=m.context, n_embd=m.d_model,
                                       n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.d_ff, resid_pdrop=m.dropout,
                                       embd_pdrop=m.dropout, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(inputs, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return model, step


def measure(name: str, model, step, batches, warmup: int, peak: dict) -> dict:
    model.train()
    with FlopCounterMode(display=False) as fc:
        step(*batches[0])
    flops = fc.get_total_flops()
    for b in batches[1 : 1 + warmup]:
        step(*b)
    timed = batches[1 + warmup :]
    t = time.perf_counter()
    for b in timed:
        step(*b)
    sec = (time.perf_counter() - t) / len(timed)
    tokens = batches[0][0].numel()
    r = {"name": name, "params": sum(p.numel() for p in model.parameters()), "seconds_per_step": sec,
         "tokens_per_s": tokens / sec, "flops_per_step": flops, "tflops": flops / sec / 1e12,
         "mfu_vs_bf16": flops / sec / 1e12 / peak["bfloat16"], "mfu_vs_fp32": flops / sec / 1e12 / peak["float32"]}
    print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, {r['tflops']:.3f} TFLOP/s, MFU {100 * r['mfu_vs_bf16']:.1f}% of bf16",
          flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/wikitext-2.toml")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--omega", type=float, default=1e-4)
    p.add_argument("--regularizers", default="l2,moco,knn,pull-ratio,knn-memory",
                   help="comma-separated train.regularizer values timed against ω = 0 (empty: none)")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    cfg = load_config(a.config, [f"train.omega={a.omega}"])
    corpus = corpus_for(cfg)
    s = token_stream(corpus.splits["train"], corpus.eos_id)
    order = epoch_order(num_train_blocks(len(corpus.splits["train"]), cfg.model.context), 0, 0)
    bs = cfg.train.batch_size
    batches = [train_batch(s, order[i * bs : (i + 1) * bs], cfg.model.context) for i in range(1 + a.warmup + a.steps)]
    peak = bf16_matmul_tflops()
    print(f"measured matrix-product rate: {peak}", flush=True)
    rows = [measure("knnlm (adaptive softmax, bf16)", *knnlm_step(cfg, corpus.vocab_size), batches, a.warmup, peak),
            measure("HF GPT-2 (full softmax, fp32)", *gpt2_step(cfg, corpus.vocab_size, False), batches, a.warmup, peak),
            measure("HF GPT-2 (full softmax, bf16 autocast)", *gpt2_step(cfg, corpus.vocab_size, True), batches, a.warmup, peak)]
    # the cost of each training objective: the same knnlm step with each regularizer (ω = 0 computes none)
    objectives = []
    for name in ["none", *[r for r in a.regularizers.split(",") if r]]:
        c = load_config(a.config, ["train.omega=0"] if name == "none" else [f"train.omega={a.omega}", f"train.regularizer={name}"])
        objectives.append({**measure(f"knnlm, {name}", *knnlm_step(c, corpus.vocab_size), batches, a.warmup, peak),
                           "regularizer": name})
    base = rows[1]["tokens_per_s"]
    md = [f"Same batches ({bs} x {cfg.model.context} tokens), d = {cfg.model.d_model}, {cfg.model.n_layers} layers; "
          f"measured matrix-product rate {peak['bfloat16']:.2f} TFLOP/s bf16, {peak['float32']:.2f} fp32.", "",
          "| model | params | tokens/s | vs GPT-2 fp32 | model TFLOP/s | MFU (bf16 rate) | MFU (fp32 rate) |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:.0f} | **{r['tokens_per_s'] / base:.2f}x** | "
                  f"{r['tflops']:.3f} | {100 * r['mfu_vs_bf16']:.1f}% | {100 * r['mfu_vs_fp32']:.1f}% |")
    md += ["", "Training step of knnlm's model with each regularizer (`train.regularizer`; `none`: ω = 0, the LM loss alone):",
           "", "| regularizer | seconds per step | vs none |", "|---|---|---|"]
    for r in objectives:
        md.append(f"| {r['regularizer']} | {r['seconds_per_step']:.3f} | {r['seconds_per_step'] / objectives[0]['seconds_per_step']:.2f}x |")
    write_results(a.out, "training", {"config": a.config, "omega": a.omega, "peak_tflops": peak, "rows": rows,
                                      "objectives": objectives}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
