"""Chained block hashes: the identity of a full KV block, shared by the engine's prefix cache and
the router's global prefix index, so both must compute exactly the same numbers.

hash(block i) = H(hash(block i-1), tokens of block i), with the root seeded by the request's
cache_salt: equal prompts with different salts never share a block hash (tenant isolation).
Only *full* blocks have a hash; a partial last block is never shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_ROOT = b"pdserve-root"


def root_hash(cache_salt: str | None) -> bytes:
    salt = (cache_salt or "").encode()
    return hashlib.blake2b(_ROOT + len(salt).to_bytes(4, "little") + salt, digest_size=8).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    data = np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=8).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                 start: int = 0, parent: bytes | None = None) -> list[int]:
    """Hashes (as non-negative ints) of the full blocks of ``token_ids``.

    ``start``/``parent`` continue a chain: hash blocks from index ``start`` given the raw parent
    digest of block ``start - 1`` (see ``BlockHasher`` for incremental use).
    """
    return [int.from_bytes(d, "little") for d in _digests(token_ids, block_size, cache_salt, start, parent)]


def _digests(token_ids, block_size, cache_salt, start, parent):
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    prev = parent if parent is not None else root_hash(cache_salt)
    out = []
    for i in range(start, len(token_ids) // block_size):
        prev = hash_block(prev, token_ids[i * block_size:(i + 1) * block_size])
        out.append(prev)
    return out


class BlockHasher:
    """Incremental chain for a growing sequence (decode appends tokens one at a time)."""

    def __init__(self, block_size: int, cache_salt: str | None = None):
        self.block_size = block_size
        self._last = root_hash(cache_salt)
        self.hashes: list[int] = []

    def extend(self, token_ids: Sequence[int]) -> list[int]:
        """Hash every newly completed full block of ``token_ids`` (the whole sequence so far)."""
        new = _digests(token_ids, self.block_size, None, len(self.hashes), self._last)
        if new:
            self._last = new[-1]
            self.hashes.extend(int.from_bytes(d, "little") for d in new)
        return self.hashes
