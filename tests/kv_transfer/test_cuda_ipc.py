"""CUDA IPC path of the transceiver, the parts that run without a GPU: which path a peer gets and
why (transfer.cuda_ipc off | auto | on), the byte ranges a READ copies, and the copies themselves
on CPU tensors (the same torch ops run on the GPU). The GPU check and its benchmark are
benchmarks/transfer.py --device cuda (bench=bandwidth ipc_GBps)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kv_transfer.config import TransferConfig
from kv_transfer.cuda_ipc import PathChoice, copy_runs, flat_bytes, host_id, select_path
from kv_transfer.descriptors import descriptor_array, pair_runs, segment_slices
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


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(1, 3)), min_size=1, max_size=5),
       st.sampled_from([2, 3, 4]), st.booleans())
def test_segment_slices_are_descriptor_rows_relative_to_their_segment(runs, bps, some_layers):
    lay = layout(bps)
    firsts = [f for f, _ in runs]
    counts = [min(c, bps - f % bps) for f, c in runs]  # a run never crosses a segment
    layers = [2, 0] if some_layers else None
    bases = {s: 10_000 * (s + 1) for s in range(12)}
    rows = descriptor_array(lay, bases, {s: 0 for s in bases}, firsts, counts, layers)
    segs, offsets, nbytes = segment_slices(lay, firsts, counts, layers)
    assert (np.array([bases[int(s)] for s in segs]) + offsets == rows[:, 0].astype(np.int64)).all()
    assert (nbytes == rows[:, 1].astype(np.int64)).all()


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
    runs = pair_runs(remote, local, 4, 3)
    num = copy_runs({i: flat_bytes(t) for i, t in src.segments.items()},
                    {i: flat_bytes(t) for i, t in dst.segments.items()}, src_lay, dst_lay, runs, max_slice_copies,
                    max_strided_runs)
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
    runs = pair_runs([5, 2, 7], [0, 6, 3], 4, 4)
    copy_runs({i: flat_bytes(t) for i, t in src.segments.items()}, {i: flat_bytes(t) for i, t in dst.segments.items()},
              lay, lay, runs, max_slice_copies=0, max_strided_runs=max_strided_runs)
    assert dst.read_blocks([0, 6, 3]).equal(src.read_blocks([5, 2, 7]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=30,
                unique_by=(lambda t: t[0], lambda t: t[1])),
       st.sampled_from([2, 3, 8]), st.sampled_from([4, 5, 16]))
def test_vectorised_pairing_equals_the_loop(pairs, src_bps, dst_bps):
    """pair_runs switches to numpy above 32 ids (a READ's per-call cost at 16 MiB matters)."""
    from kv_transfer.descriptors import _pair_runs_np

    src, dst = [p[0] for p in pairs], [p[1] for p in pairs]
    assert _pair_runs_np(np.array(src), np.array(dst), src_bps, dst_bps) == pair_runs(src, dst, src_bps, dst_bps)
    long_src, long_dst = list(range(100, 160)), list(range(7, 67))  # 60 ids: the numpy path
    runs = pair_runs(long_src, long_dst, 16, 20)
    cuts = sorted({b for b in range(101, 160) if b % 16 == 0} | {b + 93 for b in range(8, 67) if b % 20 == 0})
    assert [r.src_first for r in runs] == [100] + cuts
    assert [(r.src_first + i, r.dst_first + i) for r in runs for i in range(r.count)] == list(zip(long_src, long_dst))
