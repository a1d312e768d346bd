"""Which GPUs a worker process sees, so that CUDA IPC can reach a peer on another GPU of the node.

Ray gives an actor with ``num_gpus`` only its own GPU (CUDA_VISIBLE_DEVICES=<its id>). A decode
worker can then not open a prefill worker's KV segments on GPU 1 through CUDA IPC, and the
transceiver takes NIXL for them (a READ per block run: 45 ms for a 2048-token Llama-1B request
across two H100s, against 1.6 ms through CUDA IPC; benchmarks/README.md). So the manager starts
GPU workers with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (cluster/manager.py, unless
transfer.cuda_ipc is off) and the worker, before CUDA starts, lists every GPU of the node with
its own first: ``cuda`` / ``cuda:0`` stays the GPU Ray assigned (the engine's code is unchanged),
the others are visible for peer mappings only.

Invariant: this runs before CUDA is initialised in the process (CUDA reads CUDA_VISIBLE_DEVICES
once). If CUDA is already up, the order cannot change and the worker would run on GPU 0 of the
node whatever Ray assigned: that is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def assigned_first(assigned: Sequence[str], node_visible: Sequence[str]) -> list[str]:
    """The node's GPU ids with the assigned ones first, each once, in their own order.
    ``assigned`` ids must be among ``node_visible`` (Ray assigns from the node's list)."""
    if not assigned:
        raise ValueError("no GPU is assigned to this worker")
    unknown = [g for g in assigned if g not in node_visible]
    if unknown:
        raise ValueError(f"assigned GPU id(s) {unknown} are not among the node's GPUs {list(node_visible)}")
    first = list(dict.fromkeys(assigned))
    return first + [g for g in node_visible if g not in first]


def node_gpu_ids() -> list[str]:
    """The GPU ids Ray assigns from on this node: the raylet's CUDA_VISIBLE_DEVICES when it had
    one (inherited here under NOSET), else 0..n-1 for the node's GPU resource."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:
        return [g.strip() for g in inherited.split(",") if g.strip()]
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return [str(i) for i in range(int(node.get("Resources", {}).get("GPU", 0)))]
    raise RuntimeError(f"this worker's Ray node {node_id} is not in ray.nodes()")


def show_node_gpus_assigned_first() -> str | None:
    """Under NOSET, set CUDA_VISIBLE_DEVICES to the node's GPUs with this actor's first and return
    it; None when Ray already narrowed visibility (NOSET unset) or no GPU is assigned."""
    if os.environ.get(NOSET_ENV) != "1":
        return None
    import ray

    assigned = [str(g) for g in ray.get_gpu_ids()]
    if not assigned:
        return None
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError(f"CUDA was initialised in this worker before its GPU order was set ({NOSET_ENV}=1): "
                           "it would run on the node's first GPU, not on Ray's assigned GPU(s) "
                           f"{assigned}; set transfer.cuda_ipc: off to keep Ray's per-worker visibility")
    order = ",".join(assigned_first(assigned, node_gpu_ids()))
    os.environ["CUDA_VISIBLE_DEVICES"] = order
    log.info("GPUs visible in this worker: CUDA_VISIBLE_DEVICES=%s (Ray assigned %s; the others for CUDA IPC "
             "reads from peers)", order, assigned)
    return order
