"""Descriptor lists: run pairing and byte addresses, checked against the real segment tensors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transfer.descriptors import (MissingSegmentError, Run, check_num_tokens, descriptor_array, pair_runs,
                                     split_rows)
from kv_transfer.layout import KVLayout
from workers.engine.kv_cache import KVCache


def layout(bps: int, dtype: str = "float32") -> KVLayout:
    return KVLayout("m", num_layers=3, num_kv_heads=2, head_dim=4, block_size=2, dtype=dtype, blocks_per_segment=bps)


def test_runs_break_at_gaps_and_at_either_sides_segment_boundary():
    assert pair_runs([0, 1, 2, 3], [10, 11, 12, 13], 4, 4) == [Run(0, 10, 2), Run(2, 12, 2)]  # dst: 12 starts a segment
    assert pair_runs([3, 4], [0, 1], 4, 8) == [Run(3, 0, 1), Run(4, 1, 1)]  # src: 4 starts a segment
    assert pair_runs([5, 6, 9], [1, 2, 3], 16, 16) == [Run(5, 1, 2), Run(9, 3, 1)]
    assert pair_runs([2, 1], [0, 1], 16, 16) == [Run(2, 0, 1), Run(1, 1, 1)]  # descending: no run
    with pytest.raises(ValueError, match="3 source blocks but 2"):
        pair_runs([1, 2, 3], [1, 2], 4, 4)
    with pytest.raises(ValueError, match="negative"):
        pair_runs([-1], [0], 4, 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 23), st.integers(0, 23)), min_size=1, max_size=12, unique_by=(lambda t: t[0], lambda t: t[1])),
       st.sampled_from([2, 3, 4, 8]), st.sampled_from([2, 4, 6]))
def test_runs_cover_every_pair_in_order(pairs, src_bps, dst_bps):
    src, dst = [p[0] for p in pairs], [p[1] for p in pairs]
    runs = pair_runs(src, dst, src_bps, dst_bps)
    flat = [(r.src_first + i, r.dst_first + i) for r in runs for i in range(r.count)]
    assert flat == list(zip(src, dst))
    for r in runs:  # no run crosses a segment on either side
        assert r.src_first // src_bps == (r.src_first + r.count - 1) // src_bps
        assert r.dst_first // dst_bps == (r.dst_first + r.count - 1) // dst_bps


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_addresses_point_at_the_blocks_bytes(dtype):
    """Row (layer, kv, run) addresses exactly the bytes of segment[layer, kv, local_block:+count]."""
    lay = layout(4, dtype)
    cache = KVCache(lay, 3)
    bases = {i: t.data_ptr() for i, t in cache.segments.items()}
    devs = {i: 0 for i in cache.segments}
    firsts, counts = [1, 8, 5], [3, 2, 1]
    rows = descriptor_array(lay, bases, devs, firsts, counts)
    assert rows.shape == (3 * 2 * 3, 3)
    i = 0
    for layer in range(3):
        for kv in range(2):
            for first, count in zip(firsts, counts):
                seg, local = lay.locate(first)
                view = cache.segments[seg][layer, kv, local:local + count]
                assert int(rows[i, 0]) == view.data_ptr()
                assert int(rows[i, 1]) == view.numel() * view.element_size() == count * lay.block_bytes
                i += 1
    only_layer_1 = descriptor_array(lay, bases, devs, firsts, counts, layers=[1])
    assert (only_layer_1 == rows[6:12]).all()


def test_missing_segment_is_named():
    lay = layout(4)
    with pytest.raises(MissingSegmentError) as err:
        descriptor_array(lay, {0: 4096}, {0: 0}, [1, 9], [1, 1])
    assert err.value.segment == 2


def test_partial_last_block_counts():
    lay = layout(4)  # block_size 2
    check_num_tokens(lay, 3, 5)  # 2 + 2 + 1 (partial)
    check_num_tokens(lay, 3, 6)
    check_num_tokens(lay, 3, None)
    for bad in (4, 7, 0):
        with pytest.raises(ValueError, match="blocks of 2"):
            check_num_tokens(lay, 3, bad)


def test_split_rows_cuts_both_sides_alike():
    local = np.array([[1000, 10, 0], [5000, 3, 0]], dtype=np.uint64)
    remote = np.array([[8000, 10, 1], [9000, 3, 1]], dtype=np.uint64)
    lo, re = split_rows(local, remote, 4)
    assert lo.tolist() == [[1000, 4, 0], [1004, 4, 0], [1008, 2, 0], [5000, 3, 0]]
    assert re.tolist() == [[8000, 4, 1], [8004, 4, 1], [8008, 2, 1], [9000, 3, 1]]
    same = split_rows(local, remote, 16)
    assert same[0] is local and same[1] is remote
