"""The language model: a decoder-only Transformer in the style of Baevski & Auli (2019).

Adaptive input embeddings and an adaptive softmax share their weights (logit(w) = input_embedding(w) · h),
blocks are pre-norm with causal attention through `F.scaled_dot_product_attention`, positions are sinusoidal.

`TransformerLM` implements the language-model interface of `knnlm.lm`. The retrieval key is its named output
`Output.key`, read at one site (`KEY_SITES`); the regularizer, the datastore writer and the evaluation queries all
use this same tensor. The kNN-LM default is `ffn_input`: the input to the last block's feed-forward network, after
its layer norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import KEY_SITES, ModelConfig
from .lm import DecodeCache, Output



def padded_rows(idx: torch.Tensor) -> torch.Tensor:
    """Pad a row-index vector to the next power of two (repeating its first entry).

    The rows falling into an adaptive band change every batch; oneDNN (bf16 on CPU) builds and caches a kernel per
    matrix shape, so unbucketed shapes make memory grow without bound. Callers drop the padded results.
    """
    n = idx.numel()
    size = max(64, 1 << (n - 1).bit_length())
    return torch.cat([idx, idx[:1].expand(size - n)]) if size > n else idx


def band_edges(vocab_size: int, cutoffs: list[int]) -> list[int]:
    """[0, c1, c2, ..., V]: band i holds ids [edges[i], edges[i+1]); cutoffs ≥ V are dropped."""
    return [0] + [c for c in cutoffs if c < vocab_size] + [vocab_size]


class AdaptiveEmbedding(nn.Module):
    """Adaptive input (Baevski & Auli): band i embeds in d / div**i dims, projected up to d.

    The same weights give the tied adaptive softmax: logit(w) = (W_i e_w) · h = e_w · (W_iᵀ h).
    """

    def __init__(self, vocab_size: int, d: int, cutoffs: list[int], div_factor: float):
        super().__init__()
        self.d = d
        self.edges = band_edges(vocab_size, cutoffs)
        dims = [max(1, int(d // div_factor**i)) for i in range(len(self.edges) - 1)]
        self.embeddings = nn.ModuleList(nn.Embedding(hi - lo, dim) for lo, hi, dim in zip(self.edges, self.edges[1:], dims))
        self.projections = nn.ModuleList(nn.Linear(dim, d, bias=False) for dim in dims)  # W_i: (d, dim_i)
        for emb, proj in zip(self.embeddings, self.projections):
            nn.init.normal_(emb.weight, std=emb.weight.shape[1] ** -0.5)
            nn.init.xavier_uniform_(proj.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        out = torch.zeros(*ids.shape, self.d, device=ids.device, dtype=self.projections[0].weight.dtype)
        flat_ids, flat_out = ids.reshape(-1), out.view(-1, self.d)  # (B·T,), (B·T, d)
        for (lo, hi), emb, proj in zip(zip(self.edges, self.edges[1:]), self.embeddings, self.projections):
            rows = ((flat_ids >= lo) & (flat_ids < hi)).nonzero().squeeze(1)  # (r,): the tokens in this band
            if rows.numel():
                padded = padded_rows(rows)
                flat_out[rows] = proj(emb(flat_ids[padded] - lo))[: rows.numel()].to(out.dtype)
        return out * math.sqrt(self.d)


class BandLogSumExp(torch.autograd.Function):
    """log Σ_w exp(z · e_w) over one band's words, row by row: z (N, dim), weight (n, dim) -> (N,), computed in
    fp32 (float64 for float64 inputs) over blocks of rows whose logits stay in cache (`rows` × n about 4 MB). Neither pass holds the (N, n) logits
    whole: the backward recomputes each block's and turns it into its softmax in place. The KL term
    (`AdaptiveSoftmax.word_logprobs`) costs 2.2× less this way than with a logsumexp of the whole logits, and a
    distillation step of `configs/wikitext-2.toml` is 1.5× faster (`benchmarks/distil_step.py`, Zen 3)."""

    BLOCK = 1 << 20  # logits per block of rows

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(z.dtype, weight.dtype), torch.float32)  # fp32 or float64
        zf, wf = z.to(dtype), weight.to(dtype)
        rows = max(1, BandLogSumExp.BLOCK // max(1, len(weight)))
        out = torch.empty(len(z), dtype=dtype, device=z.device)
        with torch.autocast(z.device.type, enabled=False):
            for lo in range(0, len(z), rows):
                logits = zf[lo : lo + rows] @ wf.t()  # (rows, n)
                top = logits.amax(1, keepdim=True)
                out[lo : lo + rows] = logits.sub_(top).exp_().sum(1).log_().add_(top[:, 0])
        ctx.save_for_backward(z, weight, out)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        z, weight, lse = ctx.saved_tensors
        zf, wf, grad = z.to(lse.dtype), weight.to(lse.dtype), grad.to(lse.dtype)
        gz = torch.empty_like(zf) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(wf) if ctx.needs_input_grad[1] else None
        with torch.autocast(z.device.type, enabled=False):
            for lo in range(0, len(z), ctx.rows):
                hi = lo + ctx.rows
                p = (zf[lo:hi] @ wf.t()).sub_(lse[lo:hi, None]).exp_().mul_(grad[lo:hi, None])  # softmax × grad
                if gz is not None:
                    gz[lo:hi] = p @ wf
                if gw is not None:
                    gw.addmm_(p.t(), zf[lo:hi])
        return (None if gz is None else gz.to(z.dtype)), (None if gw is None else gw.to(weight.dtype))


class AdaptiveSoftmax(nn.Module):
    """Tied adaptive softmax: a head over band-0 words plus one logit per tail band, then a softmax per band."""

    def __init__(self, embedding: AdaptiveEmbedding):
        super().__init__()
        self.emb = embedding
        self.n_tails = len(embedding.edges) - 2
        self.cluster = nn.Linear(embedding.d, self.n_tails, bias=False) if self.n_tails else None

    def band_logits(self, h: torch.Tensor, i: int) -> torch.Tensor:  # (N, d) -> (N, n_i)
        z = h @ self.emb.projections[i].weight  # (N, dim_i) = W_iᵀ h
        return z @ self.emb.embeddings[i].weight.t()

    def head_logprobs(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, n_0 + n_tails), fp32
        logits = self.band_logits(h, 0)
        if self.cluster is not None:
            logits = torch.cat([logits, self.cluster(h)], dim=-1)
        return F.log_softmax(logits.float(), dim=-1)

    def target_logprob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | h) for each row: (N, d), (N,) -> (N,) fp32; only the target's band is computed."""
        edges = self.emb.edges
        head = self.head_logprobs(h)  # (N, n_0 + n_tails)
        out = torch.empty(target.shape, dtype=torch.float32, device=h.device)
        in_head = target < edges[1]
        out[in_head] = head[in_head, target[in_head]]
        for i in range(1, len(edges) - 1):
            rows = ((target >= edges[i]) & (target < edges[i + 1])).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            band = F.log_softmax(self.band_logits(h[padded_rows(rows)], i).float(), dim=-1)[: rows.numel()]  # (r, n_i)
            out[rows] = head[rows, edges[1] + i - 1] + band.gather(1, (target[rows] - edges[i]).unsqueeze(1)).squeeze(1)
        return out

    def word_logprobs(self, h: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """log p(w | h) of m given words per row: (N, d), (N, m) ids in [0, V) -> (N, m) fp32. Each tail band's
        normalizer is one logsumexp over its logits; only the given words' logits are kept, so no (N, V) array of
        log-probabilities is built or back-propagated (the distillation loss, `knnlm.distill`)."""
        edges = self.emb.edges
        head = self.head_logprobs(h)  # (N, n_0 + tails)
        band = torch.bucketize(words, torch.tensor(edges[1:-1], device=words.device), right=True)  # (N, m)
        out = head.gather(1, torch.where(band == 0, words, torch.zeros_like(words)))
        for i in range(1, len(edges) - 1):
            lo, hi = edges[i], edges[i + 1]
            z = h @ self.emb.projections[i].weight  # (N, dim_i)
            lse = BandLogSumExp.apply(z, self.emb.embeddings[i].weight)  # (N,), never an (N, n_i) array
            e = self.emb.embeddings[i].weight[(words - lo).clamp(0, hi - lo - 1)]  # (N, m, dim_i)
            logit = (z.unsqueeze(1) * e).sum(-1).float()  # (N, m)
            out = torch.where(band == i, head[:, edges[1] + i - 1 : edges[1] + i] + logit - lse[:, None], out)
        return out

    def full_logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """log p(w | h) for every word: (N, d) -> (N, V) fp32 (analysis and tests; training never needs it)."""
        edges = self.emb.edges
        head = self.head_logprobs(h)  # (N, n_0 + n_tails)
        parts = [head[:, : edges[1]]]  # (N, n_0), then (N, n_i) per tail band
        for i in range(1, len(edges) - 1):
            parts.append(head[:, edges[1] + i - 1 : edges[1] + i] + F.log_softmax(self.band_logits(h, i).float(), dim=-1))
        return torch.cat(parts, dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):  # attention-weight dropout (forces SDPA's slow path on CPU)
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(B, T, d) -> (B, T, d), and the keys and values of all tokens so far, 2 × (B, H, P + T, dh): the T
        tokens attend to the P tokens of `past` (incremental decoding) and causally to each other."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, dh)
        dropout = self.dropout if self.training else 0.0
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            P = past[0].shape[2]
            k, v = torch.cat([past[0], k.to(past[0].dtype)], 2), torch.cat([past[1], v.to(past[1].dtype)], 2)
            # query i sits at position P + i: it sees keys 0 … P + i (a single new token sees them all)
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, d)), (k, v)


class Block(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + ffn(ln2(x)). ln2's output is the kNN-LM key site."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, T, d) -> (B, T, d) and the key sites; sites["kv"] are the attention's keys and values so far."""
        a, kv = self.attn(self.ln1(x), past)
        x = x + self.drop(a)
        sites = {"ffn_input_prenorm": x, "kv": kv}  # every site (B, T, d)
        h = self.ln2(x)
        sites["ffn_input"] = h
        x = x + self.drop(self.ffn(h))
        sites["block_output"] = x
        return x, sites


def sinusoidal_positions(T: int, d: int) -> torch.Tensor:  # (T, d)
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return pe


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        assert cfg.key_site in KEY_SITES, f"unknown key site {cfg.key_site!r}"
        self.cfg, self.vocab_size = cfg, vocab_size
        self.key_layer = cfg.key_layer % cfg.n_layers
        self.embed = AdaptiveEmbedding(vocab_size, cfg.d_model, cfg.cutoffs, cfg.div_factor)
        self.register_buffer("positions", sinusoidal_positions(cfg.context, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.softmax = AdaptiveSoftmax(self.embed)
        for name, p in self.named_parameters():
            if name.startswith("blocks") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.startswith("blocks") and name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def key_dim(self) -> int:
        return self.cfg.d_model

    def key_module(self) -> nn.LayerNorm | None:
        """The layer norm whose output is the key (its gain and bias are what an L2 penalty can shrink)."""
        if self.cfg.key_site == "ffn_input":
            return self.blocks[self.key_layer].ln2
        if self.cfg.key_site == "final":
            return self.ln_f
        return None

    def forward(self, ids: torch.Tensor, cache: DecodeCache | None = None) -> Output:  # (B, T) -> Output
        """With a cache, the T tokens follow the cache.length tokens it holds the keys and values of: they sit at
        positions cache.length … cache.length + T − 1, and their keys and values are appended."""
        T, P = ids.shape[1], cache.length if cache is not None else 0
        assert P + T <= self.positions.shape[0], \
            f"sequence of {P + T} tokens is longer than the context {self.positions.shape[0]}"
        x = self.drop(self.embed(ids) + self.positions[P : P + T])  # (B, T, d)
        past = cache.state if cache is not None and cache.state is not None else [None] * len(self.blocks)
        key, kvs = None, []
        for i, block in enumerate(self.blocks):
            x, sites = block(x, past[i])
            kvs.append(sites["kv"])
            if i == self.key_layer and self.cfg.key_site != "final":
                key = sites[self.cfg.key_site]
        if cache is not None:
            cache.state, cache.length = kvs, P + T
        hidden = self.ln_f(x)  # (B, T, d)
        return Output(hidden=hidden, key=hidden if key is None else key)

    def target_logprob(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (B, T, d), (B, T) -> (B, T)
        return self.softmax.target_logprob(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)).view(targets.shape)

    def full_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, V) fp32
        return self.softmax.full_logprobs(hidden)

    def word_logprobs(self, hidden: torch.Tensor, words: torch.Tensor) -> torch.Tensor:  # (N, d), (N, m) -> (N, m)
        return self.softmax.word_logprobs(hidden, words)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Forward+backward matrix-product FLOPs per token (6 × dense params + attention), for throughput reports."""
        c = self.cfg
        dense = c.n_layers * (4 * c.d_model**2 + 2 * c.d_model * c.d_ff)
        head = c.d_model * (self.embed.edges[1] + self.softmax.n_tails)  # tails are touched by few tokens
        attn = c.n_layers * 2 * c.context * c.d_model  # QKᵀ and AV, averaged over causal positions
        return 6 * (dense + head) + 6 * attn
