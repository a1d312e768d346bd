"""transfer.nixl_progress_delay_us: unset = by the KV cache's device (2 ms on a GPU, where the
progress thread's CUDA polling slowed the engine's steps; 100 us on the CPU); a set value wins."""

import pytest
from pydantic import ValidationError

from kv_transfer.config import TransferConfig


def test_auto_delay_follows_the_kv_device():
    auto = TransferConfig()
    assert auto.nixl_progress_delay_us is None
    assert auto.progress_delay_us("cuda") == 2000
    assert auto.progress_delay_us("cpu") == 100


def test_explicit_delay_wins_and_is_bounded():
    assert TransferConfig(nixl_progress_delay_us=0).progress_delay_us("cuda") == 0
    assert TransferConfig(nixl_progress_delay_us=500).progress_delay_us("cpu") == 500
    with pytest.raises(ValidationError):
        TransferConfig(nixl_progress_delay_us=-1)
