"""Character-level text for the char-LM: the embedded corpus or any UTF-8 file, in stateful batches.

* Corpus: ``path=None`` reads the Python documentation that ships inside CPython
  (``pydoc_data.topics.topics``, its strings joined in sorted key order); otherwise any UTF-8
  file (relative paths are taken from the directory the run was started in).
* Split: contiguous, train first, then val, then test (``val_fraction``, ``test_fraction``).
* Vocabulary: the characters of the *training* text, sorted by code point, get ids 1..V-1; id 0
  is ``<unk>``, which every character not seen in training (in val or test) maps to.
* Batching for truncated BPTT: a split's token stream is cut into B contiguous streams and item
  t of the split's Dataset is the whole batch ``(x[:, t*L:(t+1)*L], y[...])``, targets shifted
  by one, so stream j of item t+1 continues stream j of item t and a carried hidden state stays
  meaningful. Train uses B = ``batch_size`` equal streams and full chunks only (the < L
  characters left over per stream are dropped, as char-rnn does). Val and test count every
  character after the split's first: their streams may differ in length by one and the last
  chunk may be shorter or padded; padded targets are ``IGNORE_INDEX`` (-100) and count for
  nothing. Eval uses B = ``eval_batch_size`` (default ``batch_size``) streams, fewer when the
  split is short, so that each stream holds at least ``seq_len`` targets where possible.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from runner.engine.family import DataBundle
from runner.errors import UserError

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
UNK = "<unk>"


def embedded_corpus() -> str:
    """CPython's own documentation topics (about 465k characters), joined in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module (the embedded corpus): "
                        "set dataset.path to a UTF-8 text file") from None
    return "".join(topics[key] for key in sorted(topics))


def read_text(path: str | Path) -> str:
    """The whole file as text; UserError if it is missing or not UTF-8."""
    path = Path(_absolute(str(path)))
    if not path.is_file():
        raise UserError(f"dataset.path={path} does not exist (give a UTF-8 text file, "
                        "or dataset.path=null for the embedded corpus)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"dataset.path={path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _absolute(path: str) -> str:
    # Hydra may change the working directory; a relative path means the directory of the launch.
    try:
        from hydra.utils import to_absolute_path
        return to_absolute_path(path)
    except (ImportError, ValueError):
        return path


class CharVocab:
    """id 0 is <unk>; the training characters, sorted by code point, are ids 1..V-1."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = sorted(set(chars))
        self.itos = [UNK, *self.chars]
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(list(set(text)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        """Long tensor of ids; characters outside the vocabulary become 0 (<unk>)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._codes, codes)
        known = (pos < len(self._codes)) & (self._codes[np.minimum(pos, len(self._codes) - 1)] == codes)
        return torch.from_numpy(np.where(known, pos + 1, 0))

    def decode(self, ids: Tensor | list[int]) -> str:
        return "".join("\ufffd" if i == 0 else self.itos[i] for i in (ids.tolist() if isinstance(ids, Tensor) else ids))


def unigram_entropy_bits(ids: Tensor, vocab_size: int) -> float:
    """Entropy in bits of the characters' empirical distribution (a model must beat it)."""
    p = torch.bincount(ids, minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


class StreamChunks(Dataset):
    """Item t is the batch (x[:, t*L:(t+1)*L], y[:, t*L:(t+1)*L]) of B parallel streams."""

    def __init__(self, x: Tensor, y: Tensor, seq_len: int) -> None:
        self.x, self.y, self.seq_len = x, y, seq_len

    @property
    def num_streams(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return int((self.y != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return math.ceil(self.x.shape[1] / self.seq_len)

    def __getitem__(self, t: int) -> tuple[Tensor, Tensor]:
        if not 0 <= t < len(self):
            raise IndexError(t)
        cols = slice(t * self.seq_len, (t + 1) * self.seq_len)
        return self.x[:, cols].clone(), self.y[:, cols].clone()


def train_streams(ids: Tensor, batch_size: int, seq_len: int) -> StreamChunks:
    """B equal streams, full chunks only."""
    length = (len(ids) - 1) // batch_size // seq_len * seq_len
    if length == 0:
        raise UserError(
            f"the training split has {len(ids)} characters, too few for trainer.batch_size={batch_size} "
            f"streams of dataset.seq_len={seq_len} (needs more than {batch_size * seq_len}): "
            "use a longer text or smaller values")
    n = batch_size * length
    return StreamChunks(ids[:n].view(batch_size, length), ids[1:n + 1].view(batch_size, length), seq_len)


def eval_streams(ids: Tensor, batch_size: int, seq_len: int) -> StreamChunks:
    """Streams covering every target ids[1:], lengths differing by at most one, padded at the end."""
    n_targets = len(ids) - 1
    streams = max(1, min(batch_size, n_targets // seq_len))
    lengths = [n_targets // streams + (j < n_targets % streams) for j in range(streams)]
    width = lengths[0]
    x = torch.zeros(streams, width, dtype=torch.long)
    y = torch.full((streams, width), IGNORE_INDEX, dtype=torch.long)
    start = 0
    for j, length in enumerate(lengths):
        x[j, :length] = ids[start:start + length]
        y[j, :length] = ids[start + 1:start + length + 1]
        start += length
    return StreamChunks(x, y, seq_len)


def split_text(text: str, val_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    """Contiguous train / val / test pieces of ``text``."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"dataset.{key}={value} must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"dataset.val_fraction + dataset.test_fraction = {val_fraction + test_fraction} "
                        "leaves nothing to train on: their sum must be below 1")
    n_val, n_test = round(len(text) * val_fraction), round(len(text) * test_fraction)
    n_train = len(text) - n_val - n_test
    return text[:n_train], text[n_train:n_train + n_val], text[n_train + n_val:]


def build_text(path: str | None = None, batch_size: int = 50, seq_len: int = 50,
               eval_batch_size: int | None = None, val_fraction: float = 0.05,
               test_fraction: float = 0.05) -> DataBundle:
    """The char-LM DataBundle (see the module docstring). A fraction of 0 leaves that split out."""
    if batch_size < 1 or seq_len < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise UserError(f"batch_size={batch_size}, eval_batch_size={eval_batch_size} and "
                        f"dataset.seq_len={seq_len} must be positive")
    text = embedded_corpus() if path is None else read_text(path)
    source = "the embedded corpus (pydoc_data.topics)" if path is None else f"dataset.path={path}"
    if not text:
        raise UserError(f"{source} is empty")
    train_text, val_text, test_text = split_text(text, val_fraction, test_fraction)
    vocab = CharVocab.from_text(train_text)
    train_ids = vocab.encode(train_text)
    splits = {}
    for name, piece, fraction in (("val", val_text, val_fraction), ("test", test_text, test_fraction)):
        if fraction == 0:
            splits[name] = None
        elif len(piece) < 2:
            raise UserError(f"the {name} split of {source} has {len(piece)} characters "
                            f"(dataset.{name}_fraction={fraction}); it needs at least 2: "
                            f"use a longer text, a larger fraction, or 0 to leave it out")
        else:
            splits[name] = eval_streams(vocab.encode(piece), eval_batch_size or batch_size, seq_len)
    return DataBundle(
        family="charlm",
        train=train_streams(train_ids, batch_size, seq_len),
        val=splits["val"],
        test=splits["test"],
        prebatched=True,
        info={
            "vocab": vocab.itos,
            "vocab_size": len(vocab),
            "unigram_entropy_bits": unigram_entropy_bits(train_ids, len(vocab)),
            "characters": {"train": len(train_text), "val": len(val_text), "test": len(test_text)},
            "seq_len": seq_len,
        },
    )
