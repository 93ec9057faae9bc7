"""Character language model family: truncated BPTT with carried state, bits per character, samples.

The data arrive prebatched (runner.data.text): item t of a split is chunk t of B parallel
streams, so the hidden state left by chunk t is the right initial state for chunk t+1. The
family keeps that state, detached (gradients stop at the chunk boundary: truncated BPTT), and
resets it at the start of each epoch. Evaluators carry their own state through a split.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from typing import Any

from torch import Tensor, nn

from runner.config.build import build as build_node, plain
from runner.data.text import IGNORE_INDEX
from runner.engine.family import DataBundle, Evaluator, StepInParts
from runner.errors import UserError
from runner.config.compat import Accepts
from runner.families.first_batch import check_first_batch, check_fits
from runner.losses.charlm import TokenCrossEntropy

ACCEPTS = Accepts(datasets=("runner.data.text.",), models=("runner.models.char_lstm.",), losses=("runner.losses.charlm.",))

State = tuple[Tensor, Tensor]


def _carry(state: State | None, batch_size: int) -> State | None:
    """The carried state if it belongs to streams of this batch size, else None (zeros)."""
    return state if state is not None and state[0].shape[1] == batch_size else None


class CharLMEvaluator(Evaluator):
    """Sums nll (nats) and the number of counted tokens; both additive, so exact across processes."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model, self.loss, self.state = model, loss, None

    # Tokens are counted on the device and read once, when the engine asks, not at every batch.
    @property
    def count(self) -> int:
        return int(self.sums["tokens"]) if "tokens" in self.sums else 0

    @count.setter
    def count(self, value: int) -> None:
        pass

    def update(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        logits, state = self.model(x, _carry(self.state, x.shape[0]))
        self.state = tuple(s.detach() for s in state)
        # Summed in float64: a split has up to millions of tokens.
        self.add_sum("nll", self.loss.per_token(logits, y).double().sum())
        self.add_sum("tokens", (y != IGNORE_INDEX).sum())

    def compute(self, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        nats = float(sums["nll"] / sums["tokens"])
        return {"loss": nats, "bpc": nats / math.log(2)}


class CharLMFamily(StepInParts):
    unit = "tokens"

    def __init__(self, model: nn.Module, loss: nn.Module, vocab: list[str], seed: int = 0) -> None:
        self.model, self.loss, self.vocab, self.seed = model, loss, vocab, seed
        self.state: State | None = None
        self.epoch: int | None = None
        self._resumed: tuple[int, State] | None = None  # (epoch, state) from a checkpoint

    def on_train_epoch_start(self, epoch: int) -> None:
        # A state restored from a checkpoint taken inside this epoch continues; otherwise zeros.
        # In place: under trainer.cuda_graph the captured step reads and writes these tensors.
        resumed, self._resumed = self._resumed, None
        if self.state is not None:
            for buffer, value in zip(self.state, resumed[1] if resumed and resumed[0] == epoch else (0.0, 0.0)):
                buffer.copy_(value) if isinstance(value, Tensor) else buffer.zero_()
        elif resumed is not None and resumed[0] == epoch:
            self.state = tuple(s.clone() for s in resumed[1])
        self.epoch = epoch

    def state_dict(self) -> dict:
        """The carried state, so that a run resumed mid-epoch continues its streams exactly.
        Under several processes each holds other streams and only rank 0 saves: nothing is
        kept then, and a resumed epoch restarts its streams from zeros."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if self.state is None or self.epoch is None or distributed:
            return {}
        return {"epoch": self.epoch, "h": self.state[0].detach().cpu(), "c": self.state[1].detach().cpu()}

    def load_state_dict(self, payload: dict) -> None:
        device = getattr(self, "device", None) or payload["h"].device
        self._resumed = (payload["epoch"], (payload["h"].to(device), payload["c"].to(device)))

    # A training step in parts (Family.train_loss; fused jobs, runner/engine/fused.py): the state
    # carried from the previous chunk in, the new state kept for the next.
    def train_inputs(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x, y, h, c): the chunk and the carried state (zeros at an epoch's start; None for a
        model without an ``lstm`` of runner's shape: it starts from its own zeros). The model
        reads a copy: backward needs the initial state unchanged after ``keep`` updates it."""
        x, y = batch
        carried = _carry(self.state, x.shape[0])
        if carried is None:
            lstm = getattr(self.raw_model, "lstm", None)
            if not hasattr(lstm, "num_layers"):
                return x, y, None, None
            zeros = x.new_zeros((lstm.num_layers, x.shape[0], lstm.hidden_size), dtype=torch.float32)
            return x, y, zeros, zeros.clone()
        return x, y, carried[0].clone(), carried[1].clone()

    def forward(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        x, _, h, c = inputs
        return model(x, None if h is None else (h, c))

    def loss_sum(self, outputs: tuple[Tensor, State], inputs: tuple[Tensor, ...]) -> Tensor:
        """The sum of token cross-entropies in nats. Training chunks hold no padding."""
        return self.loss(outputs[0], inputs[1])

    def units(self, inputs: tuple[Tensor, ...]) -> int:
        return inputs[1].numel()

    def carried(self, outputs: tuple[Tensor, State]) -> State:
        return outputs[1]

    def check_output(self, batch: tuple[Tensor, Tensor]) -> None:
        outputs = self.forward(self.raw_model, self.train_inputs(batch))
        if not (isinstance(outputs, tuple) and len(outputs) == 2):
            raise UserError(f"the model returned {type(outputs).__name__}; a char-LM returns (logits, state), as "
                            "runner.models.char_lstm.CharLSTM does")
        check_fits(outputs[0], (*batch[1].shape, len(self.vocab)), f"the {len(self.vocab)} characters of the "
                   "vocabulary for each target", "the model needs logits [batch, time, vocabulary]")

    def keep(self, carried: State) -> None:
        if self.state is None or self.state[0].shape != carried[0].shape:
            self.state = tuple(s.detach().clone() for s in carried)
        else:  # copied into the same tensors, so that a captured step carries the state too
            for buffer, new in zip(self.state, carried):
                buffer.copy_(new.detach())

    def evaluator(self, split: str) -> CharLMEvaluator:
        return CharLMEvaluator(self.raw_model, self.loss)

    def sample_text(self, length: int | None = None, temperature: float | None = None) -> str:
        """Text drawn from the model after a newline prime, with a generator seeded by trainer.seed
        (the same draws at every evaluation, so samples of successive epochs compare)."""
        model = self.raw_model
        prime = self.vocab.index("\n") if "\n" in self.vocab else 1
        device = next(model.parameters()).device
        ids = model.sample(torch.tensor([prime], device=device), length, temperature,
                           generator=torch.Generator().manual_seed(self.seed))
        return "".join("\ufffd" if i == 0 else self.vocab[i] for i in ids.tolist())

    def after_evaluation(self, split: str, metrics: dict[str, float], run_dir: Path | None) -> None:
        """Append a sample to run_dir/samples.txt under a header naming split, epoch and bpc."""
        if run_dir is None:
            return
        model = self.raw_model
        bpc = metrics.get("bpc", metrics.get(f"{split}/bpc"))
        when = "evaluation only" if self.epoch is None else f"epoch {self.epoch}"
        header = (f"=== {split} | {when} | bpc {bpc:.4f} | temperature {model.sample_temperature} ===\n"
                  if bpc is not None else f"=== {split} | {when} | temperature {model.sample_temperature} ===\n")
        with open(Path(run_dir) / "samples.txt", "a", encoding="utf-8") as f:
            f.write(header + self.sample_text() + "\n\n")


def fusion_blocker(model: Any, loss: Any) -> str | None:
    """Char-LSTM jobs fuse (runner/engine/fused.py) with the hand-written recurrence, which
    ``torch.func.vmap`` batches over jobs (nn.LSTM has no batching rule), and no dropout (its
    draws would happen inside the batched model call)."""
    node = plain(model)
    if node.get("impl", "torch") != "manual":
        return "the char-LSTM fuses with model.impl=manual (nn.LSTM cannot be batched over jobs)"
    if float(node.get("dropout", 0.0)) > 0:
        return "model.dropout > 0 does not fuse (its draws would be inside the batched model call)"
    return None


def build(bundle: DataBundle, model: Any, loss: Any, seed: int = 0) -> CharLMFamily:
    vocab: list[str] = list(bundle.info["vocab"])
    model = build_node(model, "model", vocab_size=len(vocab))
    if not hasattr(model, "sample"):
        raise UserError(f"model {type(model).__name__} is not a char-LM (it has no sample()): use model=char_lstm")
    loss = build_node(loss, "loss")
    if not isinstance(loss, TokenCrossEntropy):
        raise UserError(f"loss {type(loss).__name__} does not apply to the char-LM: use loss=cross_entropy")
    return check_first_batch(CharLMFamily(model, loss, vocab, seed=seed), bundle)
