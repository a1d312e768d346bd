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
    """One device->host copy of ``tensor``, queued now, read by ``result()``."""

    def __init__(self, tensor: torch.Tensor):
        self.host = tensor
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
        self.mark = DeviceMark(tensor.device)  # after the copy and every kernel queued before it

    def wait(self) -> None:
        """Block until the copy (and every kernel queued before it) has finished."""
        self.mark.wait()

    def result(self) -> torch.Tensor:
        self.wait()
        return self.host
