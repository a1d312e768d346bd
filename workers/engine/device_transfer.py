"""Host<->device copies that never stall the host on the GPU's queue.

A plain ``torch.tensor(values, device="cuda")`` or ``tensor.tolist()`` of a CUDA tensor waits for
every kernel queued before it: one such call in a step serialises the host with the GPU. Here
uploads go through pinned memory with ``non_blocking=True`` (the caching host allocator keeps the
pinned block alive until its copy ran), and a download is started at once and read later, after
waiting for an event recorded right behind it: that wait is the step's one host<->device sync.
On the CPU both are plain tensor operations.
"""

from __future__ import annotations

import torch


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list, nested lists or a CPU tensor) as a tensor on ``device``, queued, no sync."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(dtype)
    return host.to(dtype).pin_memory().to(device, non_blocking=True)


class DeviceMark:
    """A point in the device's queue: everything queued before it has run once ``wait()`` returns."""

    def __init__(self, device: torch.device):
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Download:
    """One device->host copy of ``tensor``, queued now, read by ``result()``. ``into``: the pinned
    host tensor to copy into (PinnedSlots), else a new one."""

    def __init__(self, tensor: torch.Tensor, into: torch.Tensor | None = None):
        self.host = tensor
        if tensor.device.type == "cuda":
            self.host = into if into is not None else torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
        self.mark = DeviceMark(tensor.device)  # after the copy and every kernel queued before it

    def wait(self) -> None:
        """Block until the copy (and every kernel queued before it) has finished."""
        self.mark.wait()

    def result(self) -> torch.Tensor:
        self.wait()
        return self.host


class PinnedSlots:
    """Pinned host buffers handed out in turn to downloads that are read once and let go (a
    step's sampled tokens), instead of a pinned allocation per download: torch's caching host
    allocator costs tens of µs a call on some GPU hosts (one H200: 34 µs, cProfile; a decode step
    makes one). A slot is handed out again ``n`` takes later (per dtype), and only if its holder
    released it; a slot still held (its download never read) is left to its holder and a new
    buffer takes its place. ``pin`` False: plain host memory (tests of the hand-out on a CPU)."""

    def __init__(self, n: int = 4, pin: bool = True):
        self.n, self.pin = n, pin
        self._rings: dict[torch.dtype, list] = {}  # dtype -> [next index, [(buffer, holder) or None] * n]

    def take(self, like: torch.Tensor, holder: object) -> torch.Tensor:
        """A pinned host tensor of ``like``'s shape and dtype, held by ``holder`` until release()."""
        ring = self._rings.setdefault(like.dtype, [0, [None] * self.n])
        i = ring[0]
        ring[0] = (i + 1) % self.n
        slot = ring[1][i]
        numel = like.numel()
        if slot is None or slot[1] is not None or slot[0].numel() < numel:
            grown = max(numel, slot[0].numel() if slot is not None else 0)
            buf = torch.empty(grown, dtype=like.dtype, pin_memory=self.pin)
        else:
            buf = slot[0]
        ring[1][i] = (buf, holder)
        return buf[:numel].view(like.shape)

    def release(self, holder: object) -> None:
        """``holder`` has read its buffer: the slot may be handed out again."""
        for ring in self._rings.values():
            slots = ring[1]
            for i, slot in enumerate(slots):
                if slot is not None and slot[1] is holder:
                    slots[i] = (slot[0], None)
                    return
