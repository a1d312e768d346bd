"""One live cluster for the transfer-mode test modules (two prefill workers and one decode worker,
a tiny llama, transfer.layerwise on), shared by the package, and the helpers they share.

Requests go straight to the decode worker's generate (a GenerateRequest naming the prefill
worker, or none for colocated), each with its own cache salt so no run reuses another's blocks.
The decode worker's mode is switched by replacing its spec's transfer section in place.
Modules run in name order on the one cluster: test_transfer_modes.py ends by killing a prefill
worker, so it comes last."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import ray

from tests.reliability.faults import actor_of, on_worker, wait_for, workers_of
from workers.protocol import GenerateRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = [list(range(3, 40)), [5, 6, 7, 8, 9, 10, 11], [(i * 7) % 300 + 3 for i in range(300)]]  # 300 > 128: chunked


@pytest.fixture(scope="package")
def cluster(pdserve_cluster, tiny_checkpoint):
    c = pdserve_cluster(tiny_checkpoint("llama"), prefix="transfer-modes", pools__prefill__replicas=2,
                        transfer__layerwise=True, transfer__deadline_s=5)
    yield c
    c.stop()


@pytest.fixture(scope="package")
def workers(cluster):
    ids = wait_for(lambda: (lambda w: w if len(w) == 3 else None)(workers_of(cluster.url)), 60, "3 workers")
    prefill = sorted(wid for wid, w in ids.items() if w["role"] == "prefill")
    (decode,) = [wid for wid, w in ids.items() if w["role"] == "decode"]
    return {"decode": actor_of(cluster, decode), "decode_id": decode, "prefill_ids": prefill,
            **{wid: actor_of(cluster, wid) for wid in prefill}}


def generate(decode, prompt, prefill_ids=(), salt=None, sampling=GREEDY) -> list[int]:
    req = GenerateRequest(f"t-{uuid.uuid4().hex[:8]}", tuple(prompt), sampling, cache_salt=salt or uuid.uuid4().hex,
                          prefill_candidates=tuple(prefill_ids))
    tokens = []
    for ref in decode.generate.options(num_returns="streaming").remote(req):
        delta = ray.get(ref, timeout=120)
        assert delta.error is None, delta.error
        tokens += delta.token_ids
    return tokens


def _set_transfer(worker, **update) -> None:
    worker.spec = dataclasses.replace(worker.spec, transfer=worker.spec.transfer.model_copy(update=update))


def set_transfer(decode, **update) -> None:
    """Replace fields of the decode worker's transfer settings in place."""
    on_worker(decode, lambda w: _set_transfer(w, **update))


def set_layerwise(decode, on: bool) -> None:
    set_transfer(decode, layerwise=on)


def decode_engine_requests(decode) -> list[str]:
    return on_worker(decode, lambda w: list(w.engine.requests))
