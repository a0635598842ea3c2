"""Training with kNN in mind: the key regularizers of Ton et al. (2022), added as `loss = lm_loss + omega * reg_loss`.

- `l2` (the paper's Eq. 2):   reg = mean_j ||r_j||²
- `moco` (the paper's Eq. 1): reg = mean_j Σ_i ||sg(Q_i^{w_j}) − r_j||², where Q^w holds the last `queue_len` keys
  of target word w produced by a momentum (EMA) copy of the model; empty queue slots contribute nothing.
- `zero-queue`: the MOCO code path with one all-zero, always-full queue slot per word, which is exactly `l2`
  (a check that the MOCO loss is wired as the paper writes it).

Both of the paper's losses can be paid by shrinking every key, which a tuned kNN temperature undoes. Two objectives
that a uniform rescaling of the keys cannot satisfy, over in-batch memories (the keys of the batch's *other* blocks,
as a test token's neighbours come from other text; gradients reach both ends):
- `knn` (kNN-distribution loss, after TRIME, Zhong et al. 2022): reg = mean_j −log Σ_{m: w_m = w_j} softmax_m(−d_jm/τ),
  d the squared distance, over the positions j with at least one same-word memory; τ is learned (log τ a parameter,
  started at the batch's median distance), so a uniform rescaling of the keys is absorbed by τ and does nothing,
  as the evaluation's tuned temperature does nothing with it;
- `pull-ratio` (the paper's pull toward same-word keys made scale-free): reg = mean_j mean_{m: w_m = w_j} d_jm /
  mean_{m: w_m ≠ w_j} d_jm, over the positions j with both kinds of memory;
- `knn-memory`: `knn` whose memories also hold the last `knn_memory` keys (detached) of earlier steps, closer to
  a datastore than one batch is, its loss taken at every `knn_stride`-th position to keep the step's cost.

r_j is the model's retrieval key (`Output.key`) at position j and w_j the token that follows it. Stateful parts are
modules with buffers, so they are saved in checkpoints and move between devices with the model.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TrainConfig
from .distributed import gather_cat


class L2Regularizer(nn.Module):
    """mean_j ||r_j||² over the positions of the batch."""

    def forward(self, key: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, d), (N,) -> ()
        return key.float().pow(2).sum(-1).mean()

    def after_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        pass


class KeyQueue(nn.Module):
    """Per-word ring buffers of the last L keys: keys (V, L, d), write pointer (V,), filled slots (V,)."""

    def __init__(self, vocab_size: int, d: int, queue_len: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(vocab_size, queue_len, d))
        self.register_buffer("ptr", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(vocab_size, dtype=torch.long))

    @property
    def queue_len(self) -> int:
        return self.keys.shape[1]

    @torch.no_grad()
    def enqueue(self, words: torch.Tensor, keys: torch.Tensor) -> None:
        """Append keys (N, d) to the queues of words (N,), in order; a word seen more than L times keeps its last L."""
        L = self.queue_len
        order = torch.sort(words, stable=True).indices  # group equal words, keep batch order inside a group
        w, k = words[order], keys[order].to(self.keys.dtype)  # (N,), (N, d)
        uniq, counts = torch.unique_consecutive(w, return_counts=True)  # (u,) each: the batch's distinct words
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(w), device=w.device) - torch.repeat_interleave(group_start, counts)  # 0.. within word
        count_of = torch.repeat_interleave(counts, counts)
        keep = rank >= count_of - L  # earlier ones would be overwritten within this same batch
        slot = (self.ptr[w] + rank) % L
        self.keys[w[keep], slot[keep]] = k[keep]
        self.ptr[uniq] = (self.ptr[uniq] + counts) % L
        self.filled[uniq] = torch.clamp(self.filled[uniq] + counts, max=L)

    def distance_loss(self, key: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """mean_j Σ_{filled i} ||Q_i^{w_j} − r_j||², the queue entries treated as constants."""
        q = self.keys[words].detach()  # (N, L, d)
        valid = torch.arange(self.queue_len, device=key.device)[None, :] < self.filled[words][:, None]  # (N, L)
        d2 = (q - key.float()[:, None, :]).pow(2).sum(-1)  # (N, L)
        return (d2 * valid).sum(1).mean()


class MomentumEncoder(nn.Module):
    """An EMA copy of the model that produces the keys put into the queue; it never receives gradients."""

    def __init__(self, model: nn.Module, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.encoder = copy.deepcopy(model)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ_k ← m θ_k + (1 − m) θ_q"""
        for pk, pq in zip(self.encoder.parameters(), model.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def keys(self, inputs: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        self.encoder.eval()
        return self.encoder(inputs).key


class MocoRegularizer(nn.Module):
    def __init__(self, model: nn.Module, vocab_size: int, d: int, queue_len: int, momentum: float):
        super().__init__()
        self.queue = KeyQueue(vocab_size, d, queue_len)
        self.momentum_encoder = MomentumEncoder(model, momentum)

    def forward(self, key: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, d), (N,) -> ()
        return self.queue.distance_loss(key, targets)

    @torch.no_grad()
    def after_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """After the optimizer step: EMA-update the key encoder, then enqueue its keys for this batch's targets.

        Under DDP each rank encodes its shard and the keys of all ranks are gathered in rank order (the order of
        the global batch), so every rank's queue stays identical to a single process's."""
        self.momentum_encoder.update(model)
        keys = self.momentum_encoder.keys(inputs).float()  # (B, T, d)
        keys, words = keys.reshape(-1, keys.shape[-1]), targets.reshape(-1)  # (B·T, d), (B·T,)
        self.queue.enqueue(gather_cat(words), gather_cat(keys))


class ZeroQueueRegularizer(nn.Module):
    """MOCO's distance loss against a queue holding one zero vector per word: equals L2 exactly."""

    def __init__(self, vocab_size: int, d: int):
        super().__init__()
        self.queue = KeyQueue(vocab_size, d, queue_len=1)
        self.queue.filled.fill_(1)

    def forward(self, key: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.queue.distance_loss(key, targets)  # (N, d), (N,) -> ()

    def after_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        pass


def sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (len(a), len(b)) between the rows of a and b, in fp32 (fp64 kept), outside autocast:
    bf16 products would swamp near distances."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        sq_a, sq_b = a.pow(2).sum(-1), b.pow(2).sum(-1)  # (n_a,), (n_b,)
        return torch.addmm(sq_a[:, None] + sq_b[None, :], a, b.t(), alpha=-2).clamp_min(0)  # fewer passes than a - 2b


def batch_memories(key: torch.Tensor, targets: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared distances between all positions of a batch (N, N) fp32, and two masks (N, N): `memory` (m is in
    another block than j: blocks are runs of `block` positions) and `same` (memory m's word is j's)."""
    k = key if key.dtype == torch.float64 else key.float()
    d = sq_distances(k, k)
    blocks = torch.arange(len(k), device=k.device) // max(1, block)  # (N,): each position's block
    memory = blocks[:, None] != blocks[None, :]  # (N, N)
    same = memory & (targets[:, None] == targets[None, :])
    return d, memory, same


class KnnDistributionRegularizer(nn.Module):
    """kNN-distribution loss over in-batch memories with a learned temperature (see the module docstring)."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block
        self.log_tau = nn.Parameter(torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, key: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, d), (N,) -> ()
        d, memory, same = batch_memories(key, targets, self.block)  # (N, N) each
        if not bool(self.started):
            self._start_tau(d[memory])
        has = same.any(1)  # (N,)
        if not bool(has.any()):
            return d.new_zeros(()) * self.log_tau  # no position has a same-word memory in this batch
        # only the rows that count, then two row-wise logsumexps over them (the step's cost against ω = 0:
        # `benchmarks/training.py`)
        logits = (d[has] * -self.log_tau.exp().reciprocal()).masked_fill(~memory[has], -torch.inf)  # (n_has, N)
        return self._loss(logits, same[has])

    def _start_tau(self, distances: torch.Tensor) -> None:
        """τ starts at the typical distance between the first batch's rows and their in-batch memories."""
        with torch.no_grad():
            self.log_tau.copy_(distances.median().clamp_min(1e-6).log())
            if dist.is_available() and dist.is_initialized():  # every rank starts from the same τ
                dist.all_reduce(self.log_tau.data)
                self.log_tau.data /= dist.get_world_size()
            self.started.fill_(True)

    @staticmethod
    def _loss(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """mean over rows of −log(same-word share of the row's softmax), two row-wise logsumexps."""
        log_all = torch.logsumexp(logits, dim=1)  # (rows,)
        log_same = torch.logsumexp(logits.masked_fill(~same, -torch.inf), dim=1)
        return (log_all - log_same).mean()

    def after_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        pass


class KnnMemoryRegularizer(KnnDistributionRegularizer):
    """`knn` with a memory more like a datastore: the batch's other blocks and the keys (detached) and next words of
    the last `memory` positions of earlier steps, a FIFO appended after each optimizer step. The loss is taken at
    every `stride`-th position (the offset turns with the step), which pays for the longer rows: 1,024 rows × 16,384
    memories cost what `knn`'s 4,096 × 4,096 do."""

    def __init__(self, block: int, d: int, memory: int, stride: int):
        super().__init__(block)
        self.stride = stride
        self.register_buffer("mem_keys", torch.zeros(memory, d))
        self.register_buffer("mem_words", torch.full((memory,), -1, dtype=torch.long))  # -1: an empty slot
        self.register_buffer("mem_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, key: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = key if key.dtype == torch.float64 else key.float()
        if self.training:  # what after_step appends to the memory
            self._pending = (k.detach(), targets.detach())
        n = len(k)
        rows = torch.arange(int(self.steps) % self.stride, n, self.stride, device=k.device)  # (R,): every stride-th
        filled = self.mem_words >= 0
        cols = torch.cat([k, self.mem_keys[filled].to(k.dtype)])  # (N + M, d): the batch, then the memory
        words = torch.cat([targets, self.mem_words[filled]])
        d = sq_distances(k[rows], cols)  # (R, N + M)
        blocks = torch.arange(n, device=k.device) // max(1, self.block)
        memory = torch.ones_like(d, dtype=torch.bool)
        memory[:, :n] = blocks[rows][:, None] != blocks[None, :]  # not the row's own block
        same = memory & (targets[rows][:, None] == words[None, :])
        if not bool(self.started):
            self._start_tau(d[:, :n][memory[:, :n]])
        has = same.any(1)
        if not bool(has.any()):
            return d.new_zeros(()) * self.log_tau
        logits = (d[has] * -self.log_tau.exp().reciprocal()).masked_fill(~memory[has], -torch.inf)
        return self._loss(logits, same[has])

    @torch.no_grad()
    def after_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Turn the row offset; append this step's keys (every rank's, in rank order) to the memory."""
        self.steps += 1
        if self._pending is None:
            return
        keys, words = (gather_cat(x) for x in self._pending)
        self._pending = None
        size = len(self.mem_words)
        keys, words = keys[-size:], words[-size:]  # a batch longer than the memory keeps its last positions
        slots = (int(self.mem_ptr) + torch.arange(len(words), device=words.device)) % size
        self.mem_keys[slots] = keys.to(self.mem_keys.dtype)
        self.mem_words[slots] = words
        self.mem_ptr.copy_((self.mem_ptr + len(words)) % size)


class PullRatioRegularizer(nn.Module):
    """Mean distance to same-word memories over mean distance to other words' memories (scale-free pull)."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def forward(self, key: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sums of squared distances over a mask A, Σ_m A_jm ‖r_j − r_m‖² = (A1)_j ‖r_j‖² + (A sq)_j − 2 r_j·(A R)_j,
        are matrix products: no N × N distance matrix (a WikiText-2 training step with this loss: 0.69 → 0.45 s on a
        2-core AMD EPYC, against 0.36 s with L2; `benchmarks/training.py`)."""
        k = key if key.dtype == torch.float64 else key.float()
        with torch.autocast(device_type=k.device.type, enabled=False):
            n, block = len(k), max(1, self.block)
            blocks = torch.arange(n, device=k.device) // block
            # (N, N): memory m is another block's and carries j's word
            same = ((targets[:, None] == targets[None, :]) & (blocks[:, None] != blocks[None, :])).to(k.dtype)
            sq = k.pow(2).sum(-1)
            # memories: every position of the other blocks, i.e. the whole batch less the position's own block
            own_k = torch.zeros(int(blocks[-1]) + 1, k.shape[1], dtype=k.dtype, device=k.device).index_add_(0, blocks, k)[blocks]
            own_sq = torch.zeros(int(blocks[-1]) + 1, dtype=k.dtype, device=k.device).index_add_(0, blocks, sq)[blocks]
            own_n = torch.bincount(blocks)[blocks].to(k.dtype)
            n_mem, mem_sq, mem_k = n - own_n, sq.sum() - own_sq, k.sum(0) - own_k
            n_same = same.sum(1)  # (N,), as every per-position sum below
            sum_same = n_same * sq + same @ sq - 2 * (k * (same @ k)).sum(1)
            sum_mem = n_mem * sq + mem_sq - 2 * (k * mem_k).sum(1)
            n_other, sum_other = n_mem - n_same, sum_mem - sum_same
            has = (n_same > 0) & (n_other > 0)
            if not bool(has.any()):
                return sq.new_zeros(())
            mean_same = sum_same[has] / n_same[has]
            mean_other = sum_other[has] / n_other[has]
            return (mean_same / mean_other.clamp_min(1e-12)).mean()

    def after_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        pass


# the one registry of regularizers: name -> builder(cfg, model, vocab_size, d, block); config.REGULARIZERS names the
# same keys (config imports no model code; tests/test_structure.py checks that the two agree)
REGISTRY = {
    "l2": lambda cfg, model, V, d, block: L2Regularizer(),
    "moco": lambda cfg, model, V, d, block: MocoRegularizer(model, V, d, cfg.queue_len, cfg.momentum),
    "zero-queue": lambda cfg, model, V, d, block: ZeroQueueRegularizer(V, d),
    "knn": lambda cfg, model, V, d, block: KnnDistributionRegularizer(block),
    "pull-ratio": lambda cfg, model, V, d, block: PullRatioRegularizer(block),
    "knn-memory": lambda cfg, model, V, d, block: KnnMemoryRegularizer(block, d, cfg.knn_memory, cfg.knn_stride),
}


def make_regularizer(cfg: TrainConfig, model: nn.Module, vocab_size: int, d: int, block: int = 0) -> nn.Module:
    """The regularizer `cfg.regularizer` names; `block` is the training block length (in-batch memories)."""
    return REGISTRY[cfg.regularizer](cfg, model, vocab_size, d, block)
