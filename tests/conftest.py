"""Suite-wide fixtures: tiny random-weight checkpoints (built once, cached on disk) and the
environment every test runs in (UCX on loopback, quiet tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PDSERVE_TEST_CACHE", REPO / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """tiny_checkpoint(family) -> directory of a seeded random model + tokenizer."""
    from tests.tiny_models import build_tiny_checkpoint

    def build(family: str = "llama") -> str:
        return str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))

    return build
