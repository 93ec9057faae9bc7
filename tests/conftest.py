"""Shared test fixtures: where the real data copies live, and small CPU settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (see each PROVENANCE.md); tests needing it skip where absent.
SHARED_DATA = Path(os.environ.get("RUNNER_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


def require(path: Path) -> Path:
    """Skip the calling test, with the reason, when a data file is absent."""
    if not path.exists():
        pytest.skip(f"data not available: {path} is absent")
    return path
