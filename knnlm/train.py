"""Train the language model, optionally with a key regularizer: `knnlm train --config C --out RUN [--resume]`.

Several processes: `torchrun --nproc_per_node=N -m knnlm.cli train ...` (PyTorch DDP; gloo on CPU, NCCL on GPUs).

The loop is written out: AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast, a metrics line
per log interval in `RUN/metrics.jsonl`, validation perplexity each epoch, and checkpoints every
`train.checkpoint_every` steps. The data order and the dropout noise are functions of (seed, step), so a killed
run resumed from its last checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .artifacts import UserError, atomic_path, kill_point, write_json, write_text
from .checkpoint import (BEST, init_weights_from, keep_as_best, latest_checkpoint, load_training_state, load_weights,
                         save_checkpoint)
from .config import Config, check_same_model, save_config
from .data import Corpus, block_positions, epoch_order, num_train_blocks, token_stream, train_batch, split_ids
from .distill import Targets, check_targets_for, kl_to_targets
from .distributed import barrier, setup_distributed
from .lm import LanguageModel, autocast
from .models import build_model, corpus_for
from .regularizers import make_regularizer
from .scoring import score_stream


def lr_at(step: int, total: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def block_perplexity(model: LanguageModel, corpus: Corpus, cfg: Config, split: str, max_tokens: int = 0) -> float:
    """LM perplexity on (a prefix of) a split in non-overlapping blocks of `model.context` tokens: the cheap check
    logged during training. Early tokens of each block see little context, so it is higher than the evaluation's
    sliding-window perplexity (`knnlm evaluate`, every token with at least half a window of context)."""
    ids = split_ids(corpus, cfg, split)
    ids = ids[:max_tokens] if max_tokens else ids
    s = token_stream(ids, corpus.eos_id)
    total, count = 0.0, 0
    for _, _, logp in score_stream(model, s, model.cfg.context, cfg.train.batch_size, cfg.train.bf16, want_keys=False):
        total -= logp.double().sum().item()
        count += logp.numel()
    return math.exp(total / count)


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def penalty_strength(metrics: Path, omega: float) -> dict:
    """The loss terms in nats at the start and the end of training (first and last logged windows): the LM loss, the
    regularizer's weighted term ω · reg_loss and the KL term when distilling; how strong a penalty is, in the LM
    loss's units."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.is_file() else []
    rows = [r for r in rows if "lm_loss" in r]
    if not rows:
        return {}
    at = lambda r: {"step": r["step"], "lm_loss": r["lm_loss"], "omega_reg_loss": omega * r["reg_loss"],
                    **({"kl_loss": r["kl_loss"]} if "kl_loss" in r else {})}
    return {"start": at(rows[0]), "end": at(rows[-1])}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we continue from (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


class Objective(nn.Module):
    """The loss terms of one batch. DDP wraps this module, so every parameter it trains is used in forward."""

    def __init__(self, model: LanguageModel, regularizer: nn.Module, targets: Targets | None = None):
        super().__init__()
        self.model, self.regularizer, self.targets = model, regularizer, targets

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LM cross-entropy, key regularizer, and (with distillation targets) KL(p_kNN || p_LM) at the datastore
        rows (B, T) of the batch's positions; the KL is 0 without targets."""
        out = self.model(inputs)  # hidden, key: (B, T, d)
        lm_loss = -self.model.target_logprob(out.hidden, targets).mean()
        reg_loss = self.regularizer(out.key.reshape(-1, out.key.shape[-1]), targets.reshape(-1))
        kl_loss = torch.zeros((), device=lm_loss.device)
        if self.targets is not None:
            words, probs, rest = (x.to(lm_loss.device) for x in self.targets.batch(rows))  # (B·T, m), (B·T, m), (B·T,)
            hidden = out.hidden.reshape(-1, out.hidden.shape[-1])  # (B·T, d)
            log_q = self.model.word_logprobs(hidden, words.clamp_min(0))  # (B·T, m): no (B·T, V) array
            kl_loss = kl_to_targets(log_q, words, probs, rest).mean()
        return lm_loss, reg_loss, kl_loss


def train(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train into the run folder `out`; return the final metrics (train/valid perplexity, steps, time).

    Under `torchrun` every rank takes a contiguous shard of each global batch of `train.batch_size` blocks and DDP
    averages the gradients, so the result is that of one process on the same global batch; rank 0 alone writes
    checkpoints and logs. A checkpoint holds no rank-specific state, so a run resumes on any number of ranks.
    """
    out = Path(out)
    t, mcfg = cfg.train, cfg.model
    rank, world, device = setup_distributed()
    if t.threads:  # an explicit count wins over setup_distributed's share of the cores
        torch.set_num_threads(t.threads)
    main = rank == 0
    if t.batch_size % world:
        raise UserError(f"train.batch_size: {t.batch_size} blocks cannot be split evenly over {world} ranks")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror})") from None

    corpus = corpus_for(cfg)
    train_ids = split_ids(corpus, cfg, "train")
    s = token_stream(train_ids, corpus.eos_id)
    n_blocks = num_train_blocks(len(train_ids), mcfg.context)
    steps_per_epoch = math.ceil(n_blocks / t.batch_size)
    total_steps = math.ceil(t.epochs * steps_per_epoch)  # 0 epochs: take the initial (e.g. pretrained) weights as is

    torch.manual_seed(t.seed)
    model = build_model(mcfg, corpus.vocab_size).to(device)
    distil = None
    if t.distil_targets:
        distil = Targets(t.distil_targets)
        check_targets_for(distil, corpus.vocab_hash, len(train_ids))
    regularizer = make_regularizer(t, model, model.vocab_size, model.key_dim, block=mcfg.context).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    # the regularizer's own trained parameters (the `knn` loss's temperature) are not decayed
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2] + [p for p in regularizer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(0.9, 0.98), eps=1e-8)

    metrics_path = out / "metrics.jsonl"
    step, elapsed = 0, 0.0
    train_eval_tokens = t.eval_tokens or len(split_ids(corpus, cfg, "valid"))  # train ppl over as many tokens as valid's
    # early stopping (train.keep_best): the best valid perplexity so far, its step, epochs since it improved
    best = {"valid_ppl": math.inf, "step": -1, "since": 0}
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise UserError(f"{out}: already holds a training run (pass --resume to continue it, or choose another --out)")
    if ckpt is not None:
        state = load_training_state(ckpt, model, opt, regularizer)
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        best = state.get("best", best)
        if main:
            _truncate_metrics(metrics_path, step)
    elif main:
        metrics_path.unlink(missing_ok=True)
    if ckpt is not None:
        check_same_model(out, cfg)  # --resume continues the same training, not another one
    elif t.init_from:
        init_weights_from(t.init_from, model, corpus.vocab_hash)  # a fine-tune starts from those weights
    if main:
        save_config(cfg, out / "config.json")
        if corpus.tokenizer is not None:  # the built-in model: its vocabulary (and BPE), so that `knnlm.load` need
            write_json(out / "vocab.json", corpus.vocab)  # not re-read the corpus
            if corpus.tokenizer.kind == "bpe":
                write_text(out / "tokenizer.json", corpus.tokenizer.to_json())
    objective = Objective(model, regularizer, distil)
    if world > 1:
        # tail bands of the adaptive input/softmax are unused in batches without their words; the MOCO queue is
        # kept identical on every rank by the regularizer itself, so buffers are not broadcast
        objective = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True, broadcast_buffers=False)

    def checkpoint(step: int) -> Path | None:
        path = None
        if main:
            path = save_checkpoint(out, step, model, opt, regularizer,
                                   {"elapsed": elapsed, "epoch": step / steps_per_epoch, "best": best},
                                   cfg, corpus.vocab_hash)
        barrier()
        return path

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    tokens_per_step = t.batch_size * mcfg.context
    window = {"lm": 0.0, "reg": 0.0, "kl": 0.0, "n": 0, "t0": time.time()}
    last_good = ckpt
    shard = t.batch_size // world
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        blocks = epoch_order(n_blocks, t.seed, epoch)[i * t.batch_size : (i + 1) * t.batch_size]
        blocks = blocks[rank * shard : (rank + 1) * shard]  # this rank's contiguous shard of the global batch
        inputs, targets = (x.to(device) for x in train_batch(s, blocks, mcfg.context))
        rows = block_positions(blocks, mcfg.context, len(s))  # (B, T) datastore rows of the inputs
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, t)
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout noise depends on (seed, step) only
        model.train()
        t0 = time.time()
        with autocast(device, t.bf16):
            lm_loss, reg_loss, kl_loss = objective(inputs, targets, rows)
        loss = t.ce_weight * lm_loss + t.omega * reg_loss  # ce_weight 1: the LM loss exactly
        if distil is not None:
            loss = loss + t.beta * kl_loss  # distillation toward the datastore's p_kNN (knnlm.distill)
        logged = torch.stack([lm_loss.detach().float(), reg_loss.detach().float(), kl_loss.detach().float()])
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        if not torch.isfinite(logged).all() or not torch.isfinite(loss):
            bar.close()
            where = f"; last good checkpoint: {last_good}" if last_good else ""
            raise UserError(f"train: loss became {loss.item()} at step {step}{where}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        regularizer.after_step(model, inputs, targets)
        elapsed += time.time() - t0
        step += 1
        lm_value, reg_value, kl_value = logged.tolist()
        window["lm"] += lm_value
        window["reg"] += reg_value
        window["kl"] += kl_value
        window["n"] += 1
        bar.update(1)
        bar.set_postfix(lm=f"{lm_value:.3f}", reg=f"{reg_value:.3g}", **({"kl": f"{kl_value:.3f}"} if distil else {}))

        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if main and (step % t.log_every == 0 or end_of_epoch):
            dt = time.time() - window["t0"]
            _append_metrics(metrics_path, {
                "step": step, "epoch": round(step / steps_per_epoch, 4), "lr": opt.param_groups[0]["lr"],
                "lm_loss": window["lm"] / window["n"], "reg_loss": window["reg"] / window["n"],
                **({"kl_loss": window["kl"] / window["n"]} if distil is not None else {}),
                "grad_norm": float(grad_norm), "tokens_per_s": window["n"] * tokens_per_step / max(dt, 1e-9),
            })
            window = {"lm": 0.0, "reg": 0.0, "kl": 0.0, "n": 0, "t0": time.time()}
        improved = stop = False
        if main and end_of_epoch:
            row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                   "valid_ppl": block_perplexity(model, corpus, cfg, "valid", t.eval_tokens),
                   # learning curves: the train split measured as the summary measures it (eval mode, blocks)
                   **({"train_ppl": block_perplexity(model, corpus, cfg, "train", train_eval_tokens)} if t.curves else {})}
            _append_metrics(metrics_path, row)
            bar.write(f"epoch {row['epoch']:.2f}: valid ppl {row['valid_ppl']:.2f} (blocks of {mcfg.context} tokens, no overlap)")
            if t.keep_best:
                improved = row["valid_ppl"] < best["valid_ppl"]
                best = {"valid_ppl": row["valid_ppl"], "step": step, "since": 0} if improved else \
                    {**best, "since": best["since"] + 1}
                stop = bool(t.patience) and best["since"] >= t.patience and step < total_steps
        if t.keep_best and end_of_epoch and world > 1:  # every rank checkpoints (and stops) with rank 0
            flags = torch.tensor([improved, stop], dtype=torch.int64, device=device)
            dist.broadcast(flags, 0)
            improved, stop = bool(flags[0]), bool(flags[1])
        kill_point("train", step)
        if step % t.checkpoint_every == 0 or step == total_steps or improved or stop:
            last_good = checkpoint(step)
            if improved and main:
                keep_as_best(out, last_good)
        if stop:
            bar.write(f"early stop at epoch {step / steps_per_epoch:.2f}: no better valid perplexity for "
                      f"{t.patience} epochs (best {best['valid_ppl']:.2f} at step {best['step']})")
            break
    bar.close()
    if total_steps == 0 and latest_checkpoint(out) is None:
        last_good = checkpoint(0)
    if not main:
        return {}

    if t.keep_best and (out / "checkpoints" / BEST / "model.safetensors").is_file():
        load_weights(model, out / "checkpoints" / BEST)  # the summary reports the model the run keeps
    final = {
        **({"best_step": best["step"], "stopped_early": step < total_steps} if t.keep_best else {}),
        "penalty": penalty_strength(metrics_path, t.omega),
        "steps": step, "epochs": step / steps_per_epoch, "train_seconds": elapsed, "ranks": world,
        "tokens_per_s": step * tokens_per_step / max(elapsed, 1e-9),
        "train_ppl": block_perplexity(model, corpus, cfg, "train", train_eval_tokens),
        "valid_ppl": block_perplexity(model, corpus, cfg, "valid", t.eval_tokens),
        "params": model.num_params(),
    }
    if hasattr(model, "save_pretrained"):  # a Hugging Face model: also hand it back in its own format
        model.save_pretrained(out / "hf")
    write_json(out / "train_summary.json", final)
    return final
