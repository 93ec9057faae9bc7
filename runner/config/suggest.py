""""did you mean": the nearest allowed name to a misspelt key or option, within two edits."""
from __future__ import annotations

from typing import Iterable

MAX_EDITS = 2  # batch_sz -> batch_size, focall -> focal; further than that is another word


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` within MAX_EDITS (ties: the first in sorted order), or None.
    Case is ignored: ``Batch_Size`` is ``batch_size``."""
    scored = sorted((edit_distance(word.lower(), c.lower()), c) for c in set(candidates) if c != word)
    return scored[0][1] if scored and scored[0][0] <= MAX_EDITS else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the message about ``word``, or an empty string."""
    match = nearest(word, candidates)
    return f" (did you mean '{match}'?)" if match else ""
