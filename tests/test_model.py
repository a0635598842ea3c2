import pytest
import torch
import torch.nn as nn

from knnlm.config import ModelConfig
from knnlm.model import TransformerLM

V = 500


def small_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, context=16, dropout=0.0, cutoffs=[50, 200], **kw)
    return TransformerLM(cfg, V).eval()


def test_adaptive_softmax_is_a_distribution_and_targets_agree():
    m = small_model()
    h = torch.randn(40, 32)
    full = m.softmax.full_logprobs(h)
    assert torch.allclose(full.exp().sum(1), torch.ones(40, dtype=torch.float32), atol=1e-5)
    targets = torch.randint(0, V, (40,))
    assert torch.allclose(m.softmax.target_logprob(h, targets), full.gather(1, targets[:, None]).squeeze(1), atol=1e-5)


def test_adaptive_softmax_matches_torch_reference():
    """The tied adaptive softmax equals torch's AdaptiveLogSoftmaxWithLoss with the same (untied) weights."""
    m = small_model()
    emb = m.embed
    ref = nn.AdaptiveLogSoftmaxWithLoss(32, V, cutoffs=[50, 200], div_value=4.0, head_bias=False)
    with torch.no_grad():
        head_words = emb.embeddings[0].weight @ emb.projections[0].weight.t()  # (50, d): e_w W_0ᵀ
        ref.head.weight.copy_(torch.cat([head_words, m.softmax.cluster.weight]))
        for i, tail in enumerate(ref.tail, start=1):
            tail[0].weight.copy_(emb.projections[i].weight.t())  # d -> dim_i
            tail[1].weight.copy_(emb.embeddings[i].weight)  # dim_i -> band words
    h = torch.randn(30, 32)
    assert torch.allclose(m.softmax.full_logprobs(h), ref.log_prob(h), atol=1e-5)


def test_causal_and_key_is_the_ffn_input_after_layer_norm():
    m = small_model()
    x = torch.randint(0, V, (2, 16))
    captured = {}
    m.blocks[-1].ffn.register_forward_hook(lambda mod, inp, out: captured.setdefault("ffn_in", inp[0]))
    out = m(x)
    assert torch.equal(out.key, captured["ffn_in"])  # the kNN-LM site: input of the last FFN
    y = x.clone()
    y[:, 10:] = torch.randint(0, V, (2, 6))
    out2 = m(y)
    assert torch.allclose(out.hidden[:, :10], out2.hidden[:, :10], atol=1e-6)  # the future never leaks back
    assert not torch.allclose(out.hidden[:, 10:], out2.hidden[:, 10:])


def test_other_key_sites():
    for site in ("ffn_input_prenorm", "block_output", "final"):
        m = small_model(key_site=site)
        out = m(torch.randint(0, V, (1, 16)))
        if site == "final":
            assert torch.equal(out.key, out.hidden)
        else:
            assert out.key.shape == (1, 16, 32) and not torch.equal(out.key, out.hidden)


@pytest.mark.parametrize("flags, native", [("fpu sse avx avx2 fma f16c", False),  # AMD Zen 3: emulated bf16
                                           ("avx2 avx512f avx512_bf16", True),  # Zen 4 / 5
                                           ("avx2 avx512f amx_bf16 amx_tile", True)])  # Intel Sapphire Rapids
def test_bf16_autocast_only_where_the_cpu_multiplies_bf16(monkeypatch, flags, native):
    import knnlm.lm as lm

    monkeypatch.delenv("KNNLM_BF16", raising=False)
    monkeypatch.setattr(lm, "cpuinfo_fields", lambda: {"flags": flags})
    lm.native_bf16.cache_clear()
    try:
        assert lm.native_bf16("cpu") is native and lm.native_bf16("cuda") is True
        with lm.autocast("cpu", True):
            y = torch.ones(4, 4) @ torch.ones(4, 4)
        assert y.dtype == (torch.bfloat16 if native else torch.float32)
        with lm.autocast("cpu", False):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        monkeypatch.setenv("KNNLM_BF16", "force")
        lm.native_bf16.cache_clear()
        assert lm.native_bf16("cpu") is True
    finally:
        lm.native_bf16.cache_clear()


def test_word_logprobs_are_the_full_distributions_entries():
    from knnlm.config import ModelConfig
    from knnlm.model import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, context=8, cutoffs=[10, 30]), 50)
    h = torch.randn(6, 16, requires_grad=True)
    words = torch.tensor([[0, 9, 10, 29, 30, 49]] * 3 + [[5, 5, 12, 40, 1, 2]] * 3)  # every band and its edges
    got = model.word_logprobs(h, words)
    want = model.full_logprobs(h).gather(1, words)
    assert torch.allclose(got, want, atol=1e-5)
    g1, = torch.autograd.grad(got.sum(), h)
    g2, = torch.autograd.grad(want.sum(), h)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_band_logsumexp_in_blocks_equals_the_whole_logsumexp_and_its_gradients(monkeypatch):
    """The KL term's band normalizer, computed over blocks of rows (3 rows a block here, 10 rows: a short last
    block) and recomputed in the backward: its values and both gradients equal torch.logsumexp of the whole logits
    (float64 gradcheck, and fp32 against float64), also under bf16 autocast (it computes in fp32)."""
    from knnlm.model import BandLogSumExp

    monkeypatch.setattr(BandLogSumExp, "BLOCK", 3 * 7)  # 7 words: 3 rows a block
    torch.manual_seed(1)
    z = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(BandLogSumExp.apply, (z, w))
    want = torch.logsumexp(z @ w.t(), 1)
    g = torch.randn(10, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * g).sum(), (z, w))
    zf, wf = z.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = BandLogSumExp.apply(zf, wf)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)
        grads = torch.autograd.grad((got * g.float()).sum(), (zf, wf))
        assert all(torch.allclose(a.double(), b, atol=1e-5) for a, b in zip(grads, want_grads))


@pytest.mark.parametrize("site", ["ffn_input", "final"])
def test_kv_cached_decoding_equals_recomputing_the_whole_prefix(site):
    """model(new, cache) after the prefix = the same positions of one pass over prefix + new: a prompt of 5 tokens,
    a chunk of 3, then single tokens up to the full context (positions offset by the cache's length)."""
    from knnlm.lm import DecodeCache

    m = small_model(key_site=site)
    x = torch.randint(0, V, (3, 16))
    with torch.no_grad():
        full = m(x)
        cache, hidden, keys = DecodeCache(), [], []
        for a, b in [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 16)]:
            out = m(x[:, a:b], cache)
            assert cache.length == b and cache.state[0][0].shape == (3, 2, b, 16)  # (B, H, t, dh) per block
            hidden.append(out.hidden), keys.append(out.key)
    assert torch.allclose(torch.cat(hidden, 1), full.hidden, atol=1e-5)
    assert torch.allclose(torch.cat(keys, 1), full.key, atol=1e-5)
    with pytest.raises(AssertionError, match="longer than the context"):
        m(x[:, :1], cache)  # a full cache: the caller must slide the window
