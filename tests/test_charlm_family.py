"""Char-LM family: carried state (truncated BPTT), exact bits per char, samples, learning."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from runner.data.text import IGNORE_INDEX, build_text, embedded_corpus, eval_streams
from runner.families.charlm import CharLMFamily
from runner.losses.charlm import TokenCrossEntropy
from runner.models.char_lstm import CharLSTM

VOCAB = ["<unk>", *"abcdefghij"]


def _family(impl: str = "torch", seed: int = 0) -> CharLMFamily:
    torch.manual_seed(seed)
    model = CharLSTM(vocab_size=len(VOCAB), impl=impl, embedding_dim=6, hidden_size=12, num_layers=2,
                     sample_length=40)
    return CharLMFamily(model, TokenCrossEntropy(), VOCAB, seed=seed)


@pytest.mark.parametrize("impl", ["torch", "manual"])
def test_carried_state_equals_one_pass_over_the_concatenation(impl):
    family = _family(impl)
    data = torch.randint(1, len(VOCAB), (3, 21), generator=torch.Generator().manual_seed(1))
    x, y, length = data[:, :-1], data[:, 1:], 10
    family.on_train_epoch_start(0)
    first, n1 = family.train_loss((x[:, :length], y[:, :length]))
    second, n2 = family.train_loss((x[:, length:], y[:, length:]))
    assert n1 == n2 == 3 * length and isinstance(n1, int)
    assert not any(s.requires_grad for s in family.state)  # detached: gradients stop at the chunk edge
    logits, _ = family.model(x, None)
    whole = TokenCrossEntropy()(logits, y)
    torch.testing.assert_close(first + second, whole, rtol=1e-6, atol=1e-5)
    # The second chunk alone from a zero state is different, so the carry is what matched.
    family.on_train_epoch_start(1)
    assert all(not s.any() for s in family.state)  # reset to zeros, in place
    fresh, _ = family.train_loss((x[:, length:], y[:, length:]))
    assert not torch.allclose(fresh, second)


def test_carried_state_survives_a_checkpoint_inside_the_epoch(tmp_path):
    data = torch.randint(1, len(VOCAB), (3, 31), generator=torch.Generator().manual_seed(4))
    chunks = [(data[:, t:t + 10], data[:, t + 1:t + 11]) for t in (0, 10, 20)]
    family = _family()
    family.on_train_epoch_start(2)
    family.train_loss(chunks[0])
    family.train_loss(chunks[1])
    torch.save({"family": family.state_dict()}, tmp_path / "last.pt")
    expected, _ = family.train_loss(chunks[2])

    saved = torch.load(tmp_path / "last.pt", weights_only=True)["family"]
    resumed = _family()
    resumed.load_state_dict(saved)
    resumed.on_train_epoch_start(2)  # the engine restarts the interrupted epoch's loop
    got, _ = resumed.train_loss(chunks[2])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    next_epoch = _family()
    next_epoch.load_state_dict(saved)
    next_epoch.on_train_epoch_start(3)  # checkpoint from the end of epoch 2: epoch 3 starts at zeros
    assert next_epoch.state is None
    assert _family().state_dict() == {}  # nothing carried yet


class UniformLogits(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x, state=None):
        zeros = torch.zeros(1, x.shape[0], 1)
        return torch.zeros(*x.shape, self.vocab_size, dtype=torch.float64), (zeros, zeros)


@pytest.mark.parametrize("vocab_size", [2, 11, 65])
def test_bpc_of_uniform_logits_is_log2_vocab(vocab_size):
    family = CharLMFamily(UniformLogits(vocab_size), TokenCrossEntropy(), ["<unk>"] * vocab_size)
    ids = torch.randint(0, vocab_size, (997,), generator=torch.Generator().manual_seed(vocab_size))
    data = eval_streams(ids, 7, 50)  # padded last chunk: padding must not count
    ev = family.evaluator("val")
    for t in range(len(data)):
        ev.update(data[t])
    metrics = ev.compute(ev.sums, {})
    assert ev.count == 996
    assert metrics["bpc"] == pytest.approx(math.log2(vocab_size), rel=1e-12)
    assert metrics["loss"] == pytest.approx(math.log(vocab_size), rel=1e-12)
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-15)


def test_evaluator_carries_state_and_is_additive_over_stream_shards():
    family = _family()
    family.model.eval()
    ids = torch.randint(1, len(VOCAB), (403,), generator=torch.Generator().manual_seed(3))
    data = eval_streams(ids, 4, 10)
    ev = family.evaluator("val")
    with torch.no_grad():
        for t in range(len(data)):
            ev.update(data[t])
        # Reference: each whole stream in one pass, nats summed over its counted targets.
        logits, _ = family.model(data.x, None)
        nats = nn.functional.cross_entropy(logits.flatten(0, 1), data.y.flatten(), reduction="sum",
                                           ignore_index=IGNORE_INDEX)
        # Two processes, each with half the streams (the engine's row shards): sums add up.
        shards = [family.evaluator("val") for _ in range(2)]
        for t in range(len(data)):
            x, y = data[t]
            shards[0].update((x[:2], y[:2]))
            shards[1].update((x[2:], y[2:]))
    torch.testing.assert_close(ev.sums["nll"], nats.double(), rtol=1e-6, atol=1e-4)
    assert ev.count == 402 == shards[0].count + shards[1].count
    reduced = {k: shards[0].sums[k] + shards[1].sums[k] for k in ev.sums}
    assert ev.compute(reduced, {})["bpc"] == pytest.approx(ev.compute(ev.sums, {})["bpc"], rel=1e-6)


def test_samples_are_appended_with_a_header_and_reproducible(tmp_path):
    family = _family(seed=7)
    family.on_train_epoch_start(3)
    family.after_evaluation("val", {"bpc": 2.5, "loss": 1.7}, tmp_path)
    family.after_evaluation("test", {"bpc": 2.6, "loss": 1.8}, tmp_path)
    family.after_evaluation("val", {"bpc": 2.5}, None)  # unit tests / other ranks: nothing written
    text = (tmp_path / "samples.txt").read_text(encoding="utf-8")
    blocks = text.split("=== ")[1:]
    assert blocks[0].startswith("val | epoch 3 | bpc 2.5000 | temperature 0.8 ===\n")
    assert blocks[1].startswith("test | epoch 3 | bpc 2.6000")
    sample = blocks[0].split("===\n", 1)[1].strip("\n")
    assert len(sample) == 40 and set(sample) <= set(VOCAB[1:])  # <unk> is never drawn
    assert family.sample_text() == family.sample_text()  # seeded generator
    assert family.model.training  # sampling restored the mode


def _train_then_val_bpc(tmp_path, n_chars: int, batch_size: int, hidden_size: int, num_layers: int,
                        steps: int, lr: float) -> tuple[float, float, float]:
    """(val bpc untrained, val bpc after ``steps`` Adam steps with carried state, unigram entropy)."""
    path = tmp_path / "docs.txt"
    path.write_text(embedded_corpus()[:n_chars], encoding="utf-8")
    bundle = build_text(str(path), batch_size=batch_size, seq_len=50)
    torch.manual_seed(0)
    model = CharLSTM(bundle.info["vocab_size"], embedding_dim=16, hidden_size=hidden_size, num_layers=num_layers)
    family = CharLMFamily(model, TokenCrossEntropy(), bundle.info["vocab"])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def val_bpc() -> float:
        model.eval()
        ev = family.evaluator("val")
        with torch.no_grad():
            for t in range(len(bundle.val)):
                ev.update(bundle.val[t])
        model.train()
        return ev.compute(ev.sums, {})["bpc"]

    untrained, step, epoch = val_bpc(), 0, 0
    while step < steps:
        family.on_train_epoch_start(epoch)
        for t in range(min(len(bundle.train), steps - step)):
            loss_sum, count = family.train_loss(bundle.train[t])
            optimizer.zero_grad()
            (loss_sum / count).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            step += 1
        epoch += 1
    return untrained, val_bpc(), bundle.info["unigram_entropy_bits"]


def test_short_run_beats_the_unigram_entropy(tmp_path):
    """1 x 64 LSTM, 120 steps of 8 x 50 characters on 20k characters of the docs (~10 s)."""
    untrained, trained, entropy = _train_then_val_bpc(tmp_path, 20_000, 8, 64, 1, steps=120, lr=1e-2)
    assert untrained > entropy  # a fresh model is near log2 V
    assert trained < entropy - 0.5, (trained, entropy)


@pytest.mark.slow
def test_char_rnn_defaults_beat_the_unigram_entropy(tmp_path):
    """char-rnn's 2 x 128, batch 50, seq 50, lr 2e-3: 300 steps on 150k characters."""
    untrained, trained, entropy = _train_then_val_bpc(tmp_path, 150_000, 50, 128, 2, steps=300, lr=2e-3)
    assert untrained > entropy
    assert trained < entropy - 1.0, (trained, entropy)
