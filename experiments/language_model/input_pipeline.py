"""Token streams for language modelling and Transformer-XL style batching.

Datasets (``config.data.name``):

* ``pystdlib`` (default, no download): bytes of the running Python's standard-library ``.py``
  files (sorted paths; ``test``/``tests``/``idle_test`` folders and site-packages excluded),
  split 90/5/5. Byte vocabulary (256), metric bits per character.
* ``text``: any local file ``config.data.path``, as bytes, split 90/5/5.
* ``enwik8``: the raw 100,000,000-byte file (``enwik8`` or ``enwik8.zip``); first 90M bytes
  train, next 5M valid, last 5M test.
* ``wikitext103``: ``wiki.{train,valid,test}.tokens``; word vocabulary from train, sorted by
  frequency (ties: first occurrence), every line ends with ``<eos>``; metric perplexity.

Nothing downloads: a missing file raises ``FileNotFoundError`` naming the file and
``scripts/download_data.sh``.

Batching (Dai et al. 2019): a split's token stream of length N is cut into ``B`` parallel streams
``data_BxS`` with ``S = N // B``; window ``w`` is ``inputs = data[:, wT : wT + T]`` and
``targets = data[:, wT + 1 : wT + T + 1]``, so consecutive windows continue each stream and the
model's memory carries across them. The training position (a window counter) is all the
pipeline state there is; it is saved in the checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import sysconfig
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

DOWNLOAD_HINT = "fetch it with: bash scripts/download_data.sh {name} {dest}"
ENWIK8_BYTES = 100_000_000
DATASETS = ("pystdlib", "text", "enwik8", "wikitext103")
EOS = "<eos>"
EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Three token streams (int32 arrays of ids) and how to score them.

    Attributes:
      train, valid, test: 1-D token ids (uint8 for byte data, int32 for words; batches are
        cast to int32 window by window, so enwik8 stays 100 MB in memory).
      vocab_size: number of distinct ids (256 for byte-level data).
      metric: ``"bpc"`` (bits per character/byte) or ``"perplexity"``.
      vocab: id -> word for word-level data, else None.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int
    metric: str
    vocab: list[str] | None = None


def split_90_5_5(data_N: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a stream into its first 90%, next 5% and last 5% (the enwik8 convention)."""
    n = len(data_N)
    n_valid = n_test = n // 20
    n_train = n - n_valid - n_test
    return data_N[:n_train], data_N[n_train : n_train + n_valid], data_N[n_train + n_valid :]


def bytes_corpus(raw: bytes, source: str) -> Corpus:
    """A byte-level corpus (vocab 256, metric BPC) split 90/5/5 from ``raw``."""
    if len(raw) < 200:
        raise ValueError(f"{source} has only {len(raw)} bytes; need at least 200 for 90/5/5 splits")
    data = np.frombuffer(raw, dtype=np.uint8)
    train, valid, test = split_90_5_5(data)
    return Corpus(train, valid, test, vocab_size=256, metric="bpc")


def stdlib_source_files(root: str | None = None) -> list[str]:
    """Sorted paths of the standard library's ``.py`` files, test folders excluded."""
    root = sysconfig.get_paths()["stdlib"] if root is None else root
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS)
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def read_pystdlib(root: str | None = None) -> Corpus:
    """The concatenated bytes of ``stdlib_source_files(root)`` as a byte corpus."""
    files = stdlib_source_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files found under {root or sysconfig.get_paths()}")
    chunks = []
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
    return bytes_corpus(b"".join(chunks), "pystdlib")


def _missing(name: str, path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} data not found: {path} does not exist. Nothing is downloaded implicitly; "
        + DOWNLOAD_HINT.format(name=name, dest=os.path.dirname(path) or ".")
    )


def read_text(path: str) -> Corpus:
    """Any local file, as bytes, split 90/5/5."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"text data not found: config.data.path={path!r} is not a file "
            "(pass --config.data.path=FILE)"
        )
    with open(path, "rb") as f:
        return bytes_corpus(f.read(), path)


def _find_enwik8(path: str) -> str:
    """``path`` itself if it is a file, else ``path/enwik8`` or ``path/enwik8.zip``."""
    if os.path.isfile(path):
        return path
    for name in ("enwik8", "enwik8.zip"):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"enwik8 data not found: neither {path} nor {os.path.join(path, 'enwik8')}[.zip] is a "
        "file. Nothing is downloaded implicitly; "
        + DOWNLOAD_HINT.format(name="enwik8", dest=path or "data/enwik8")
    )


def read_enwik8(path: str) -> Corpus:
    """The enwik8 file (raw or zipped; ``path`` is the file or its directory): 90M/5M/5M."""
    if not path:
        raise ValueError("config.data.path must name the enwik8 file or its directory")
    found = _find_enwik8(path)
    refetch = "bash scripts/download_data.sh enwik8 " + (os.path.dirname(found) or ".")
    if found.endswith(".zip"):
        try:
            with zipfile.ZipFile(found) as z:
                raw = z.read("enwik8")
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
            raise ValueError(
                f"{found} is not a readable enwik8 zip ({type(e).__name__}: {e}); delete it and "
                f"re-fetch it with: {refetch}"
            ) from None
    else:
        with open(found, "rb") as f:
            raw = f.read()
    if len(raw) != ENWIK8_BYTES:
        raise ValueError(
            f"{found} has {len(raw):,} bytes, expected {ENWIK8_BYTES:,}; re-fetch it with "
            + refetch
        )
    data = np.frombuffer(raw, dtype=np.uint8)
    n = 90_000_000
    return Corpus(data[:n], data[n : n + 5_000_000], data[n + 5_000_000 :], 256, "bpc")


def tokenize_lines(lines: Iterator[str]) -> Iterator[str]:
    """Whitespace tokens of each line followed by ``<eos>`` (blank lines give only ``<eos>``)."""
    for line in lines:
        yield from line.split()
        yield EOS


def build_vocab(train_path: str) -> list[str]:
    """Words of ``train_path`` sorted by decreasing count, ties by first occurrence."""
    with open(train_path, encoding="utf-8") as f:
        counts = collections.Counter(tokenize_lines(f))
    # Counter preserves first-insertion order and sorted() is stable.
    return sorted(counts, key=lambda w: -counts[w])


def encode_file(path: str, index: dict[str, int]) -> np.ndarray:
    """Ids of the tokens of ``path``; words absent from the vocabulary raise ValueError."""
    ids = []
    with open(path, encoding="utf-8") as f:
        for tok in tokenize_lines(f):
            i = index.get(tok)
            if i is None:
                i = index.get("<unk>")
                if i is None:
                    raise ValueError(f"{path}: token {tok!r} is not in the training vocabulary")
            ids.append(i)
    return np.asarray(ids, dtype=np.int32)


def read_wikitext103(path: str) -> Corpus:
    """WikiText-103 from the directory ``path`` holding ``wiki.{train,valid,test}.tokens``.

    The encoded splits and the vocabulary are cached in ``<path>/wt103_cache.npz`` when the
    directory is writable (building them from the 540 MB train file takes minutes).
    """
    if not path:
        raise ValueError("config.data.path must name the directory with wiki.*.tokens")
    files = {s: os.path.join(path, f"wiki.{s}.tokens") for s in ("train", "valid", "test")}
    for f in files.values():
        if not os.path.isfile(f):
            raise _missing("wikitext103", f)
    cache = os.path.join(path, "wt103_cache.npz")
    if os.path.isfile(cache) and os.path.getmtime(cache) >= max(
        os.path.getmtime(f) for f in files.values()
    ):
        with np.load(cache, allow_pickle=False) as z:
            vocab = [str(w) for w in z["vocab"]]
            return Corpus(z["train"], z["valid"], z["test"], len(vocab), "perplexity", vocab)
    vocab = build_vocab(files["train"])
    index = {w: i for i, w in enumerate(vocab)}
    splits = {s: encode_file(f, index) for s, f in files.items()}
    if os.access(path, os.W_OK):
        buf = io.BytesIO()
        np.savez(buf, vocab=np.asarray(vocab), **splits)
        with open(cache, "wb") as f:
            f.write(buf.getvalue())
    return Corpus(splits["train"], splits["valid"], splits["test"], len(vocab), "perplexity", vocab)


def load_corpus(data_config: Any) -> Corpus:
    """Dispatch on ``data_config.name`` in {pystdlib, text, enwik8, wikitext103}."""
    name, path = data_config.name, data_config.get("path", "")
    if name == "pystdlib":
        return read_pystdlib(path or None)
    if name == "text":
        return read_text(path)
    if name == "enwik8":
        return read_enwik8(path)
    if name == "wikitext103":
        return read_wikitext103(path)
    raise ValueError(f"config.data.name={name!r} unknown; use one of {DATASETS}")


def check_data_present(data_config: Any) -> None:
    """Fail within seconds (before model building) if the data files are missing."""
    name, path = data_config.name, data_config.get("path", "")
    if name == "enwik8":
        _find_enwik8(path)
    elif name == "wikitext103":
        for s in ("train", "valid", "test"):
            f = os.path.join(path, f"wiki.{s}.tokens")
            if not os.path.isfile(f):
                raise _missing("wikitext103", f)
    elif name == "text" and not (path and os.path.isfile(path)):
        raise FileNotFoundError(f"text data not found: config.data.path={path!r} is not a file")


def check_split_lengths(
    corpus: Corpus, batch_size: int, seq_len: int, eval_batch_size: int
) -> None:
    """Fail before any model is built if a split is too short for the configured windows.

    Training needs one full window: streams of ``S = len(train) // batch_size`` tokens with
    ``seq_len <= S - 1``. Evaluation needs ``len(split) // eval_batch_size >= 2`` tokens per
    stream (one input and its target) in ``valid`` and ``test``.

    Raises:
      ValueError: naming the split, its length and the config field to change.
    """
    stream = len(corpus.train) // batch_size
    if stream - 1 < seq_len:
        raise ValueError(
            f"config.seq_len={seq_len} is too long for the training split: "
            f"{len(corpus.train):,} tokens in config.batch_size={batch_size} streams give "
            f"{stream:,} tokens per stream, so seq_len must be <= {max(stream - 1, 0)} "
            "(lower seq_len or batch_size, or use more data)"
        )
    for name in ("valid", "test"):
        n = len(getattr(corpus, name))
        if n // eval_batch_size < 2:
            raise ValueError(
                f"the {name} split has {n:,} tokens, too short for "
                f"config.eval_batch_size={eval_batch_size} streams (needs >= "
                f"{2 * eval_batch_size} tokens); lower eval_batch_size or use more data"
            )


class StreamBatcher:
    """Transformer-XL windows over ``batch_size`` parallel streams of one split.

    Args:
      tokens_N: the split's token ids.
      batch_size: the global number of streams B.
      seq_len: window length T.
      rows: which streams this process feeds (``local_batch_slice``); default all.

    Attributes:
      num_windows: windows per pass, ``ceil((S - 1) / T)``; the last one may be partial and is
        then padded with weight 0.
    """

    def __init__(
        self, tokens_N: np.ndarray, batch_size: int, seq_len: int, rows: slice | None = None
    ):
        stream_len = len(tokens_N) // batch_size
        if stream_len < 2:
            raise ValueError(
                f"a split of {len(tokens_N)} tokens is too short for batch_size={batch_size}"
            )
        data_BxS = np.asarray(tokens_N[: stream_len * batch_size]).reshape(batch_size, stream_len)
        self.data_BxS = data_BxS[rows if rows is not None else slice(None)]
        self.seq_len = seq_len
        self.num_windows = -(-(stream_len - 1) // seq_len)
        self.num_full_windows = (stream_len - 1) // seq_len

    def window(self, w: int) -> dict[str, np.ndarray]:
        """Window ``w``: ``inputs``, ``targets`` (int32 ``bxT``) and ``weights`` (float32)."""
        if not 0 <= w < self.num_windows:
            raise ValueError(f"window {w} out of range [0, {self.num_windows})")
        T = self.seq_len
        start = w * T
        x = self.data_BxS[:, start : start + T]
        y = self.data_BxS[:, start + 1 : start + T + 1]
        n = y.shape[1]
        pad = ((0, 0), (0, T - n))
        weights = np.ones((x.shape[0], T), np.float32)
        weights[:, n:] = 0.0
        return {
            "inputs": np.pad(x[:, :n], pad).astype(np.int32),
            "targets": np.pad(y, pad).astype(np.int32),
            "weights": weights,
        }


class TrainStream:
    """Endless training windows; the position (windows consumed so far) is checkpointable.

    Training uses only full windows; after the last one the next epoch starts from window 0
    and ``starts_epoch`` tells the caller to reset the model memory.
    """

    def __init__(self, batcher: StreamBatcher, position: int = 0):
        if batcher.num_full_windows < 1:
            raise ValueError("the training split is too short for one full window")
        self.batcher = batcher
        self.position = int(position)

    @property
    def starts_epoch(self) -> bool:
        return self.position % self.batcher.num_full_windows == 0

    def next(self) -> tuple[dict[str, np.ndarray], bool]:
        """``(window, reset_memory)`` and advance the position by one."""
        reset = self.starts_epoch
        batch = self.batcher.window(self.position % self.batcher.num_full_windows)
        self.position += 1
        return batch, reset

    def state(self) -> dict[str, int]:
        return {
            "position": self.position,
            "epoch": self.position // self.batcher.num_full_windows,
        }
