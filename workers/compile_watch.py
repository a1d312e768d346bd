"""Compiles that happen while a worker serves: Triton JIT compiles (ours and inductor's) and
torch.compile (dynamo) frames, timed into the worker's HopTimer as ``jit.triton`` and
``jit.dynamo``. A compile inside serving stalls the engine thread for the whole compile (a Triton
kernel ~0.5-3 s on a GPU host, a dynamo frame seconds), with every request of that worker behind
it; the warm-up exists so that none happens after start (benchmarks/serve.py reports these hops).

Diagnostic only: the hooks time and count, they never change what compiles. A Triton compile
served from Triton's on-disk cache is timed too (it is cheap then). The hooks are installed once
per process; each install() points them at its timer (a worker process has one worker).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

_installed = False
_hops = None  # the HopTimer the hooks add to
_lock = threading.Lock()
_serving = False  # set once the worker serves: compiles from then on are counted apart
_serving_count, _serving_seconds = 0, 0.0


def install(hops) -> bool:
    """Time this process's compiles into ``hops`` (a HopTimer) from now on. Returns False where
    there is no Triton and no dynamo callback API to hook (nothing is timed then)."""
    global _installed, _hops
    with _lock:
        _hops = hops
        if not _installed:
            _installed = _install_triton() | _install_dynamo()
        return _installed


def mark_serving() -> None:
    """The worker started serving: every compile from here on is one a request may wait behind."""
    global _serving
    _serving = True


def serving_compiles() -> tuple[int, float]:
    """(compiles, seconds) since mark_serving() in this process (a worker's counters)."""
    return _serving_count, _serving_seconds


def _add(name: str, seconds: float) -> None:
    global _serving_count, _serving_seconds
    if _hops is not None:
        _hops.add(name, seconds)
    if _serving:
        with _lock:
            _serving_count += 1
            _serving_seconds += seconds


def _install_triton() -> bool:
    try:
        from triton import knobs
    except ImportError:
        return False
    started: dict = {}
    before_cache, before_post = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook

    def cache_hook(*args, **kwargs):  # before each compile (or on-disk cache load) of a specialisation
        started[(threading.get_ident(), repr(kwargs.get("key")))] = time.perf_counter()
        return before_cache(*args, **kwargs) if before_cache else None

    def post_hook(*args, **kwargs):
        t0 = started.pop((threading.get_ident(), repr(kwargs.get("key"))), None)
        if t0 is not None:
            seconds = time.perf_counter() - t0
            _add("jit.triton", seconds)
            if seconds > 0.2:
                fn = kwargs.get("fn")
                log.info("Triton compiled %s in %.2f s", getattr(fn, "name", fn), seconds)
        return before_post(*args, **kwargs) if before_post else None

    knobs.runtime.jit_cache_hook = cache_hook
    knobs.runtime.jit_post_compile_hook = post_hook
    return True


def _install_dynamo() -> bool:
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return False
    t0: list[float] = []

    def start(_args=None):
        t0.append(time.perf_counter())

    def end(_args=None):
        if t0:
            seconds = time.perf_counter() - t0.pop()
            _add("jit.dynamo", seconds)
            log.info("torch.compile compiled a frame in %.2f s", seconds)

    callback_handler.register_start_callback(start)
    callback_handler.register_end_callback(end)
    return True
