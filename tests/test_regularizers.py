"""The key regularizers: L2, the MOCO queue and momentum encoder, and zero-queue ≡ L2."""

import torch

from knnlm.config import ModelConfig, TrainConfig
from knnlm.model import TransformerLM
from knnlm.regularizers import KeyQueue, L2Regularizer, MocoRegularizer, MomentumEncoder, make_regularizer


def reference_enqueue(state, words, keys, L):
    """Plain-Python ring buffers: per word a list of slots and a write pointer."""
    for w, k in zip(words.tolist(), keys):
        slots, ptr, filled = state.setdefault(w, [[None] * L, 0, 0])
        slots[ptr] = k.clone()
        state[w] = [slots, (ptr + 1) % L, min(filled + 1, L)]


def test_queue_wraps_around_and_keeps_per_word_order():
    torch.manual_seed(0)
    V, d, L = 6, 3, 4
    q = KeyQueue(V, d, L)
    ref = {}
    for _ in range(7):  # batches with repeated words, some more than L times in one batch
        words = torch.randint(0, V, (11,))
        words[:6] = 2
        keys = torch.randn(11, d)
        q.enqueue(words, keys)
        reference_enqueue(ref, words, keys, L)
    for w in range(V):
        slots, ptr, filled = ref.get(w, [[None] * L, 0, 0])
        assert q.ptr[w].item() == ptr and q.filled[w].item() == filled
        for i, s in enumerate(slots):
            if s is None:
                assert torch.all(q.keys[w, i] == 0)
            else:
                assert torch.equal(q.keys[w, i], s)


def test_distance_loss_ignores_empty_slots_and_sums_over_the_queue():
    q = KeyQueue(3, 2, 3)
    q.enqueue(torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    r = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], requires_grad=True)
    loss = q.distance_loss(r, torch.tensor([0, 1, 2]))
    # word 0: |(1,0)|² + |(0,1)|² = 2 ; word 1: |(2,2)-(1,1)|² = 2 ; word 2: empty queue = 0
    assert torch.isclose(loss, torch.tensor((2.0 + 2.0 + 0.0) / 3))
    loss.backward()
    assert q.keys.grad is None  # queue entries are stop-gradient constants


def test_zero_queue_equals_l2_exactly():
    torch.manual_seed(1)
    key = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 20, (50,))
    zq = make_regularizer(TrainConfig(regularizer="zero-queue"), None, 20, 8)
    a = zq(key, targets)
    ga, = torch.autograd.grad(a, key)
    b = L2Regularizer()(key, targets)
    gb, = torch.autograd.grad(b, key)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def _model():
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, context=8, cutoffs=[20], dropout=0.0), 50)


def test_momentum_encoder_gets_no_gradient_and_follows_the_ema():
    model = _model()
    moco = MocoRegularizer(model, 50, 16, queue_len=4, momentum=0.9)
    enc = moco.momentum_encoder.encoder
    before = [p.clone() for p in enc.parameters()]
    x = torch.randint(0, 50, (2, 8))
    out = model(x)
    moco.queue.enqueue(x.reshape(-1), torch.randn(16, 16))
    loss = model.target_logprob(out.hidden, x).mean() + moco(out.key.reshape(-1, 16), x.reshape(-1))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moco.momentum_encoder.update(model)
    for b, pk, pq in zip(before, enc.parameters(), model.parameters()):
        assert torch.allclose(pk, 0.9 * b + 0.1 * pq)


def test_after_step_enqueues_momentum_keys_of_the_targets():
    model = _model()
    moco = MocoRegularizer(model, 50, 16, queue_len=4, momentum=0.5)
    x = torch.randint(0, 50, (1, 8))
    y = torch.arange(8)[None]  # distinct targets
    moco.after_step(model, x, y)
    expected = moco.momentum_encoder.encoder(x).key[0]
    for j in range(8):
        assert moco.queue.filled[j] == 1
        assert torch.allclose(moco.queue.keys[j, 0], expected[j])


# --- objectives that a uniform rescaling of the keys cannot satisfy -------------------------------------------------

import math

import numpy as np
import pytest

from knnlm.regularizers import KnnDistributionRegularizer, KnnMemoryRegularizer, PullRatioRegularizer


def _batch(seed=0, n=24, d=5, vocab=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, vocab, (n,), generator=g)


def _numpy_knn_loss(key, targets, block, tau):
    """Loops over positions: −log of the same-word share of softmax(−d/τ) over the other blocks' positions."""
    k, t, n = key.detach().numpy(), targets.numpy(), len(targets)
    losses = []
    for j in range(n):
        mem = [m for m in range(n) if m // block != j // block]
        same = [m for m in mem if t[m] == t[j]]
        if not same:
            continue
        logit = {m: -float(np.sum((k[j] - k[m]) ** 2)) / tau for m in mem}
        lse = lambda ms: np.logaddexp.reduce([logit[m] for m in ms])
        losses.append(lse(mem) - lse(same))
    return float(np.mean(losses))


def _numpy_pull_ratio(key, targets, block):
    k, t, n = key.detach().numpy(), targets.numpy(), len(targets)
    ratios = []
    for j in range(n):
        mem = [m for m in range(n) if m // block != j // block]
        same = [np.sum((k[j] - k[m]) ** 2) for m in mem if t[m] == t[j]]
        other = [np.sum((k[j] - k[m]) ** 2) for m in mem if t[m] != t[j]]
        if same and other:
            ratios.append(np.mean(same) / np.mean(other))
    return float(np.mean(ratios))


def test_knn_distribution_loss_equals_a_brute_force_and_starts_tau_at_the_median_distance():
    key, targets = _batch()
    reg = KnnDistributionRegularizer(block=6).double()
    loss = reg(key, targets)
    tau = float(reg.log_tau.detach().exp())
    k = key.numpy()
    dists = sorted(np.sum((k[j] - k[m]) ** 2) for j in range(24) for m in range(24) if j // 6 != m // 6)
    med = dists[(len(dists) - 1) // 2]  # torch's median: the lower middle value
    assert tau == pytest.approx(med, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(_numpy_knn_loss(key, targets, 6, tau), rel=1e-9)
    with torch.no_grad():
        reg.log_tau.fill_(math.log(3.0))  # a later step, with a trained τ
    assert float(reg(key, targets).detach()) == pytest.approx(_numpy_knn_loss(key, targets, 6, 3.0), rel=1e-9)


def test_pull_ratio_equals_a_brute_force():
    key, targets = _batch(1)
    assert float(PullRatioRegularizer(block=4)(key, targets)) == pytest.approx(_numpy_pull_ratio(key, targets, 4), rel=1e-9)


@pytest.mark.parametrize("name", ["knn", "pull-ratio"])
def test_gradients_match_finite_differences(name):
    key, targets = _batch(2, n=12, d=3, vocab=3)
    reg = (KnnDistributionRegularizer(block=4) if name == "knn" else PullRatioRegularizer(block=4)).double()
    reg(key, targets)  # starts τ
    key.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda k: reg(k, targets), (key,), eps=1e-6, atol=1e-6)
    if name == "knn":  # and the temperature's gradient
        f = lambda lt: torch.func.functional_call(reg, {"log_tau": lt}, (key.detach(), targets))
        assert torch.autograd.gradcheck(f, (reg.log_tau.detach().clone().requires_grad_(True),))


def test_a_uniform_rescaling_of_the_keys_cannot_pay_these_losses():
    key, targets = _batch(3)
    pull = PullRatioRegularizer(block=6).double()
    assert float(pull(0.1 * key, targets)) == pytest.approx(float(pull(key, targets)), rel=1e-9)
    knn = KnnDistributionRegularizer(block=6).double()
    a = float(knn(key, targets).detach())
    knn_small = KnnDistributionRegularizer(block=6).double()
    b = float(knn_small(0.1 * key, targets).detach())  # τ starts at the shrunken keys' median: the same loss
    assert a == pytest.approx(b, rel=1e-9)
    # whereas the L2 penalty falls 100-fold
    l2 = L2Regularizer()
    assert float(l2(0.1 * key, targets)) == pytest.approx(0.01 * float(l2(key, targets)))


@pytest.mark.parametrize("name", ["knn", "pull-ratio"])
def test_zero_weight_gives_exactly_the_lm_loss_and_gradients(name):
    from knnlm.train import Objective

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, context=8, dropout=0.0, cutoffs=[20, 40])
    torch.manual_seed(0)
    model = TransformerLM(cfg, 60)
    inputs = torch.randint(0, 60, (4, 8))
    targets = torch.randint(0, 60, (4, 8))
    grads = {}
    for reg_name in (name, "l2"):
        model.zero_grad()
        reg = make_regularizer(TrainConfig(regularizer=reg_name), model, 60, 16, block=8)
        lm_loss, reg_loss, _ = Objective(model, reg)(inputs, targets)
        loss = lm_loss + 0.0 * reg_loss
        loss.backward()
        grads[reg_name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        assert torch.isfinite(reg_loss)
    assert torch.equal(grads[name][0], grads["l2"][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[name][1], grads["l2"][1]))


def _numpy_knn_memory_loss(key, targets, block, tau, rows, mem_keys, mem_words):
    """Loops: at each row j, −log of the same-word share of softmax(−d/τ) over the batch's other blocks' positions
    and the memory's entries."""
    k, t, n = key.detach().numpy(), targets.numpy(), len(targets)
    losses = []
    for j in rows:
        cols = [(k[m], t[m]) for m in range(n) if m // block != j // block] + list(zip(mem_keys, mem_words))
        logits = np.array([-float(np.sum((k[j] - c) ** 2)) / tau for c, _ in cols])
        same = np.array([w == t[j] for _, w in cols])
        if same.any():
            losses.append(np.logaddexp.reduce(logits) - np.logaddexp.reduce(logits[same]))
    return float(np.mean(losses))


def _memory_steps(reg, batches):
    """Each batch through the loss and `after_step`, as training does; the last batch's loss."""
    for key, targets in batches:
        loss = reg(key, targets)
        reg.after_step(None, None, None)
    return loss


def test_knn_memory_keeps_the_last_positions_of_earlier_steps_in_order():
    reg = KnnMemoryRegularizer(block=2, d=3, memory=10, stride=1).double()
    batches = [_batch(s, n=4, d=3, vocab=5) for s in range(4)]  # 16 positions through a memory of 10
    _memory_steps(reg, batches)
    keys = torch.cat([k for k, _ in batches])[-10:]
    words = torch.cat([t for _, t in batches])[-10:]
    oldest = int(reg.mem_ptr)  # the next slot written holds the oldest entry
    order = [(oldest + i) % 10 for i in range(10)]
    assert torch.equal(reg.mem_keys[order], keys) and torch.equal(reg.mem_words[order], words)
    assert int(reg.steps) == 4
    big = KnnMemoryRegularizer(block=2, d=3, memory=3, stride=1).double()
    _memory_steps(big, [_batch(9, n=8, d=3)])  # a batch longer than the memory leaves its last positions
    assert torch.equal(big.mem_keys[[(int(big.mem_ptr) + i) % 3 for i in range(3)]], _batch(9, n=8, d=3)[0][-3:])


def test_knn_memory_loss_equals_a_brute_force_over_the_batch_and_the_memory():
    reg = KnnMemoryRegularizer(block=6, d=5, memory=30, stride=4).double()
    first, second, third = (_batch(s, n=24, d=5, vocab=4) for s in (4, 5, 6))
    _memory_steps(reg, [first])  # the memory is part-filled: 24 of 30 slots
    tau = float(reg.log_tau.detach().exp())
    k = first[0].numpy()  # τ starts at the median distance from the first step's rows (0, 4, ...) to other blocks
    dists = sorted(np.sum((k[j] - k[m]) ** 2) for j in range(0, 24, 4) for m in range(24) if j // 6 != m // 6)
    assert tau == pytest.approx(dists[(len(dists) - 1) // 2], rel=1e-9)
    loss = _memory_steps(reg, [second])  # step 1: rows 1, 5, 9, ...
    expected = _numpy_knn_memory_loss(*second, 6, tau, range(1, 24, 4), first[0].numpy(), first[1].numpy())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    with torch.no_grad():
        reg.log_tau.fill_(math.log(2.0))
    loss = reg(*third)  # step 2: rows 2, 6, ...; memory: the last 30 positions, 6 of the first batch then the second
    mem_k = torch.cat([first[0][-6:], second[0]]).numpy()
    mem_w = torch.cat([first[1][-6:], second[1]]).numpy()
    expected = _numpy_knn_memory_loss(*third, 6, 2.0, range(2, 24, 4), mem_k, mem_w)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)


def test_knn_memory_gradients_and_rescaling():
    reg = KnnMemoryRegularizer(block=4, d=3, memory=12, stride=2).double()
    _memory_steps(reg, [_batch(7, n=12, d=3, vocab=3)])
    key, targets = _batch(8, n=12, d=3, vocab=3)
    key.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda k: reg(k, targets), (key,), eps=1e-6, atol=1e-6)
    f = lambda lt: torch.func.functional_call(reg, {"log_tau": lt}, (key.detach(), targets))
    assert torch.autograd.gradcheck(f, (reg.log_tau.detach().clone().requires_grad_(True),))
    # keys and memory shrunk alike: τ starts at the shrunken median, so every loss is the same
    batches = [_batch(s, n=12, d=3, vocab=3) for s in (10, 11, 12)]
    a = KnnMemoryRegularizer(block=4, d=3, memory=12, stride=2).double()
    b = KnnMemoryRegularizer(block=4, d=3, memory=12, stride=2).double()
    for key, targets in batches:
        assert float(a(key, targets).detach()) == pytest.approx(float(b(0.1 * key, targets).detach()), rel=1e-9)
        a.after_step(None, None, None), b.after_step(None, None, None)
