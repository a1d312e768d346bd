"""PeriodicLoop: runs ``step()`` every ``interval_s`` on the running event loop until stopped.
A failed round is logged and kept in ``last_error``; the loop goes on."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class PeriodicLoop:
    loop_name = "pdserve-loop"

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    async def step(self):
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.loop_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("%s round failed: %s", self.loop_name, self.last_error)
            await asyncio.sleep(self.interval_s)
