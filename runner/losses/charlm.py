"""The char-LM objective: cross-entropy of the next character, summed over the counted tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runner.data.text import IGNORE_INDEX


class TokenCrossEntropy(nn.Module):
    """Sum over tokens of -log softmax(logits)[target], in nats; IGNORE_INDEX targets (padding)
    count for nothing. No mean is taken: the engine divides by the token count of the step."""

    def per_token(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Nats of each token, flattened (0 where the target is IGNORE_INDEX); at least float32."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()  # log-softmax of bf16/fp16 logits loses bits per char
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none",
                               ignore_index=IGNORE_INDEX)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.per_token(logits, targets).sum()
