"""The Python API (`knnlm.load`): scores agree with `knnlm evaluate`, the next-token distribution with a brute-force
kNN-LM, generation with its own distribution; and no evaluation cache answers for other inputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import knnlm
from conftest import TINY, fails, knnlm as cli
from knnlm.api import sample
from knnlm.data import default_data_dir
from knnlm.datastore import Datastore
from knnlm.evaluate import _search_is_cached
from knnlm.lm import autocast
from knnlm.knn import interpolate

TEXT = ("the game was released in japan in 2010 .\n"
        "he played for the club until his death , and zzyzxq is not a word .\n"
        "\n"
        "the film received positive reviews from critics .\n")


@pytest.fixture()
def run(tiny_run, tmp_path):
    """A private copy of the tiny run (valid evaluated), so that tests may evaluate other text into it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out, ignore=shutil.ignore_patterns("test"))
    return out


@pytest.fixture()
def custom_corpus(tmp_path):
    """WikiText-2's training split (hence the run's vocabulary) with TEXT as the test split."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    shared = default_data_dir()
    for split in ("train", "valid"):
        (folder / f"wiki.{split}.tokens").symlink_to(shared / f"wiki.{split}.tokens")
    (folder / "wiki.test.tokens").write_text(TEXT)
    return folder


@pytest.mark.slow
@pytest.mark.wikitext
def test_custom_text_after_wikitext_gets_its_own_numbers_and_score_agrees_with_evaluate(run, custom_corpus):
    wiki = json.loads(cli("evaluate", "--out", run, "--json", "--split", "test").stdout)
    assert wiki["tokens"] == 10000
    mine = json.loads(cli("evaluate", "--out", run, "--json", "--split", "test", f"data.path={custom_corpus}").stdout)
    lm = knnlm.load(run)
    scored = lm.score(TEXT)
    assert mine["tokens"] == len(scored.tokens) == len(TEXT.split()) + TEXT.count("\n")  # not the cached 10000
    assert "<unk>" in scored.tokens and scored.tokens.count("<eos>") == 4
    folder = next(run.glob("eval-corpus-*")) / "test"  # another text than the datastore's: its own folder
    assert json.loads((run / "eval" / "test" / "summary.json").read_text())["tokens"] == 10000  # WikiText's stays
    saved_lm = np.load(folder / "lm_logprobs.npy")
    saved_knn = np.load(folder / "knn_logprobs.npy").astype(np.float64)
    assert (lm.k, lm.knn_temperature, lm.lmbda) == (mine["k"], mine["temperature"], mine["lambda"])
    np.testing.assert_allclose(scored.lm, saved_lm, atol=1e-4)
    finite = np.isfinite(saved_knn)
    assert np.array_equal(finite, np.isfinite(scored.knn))
    np.testing.assert_allclose(scored.knn[finite], saved_knn[finite], atol=1e-4)
    np.testing.assert_allclose(scored.logprobs, interpolate(saved_lm, saved_knn, mine["lambda"]), atol=1e-4)
    assert scored.ppl == pytest.approx(mine["knnlm_ppl"], rel=1e-4)
    # the command-line wrapper prints the same perplexity
    out = json.loads(cli("score", custom_corpus / "wiki.test.tokens", "--out", run, "--json").stdout)
    assert out["tokens"] == mine["tokens"] and out["knnlm_ppl"] == pytest.approx(scored.ppl, rel=1e-9)


@pytest.mark.slow
def test_next_token_distribution_is_the_brute_force_knnlm(run):
    lm = knnlm.load(run)
    context = "the game was released in"
    logp = lm.next_token_logprobs(context)
    assert logp.shape == (len(lm.vocab),) and abs(float(torch.logsumexp(logp, 0))) < 1e-5
    # independent kNN part: float64 distances to every stored key, the k nearest, softmax(−d/T) summed per token
    ids = lm.encode(context, close_last_line=False)
    s = torch.from_numpy(np.concatenate([[lm.eos_id], ids]).astype(np.int64))
    with torch.no_grad(), autocast("cpu", lm.bf16):  # as the model is run: bf16 where the CPU has it
        out = lm.model(s[None])
        lm_logp = lm.model.full_logprobs(out.hidden[0, -1:]).float()[0].double()
    q = out.key[0, -1].to(torch.float16).double().numpy()
    ds = Datastore(run / "datastore")
    d = ((np.asarray(ds.keys, dtype=np.float64) - q) ** 2).sum(1)
    near = np.argsort(d, kind="stable")[: lm.k]
    w = np.exp(-(d[near] - d[near].min()) / lm.knn_temperature)
    p_knn = np.bincount(ds.vals[near], weights=w / w.sum(), minlength=len(lm.vocab))
    with np.errstate(divide="ignore"):  # log 0 where no neighbour carries the word
        want = np.logaddexp(np.log(lm.lmbda) + np.log(p_knn), np.log1p(-lm.lmbda) + lm_logp.numpy())
    np.testing.assert_allclose(logp.numpy(), want, atol=1e-4)
    # and the score of the next word, by the scoring path (band-wise LM log-probability, batched search)
    nxt = "the"
    scored = lm.score(context + " " + nxt)
    assert scored.tokens[-2] == nxt
    assert float(logp[lm.index[nxt]]) == pytest.approx(scored.logprobs[-2], abs=1e-4)


@pytest.mark.slow
def test_generate_follows_the_distribution(run):
    lm = knnlm.load(run)
    prompt = "the film"
    greedy = lm.generate(prompt, max_tokens=4, greedy=True)
    ids = list(lm.encode(prompt, close_last_line=False))
    for _ in range(4):  # greedy = the argmax chain of next_token_logprobs
        ids.append(int(lm.next_token_logprobs(np.asarray(ids, dtype=np.int32)).argmax()))
    assert greedy == lm.decode(ids[-4:])
    assert lm.generate(prompt, max_tokens=4, top_k=1, seed=3) == greedy  # top-1 sampling is greedy
    a = lm.generate(prompt, max_tokens=6, top_p=0.9, seed=7)
    assert a == lm.generate(prompt, max_tokens=6, top_p=0.9, seed=7)  # a seed reproduces the sample
    proc = cli("generate", "--out", run, "--prompt", prompt, "--max-tokens", "4", "--greedy")
    assert proc.stdout.strip() == (prompt + " " + greedy).strip()
    fails(cli("generate", "--out", run, "--top-p", "0", check=False), "top_p")
    fails(cli("score", run / "no-such-file", "--out", run, check=False), "no-such-file")


@pytest.mark.slow
def test_kv_cached_and_batched_generation_equal_recomputation(run):
    lm = knnlm.load(run)
    lm.bf16 = False  # fp32 on every machine: the two paths differ only by the order of their sums
    T = lm.model.cfg.context
    prompt = list(lm.encode("the film was", close_last_line=False))
    n = T + 10  # past the context window: the cache gives way to recomputing the sliding window
    cached = lm.generate_ids([prompt], n, greedy=True)[0]
    assert cached == lm.generate_ids([prompt], n, greedy=True, cache=False)[0]
    # step by step: the cached distribution is the recomputed one (next_token_logprobs runs the whole window)
    from knnlm.api import DecodeCache
    from knnlm.data import token_stream

    streams, caches = token_stream(np.asarray(prompt, dtype=np.int32), lm.eos_id)[None], [DecodeCache()]
    for t in cached[: T - len(prompt) + 3]:
        logp = lm._next_logprobs(streams, caches)[0]
        want = lm.next_token_logprobs(streams[0, 1:].numpy())
        finite = torch.isfinite(want)
        # fp32 in another order (a cached step's one-row products against the window's matrix products, which MKL
        # computes with other kernels): up to 2.5e-4 apart on AMD Zen 4 (family 25 model 17) for log-probabilities
        # near -14; a wrong cache or position is off by orders more
        assert torch.equal(finite, torch.isfinite(logp)) and torch.allclose(logp[finite], want[finite], atol=1e-3)
        assert int(logp.argmax()) == t
        streams = torch.cat([streams, torch.tensor([[t]])], 1)
    # a batch of prompts (two of one length, one longer) = each prompt alone
    prompts = ["the film was", "the game is", "he played for the club"]
    assert lm.generate(prompts, max_tokens=6, greedy=True) == [lm.generate(p, max_tokens=6, greedy=True) for p in prompts]
    stopped = lm.generate_ids([lm.encode(p, close_last_line=False) for p in prompts], 40, greedy=True, stop_at_eos=True)
    assert all(lm.eos_id not in s[:-1] for s in stopped)  # each row ends at its own end of line
    # the kNN temperature is knn_temperature; `temperature` still works, with a warning
    with pytest.warns(DeprecationWarning, match="knn_temperature"):
        old = knnlm.load(run, temperature=2.0)
    assert old.knn_temperature == knnlm.load(run, knn_temperature=2.0).knn_temperature == 2.0


@pytest.mark.slow
def test_neighbours_are_the_brute_force_nearest_training_contexts(run):
    lm = knnlm.load(run)
    context = "the game was released in"
    near = lm.neighbours(context, k=8)
    # independent: float64 distances from the query key (float16, as stored) to every stored key
    ids = lm.encode(context, close_last_line=False)
    s = torch.from_numpy(np.concatenate([[lm.eos_id], ids]).astype(np.int64))
    with torch.no_grad(), autocast("cpu", lm.bf16):
        q = lm.model(s[None]).key[0, -1].to(torch.float16).double().numpy()
    ds = Datastore(run / "datastore")
    d = ((np.asarray(ds.keys, dtype=np.float64) - q) ** 2).sum(1)
    want = np.argsort(d, kind="stable")[:8]
    np.testing.assert_allclose(near.distances, d[want], rtol=1e-4, atol=1e-3)
    assert set(near.ids.tolist()) == set(want.tolist()) or np.allclose(np.sort(d[near.ids]), d[want], rtol=1e-5)
    assert near.next_ids.tolist() == ds.vals[near.ids].tolist()
    # the text around row i: the training stream's tokens up to position i, then the token that followed
    from knnlm.data import load_corpus

    stream = np.concatenate([[lm.eos_id], load_corpus().splits["train"][:100000]])  # the tiny run's training text
    for i, before, nxt in zip(near.ids, near.before, near.next_tokens):
        assert lm.vocab[stream[i + 1]] == nxt
        if stream[i] != lm.eos_id:  # the text before ends with the token at the stored key's position
            assert before.split()[-1] == lm.vocab[stream[i]]
    proc = cli("score", run / "explain.txt", "--out", run, "--explain", "3", check=False)
    fails(proc, "explain.txt")
    (run / "explain.txt").write_text(context + " the\n")
    out = cli("score", run / "explain.txt", "--out", run, "--explain", "5").stdout
    assert "token 5 'the'" in out and out.count("  #") == lm.k
    first = lm.neighbours(context)  # token 5's context is the five words before it
    assert f"#{first.ids[0]}" in out and f"[{first.next_tokens[0]}]" in out
    fails(cli("score", run / "explain.txt", "--out", run, "--explain", "99", check=False), "--explain")
    # an approximate index that finds fewer than k pads its answers with id −1 at distance inf: left out
    searcher = lm.searcher

    class Padded:
        def search(self, queries, k):
            D, I = searcher.search(queries, k - 2)
            return (np.concatenate([D, np.full((len(D), 2), np.inf, D.dtype)], 1),
                    np.concatenate([I, np.full((len(I), 2), -1, I.dtype)], 1))

    lm.searcher = Padded()
    padded = lm.neighbours(context, k=8)
    assert padded.ids.tolist() == near.ids[:6].tolist() and padded.next_tokens == near.next_tokens[:6]


def test_sampling_follows_temperature_top_k_and_top_p():
    logp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    draws = np.bincount([sample(logp, generator=g) for _ in range(10000)], minlength=4) / 10000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.02)  # 4 standard errors at p = 0.5
    sharp = torch.softmax(logp / 0.5, 0).numpy()  # temperature 0.5 squares and renormalizes
    draws = np.bincount([sample(logp, 0.5, generator=g) for _ in range(10000)], minlength=4) / 10000
    np.testing.assert_allclose(draws, sharp, atol=0.02)
    assert np.abs(draws - [0.5, 0.3, 0.15, 0.05]).max() > 0.1  # ... and told apart from temperature 1
    assert {sample(logp, top_k=2, generator=g) for _ in range(500)} == {0, 1}
    assert {sample(logp, top_p=0.75, generator=g) for _ in range(500)} == {0, 1}  # 0.5 + 0.3 ≥ 0.75
    assert {sample(logp, top_p=0.5, generator=g) for _ in range(200)} == {0}
    assert {sample(logp, top_k=1, generator=g) for _ in range(50)} == {0}


@pytest.mark.slow
@pytest.mark.guarantee("archive-and-cache")
def test_the_search_cache_answers_only_its_own_inputs(tiny_run):
    out = tiny_run[0]
    folder = out / "eval" / "valid"
    meta = json.loads((folder / "meta.json").read_text())
    ds = Datastore(out / "datastore")
    targets = np.load(folder / "targets.npy")
    inputs = meta["inputs"]
    assert inputs["split"] == "valid" and inputs["stride"] == ds.meta["stride"] and inputs["bf16"] == ds.meta["bf16"]

    def cached(index=meta["index"], k_max=meta["k_max"], t=targets, **changed):
        return _search_is_cached(folder, ds, index, k_max, True, {**inputs, **changed}, t)

    assert cached()
    assert cached(k_max=8)  # fewer neighbours than saved: a prefix of the same search
    assert not cached(k_max=meta["k_max"] + 1)
    assert not cached(index="IVF1024,PQ16")
    other = targets.copy()
    other[5] += 1
    assert not cached(t=other)  # the text itself
    assert not cached(t=targets[:-1])
    for key, value in (("split", "test"), ("vocab_hash", "0" * 16), ("datastore", "f" * 16), ("stride", 7),
                       ("bf16", not inputs["bf16"]), ("key_site", "final"), ("key_layer", 0)):
        assert not cached(**{key: value}), key


@pytest.mark.slow
@pytest.mark.guarantee("archive-and-cache")
def test_a_datastore_rebuilt_with_another_stride_is_searched_again(run):
    valid = run / "eval" / "valid"
    before, searched = json.loads((valid / "meta.json").read_text()), (valid / "neighbors.npy").stat().st_mtime_ns
    cli("datastore", "--out", run, "datastore.stride=16")
    cli("evaluate", "--out", run)
    after = json.loads((valid / "meta.json").read_text())
    assert after["inputs"]["stride"] == 16 != before["inputs"]["stride"]
    assert after["inputs"]["datastore"] != before["inputs"]["datastore"]
    assert (valid / "neighbors.npy").stat().st_mtime_ns != searched  # searched anew, not served from the old cache


def made_up_raw_text(n_lines: int, seed: int) -> str:
    """Sentences with capitals and punctuation, as a researcher's own text would have (not pre-tokenized)."""
    rng = np.random.default_rng(seed)
    names, verbs = ["Anna", "The committee", "Paris", "Dr. Lee", "The cat"], ["met", "saw", "won't see", "praised"]
    things = ["the report", "a new bridge", "its 3.5% growth", "the river's bank", "1,200 people"]
    ends = [".", "!", "?", ", again.", " (twice)."]
    return "".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}{rng.choice(ends)}\n"
                   for _ in range(n_lines))


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["words", "bpe"])
def test_own_raw_text_counts_unknown_words_and_reports_per_word_perplexity(tokenizer, tmp_path):
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(made_up_raw_text(600, 0))
    valid = made_up_raw_text(60, 1) + "Zanzibar's Quokka met Anna.\n"  # words training never saw
    (corpus / "valid.txt").write_text(valid)
    (corpus / "test.txt").write_text(made_up_raw_text(60, 2))
    run = tmp_path / "run"
    extra = ["data.vocab_size=300"] if tokenizer == "bpe" else []
    proc = cli("run", "--config", TINY, "--out", run, f"data.path={corpus}", f"data.tokenizer={tokenizer}",
               "data.max_train_tokens=0", "data.max_eval_tokens=0", "train.epochs=1", "eval.k_max=16", "eval.k=4,16",
               *extra)
    summary = json.loads((run / "eval" / "valid" / "summary.json").read_text())
    lm = np.load(run / "eval" / "valid" / "lm_logprobs.npy").astype(np.float64)
    targets = np.load(run / "eval" / "valid" / "targets.npy")
    words = sum(len(line.split()) + 1 for line in valid.splitlines())  # counted here, without knnlm
    assert summary["words"] == words and summary["tokens"] == len(targets)
    assert summary["lm_word_ppl"] == pytest.approx(np.exp(-lm.sum() / words), rel=1e-6)
    vocab = json.loads((run / "vocab.json").read_text())
    unk = int((targets == vocab.index("<unk>")).sum()) if "<unk>" in vocab else 0
    assert summary["oov_rate"] == pytest.approx(unk / len(targets))
    if tokenizer == "words":  # 'zanzibar', 'quokka': unknown; training has no <unk>, so the run warns
        assert unk == 2 and "none in train" in proc.stderr
        assert f"{100 * summary['oov_rate']:.2f}%" in proc.stdout  # and the table shows the OOV rate
    else:
        assert unk == 0
    # the API reads text with the run's tokenizer: its per-word perplexity is the evaluation's
    scored = knnlm.load(run).score(valid)
    assert scored.words == words and len(scored.tokens) == len(targets)
    np.testing.assert_allclose(scored.lm, lm, atol=1e-4)
    assert scored.word_ppl == pytest.approx(summary["knnlm_word_ppl"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.guarantee("bounded-memory")
def test_score_searched_in_small_chunks_equals_one_search_of_every_token(run, monkeypatch):
    """`score` streams: the keys of a long text are searched SEARCH_CHUNK at a time and dropped; the numbers are
    those of one search over every token (planted: chunks of 7 queries against one chunk of all of them)."""
    import knnlm.api as api
    text = TEXT * 30
    lm = knnlm.load(run)
    monkeypatch.setattr(lm.cfg.datastore, "batch_size", 1)  # one window's tokens per step of the stream
    monkeypatch.setattr(api, "SEARCH_CHUNK", 10**9)
    whole = lm.score(text)
    searched = []
    search = lm._knn_search
    monkeypatch.setattr(lm, "_knn_search", lambda keys: searched.append(len(keys)) or search(keys))
    monkeypatch.setattr(api, "SEARCH_CHUNK", 7)
    chunked = lm.score(text)
    assert len(searched) > 10 and max(searched) < 7 + lm.model.cfg.context  # one window past the chunk at most
    assert sum(searched) == len(whole.tokens) == len(chunked.tokens)
    np.testing.assert_array_equal(chunked.lm, whole.lm)
    np.testing.assert_allclose(chunked.knn, whole.knn, rtol=1e-12, atol=0)


FREED = """
import sys
from pathlib import Path
import numpy as np
if sys.argv[1] == "set":
    from knnlm.scoring import return_large_frees_to_os
    assert return_large_frees_to_os()
def resident_mb():
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
block = np.ones(16 << 20, dtype=np.uint8)  # mmapped and freed: glibc's default raises its threshold to 16 MB
del block
block = np.ones(8 << 20, dtype=np.uint8)  # so this one comes from the heap and stays there once freed
before = resident_mb()
del block
print(before - resident_mb())
"""


@pytest.mark.guarantee("bounded-memory")
def test_scoring_has_glibc_return_large_freed_blocks_to_the_os():
    """Without a fixed mmap threshold, glibc keeps freed arrays under 32 MB in its heaps and a long `score` grows
    (benchmarks/score_memory.py). Planted, in fresh processes: a 16 MB array freed, then an 8 MB one; with glibc's
    default the 8 MB stay resident after their free (the control), with `return_large_frees_to_os` they leave."""
    import ctypes.util
    import subprocess
    import sys
    if not (ctypes.util.find_library("c") or "").startswith("libc.so") or not Path("/proc/self/status").exists():
        pytest.skip("glibc on Linux only")

    def released_mb(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, text=True, check=True)
        return float(done.stdout)

    assert released_mb("default") < 1
    assert released_mb("set") > 7
