"""Named datastores (`knnlm datastore --name`): a second datastore of another text for a trained run, chosen at
evaluation, scoring and generation, its results kept apart from the run's own."""

import json
import shutil

import numpy as np
import pytest
import torch

import knnlm
from conftest import fails, knnlm as cli, main_fails, snapshot
from knnlm.checkpoint import load_model
from knnlm.data import default_data_dir
from knnlm.lm import autocast

UNSEEN = "qwzxv"  # a word the WikiText-2 vocabulary lacks: read as <unk>


def domain_corpus(folder):
    """A small corpus in WikiText's folder format, of other text than the tiny run's training slice (WikiText-2's
    valid split, which that slice never reads), with an unseen word on every fifth line."""
    lines = [line for line in (default_data_dir() / "wiki.valid.tokens").read_text().splitlines() if line.strip()]
    lines = [f"{line} {UNSEEN}" if i % 5 == 0 else line for i, line in enumerate(lines)]
    folder.mkdir()
    for split, part in (("train", lines[:150]), ("valid", lines[150:180]), ("test", lines[180:200])):
        (folder / f"wiki.{split}.tokens").write_text("\n".join(part) + "\n")
    return folder


def tokens_of(path):
    """Targets of a split as the run's whitespace reading counts them: its words and one end-of-line per line."""
    return sum(len(line.split()) + 1 for line in path.read_text().splitlines())


@pytest.fixture()
def run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out, ignore=shutil.ignore_patterns("test"))
    return out


@pytest.mark.slow
@pytest.mark.wikitext
def test_a_second_named_datastore_is_built_evaluated_and_used_beside_the_run_own(run, tmp_path):
    corpus = domain_corpus(tmp_path / "domain")
    default_eval, default_store = snapshot(run / "eval"), snapshot(run / "datastore")

    built = json.loads(cli("datastore", "--out", run, "--name", "dom", f"data.path={corpus}", "--json").stdout)
    folder = run / "datastores" / "dom" / "datastore"
    meta = json.loads((folder / "meta.json").read_text())
    n_train = tokens_of(corpus / "wiki.train.tokens")
    assert meta["N"] == built["keys"] == n_train  # one key per training position of its own corpus
    assert meta["name"] == "dom" and meta["corpus"] == str(corpus.resolve()) and 0 < built["oov_rate"] < 0.1

    # keys and values against an independent reference: the text encoded with the run's vocab.json, and the model
    # run on each window (the first scores positions 0..T-1; each later one ends T/2 further, scores its last T/2)
    vocab = json.loads((run / "vocab.json").read_text())
    index = {w: i for i, w in enumerate(vocab)}
    ids = [index["<eos>"]]
    for line in (corpus / "wiki.train.tokens").read_text().splitlines():
        ids += [index.get(w, index["<unk>"]) for w in line.split()] + [index["<eos>"]]
    s = torch.tensor(ids)
    model, cfg, _ = load_model(run)
    T, n = cfg.model.context, len(ids) - 1
    keys = np.load(folder / "keys.npy")
    assert np.array_equal(np.load(folder / "vals.npy"), s[1:].numpy())
    reference, end, scored = np.zeros_like(keys), min(T, n), 0
    with torch.no_grad(), autocast("cpu", cfg.train.bf16):  # the builder's precision: bf16 where the CPU has it (AMX)
        while scored < n:
            start = max(0, end - T)
            key = model(s[start:end][None]).key[0].to(torch.float16).numpy()  # (end - start, d)
            reference[scored:end] = key[scored - start :]
            scored, end = end, min(end + T // 2, n)
    np.testing.assert_allclose(keys.astype(np.float32), reference.astype(np.float32), atol=2e-3, rtol=1e-2)

    # evaluation with the named datastore: its own text's valid split, results beside it
    named = json.loads(cli("evaluate", "--out", run, "--datastore", "dom", "--json").stdout)
    assert named["tokens"] == tokens_of(corpus / "wiki.valid.tokens") and named["datastore_size"] == n_train
    assert (run / "datastores" / "dom" / "eval" / "valid" / "summary.json").is_file()
    # the run's own datastore on the same text: another folder, the same LM perplexity
    other = json.loads(cli("evaluate", "--out", run, f"data.path={corpus}", "--json").stdout)
    assert other["tokens"] == named["tokens"] and other["lm_ppl"] == pytest.approx(named["lm_ppl"], rel=1e-6)
    assert other["datastore_size"] == json.loads((run / "datastore" / "meta.json").read_text())["N"]
    assert len(list(run.glob("eval-domain-*/valid/summary.json"))) == 1
    # and the run's own datastore and evaluation of its own text, untouched by both
    assert snapshot(run / "eval") == default_eval and snapshot(run / "datastore") == default_store
    own = json.loads(cli("evaluate", "--out", run, "--json").stdout)
    assert own["tokens"] == 10000 and own["datastore_size"] == 100000

    # the API and `score` use the named datastore at the settings chosen on its text
    lm = knnlm.load(run, datastore="dom")
    assert (lm.k, lm.knn_temperature, lm.lmbda) == (named["k"], named["temperature"], named["lambda"])
    scored = lm.score((corpus / "wiki.valid.tokens").read_text())
    assert scored.ppl == pytest.approx(named["knnlm_ppl"], rel=1e-4)
    assert UNSEEN not in lm.neighbours("the").rows()[0]["before"]  # its text is the domain's, read as <unk>
    out = json.loads(cli("score", corpus / "wiki.valid.tokens", "--out", run, "--datastore", "dom", "--json").stdout)
    assert out["knnlm_ppl"] == pytest.approx(scored.ppl, rel=1e-9)
    assert cli("generate", "--out", run, "--datastore", "dom", "--prompt", "the", "--max-tokens", "3", "--greedy").stdout
    assert "OK" in cli("verify", "--out", run).stdout

    # a name that is not there: one line naming those that are
    fails(cli("evaluate", "--out", run, "--datastore", "nope", check=False), "no datastore named 'nope'", "dom")
    fails(cli("score", corpus / "wiki.valid.tokens", "--out", run, "--datastore", "nope", check=False), "available: dom")


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".hidden", "", "x" * 65])
def test_a_datastore_name_that_is_a_path_is_one_line_exit_2(name, tmp_path, capsys):
    from knnlm.cli import main

    out = tmp_path / "run"
    for args in (["datastore", "--out", out, "--name", name], ["evaluate", "--out", out, "--datastore", name]):
        line = main_fails(capsys, *args)
        assert "not a datastore name" in line
        assert main([str(a) for a in args]) == 2
        capsys.readouterr()
    assert not out.exists() and not (tmp_path / "x").exists()


def test_another_text_is_read_with_the_run_vocabulary(tmp_path):
    from knnlm.data import load_corpus, load_corpus_with_vocab

    def corpus(folder, train, valid):
        folder.mkdir()
        for split, text in (("train", train), ("valid", valid), ("test", valid)):
            (folder / f"{split}.txt").write_text(text)
        return folder

    own = load_corpus(corpus(tmp_path / "own", "a b c\nb c\n", "a c\n"))
    other = load_corpus_with_vocab(corpus(tmp_path / "other", "a new b\n", "c d\n"), own.vocab, own.tokenizer,
                                   own.vocab_hash)
    index = {w: i for i, w in enumerate(own.vocab)}
    assert other.vocab == own.vocab and other.vocab_hash == own.vocab_hash  # the model's checks pass
    assert other.splits["train"].tolist() == [index[w] for w in ("a", "<unk>", "b", "<eos>")]
    assert other.oov_rate("train") == 0.25 and other.oov_rate("valid") == pytest.approx(1 / 3)
    assert other.digest and other.digest != own.digest  # which text, by content
