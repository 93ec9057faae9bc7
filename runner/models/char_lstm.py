"""Character-level LSTM language model: embedding, LSTM, linear head (char-rnn's 2 x 128 default).

``forward(x, state)`` returns ``(logits, new_state)`` in one call, so the family can carry the
(detached) state across the chunks of truncated BPTT and the engine can wrap the model (DDP,
torch.compile). ``impl`` picks the recurrence: ``torch`` (``nn.LSTM``) or ``manual``
(``runner.models.lstm_manual``, backward pass written out); both share parameter names,
layout and initialisation, so their state_dicts are interchangeable.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from runner.errors import UserError
from runner.models.lstm_manual import ManualLSTM

State = tuple[Tensor, Tensor]


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int, impl: str = "torch", embedding_dim: int = 64, hidden_size: int = 128,
                 num_layers: int = 2, dropout: float = 0.0, sample_temperature: float = 0.8,
                 sample_length: int = 500) -> None:
        """``vocab_size`` comes from the data. char-rnn feeds one-hot vectors; a learned embedding
        is the usual equivalent with fewer input weights. ``sample_*`` are the defaults of
        ``sample`` (text written after each evaluation)."""
        super().__init__()
        if impl not in ("torch", "manual"):
            raise UserError(f"model.impl={impl!r} is not an option: use 'torch' (nn.LSTM) or 'manual'")
        if not 0 <= dropout < 1:
            raise UserError(f"model.dropout={dropout} must be in [0, 1)")
        if sample_temperature <= 0:
            raise UserError(f"model.sample_temperature={sample_temperature} must be positive")
        if min(embedding_dim, hidden_size, num_layers) < 1 or sample_length < 0:
            raise UserError("model.embedding_dim, model.hidden_size and model.num_layers must be positive "
                            "and model.sample_length not negative")
        self.impl, self.sample_temperature, self.sample_length = impl, sample_temperature, sample_length
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        if impl == "torch":
            self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True, dropout=dropout)
        else:
            self.lstm = ManualLSTM(embedding_dim, hidden_size, num_layers, dropout=dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x [B, L] ids, state (h, c) each [layers, B, H] or None (zeros) -> logits [B, L, V], state."""
        emb = self.embedding(x)
        if self.impl == "manual":
            # The hand-written backward has no autocast rules: run the recurrence in float32.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out, state = self.lstm(emb.float(), None if state is None else tuple(s.float() for s in state))
        else:
            out, state = self.lstm(emb, state)
        return self.head(out), state

    @torch.no_grad()
    def sample(self, prime: Tensor, length: int | None = None, temperature: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``length`` ids drawn one at a time after the 1-D ``prime`` ids, from softmax(logits / T).
        Id 0 (<unk>) is never drawn. ``generator`` (a CPU generator) makes it reproducible."""
        length = self.sample_length if length is None else length
        temperature = self.sample_temperature if temperature is None else temperature
        was_training = self.training
        self.eval()
        logits, state = self(prime.view(1, -1), None)
        drawn = []
        for _ in range(length):
            step = logits[0, -1].float().cpu() / temperature
            step[0] = float("-inf")
            next_id = torch.multinomial(torch.softmax(step, dim=0), 1, generator=generator)
            drawn.append(int(next_id))
            logits, state = self(next_id.view(1, 1).to(prime.device), state)
        self.train(was_training)
        return torch.tensor(drawn, dtype=torch.long)
