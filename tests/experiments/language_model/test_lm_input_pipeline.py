"""Tests of the LM input pipeline on small files the tests write."""

import os

import ml_collections
import numpy as np
import pytest

from experiments.language_model import input_pipeline as ip


def test_split_90_5_5_sizes_and_order():
    data = np.arange(1000)
    train, valid, test = ip.split_90_5_5(data)
    assert (len(train), len(valid), len(test)) == (900, 50, 50)
    np.testing.assert_array_equal(np.concatenate([train, valid, test]), data)


def test_text_reader_bytes_and_splits(tmp_path):
    raw = bytes(range(256)) * 4
    path = tmp_path / "t.txt"
    path.write_bytes(raw)
    corpus = ip.load_corpus(ml_collections.ConfigDict({"name": "text", "path": str(path)}))
    assert corpus.vocab_size == 256 and corpus.metric == "bpc"
    assert len(corpus.train) == 922 and len(corpus.valid) == 51 and len(corpus.test) == 51
    assert bytes(corpus.train.tolist()) == raw[:922]
    assert bytes(corpus.test.tolist()) == raw[-51:]


def test_text_reader_missing_file_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.data.path"):
        ip.read_text(str(tmp_path / "nope.txt"))


def test_enwik8_split_positions(tmp_path):
    path = tmp_path / "enwik8"
    with open(path, "wb") as f:  # 100,000,000 bytes, mostly a sparse hole of zeros
        f.write(b"A")
        f.seek(90_000_000)
        f.write(b"V")
        f.seek(95_000_000)
        f.write(b"T")
        f.truncate(ip.ENWIK8_BYTES)
    corpus = ip.read_enwik8(str(tmp_path))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (
        90_000_000,
        5_000_000,
        5_000_000,
    )
    assert corpus.train[0] == ord("A") and corpus.valid[0] == ord("V")
    assert corpus.test[0] == ord("T")
    assert corpus.train.dtype == np.uint8


def test_enwik8_wrong_size_and_missing(tmp_path):
    (tmp_path / "enwik8").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="expected 100,000,000"):
        ip.read_enwik8(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts/download_data.sh enwik8"):
        ip.check_data_present(
            ml_collections.ConfigDict({"name": "enwik8", "path": str(tmp_path / "missing")})
        )


def _write_wikitext(root):
    os.makedirs(root, exist_ok=True)
    (root / "wiki.train.tokens").write_text(" = Title = \n\n the cat sat on the mat \n the end \n")
    (root / "wiki.valid.tokens").write_text(" the cat \n")
    (root / "wiki.test.tokens").write_text(" <unk> sat \n")


def test_wikitext103_vocab_and_encoding(tmp_path):
    root = tmp_path / "wt"
    _write_wikitext(root)
    (root / "wiki.train.tokens").write_text(
        " = Title = \n\n the cat sat on the mat <unk> \n the end \n"
    )
    corpus = ip.read_wikitext103(str(root))
    # counts: <eos> 4, the 3, = 2, then count-1 words in order of first occurrence
    assert corpus.vocab == ["<eos>", "the", "=", "Title", "cat", "sat", "on", "mat", "<unk>", "end"]
    assert corpus.metric == "perplexity" and corpus.vocab_size == 10
    words = [corpus.vocab[i] for i in corpus.train]
    assert words[:5] == ["=", "Title", "=", "<eos>", "<eos>"]
    assert [corpus.vocab[i] for i in corpus.valid] == ["the", "cat", "<eos>"]
    assert [corpus.vocab[i] for i in corpus.test] == ["<unk>", "sat", "<eos>"]
    assert (root / "wt103_cache.npz").exists()
    again = ip.read_wikitext103(str(root))  # from the cache
    assert again.vocab == corpus.vocab
    np.testing.assert_array_equal(again.train, corpus.train)


def test_wikitext103_unknown_word_without_unk_raises(tmp_path):
    root = tmp_path / "wt"
    _write_wikitext(root)
    (root / "wiki.valid.tokens").write_text(" zebra \n")
    with pytest.raises(ValueError, match="zebra"):
        ip.read_wikitext103(str(root))


def test_wikitext103_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.tokens.*download_data\.sh"):
        ip.read_wikitext103(str(tmp_path))


def test_pystdlib_excludes_test_folders(tmp_path):
    for rel in ("a.py", "pkg/b.py", "test/c.py", "pkg/tests/d.py", "pkg/e.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel * 30)
    files = [os.path.relpath(f, tmp_path) for f in ip.stdlib_source_files(str(tmp_path))]
    assert files == ["a.py", os.path.join("pkg", "b.py")]
    corpus = ip.read_pystdlib(str(tmp_path))
    total = len(corpus.train) + len(corpus.valid) + len(corpus.test)
    assert total == len("a.py" * 30) + len("pkg/b.py" * 30)


def test_stream_batcher_windows_continue_streams():
    tokens = np.arange(103)
    b = ip.StreamBatcher(tokens, batch_size=4, seq_len=5)  # streams of 25, 24 targets each
    assert b.num_windows == 5 and b.num_full_windows == 4
    w0, w1 = b.window(0), b.window(1)
    np.testing.assert_array_equal(w0["inputs"][1], np.arange(25, 30))
    np.testing.assert_array_equal(w0["targets"][1], np.arange(26, 31))
    np.testing.assert_array_equal(w1["inputs"][1], np.arange(30, 35))
    last = b.window(4)  # 24 targets = 4 full windows + 4 in the last
    np.testing.assert_array_equal(last["weights"][0], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(last["targets"][0, :4], [21, 22, 23, 24])
    assert w0["inputs"].dtype == np.int32
    rows = ip.StreamBatcher(tokens, 4, 5, rows=slice(2, 4)).window(1)
    np.testing.assert_array_equal(rows["inputs"], w1["inputs"][2:4])
    with pytest.raises(ValueError, match="out of range"):
        b.window(5)


def test_train_stream_position_and_epoch_reset():
    b = ip.StreamBatcher(np.arange(103), batch_size=4, seq_len=5)
    stream = ip.TrainStream(b)
    resets = [stream.next()[1] for _ in range(9)]
    assert resets == [True, False, False, False, True, False, False, False, True]
    assert stream.state() == {"position": 9, "epoch": 2}
    resumed = ip.TrainStream(b, position=6)
    batch, reset = resumed.next()
    np.testing.assert_array_equal(batch["inputs"], b.window(2)["inputs"])
    assert not reset


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="config.data.name='nope'"):
        ip.load_corpus(ml_collections.ConfigDict({"name": "nope", "path": ""}))
