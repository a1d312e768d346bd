"""Other dtypes: outputs close to transformers by vLLM's rule (where greedy sequences diverge,
each side's token is in the other's top-k)."""

import torch

from tests.workers.engine.helpers import PROMPTS, hf_model, make_engine
from workers.protocol import SamplingParams


def check_logprobs_close(ours, theirs, k=5):
    """ours/theirs: lists of (token ids, per-step top-k id lists)."""
    for (ids_a, top_a), (ids_b, top_b) in zip(ours, theirs):
        for i, (a, b) in enumerate(zip(ids_a, ids_b)):
            if a != b:
                assert a in top_b[i][:k] and b in top_a[i][:k], f"diverged at {i}: {a} vs {b}"
                break


def test_bfloat16_close_to_transformers(tiny_checkpoint):
    model_dir = tiny_checkpoint("qwen2")
    engine = make_engine(model_dir, dtype="bfloat16")
    assert engine.kv_cache.segments[0].dtype == torch.bfloat16
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, top_logprobs=5)
    ours = []
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, sp)
    got = {f"r{i}": ([], []) for i in range(len(PROMPTS))}
    while engine.has_work():
        for d in engine.step().deltas:
            got[d.request_id][0].extend(d.token_ids)
            got[d.request_id][1].extend([[t for t, _ in step] for step in d.top_logprobs])
    model = hf_model(model_dir, "bfloat16")
    theirs = []
    with torch.inference_mode():
        for p in PROMPTS:
            out = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            theirs.append((out.sequences[0, len(p):].tolist(), [s[0].topk(5).indices.tolist() for s in out.scores]))
    ours = [got[f"r{i}"] for i in range(len(PROMPTS))]
    check_logprobs_close(ours, theirs)
    same = sum(a[0] == b[0] for a, b in zip(ours, theirs))
    assert same >= len(PROMPTS) // 2, "bf16 outputs should mostly agree exactly on clear-logit models"
