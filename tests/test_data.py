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


@pytest.mark.guarantee("archive-and-cache")
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


# ---- raw text: tokenizers, <unk>, OOV rates, per-word counts ---------------------------------------------------

RAW_TRAIN = ("The Cat sat on the mat.\n"
             "Don't stop: it's 3.14, not 1,000!\n"
             "The cat's hat (red) was \"new\".\n"
             "\n"
             "the dog sat.\n")
RAW_VALID = "The Dog sat on a Rug.\n"
RAW_TEST = "Zebras don't sit!\n"


def raw_corpus(folder):
    folder.mkdir(exist_ok=True)
    for split, text in (("train", RAW_TRAIN), ("valid", RAW_VALID), ("test", RAW_TEST)):
        (folder / f"{split}.txt").write_text(text)
    return folder


def whitespace_words_and_lines(text: str) -> int:
    """The unit of per-word perplexity, counted here without knnlm: whitespace words plus one per line."""
    return sum(len(line.split()) + 1 for line in text.splitlines())


def test_words_split_punctuation_clitics_and_numbers_off_like_wikitext():
    from knnlm.data import TextTokenizer

    tok = TextTokenizer("words")
    assert tok.split("Don't stop: it's 3.14, not 1,000!") == \
        ["Do", "n't", "stop", ":", "it", "'s", "3.14", ",", "not", "1,000", "!"]
    assert tok.split('The cat\'s hat (red) was "new".') == \
        ["The", "cat", "'s", "hat", "(", "red", ")", "was", '"', "new", '"', "."]
    assert TextTokenizer("words", lowercase=True).split("The Cat.") == ["the", "cat", "."]
    assert TextTokenizer().split("The Cat.") == ["The", "Cat."]  # whitespace: as it is


def test_raw_text_oov_rate_unseen_unk_warning_and_per_word_counts(tmp_path, capsys):
    from knnlm.config import DataConfig

    folder = raw_corpus(tmp_path / "raw")
    c = load_corpus(folder, DataConfig(tokenizer="words", lowercase=True))
    words = lambda split: [c.vocab[i] for i in c.splits[split]]  # noqa: E731
    # valid "the dog sat on a rug ." : 'a' and 'rug' never occur in training
    assert words("valid") == ["the", "dog", "sat", "on", "<unk>", "<unk>", ".", "<eos>"]
    assert c.oov_rate("valid") == pytest.approx(2 / 8) and c.oov_rate("train") == 0
    assert words("test") == ["<unk>", "do", "n't", "<unk>", "!", "<eos>"]
    assert c.oov_rate("test") == pytest.approx(2 / 6)
    err = capsys.readouterr().err
    assert "25.00% <unk>" in err  # printed when the corpus is encoded
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "none in train" in warning[0] and "data.min_count" in warning[0]
    # per-word perplexity's unit: whitespace words + line ends, whatever the tokenizer
    for split, text in (("train", RAW_TRAIN), ("valid", RAW_VALID), ("test", RAW_TEST)):
        assert c.words(split, len(c.splits[split])) == whitespace_words_and_lines(text)
    load_corpus(folder, DataConfig(tokenizer="words", lowercase=True))  # from the cache: no second warning
    assert "warning:" not in capsys.readouterr().err

    # min_count 2: training words seen once become <unk>, so the LM learns it, and nothing is warned
    rare = load_corpus(folder, DataConfig(tokenizer="words", lowercase=True, min_count=2))
    counts = {}
    for w in words("train"):
        counts[w] = counts.get(w, 0) + 1
    once = sum(n for w, n in counts.items() if n == 1)
    assert rare.oov_rate("train") == pytest.approx(once / len(rare.splits["train"])) and once > 0
    assert "warning:" not in capsys.readouterr().err
    assert rare.vocab_hash != c.vocab_hash  # another cache and another vocabulary identity, not a stale answer


def test_the_default_whitespace_reading_keeps_its_cache_folder_and_vocabulary_hash(tmp_path):
    from knnlm.config import DataConfig
    from knnlm.data import cache_key, cache_root, corpus_files, word_vocab_hash

    folder = raw_corpus(tmp_path / "raw")
    c = load_corpus(folder)
    assert c.vocab_hash == word_vocab_hash(c.vocab) and c.word_counts is None  # one token per word
    assert (cache_root() / f"corpus-{cache_key(corpus_files(folder)[1])}" / "meta.json").is_file()
    again = load_corpus(folder, DataConfig())
    assert again.vocab == c.vocab and all(np.array_equal(again.splits[s], c.splits[s]) for s in c.splits)
    assert [c.vocab[i] for i in c.splits["valid"]] == ["The", "<unk>", "sat", "on", "<unk>", "<unk>", "<eos>"]


def test_bpe_reads_every_word_and_gives_the_text_back(tmp_path):
    pytest.importorskip("tokenizers")
    from knnlm.config import DataConfig

    folder = raw_corpus(tmp_path / "raw")
    c = load_corpus(folder, DataConfig(tokenizer="bpe", vocab_size=300))
    assert c.oov_rate("valid") == c.oov_rate("test") == 0  # byte-level: nothing is unknown
    counts = c.counts()
    seen = counts[counts > 0]
    assert np.all(seen[:-1] >= seen[1:]) and np.all(counts[len(seen):] == 0)  # frequency order for adaptive softmax
    for split, text in (("valid", RAW_VALID), ("test", RAW_TEST)):
        lines, line = [], []
        for i in c.splits[split]:
            if i == c.eos_id:
                lines.append(c.tokenizer.join(line))
                line = []
            else:
                line.append(c.vocab[i])
        assert lines == text.splitlines()
        assert c.words(split, len(c.splits[split])) == whitespace_words_and_lines(text)
