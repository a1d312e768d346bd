"""ZeroOverlapAlarm: notices when KV-aware routing has silently degraded to load-only routing.

If the workers' KV event stream is broken (not wired, dropped, wrong block size or hash), every
overlap score is zero, and the router still works, just without prefix reuse. The tell: requests
keep repeating a prefix (the router sees a first-block hash it saw before) and still nobody matches.

Tumbling windows of ``window_requests`` requests that have at least one full block. At the end of
a window the alarm is raised iff every overlap in it was zero and at least ``min_repeats`` of its
requests repeated a recently seen first block; a warning is logged once per such window. Any
non-zero overlap clears the alarm at once (the stream evidently works).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

log = logging.getLogger(__name__)


class ZeroOverlapAlarm:
    def __init__(self, window_requests: int = 50, min_repeats: int = 5, max_remembered_prefixes: int | None = None):
        """``window_requests`` 0 turns the alarm off (observe() then always returns False)."""
        if window_requests < 0 or min_repeats < 1:
            raise ValueError("need window_requests >= 0 and min_repeats >= 1")
        self.window_requests = window_requests
        self.min_repeats = min_repeats
        # First-block hashes remembered across windows (a prefix may recur less often than a
        # window); bounded, oldest forgotten first.
        self._max_remembered = max_remembered_prefixes or max(1024, 4 * window_requests)
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._num_in_window = 0
        self._num_repeats = 0
        self._all_zero = True
        self.is_alarmed = False
        self.num_alarm_windows = 0  # windows that ended alarmed (a counter for /metrics)

    def observe(self, first_block_hash: int | None, max_overlap_blocks: int) -> bool:
        """Record one routed request: its first full block's hash (None if it has no full block)
        and the largest overlap any worker had. Returns whether the alarm is raised."""
        if max_overlap_blocks < 0:
            raise ValueError("max_overlap_blocks must be >= 0")
        if self.window_requests == 0 or first_block_hash is None:
            return self.is_alarmed
        if first_block_hash in self._seen:
            self._num_repeats += 1
            self._seen.move_to_end(first_block_hash)
        else:
            self._seen[first_block_hash] = None
            if len(self._seen) > self._max_remembered:
                self._seen.popitem(last=False)
        if max_overlap_blocks > 0:
            self._all_zero = False
            self.is_alarmed = False
        self._num_in_window += 1
        if self._num_in_window >= self.window_requests:
            self._close_window()
        return self.is_alarmed

    def _close_window(self) -> None:
        if self._all_zero and self._num_repeats >= self.min_repeats:
            self.is_alarmed = True
            self.num_alarm_windows += 1
            log.warning(
                "KV-aware routing sees no prefix reuse: %d requests all had zero overlap although %d repeated a "
                "recent prefix; the workers' KV event stream is probably broken (check event delivery, block "
                "size and hashing)", self._num_in_window, self._num_repeats)
        else:
            self.is_alarmed = False
        self._num_in_window = 0
        self._num_repeats = 0
        self._all_zero = True
