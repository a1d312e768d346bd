"""Steps queued on the device that the host has not seen finish, and the blocks they may still
write after the host freed them.

The host runs ahead of the device: a step is launched (queued) and step() may return before the
device ran it. Inside the engine that is harmless, since every later step runs after it in
stream order, so a freed block may be handed to the next step at once. Outside the device's
order it is not: a peer writing an imported prompt's KV into a block (kv_transfer, NIXL) must not
race a queued step that still writes that block's old owner's KV (a request aborted, or stopped
by a token read after its next step was queued). So blocks freed while a launched step that
computes their request is unsynced are remembered, and ``wait_for_blocks`` waits for that step
before such a block goes to a peer. A sync on a step (its tokens read back) proves it and every
step launched before it finished.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from workers.engine.device_transfer import DeviceMark
from workers.engine.request import Request
from workers.engine.sampler import DeviceSample


@dataclass(eq=False)
class LaunchedStep:
    requests: set[Request]  # every request the step computes (writes KV for)
    sampled: list[Request]  # row i of the sample is sampled[i]'s next token
    sample: DeviceSample | None  # None: the step samples nothing (prefill chunks only)
    mark: DeviceMark | None  # everything the step queued has run once mark.wait() returns (set at launch)
    resolve_now: bool = False  # see Engine.step: never left in flight
    resolved: bool = False  # its tokens were read back (Engine._resolve)
    freed_blocks: set[int] = field(default_factory=set)


class LaunchedSteps:
    """The launched steps not yet known to have finished on the device, oldest first."""

    def __init__(self):
        self.unsynced: list[LaunchedStep] = []

    def add(self, step: LaunchedStep) -> None:
        self.unsynced.append(step)

    def synced(self, step: LaunchedStep) -> None:
        """The host saw ``step`` finish: it and every older step are done."""
        if step in self.unsynced:
            del self.unsynced[: self.unsynced.index(step) + 1]

    def released(self, req: Request, block_ids: Iterable[int]) -> None:
        """req's blocks go back to the pool now; remember them for the steps that still write them."""
        for step in self.unsynced:
            if req in step.requests:
                step.freed_blocks.update(block_ids)

    def wait_for_blocks(self, block_ids: list[int]) -> None:
        """Before a peer writes these blocks: wait for the newest step that may still write one."""
        for step in reversed(self.unsynced):
            if not step.freed_blocks.isdisjoint(block_ids):
                step.mark.wait()
                self.synced(step)
                return

    def wait_all(self) -> None:
        if self.unsynced:
            self.unsynced[-1].mark.wait()
            self.unsynced.clear()
