"""The vectorised run builder (descriptors.plan_runs) against a plain reference loop, the id
conversion it starts from, and the segment checks a READ makes with it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transfer.descriptors import (Run, RunTable, block_id_array, missing_segments, pair_runs, plan_runs,
                                     segment_mask)


def reference_runs(src: list[int], dst: list[int], src_bps: int, dst_bps: int) -> list[Run]:
    """One pair at a time: extend the last run when both sides go on by one and neither starts a
    segment; otherwise start a run."""
    runs: list[Run] = []
    for s, d in zip(src, dst):
        if runs:
            last = runs[-1]
            if s == last.src_first + last.count and d == last.dst_first + last.count and s % src_bps and d % dst_bps:
                runs[-1] = Run(last.src_first, last.dst_first, last.count + 1)
                continue
        runs.append(Run(s, d, 1))
    return runs


def check(src: list[int], dst: list[int], src_bps: int, dst_bps: int) -> RunTable:
    table = plan_runs(src, dst, src_bps, dst_bps)
    want = reference_runs(src, dst, src_bps, dst_bps)
    assert table.runs() == want
    assert (table.src_first.tolist(), table.dst_first.tolist(), table.count.tolist()) == \
        ([r.src_first for r in want], [r.dst_first for r in want], [r.count for r in want])
    assert table.src_ids.tolist() == src and table.dst_ids.tolist() == dst
    rebuilt = RunTable.of(want)  # a list of Run back to arrays: the same table
    assert rebuilt.src_ids.tolist() == src and rebuilt.dst_ids.tolist() == dst
    return table


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=80,
                unique_by=(lambda t: t[0], lambda t: t[1])),
       st.sampled_from([1, 2, 3, 8, 64]), st.sampled_from([1, 4, 5, 16, 64]))
def test_scattered_ids_without_duplicates_match_the_loop(pairs, src_bps, dst_bps):
    check([p[0] for p in pairs], [p[1] for p in pairs], src_bps, dst_bps)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200), st.integers(1, 300), st.sampled_from([3, 16, 64]),
       st.sampled_from([5, 16, 64]), st.integers(0, 3))
def test_contiguous_and_partly_contiguous_ids_match_the_loop(src_start, dst_start, n, src_bps, dst_bps, num_gaps):
    src, dst = list(range(src_start, src_start + n)), list(range(dst_start, dst_start + n))
    for g in range(num_gaps):  # shift a tail of one side: a gap on that side only
        cut = (g + 1) * n // (num_gaps + 1)
        src[cut:] = [b + 7 for b in src[cut:]]
    table = check(src, dst, src_bps, dst_bps)
    if num_gaps == 0:  # runs break only where either side starts a segment
        cuts = {b for b in src[1:] if b % src_bps == 0} | {src[dst.index(b)] for b in dst[1:] if b % dst_bps == 0}
        assert len(table) == 1 + len(cuts)


def test_reversed_single_and_empty():
    assert check(list(range(20, 0, -1)), list(range(40, 60)), 64, 64).count.tolist() == [1] * 20  # descending: no run
    assert check([9], [3], 4, 4).runs() == [Run(9, 3, 1)]
    assert check([3, 4], [0, 1], 4, 8).runs() == [Run(3, 0, 1), Run(4, 1, 1)]  # 4 starts a source segment
    empty = plan_runs([], [], 4, 4)
    assert len(empty) == 0 and empty.runs() == [] and empty.num_blocks == 0


def test_every_id_container_gives_the_same_table():
    src, dst = [7, 8, 9, 2, 30], [0, 1, 2, 3, 4]
    want = reference_runs(src, dst, 16, 16)
    for convert in (list, tuple, np.array, lambda x: np.array(x, dtype=np.int32),
                    lambda x: np.array(x, dtype=np.uint16)):
        assert plan_runs(convert(src), convert(dst), 16, 16).runs() == want
    assert plan_runs(range(3, 40), range(100, 137), 16, 16).runs() == reference_runs(list(range(3, 40)),
                                                                                      list(range(100, 137)), 16, 16)
    assert plan_runs(iter(src), (b for b in dst), 16, 16).runs() == want  # iterables without a length
    ids = np.arange(5, dtype=np.int64)
    assert block_id_array(ids) is ids  # an int64 array is used as is
    assert pair_runs(src, dst, 16, 16) == want == plan_runs(src, dst, 16, 16)


def test_bad_ids_raise_typed_errors():
    with pytest.raises(ValueError, match="3 source blocks but 2"):
        plan_runs([1, 2, 3], [1, 2], 4, 4)
    with pytest.raises(ValueError, match=r"negative block id in transfer \(5 -> -1\)"):
        plan_runs([4, 5], [0, -1], 4, 4)
    with pytest.raises(TypeError, match="must be integers"):
        plan_runs(np.array([1.0, 2.0]), [0, 1], 4, 4)
    with pytest.raises(ValueError, match="flat sequence"):
        plan_runs(np.zeros((2, 2), dtype=np.int64), [0, 1], 4, 4)
    with pytest.raises(TypeError):
        plan_runs([1, None], [0, 1], 4, 4)


def test_missing_segments_names_each_missing_one_once():
    mask = segment_mask([0, 2, 3])
    assert mask.tolist() == [True, False, True, True]
    assert missing_segments(np.array([0, 3, 2, 0]), mask) == []
    assert missing_segments(np.array([1, 9, 0, 1, 9]), mask) == [1, 9]
    assert missing_segments(np.array([], dtype=np.int64), segment_mask([])) == []
    assert missing_segments(np.array([0]), segment_mask([])) == [0]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 100), st.integers(0, 100), st.integers(2, 40), st.sampled_from([16, 64, 256]),
       st.sampled_from(["swap", "duplicate", "shift_dst", "none"]), st.data())
def test_near_contiguous_ids_match_the_loop(src_start, dst_start, n, bps, mutation, data):
    """Ids whose ends look like one run (the one-run shortcut's precondition) but whose inside is
    not: two ids swapped, one repeated, one destination id moved; the shortcut must not take them."""
    src, dst = list(range(src_start, src_start + n)), list(range(dst_start, dst_start + n))
    i = data.draw(st.integers(1, n - 2)) if n > 2 else 0
    if mutation == "swap" and n > 2:
        src[i], src[i + 1] = src[i + 1], src[i]
    elif mutation == "duplicate" and n > 2:
        src[i] = src[i + 1]
        dst[i] = dst[i + 1]
    elif mutation == "shift_dst" and n > 2:
        dst[i] += 1000
    check(src, dst, bps, bps)


def test_one_run_shortcut_keeps_segment_boundaries_and_sign_checks():
    assert plan_runs(list(range(60, 70)), list(range(0, 10)), 64, 64).count.tolist() == [4, 6]  # 64 starts a segment
    assert plan_runs(list(range(0, 10)), list(range(60, 70)), 64, 64).count.tolist() == [4, 6]
    table = plan_runs(np.arange(5, 37), np.arange(100, 132), 64, 256)
    assert table.runs() == [Run(5, 100, 32)] and table.src_ids.tolist() == list(range(5, 37))
    with pytest.raises(ValueError, match="negative block id"):
        plan_runs([-2, -1, 0], [0, 1, 2], 4, 4)
