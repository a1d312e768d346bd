"""CUDA IPC path of the transceiver, the parts that run without a GPU: which path a peer gets and
why (transfer.cuda_ipc off | auto | on), the byte ranges a READ copies, and the copies themselves
on CPU tensors (the same torch ops run on the GPU). The GPU check and its benchmark are
benchmarks/transfer.py --device cuda (bench=bandwidth ipc_GBps)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from kv_transfer.config import TransferConfig
from kv_transfer.block_copy import SegmentSet, SegmentViews, copy_runs
from kv_transfer.cuda_ipc import CudaIpcReader, PathChoice, host_id, select_path
from kv_transfer.descriptors import plan_runs
from kv_transfer.errors import BackendUnavailableError
from kv_transfer.layout import KVLayout
from workers.engine.kv_cache import KVCache
from workers.protocol import CudaIpcSegment, KVSegmentInfo, PeerInfo

LAYOUT = dict(model_id="m", num_layers=3, num_kv_heads=2, head_dim=4, block_size=2, dtype="float32")
HOST = "node-a:boot-1"


def layout(bps: int) -> KVLayout:
    return KVLayout(**LAYOUT, blocks_per_segment=bps)


def ipc_segment(index: int, uuid: str = "GPU-0") -> CudaIpcSegment:
    return CudaIpcSegment(index=index, gpu_uuid=uuid, storage_handle=b"h", storage_size_bytes=1, storage_offset_bytes=0,
                          ref_counter_handle=b"r", ref_counter_offset=0, event_handle=b"e", event_sync_required=True,
                          tensor_offset=0)


def peer(memory_kind="VRAM", host=HOST, exported=(0, 1), uuid="GPU-0") -> PeerInfo:
    lay = layout(4)
    return PeerInfo(worker_id="prefill-0", backend="nixl", agent_name="prefill-0-abc", agent_metadata=b"",
                    memory_kind=memory_kind,
                    segments=tuple(KVSegmentInfo(i, 4096 * (i + 1), lay.segment_bytes, 0) for i in (0, 1)),
                    layout=lay, compat_hash=lay.compat_hash(), kv_epoch=2, host_id=host,
                    cuda_ipc=tuple(ipc_segment(i, uuid) for i in exported))


VISIBLE = {"GPU-0": 0, "GPU-1": 1}


def test_config_names_the_modes():
    assert TransferConfig().cuda_ipc == "auto"
    assert TransferConfig(cuda_ipc="on").cuda_ipc == "on"
    with pytest.raises(ValidationError, match="cuda_ipc"):
        TransferConfig(cuda_ipc="maybe")


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_same_node_vram_peer_with_a_visible_gpu_gets_cuda_ipc(mode):
    assert select_path(mode, "cuda", HOST, peer(), VISIBLE) == \
        PathChoice("cuda_ipc", "same node, VRAM on both sides, its GPU visible here")
    assert select_path(mode, "cuda", HOST, peer(uuid="GPU-1"), VISIBLE).path == "cuda_ipc"  # GPU0 -> GPU1


@pytest.mark.parametrize("mode", ["off", "auto", "on"])
def test_nixl_where_cuda_ipc_does_not_apply(mode):
    """Another node, or host memory on either side: NIXL in every mode (not a fallback: IPC is
    for same-node VRAM only); off: NIXL even where IPC would apply."""
    assert "another node" in select_path(mode, "cuda", HOST, peer(host="node-b:boot-9"), VISIBLE).reason \
        or mode == "off"
    assert select_path(mode, "cuda", HOST, peer(host="node-b:boot-9"), VISIBLE).path == "nixl"
    assert select_path(mode, "cuda", HOST, peer(memory_kind="DRAM"), VISIBLE).path == "nixl"
    assert select_path(mode, "cpu", HOST, peer(), VISIBLE).path == "nixl"
    assert select_path(mode, "cuda", HOST, peer(host=""), VISIBLE).path == "nixl"
    if mode == "off":
        assert select_path(mode, "cuda", HOST, peer(), VISIBLE) == PathChoice("nixl", "transfer.cuda_ipc is off")


@pytest.mark.parametrize("broken, words", [
    (dict(exported=(0,)), "exported no CUDA IPC handle for segments [1]"),
    (dict(uuid="GPU-7"), "GPU(s) ['GPU-7'] of prefill-0 are not visible in this process"),
])
def test_a_same_node_peer_ipc_cannot_reach_is_nixl_only_under_auto(broken, words):
    choice = select_path("auto", "cuda", HOST, peer(**broken), VISIBLE)
    assert choice.path == "nixl" and words in choice.reason and "auto: NIXL" in choice.reason
    with pytest.raises(BackendUnavailableError, match=r"cuda_ipc is 'on'") as err:
        select_path("on", "cuda", HOST, peer(**broken), VISIBLE)
    assert words in str(err.value) and err.value.peer == "prefill-0"
    with pytest.raises(ValueError, match="off | auto | on"):
        select_path("yes", "cuda", HOST, peer(), VISIBLE)


def test_host_id_is_stable_and_names_this_host():
    import socket

    assert host_id() == host_id() and host_id().startswith(socket.gethostname() + ":")


def views(cache: KVCache) -> dict[int, SegmentViews]:
    return {i: SegmentViews.of(t, cache.layout) for i, t in cache.segments.items()}


def random_cache(lay: KVLayout, num_segments: int, seed: int) -> KVCache:
    cache = KVCache(lay, num_segments)
    gen = torch.Generator().manual_seed(seed)
    for seg in cache.segments.values():
        seg.copy_(torch.randn(seg.shape, generator=gen))
    return cache


@pytest.mark.parametrize("max_slice_copies,max_strided_runs", [(10_000, 0), (0, 10_000), (0, 0)],
                         ids=["one-copy-per-slice", "strided-per-run", "gather-scatter"])
def test_copy_runs_moves_exactly_the_blocks(max_slice_copies, max_strided_runs):
    """Scattered ids, runs cut at both sides' (different) segment boundaries: destination block i
    holds source block i's bytes (all layers, K and V) and no other block is written."""
    src_lay, dst_lay = layout(4), layout(3)
    src, dst = random_cache(src_lay, 3, 1), KVCache(dst_lay, 4)
    remote = [1, 2, 3, 4, 9, 10, 0, 7]
    local = [0, 1, 2, 3, 8, 11, 5, 6]
    runs = plan_runs(remote, local, 4, 3)
    num = copy_runs(views(src), views(dst), src_lay, dst_lay, runs, max_slice_copies, max_strided_runs, kernel=False)
    assert num == src_lay.num_layers * 2 * len(runs)
    assert dst.read_blocks(local).equal(src.read_blocks(remote))
    others = [b for b in range(dst.num_blocks) if b not in local]
    assert not dst.read_blocks(others).any()


@pytest.mark.parametrize("max_strided_runs", [10_000, 0], ids=["strided-per-run", "gather-scatter"])
def test_copy_runs_bfloat16_whole_blocks(max_strided_runs):
    """bf16 blocks of an odd number of 2-byte words per block row still copy whole (byte rows)."""
    lay = dataclasses.replace(layout(4), dtype="bfloat16", head_dim=3, num_kv_heads=1, block_size=1)  # 6-byte blocks
    assert lay.block_bytes % 8
    src, dst = random_cache(lay, 2, 3), KVCache(lay, 2)
    runs = plan_runs([5, 2, 7], [0, 6, 3], 4, 4)
    copy_runs(views(src), views(dst), lay, lay, runs, max_slice_copies=0, max_strided_runs=max_strided_runs,
              kernel=False)
    assert dst.read_blocks([0, 6, 3]).equal(src.read_blocks([5, 2, 7]))


@pytest.mark.parametrize("src_segs,dst_segs", [((2,), (1,)), ((0, 3), (2,)), ((1,), (0, 2, 3)),
                                               ((0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5))],
                         ids=["one-pair", "sources-to-one", "one-to-destinations", "staging-36-pairs"])
def test_gather_scatter_over_segment_pairs(src_segs, dst_segs):
    """Scattered blocks (every run one block): per segment pair when there are few pairs, through a
    staging buffer when that takes fewer calls (2 * 36 pairs > 6 sources + 2 * 6 destinations)."""
    src_lay, dst_lay = layout(8), layout(7)
    src, dst = random_cache(src_lay, 6, 11), KVCache(dst_lay, 6)
    per_pair = min(3, 7 // max(len(src_segs), len(dst_segs)))
    used_src, used_dst = dict.fromkeys(src_segs, 0), dict.fromkeys(dst_segs, 0)
    remote, local = [], []
    for s, d in [(s, d) for s in src_segs for d in dst_segs for _ in range(per_pair)]:
        remote.append(s * 8 + 7 - used_src[s])  # descending inside a segment: never a run
        local.append(d * 7 + used_dst[d])
        used_src[s] += 1
        used_dst[d] += 1
    order = np.random.default_rng(3).permutation(len(remote))
    remote, local = [remote[i] for i in order], [local[i] for i in order]
    runs = plan_runs(remote, local, 8, 7)
    copy_runs(views(src), views(dst), src_lay, dst_lay, runs, max_slice_copies=0, max_strided_runs=0, kernel=False)
    assert dst.read_blocks(local).equal(src.read_blocks(remote))
    others = [b for b in range(dst.num_blocks) if b not in local]
    assert not dst.read_blocks(others).any()


def test_gather_path_copies_pairs_that_are_one_run_and_pairs_that_are_not():
    """More runs than strided copies allow: contiguous stretches over segment boundaries (a pair
    that is one run: one strided copy) next to scattered blocks sharing a pair (gather + scatter)."""
    src_lay, dst_lay = layout(8), layout(7)
    src, dst = random_cache(src_lay, 6, 13), KVCache(dst_lay, 6)
    remote = list(range(2, 30)) + [47, 40, 45]
    local = list(range(5, 33)) + [41, 36, 39]
    runs = plan_runs(remote, local, 8, 7)
    assert len(runs) > 2
    copy_runs(views(src), views(dst), src_lay, dst_lay, runs, max_slice_copies=0, max_strided_runs=2, kernel=False)
    assert dst.read_blocks(local).equal(src.read_blocks(remote))
    others = [b for b in range(dst.num_blocks) if b not in local]
    assert not dst.read_blocks(others).any()


def reader_with(src: KVCache, dst: KVCache, epoch: int = 2) -> tuple[CudaIpcReader, PeerInfo]:
    """A reader on CPU tensors: ``src``'s segments adopted as a peer's at ``epoch``, ``dst``'s as ours."""
    info = dataclasses.replace(peer(), layout=src.layout, compat_hash=src.layout.compat_hash(), kv_epoch=epoch)
    reader = CudaIpcReader(torch.device("cpu"))
    reader.adopt(info, src.segments)
    for i, t in dst.segments.items():
        reader.add_local(i, t, dst.layout)
    return reader, info


@pytest.mark.parametrize("pattern", ["contiguous", "scattered"])
def test_reader_reads_the_blocks_with_views_made_before_the_read(pattern):
    """CudaIpcReader.read on CPU tensors: the same views, plan and copy choice as on a GPU (one
    strided copy per run for contiguous ids, gather/scatter for scattered ones)."""
    src_lay, dst_lay = layout(16), layout(12)
    src, dst = random_cache(src_lay, 3, 5), KVCache(dst_lay, 4)
    rng = np.random.default_rng(7)
    if pattern == "contiguous":
        remote, local = list(range(5, 35)), list(range(12, 42))
    else:
        remote = rng.choice(48, 30, replace=False).tolist()
        local = rng.choice(48, 30, replace=False).tolist()
    reader, info = reader_with(src, dst)
    runs = plan_runs(remote, local, 16, 12)
    assert (len(runs) <= 16) == (pattern == "contiguous")
    assert reader.read(info, runs, dst_lay) == 2 * src_lay.num_layers * len(runs)
    assert dst.read_blocks(local).equal(src.read_blocks(remote))
    others = [b for b in range(dst.num_blocks) if b not in local]
    assert not dst.read_blocks(others).any()


def test_reader_refuses_another_epoch_and_segments_it_does_not_hold():
    src, dst = random_cache(layout(4), 2, 9), KVCache(layout(4), 2)
    reader, info = reader_with(src, dst, epoch=2)
    runs = plan_runs([0, 1], [4, 5], 4, 4)
    with pytest.raises(RuntimeError, match="mapped at epoch 2, not at epoch 3"):
        reader.read(dataclasses.replace(info, kv_epoch=3), runs, dst.layout)
    reader.remove_local(1)  # our segment 1 is gone: its views with it
    with pytest.raises(ValueError, match=r"segments \[1\], which this cache does not have"):
        reader.read(info, runs, dst.layout)
    assert not dst.read_blocks([4, 5]).any()  # refused before any copy
    reader.close(info.agent_name)
    assert not reader.is_open(info)
    with pytest.raises(RuntimeError, match="not mapped"):
        reader.read(info, plan_runs([0], [0], 4, 4), dst.layout)


class LaunchCount(TorchDispatchMode):
    """Counts the torch ops that would launch work on a GPU (every non-view aten op)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def check_copy(src: KVCache, dst: KVCache, remote: list[int], local: list[int], **kwargs) -> list[str]:
    """copy_runs of remote -> local with ``kwargs``: byte-exact, no other block written; returns the ops."""
    runs = plan_runs(remote, local, src.layout.blocks_per_segment, dst.layout.blocks_per_segment)
    with LaunchCount() as count:
        copy_runs(views(src), views(dst), src.layout, dst.layout, runs, **kwargs)
    assert dst.read_blocks(local).equal(src.read_blocks(remote))
    others = [b for b in range(dst.num_blocks) if b not in set(local)]
    assert not others or not dst.read_blocks(others).any()
    return count.ops


@pytest.mark.parametrize("num_layers", [1, 16])
def test_one_run_is_one_copy_for_every_layer_k_and_v(num_layers):
    """Contiguous ids (one run) move with one strided copy whatever the layers: the sweep's
    1-layer layout (2 slices) and Llama's 16 layers (32 slices) alike."""
    lay = dataclasses.replace(layout(40), num_layers=num_layers)
    src, dst = random_cache(lay, 1, 21), KVCache(lay, 1)
    assert check_copy(src, dst, list(range(3, 33)), list(range(9, 39))) == ["aten.copy_.default"]
    whole = KVCache(lay, 1)  # a whole segment: one copy too (torch makes it a memcpy on a GPU)
    assert check_copy(src, whole, list(range(40)), list(range(40))) == ["aten.copy_.default"]


@pytest.mark.parametrize("contiguous_side", ["source", "destination"])
def test_scattered_ids_with_one_side_a_range_take_one_call(contiguous_side):
    """Many runs in one segment pair where one side's blocks are one range (a prefix-cached
    source read into freshly allocated blocks, or the reverse): one gather straight into the
    destination range, or one scatter straight from the source range; no gather buffer."""
    lay = layout(32)
    src, dst = random_cache(lay, 1, 23), KVCache(lay, 1)
    scattered = random.Random(5).sample(range(32), 20)
    remote, local = (list(range(6, 26)), scattered) if contiguous_side == "source" else (scattered, list(range(6, 26)))
    ops = check_copy(src, dst, remote, local, max_strided_runs=0, kernel=False)
    want = "aten.index_copy_.default" if contiguous_side == "source" else "aten.index_select.out"
    assert ops == [want]


def test_scattered_ids_on_both_sides_gather_then_scatter():
    lay = layout(32)
    src, dst = random_cache(lay, 1, 25), KVCache(lay, 1)
    remote, local = random.Random(6).sample(range(32), 20), random.Random(7).sample(range(32), 20)
    assert check_copy(src, dst, remote, local, max_strided_runs=0, kernel=False) == \
        ["aten.index_select.default", "aten.index_copy_.default"]


def test_segment_pairs_with_one_side_a_range_take_one_call_each():
    """Over several segment pairs: a pair whose destination blocks are one range is one gather
    into it, one whose source blocks are one range one scatter from it, one that is a run on
    both sides one strided copy, and a scattered pair a gather + a scatter."""
    src_lay, dst_lay = layout(8), layout(8)
    src, dst = random_cache(src_lay, 4, 27), KVCache(dst_lay, 4)
    pairs = [([7, 2, 5], [0, 1, 2]),         # segment 0 -> 0: destination a range
             ([8, 9, 10], [14, 9, 12]),      # 1 -> 1: source a range
             ([16, 17], [28, 29]),           # 2 -> 3: a run on both sides
             ([31, 27, 29], [20, 23, 18])]   # 3 -> 2: scattered on both
    remote = [b for r, _ in pairs for b in r]
    local = [b for _, l in pairs for b in l]
    ops = check_copy(src, dst, remote, local, max_strided_runs=0, kernel=False)
    assert sorted(ops) == sorted(["aten.index_select.out", "aten.index_copy_.default", "aten.copy_.default",
                                  "aten.index_select.default", "aten.index_copy_.default"])


def test_segment_set_addresses_every_segment_from_its_anchor():
    cache = random_cache(layout(4), 3, 29)
    cache.remove_segment(1)
    segs = SegmentSet(views(cache))
    assert segs.mask.tolist() == [True, False, True] and 1 not in segs and len(segs) == 2
    size = segs.anchor.element_size()
    for i in (0, 2):
        assert segs.anchor.data_ptr() + int(segs.base_words[i]) * size == segs[i].rows.data_ptr()
    assert segs.device == torch.device("cpu") and SegmentSet.of(segs) is segs


def test_the_block_table_kernel_needs_triton_on_a_gpu_or_its_interpreter():
    lay = layout(8)
    src, dst = random_cache(lay, 1, 31), KVCache(lay, 1)
    runs = plan_runs([5, 1, 3], [0, 4, 2], 8, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        copy_runs(views(src), views(dst), lay, lay, runs, kernel=True)
    assert not dst.read_blocks([0, 4, 2]).any()  # refused before any copy


def test_issued_reads_are_in_place_after_synchronize():
    """issue() several READs (different requests' blocks), then synchronize() once: every READ's
    blocks arrived; on CPU tensors issue() already copied them, the same calls run on a GPU."""
    src, dst = random_cache(layout(16), 2, 33), KVCache(layout(16), 2)
    reader, info = reader_with(src, dst)
    requests = [(list(range(0, 6)), list(range(20, 26))), ([30, 3, 17], [1, 2, 9]), ([7], [31])]
    for remote, local in requests:
        assert reader.issue(info, plan_runs(remote, local, 16, 16), dst.layout) > 0
    reader.synchronize(info)
    for remote, local in requests:
        assert dst.read_blocks(local).equal(src.read_blocks(remote))
    with pytest.raises(RuntimeError, match="not at epoch 3"):
        reader.synchronize(dataclasses.replace(info, kv_epoch=3))
