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
