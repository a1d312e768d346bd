"""Per-layer hooks of one engine step: how a request exports its KV layer by layer while the
forward pass runs (layer-wise KV streaming; see Engine.add_request's on_layer_done).

    factory(block_ids) -> hook | None     once per request, when the step completing its prompt is
                                          scheduled (block_ids: every block of the prompt, final)
    hook(layer, wait_written)             after that step queued layer L's KV write; the bytes are
                                          in place once wait_written() returns

Hooks run on the engine thread inside the forward pass: they must not block (hand the work to
another thread and call wait_written() there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from workers.engine.request import Request

log = logging.getLogger(__name__)

LayerHook = Callable[[int, Callable[[], None]], None]  # hook(layer, wait_written)
LayerHookFactory = Callable[[tuple[int, ...]], LayerHook | None]  # factory(block_ids)


def make_layer_hook(req: Request) -> list[tuple[Request, LayerHook]]:
    """Call the request's factory once, with its final block ids; [] if it gave no hook."""
    factory, req.layer_hook_factory = req.layer_hook_factory, None
    try:
        hook = factory(tuple(req.block_ids))
    except Exception as e:
        log.exception("layer hook factory of %s failed", req.request_id)
        req.layer_hook_error = f"layer-wise export of {req.request_id} failed to start: {type(e).__name__}: {e}"
        return []
    return [] if hook is None else [(req, hook)]


class LayerHooks:
    """The step's on_layer_written callback: every request's hook, each failure kept to its request
    (a raising hook must never break the forward pass of the others)."""

    def __init__(self, hooks: list[tuple[Request, LayerHook]]):
        self.hooks = hooks

    def __call__(self, layer: int, wait_written: Callable[[], None]) -> None:
        for req, hook in self.hooks:
            if req.layer_hook_error is not None:
                continue
            try:
                hook(layer, wait_written)
            except Exception as e:
                log.exception("layer hook of %s failed at layer %d", req.request_id, layer)
                req.layer_hook_error = f"layer-wise export of {req.request_id} failed at layer {layer}: " \
                    f"{type(e).__name__}: {e}"
