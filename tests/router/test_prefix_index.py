"""PrefixIndex: prefix-match semantics, the event seq contract, bounds, and equivalence with a naive index."""

import random

import pytest

from router.prefix_index import PrefixIndex, TooManyWorkersError
from workers.block_hash import block_hashes
from workers.protocol import KVEvent, KVEventKind

BS = 4
PROMPT = list(range(100, 116))  # 4 full blocks
H = block_hashes(PROMPT, BS)


def stored(worker, hashes, seq):
    return KVEvent(worker, KVEventKind.STORED, tuple(hashes), seq)


def removed(worker, hashes, seq):
    return KVEvent(worker, KVEventKind.REMOVED, tuple(hashes), seq)


def test_overlap_counts_consecutive_blocks_from_the_start():
    idx = PrefixIndex()
    idx.apply(stored("a", H, 0))
    idx.apply(stored("b", H[:2], 0))
    idx.apply(stored("c", [H[0], H[1], H[3]], 0))  # has block 3 but not block 2
    idx.apply(stored("d", H[3:], 0))  # no block 0: matches nothing
    assert idx.overlap(H) == {"a": 4, "b": 2, "c": 2}
    assert idx.overlap(H[:1]) == {"a": 1, "b": 1, "c": 1}
    assert idx.overlap([]) == {}
    # A request that diverges after block 1 shares only the first two blocks (the chain differs after).
    other = block_hashes(PROMPT[:8] + [7] * 8, BS)
    assert other[:2] == H[:2] and other[2] != H[2]
    assert idx.overlap(other) == {"a": 2, "b": 2, "c": 2}


def test_cache_salt_separates_tenants():
    idx = PrefixIndex()
    idx.apply(stored("a", block_hashes(PROMPT, BS, cache_salt="tenant-1"), 0))
    assert idx.overlap(block_hashes(PROMPT, BS, cache_salt="tenant-2")) == {}
    assert idx.overlap(block_hashes(PROMPT, BS)) == {}
    assert idx.overlap(block_hashes(PROMPT, BS, cache_salt="tenant-1")) == {"a": 4}


def test_removed_and_remove_worker_and_slot_reuse():
    idx = PrefixIndex()
    idx.apply(stored("a", H, 0))
    idx.apply(stored("b", H, 0))
    idx.apply(removed("a", [H[2]], 1))
    assert idx.overlap(H) == {"a": 2, "b": 4}
    idx.apply(removed("a", [12345], 2))  # unknown hash: no-op
    idx.remove_worker("b")
    idx.remove_worker("never-seen")
    assert idx.overlap(H) == {"a": 2}
    idx.apply(stored("e", H[:1], 0))  # takes b's freed slot and must not inherit b's blocks
    assert idx.overlap(H) == {"a": 2, "e": 1}
    idx.remove_worker("a")
    idx.remove_worker("e")
    s = idx.stats()
    assert (s.num_workers, s.num_blocks, s.num_entries) == (0, 0, 0)


def test_seq_gap_marks_resync_and_snapshot_repairs_it():
    idx = PrefixIndex()
    idx.apply(stored("a", H[:1], 0))
    idx.apply(stored("a", H[1:2], 1))
    assert not idx.needs_resync("a")
    idx.apply(stored("a", H[3:], 5))  # seqs 2..4 lost
    assert idx.needs_resync("a") and idx.workers_needing_resync() == ["a"]
    assert idx.stats().num_seq_gaps == 1
    assert idx.overlap(H) == {"a": 2}  # events after a gap still apply
    # Snapshot as of seq 7: the worker holds all 4 blocks.
    idx.reset_worker("a", H, seq=7)
    assert not idx.needs_resync("a") and idx.next_seq("a") == 8
    assert idx.overlap(H) == {"a": 4}
    idx.apply(removed("a", H, 6))  # older than the snapshot: stale, ignored
    assert idx.overlap(H) == {"a": 4} and idx.stats().num_stale_events == 1
    idx.apply(removed("a", H[3:], 8))
    assert idx.overlap(H) == {"a": 3} and not idx.needs_resync("a")


def test_first_event_not_zero_means_missed_history():
    idx = PrefixIndex()
    idx.apply(stored("late", H, 42))  # the router joined after the worker's first events
    assert idx.needs_resync("late")
    assert idx.overlap(H) == {"late": 4}


def test_snapshot_without_seq_takes_next_event_as_baseline():
    idx = PrefixIndex()
    idx.reset_worker("a", H[:2])
    idx.apply(stored("a", H[2:3], 17))
    assert not idx.needs_resync("a") and idx.next_seq("a") == 18
    assert idx.overlap(H) == {"a": 3}


def test_seq_zero_starts_a_fresh_stream_and_cleared_empties():
    idx = PrefixIndex()
    idx.apply(stored("a", H, 0))
    idx.apply(stored("a", [999], 3))  # gap
    assert idx.needs_resync("a")
    idx.apply(stored("a", H[:1], 0))  # restarted worker: old knowledge dropped, no resync needed
    assert idx.overlap(H) == {"a": 1} and not idx.needs_resync("a") and idx.num_blocks_of("a") == 1
    idx.apply(stored("a", H, 1))
    idx.apply(KVEvent("a", KVEventKind.CLEARED, (), 9))  # a gap, but CLEARED is a full (empty) snapshot
    assert idx.overlap(H) == {} and not idx.needs_resync("a") and idx.next_seq("a") == 10
    with pytest.raises(ValueError):
        idx.apply(stored("a", H, -1))


def test_memory_bounds():
    idx = PrefixIndex(max_blocks_per_worker=3, max_workers=2)
    idx.apply(stored("a", H, 0))  # 4 blocks, cap 3: the oldest (block 0) is forgotten
    assert idx.num_blocks_of("a") == 3 and idx.stats().num_forgotten == 1
    assert idx.overlap(H) == {}  # block 0 gone, so no prefix match: an under-estimate, never wrong
    idx.apply(stored("a", [H[0]], 1))  # re-stored: newest now, block 1 (oldest) is forgotten
    assert idx.overlap(H) == {"a": 1}
    idx.apply(stored("b", H[:1], 0))
    with pytest.raises(TooManyWorkersError, match="index_max_workers"):
        idx.apply(stored("c", H[:1], 0))
    idx.remove_worker("b")
    idx.apply(stored("c", H[:1], 0))  # room again
    assert idx.overlap(H) == {"a": 1, "c": 1}


def _naive_overlap(owners: dict[int, set[str]], hashes: list[int]) -> dict[str, int]:
    out = {}
    workers = set().union(*owners.values()) if owners else set()
    for w in workers:
        n = 0
        while n < len(hashes) and w in owners.get(hashes[n], ()):
            n += 1
        if n:
            out[w] = n
    return out


def test_equivalent_to_a_naive_index_under_random_events():
    rng = random.Random(7)
    # A small tree of prompts sharing prefixes, so overlaps of every length occur.
    prompts = []
    for _ in range(30):
        base = rng.choice(prompts)[: rng.randrange(0, 40)] if prompts and rng.random() < 0.7 else []
        prompts.append(base + [rng.randrange(50) for _ in range(40 - len(base))])
    chains = [block_hashes(p, BS) for p in prompts]
    idx, owners, seqs = PrefixIndex(), {}, {}
    workers = [f"w{i}" for i in range(12)]
    for step in range(3000):
        w = rng.choice(workers)
        r = rng.random()
        if r < 0.02:
            idx.remove_worker(w)
            for s in owners.values():
                s.discard(w)
            seqs.pop(w, None)
            continue
        seq = seqs.get(w, -1) + 1
        seqs[w] = seq
        chain = rng.choice(chains)
        hashes = chain[: rng.randrange(1, len(chain) + 1)] if r < 0.6 else rng.sample(chain, rng.randrange(1, 4))
        if r < 0.6:
            idx.apply(stored(w, hashes, seq))
            for h in hashes:
                owners.setdefault(h, set()).add(w)
        elif r < 0.98:
            idx.apply(removed(w, hashes, seq))
            for h in hashes:
                owners.get(h, set()).discard(w)
        else:
            idx.apply(KVEvent(w, KVEventKind.CLEARED, (), seq))
            for s in owners.values():
                s.discard(w)
        if step % 25 == 0:
            for chain in chains:
                assert idx.overlap(chain) == _naive_overlap(owners, chain)
    live = {(h, w) for h, s in owners.items() for w in s}
    assert idx.stats().num_entries == len(live)
    assert idx.stats().num_blocks == len({h for h, _ in live})
    assert idx.workers_needing_resync() == []


def test_thousands_of_workers_and_blocks():
    idx = PrefixIndex()
    chain = block_hashes(list(range(4000 * BS)), BS)  # 4000 blocks
    for i in range(2000):
        idx.apply(stored(f"w{i:04d}", chain[: i + 1], 0))  # worker i holds the first i+1 blocks
    got = idx.overlap(chain)
    assert len(got) == 2000
    assert all(got[f"w{i:04d}"] == i + 1 for i in range(2000))
    assert idx.stats().num_entries == sum(range(1, 2001))
