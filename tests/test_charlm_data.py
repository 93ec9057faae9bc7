"""Char-LM data: corpus, split, vocabulary and <unk> rule, stateful batch layout, errors."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import entropy

from runner.data.text import (IGNORE_INDEX, CharVocab, build_text, embedded_corpus, eval_streams,
                              train_streams)
from runner.errors import UserError
from conftest import SHARED_DATA, require

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


def _write(tmp_path, text: str, name: str = "corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_vocabulary_from_training_text_and_unknown_rule():
    vocab = CharVocab.from_text("banana")
    assert vocab.itos == ["<unk>", "a", "b", "n"]  # id 0 is <unk>; seen chars sorted by code point
    assert vocab.encode("banana").tolist() == [2, 1, 3, 1, 3, 1]
    assert vocab.encode("cab€").tolist() == [0, 1, 2, 0]  # unseen chars (also non-ASCII) -> 0
    assert vocab.decode([2, 1, 0]) == "ba\ufffd"


def test_split_is_contiguous_and_vocab_comes_from_train(tmp_path):
    text = "a" * 900 + "b" * 50 + "Z" * 50  # 'b' and 'Z' only outside the training 90%
    bundle = build_text(_write(tmp_path, text), batch_size=2, seq_len=10, val_fraction=0.05, test_fraction=0.05)
    assert bundle.family == "charlm" and bundle.prebatched
    assert bundle.info["characters"] == {"train": 900, "val": 50, "test": 50}
    assert bundle.info["vocab"] == ["<unk>", "a"] and bundle.info["vocab_size"] == 2
    assert bundle.info["unigram_entropy_bits"] == 0.0
    for split in (bundle.val, bundle.test):  # every target there is unknown
        assert set(split.y[split.y != IGNORE_INDEX].tolist()) == {0}


def test_unicode_file_and_unigram_entropy(tmp_path):
    text = "añb€" * 300 + "ñ" * 77 + TEXT
    bundle = build_text(_write(tmp_path, text), batch_size=3, seq_len=8)
    train_text = text[:bundle.info["characters"]["train"]]
    assert bundle.info["vocab"][1:] == sorted(set(train_text))
    expected = entropy(list(Counter(train_text).values()), base=2)
    assert bundle.info["unigram_entropy_bits"] == pytest.approx(expected, abs=1e-12)


def test_train_layout_streams_continue_across_chunks():
    ids = torch.arange(1, 1002)  # position p holds p + 1: the layout is readable from the values
    data = train_streams(ids, batch_size=4, seq_len=10)
    length = 1000 // 4 // 10 * 10
    assert len(data) == length // 10
    for t in range(len(data)):
        x, y = data[t]
        assert x.shape == y.shape == (4, 10)
        assert torch.equal(y, x + 1)  # targets are the next character
        for j in range(4):
            assert x[j, 0] == ids[j * length + t * 10]  # stream j is a contiguous piece of the text
            if t + 1 < len(data):
                assert data[t + 1][0][j, 0] == x[j, -1] + 1  # chunk t+1 starts where chunk t ended


def test_builder_streams_read_back_the_training_text(tmp_path):
    bundle = build_text(_write(tmp_path, TEXT), batch_size=3, seq_len=7)
    vocab = CharVocab(bundle.info["vocab"][1:])
    n_train = bundle.info["characters"]["train"]
    length = (n_train - 1) // 3 // 7 * 7
    for j in range(3):
        stream = "".join(vocab.decode(bundle.train[t][0][j]) for t in range(len(bundle.train)))
        assert stream == TEXT[j * length:(j + 1) * length]


@pytest.mark.parametrize("n, streams, seq_len", [(2, 5, 4), (41, 4, 10), (1000, 7, 10), (123, 50, 50)])
def test_eval_streams_count_every_target_once(n, streams, seq_len):
    ids = torch.randint(1, 9, (n,), generator=torch.Generator().manual_seed(n))
    data = eval_streams(ids, streams, seq_len)
    assert len(data) >= 1 and data.num_tokens == n - 1
    chunks = [data[t] for t in range(len(data))]
    assert all(x.shape[1] <= seq_len for x, _ in chunks)
    xs, ys = torch.cat([x for x, _ in chunks], 1), torch.cat([y for _, y in chunks], 1)
    valid = ys != IGNORE_INDEX
    # Rows in order, valid positions only, are exactly the split's (input, target) pairs.
    assert torch.equal(xs[valid], ids[:-1]) and torch.equal(ys[valid], ids[1:])
    assert (valid.sum(1).max() - valid.sum(1).min()) <= 1


def test_short_eval_split_of_a_small_corpus_gives_a_chunk(tmp_path):
    bundle = build_text(_write(tmp_path, TEXT[:3000]), batch_size=50, seq_len=50)  # val: 150 chars
    assert len(bundle.val) >= 1 and bundle.val.num_tokens == bundle.info["characters"]["val"] - 1
    assert len(bundle.test) >= 1 and bundle.test.num_tokens == bundle.info["characters"]["test"] - 1


def test_zero_fraction_leaves_the_split_out(tmp_path):
    bundle = build_text(_write(tmp_path, TEXT), batch_size=2, seq_len=8, test_fraction=0.0)
    assert bundle.test is None and bundle.val is not None


def test_embedded_corpus_is_pydoc_topics_in_sorted_key_order():
    from pydoc_data.topics import topics

    text = embedded_corpus()
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(v) for v in topics.values()) > 100_000
    bundle = build_text(None, batch_size=50, seq_len=50)
    assert bundle.info["vocab_size"] > 60 and len(bundle.train) > 100


def test_tinyshakespeare_by_path():
    path = require(SHARED_DATA / "tinyshakespeare" / "input.txt")
    bundle = build_text(str(path), batch_size=50, seq_len=50)
    assert bundle.info["characters"] == {"train": 1_003_854, "val": 55_770, "test": 55_770}
    assert bundle.info["vocab_size"] == 66  # 65 characters + <unk>
    assert bundle.val.num_tokens == bundle.info["characters"]["val"] - 1


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(UserError, match="dataset.path"):
        build_text(str(tmp_path / "absent.txt"))


def test_not_utf8_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème\n".encode("latin-1") * 100)
    with pytest.raises(UserError, match="not UTF-8"):
        build_text(str(path), batch_size=2, seq_len=4)


@pytest.mark.parametrize("text, kwargs, match", [
    ("", {}, "is empty"),
    ("abcdefghijklmnopqrstuvwxyz", {"val_fraction": 0.01}, "val split .* 0 characters"),
    (TEXT, {"test_fraction": 0.5, "val_fraction": 0.5}, "sum must be below 1"),
    (TEXT, {"val_fraction": -0.1}, "dataset.val_fraction"),
    (TEXT[:300], {"batch_size": 50, "seq_len": 50}, "too few for trainer.batch_size=50"),
])
def test_bad_input_is_a_user_error(tmp_path, text, kwargs, match):
    kwargs = {"batch_size": 2, "seq_len": 4, **kwargs}
    with pytest.raises(UserError, match=match):
        build_text(_write(tmp_path, text), **kwargs)


def test_val_fraction_rounding_is_contiguous(tmp_path):
    bundle = build_text(_write(tmp_path, TEXT), batch_size=2, seq_len=8, val_fraction=0.1, test_fraction=0.2)
    chars = bundle.info["characters"]
    assert chars["val"] == round(len(TEXT) * 0.1) and chars["test"] == round(len(TEXT) * 0.2)
    assert sum(chars.values()) == len(TEXT)
    assert math.isfinite(bundle.info["unigram_entropy_bits"])
