"""The block-table kernel (kv_transfer/block_copy.py) on CPU tensors through Triton's interpreter.
Not collected directly: test_block_kernel.py runs this file with TRITON_INTERPRET=1, which must be
set before triton is first imported."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (tests/kv_transfer/test_block_kernel.py does)")

from kv_transfer import block_copy  # noqa: E402
from kv_transfer.block_copy import SegmentSet, SegmentViews, copy_runs  # noqa: E402
from kv_transfer.cuda_ipc import CudaIpcReader  # noqa: E402
from kv_transfer.descriptors import plan_runs  # noqa: E402
from kv_transfer.layout import KVLayout  # noqa: E402
from workers.engine.kv_cache import KVCache  # noqa: E402
from tests.kv_transfer.test_cuda_ipc import peer  # noqa: E402

LAYOUT = dict(model_id="m", num_layers=3, num_kv_heads=2, head_dim=4, block_size=2, dtype="float32")


def random_cache(lay: KVLayout, num_segments: int, seed: int) -> KVCache:
    cache = KVCache(lay, num_segments)
    gen = torch.Generator().manual_seed(seed)
    for seg in cache.segments.values():
        seg.copy_(torch.randn(seg.shape, generator=gen).to(seg.dtype))
    return cache


def views(cache: KVCache) -> SegmentSet:
    return SegmentSet({i: SegmentViews.of(t, cache.layout) for i, t in cache.segments.items()})


@pytest.fixture
def launches(monkeypatch):
    """Counts the kernel's launches."""
    count = []
    kernel = block_copy._copy_blocks_kernel

    class Counting:
        def __getitem__(self, grid):
            count.append(grid)
            return kernel[grid]

    monkeypatch.setattr(block_copy, "_copy_blocks_kernel", Counting())
    return count


def check(src: KVCache, dst: KVCache, remote: list[int], local: list[int]) -> None:
    assert dst.read_blocks(local).equal(src.read_blocks(remote))
    others = [b for b in range(dst.num_blocks) if b not in set(local)]
    assert not dst.read_blocks(others).any()


@pytest.mark.parametrize("dtype, head_dim, block_size, heads", [("float32", 4, 2, 2), ("bfloat16", 64, 16, 1),
                                                                ("bfloat16", 3, 1, 1)],
                         ids=["int64-words", "bf16-2048-byte-blocks", "byte-words-6-byte-blocks"])
def test_scattered_ids_over_many_segments_in_one_launch(dtype, head_dim, block_size, heads, launches):
    """Scattered ids over every segment of both sides (different blocks per segment): one launch,
    byte-exact, no other block written; block bytes that are not whole 8-byte words too."""
    base = dict(LAYOUT, dtype=dtype, head_dim=head_dim, block_size=block_size, num_kv_heads=heads)
    src_lay, dst_lay = KVLayout(**base, blocks_per_segment=8), KVLayout(**base, blocks_per_segment=7)
    src, dst = random_cache(src_lay, 5, 1), KVCache(dst_lay, 5)
    remote, local = random.Random(2).sample(range(40), 25), random.Random(3).sample(range(35), 25)
    runs = plan_runs(remote, local, 8, 7)
    assert copy_runs(views(src), views(dst), src_lay, dst_lay, runs) == 2 * src_lay.num_layers * len(runs)
    check(src, dst, remote, local)
    assert launches == [(25, 2 * src_lay.num_layers)]


def test_contiguous_ids_over_segment_boundaries_in_one_launch(launches):
    """Contiguous ids cut into runs at both sides' segment boundaries (more runs than strided
    copies are worth): one launch."""
    src_lay, dst_lay = KVLayout(**LAYOUT, blocks_per_segment=4), KVLayout(**LAYOUT, blocks_per_segment=6)
    src, dst = random_cache(src_lay, 6, 4), KVCache(dst_lay, 4)
    remote, local = list(range(2, 20)), list(range(3, 21))
    runs = plan_runs(remote, local, 4, 6)
    assert len(runs) > block_copy.MAX_STRIDED_RUNS_KERNEL
    copy_runs(views(src), views(dst), src_lay, dst_lay, runs)
    check(src, dst, remote, local)
    assert len(launches) == 1
    few = plan_runs([0, 1, 2, 3], [0, 1, 2, 3], 4, 6)  # one run: a strided copy, no kernel
    copy_runs(views(src), views(dst), src_lay, dst_lay, few)
    assert len(launches) == 1


def test_the_reader_takes_the_kernel_and_waits_for_it(launches):
    """CudaIpcReader.read / issue on CPU tensors under the interpreter: the kernel's path, as on
    a GPU; a READ of one run still one strided copy."""
    lay = KVLayout(**LAYOUT, blocks_per_segment=8)
    src, dst = random_cache(lay, 3, 5), KVCache(lay, 3)
    info = dataclasses.replace(peer(), layout=lay, compat_hash=lay.compat_hash())
    reader = CudaIpcReader(torch.device("cpu"))
    reader.adopt(info, src.segments)
    for i, t in dst.segments.items():
        reader.add_local(i, t, lay)
    remote, local = [17, 3, 9, 22, 0], [4, 20, 11, 2, 15]
    reader.read(info, plan_runs(remote, local, 8, 8), lay)
    reader.issue(info, plan_runs([5, 6, 7], [8, 9, 10], 8, 8), lay)
    reader.synchronize(info)
    check(src, dst, remote + [5, 6, 7], local + [8, 9, 10])
    assert len(launches) == 1


def test_warm_up_launches_nothing_that_copies(launches):
    """warm_up compiles the kernel with a launch of zero blocks: no block changes."""
    lay = KVLayout(**LAYOUT, blocks_per_segment=8)
    cache = random_cache(lay, 2, 6)
    before = {i: t.clone() for i, t in cache.segments.items()}
    block_copy.warm_up(views(cache))
    assert launches == [(0, 2 * lay.num_layers)]
    assert all(torch.equal(before[i], t) for i, t in cache.segments.items())
