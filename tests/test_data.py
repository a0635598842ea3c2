import numpy as np
import pytest

from knnlm.artifacts import UserError
from knnlm.data import load_corpus, sliding_windows, token_stream, train_batch


@pytest.mark.wikitext
def test_wikitext2_counts_and_vocabulary():
    c = load_corpus()  # the shared copy is found by default
    assert {s: len(a) for s, a in c.splits.items()} == {"train": 2088628, "valid": 217646, "test": 245569}
    assert c.vocab_size == 33278
    assert c.splits["train"].dtype == np.int32  # not int16: 33,278 types
    unk = c.vocab.index("<unk>")
    assert int((c.splits["train"] == unk).sum()) == 54625
    assert int((c.splits["valid"] == unk).sum()) == 11718
    counts = c.counts()
    assert np.all(counts[:-1] >= counts[1:]), "vocabulary must be sorted by training frequency"
    again = load_corpus()  # from the cache
    assert all(np.array_equal(again.splits[s], c.splits[s]) for s in c.splits) and again.vocab == c.vocab


def test_plain_text_folder_and_unknown_words(tmp_path):
    (tmp_path / "train.txt").write_text("a b a\nc a\n")
    (tmp_path / "valid.txt").write_text("a z\n")
    (tmp_path / "test.txt").write_text("b\n\n")
    c = load_corpus(tmp_path)
    assert c.vocab[:2] == ["a", "<eos>"] and "<unk>" in c.vocab
    words = [c.vocab[i] for i in c.splits["valid"]]
    assert words == ["a", "<unk>", "<eos>"]
    assert [c.vocab[i] for i in c.splits["test"]] == ["b", "<eos>", "<eos>"]


@pytest.mark.parametrize("n,T,stride", [(1000, 64, 32), (64, 64, 32), (10, 64, 32), (1001, 50, 17), (300, 64, 64)])
def test_sliding_windows_score_every_position_once_with_context(n, T, stride):
    seen = np.zeros(n, dtype=int)
    for i, (a, e, f) in enumerate(sliding_windows(n, T, stride)):
        assert e - a <= T and a <= f <= e
        seen[f:e] += 1
        if i > 0:
            assert f - a >= T - stride  # at least context - stride tokens before the first scored one
    assert np.all(seen == 1)


def test_train_batch_pairs_input_with_next_token():
    ids = np.arange(1, 101, dtype=np.int32)
    s = token_stream(ids, eos_id=0)
    x, y = train_batch(s, __import__("torch").tensor([0, 3]), 10)
    assert x[0].tolist() == [0] + list(range(1, 10)) and y[0].tolist() == list(range(1, 11))
    assert (y[:, :-1] == x[:, 1:]).all()


def test_missing_and_partial_folders(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(UserError, match="no corpus files"):
        load_corpus(tmp_path)
    (tmp_path / "train.txt").write_text("a\n")
    with pytest.raises(UserError, match="only some splits"):
        load_corpus(tmp_path)


def test_corpora_that_differ_only_where_a_split_ends_have_their_own_cache(tmp_path):
    """The cache key used to hash train + valid + test joined with nothing between them: moving a boundary kept the
    key, and the second corpus was answered from the first one's cache."""
    texts = [("a b\nc a\n", "b c\n", "a\n"), ("a b\nc a\nb c\n", "", "a\n"), ("a b\n", "c a\nb c\n", "a\n")]
    texts = [t for t in texts if all(t)]  # every split non-empty (an empty one is refused)
    corpora = []
    for i, (train, valid, test) in enumerate(texts):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        for name, text in zip(("train", "valid", "test"), (train, valid, test)):
            (folder / f"{name}.txt").write_text(text)
        assert "".join((train, valid, test)) == "".join(texts[0])  # the same bytes, split elsewhere
        corpora.append((load_corpus(folder), (train, valid, test)))
    for corpus, split_texts in corpora:  # the reference reading: words of train, others <unk>, <eos> per line
        known = set(split_texts[0].split())
        for name, text in zip(("train", "valid", "test"), split_texts):
            words = [w if w in known or w == "<eos>" else "<unk>"
                     for line in text.splitlines() for w in [*line.split(), "<eos>"]]
            assert [corpus.vocab[i] for i in corpus.splits[name]] == words, name
    from knnlm.data import cache_key, split_files
    keys = {cache_key(split_files(tmp_path / f"c{i}")) for i in range(len(texts))}
    assert len(keys) == len(texts)
