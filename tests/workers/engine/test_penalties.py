"""Presence, frequency and repetition penalties through the engine, in both scheduling modes
(conftest.py): greedy output token-identical to transformers' generate(repetition_penalty=...) and
to a by-hand loop (the HF model's forward + OpenAI's formula), with unpenalised requests in the
same batch untouched; a migrated request (prompt + generated so far, output_position_offset) and a
disaggregated one (prefill in A, decode in B) go on exactly as the undisturbed colocated run."""

import dataclasses

import torch

from tests.workers.engine.helpers import (GREEDY, PROMPTS, assert_all_blocks_free, collect, hf_greedy, hf_model,
                                          make_engine, run_all)
from tests.workers.engine.test_split import prefill, transfer
from workers.protocol import FinishReason, SamplingParams

N = 12
REPETITION = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, repetition_penalty=1.8)
REPEAT_MORE = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, repetition_penalty=0.5)
OPENAI = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, frequency_penalty=1.2, presence_penalty=1.5)
# negative: the model loops on its own newest tokens, so a count missing the token still in flight
# (async scheduling) shows
LOOP = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, frequency_penalty=-2.0, presence_penalty=-2.0)
ALL = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, repetition_penalty=0.7, frequency_penalty=-0.4,
                     presence_penalty=1.5)


def hf_generate(model_dir: str, prompt: list[int], repetition_penalty: float) -> list[int]:
    with torch.inference_mode():
        out = hf_model(model_dir).generate(torch.tensor([prompt]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                                           pad_token_id=0, repetition_penalty=repetition_penalty)
    return out[0, len(prompt):].tolist()


def by_hand(model_dir: str, prompt: list[int], sp: SamplingParams) -> list[int]:
    """Greedy: the model's forward over the whole sequence each step, then transformers'
    repetition processor and OpenAI's formula on the last logits, by hand."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model, ids, out = hf_model(model_dir), list(prompt), []
    with torch.inference_mode():
        for _ in range(sp.max_tokens):
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            for t, bias in sp.logit_bias:  # first, as vLLM
                logits[0, t] += bias
            if sp.repetition_penalty != 1:
                logits = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(torch.tensor([ids]), logits)
            logits = logits[0]
            for t in set(out):
                logits[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def test_repetition_penalty_matches_generate(tiny_checkpoint):
    model_dir = tiny_checkpoint("llama")
    plain = {f"g{i}": hf_greedy(model_dir, p, N) for i, p in enumerate(PROMPTS)}
    want = {}
    for tag, sp in (("p", REPETITION), ("q", REPEAT_MORE)):
        want |= {f"{tag}{i}": hf_generate(model_dir, p, sp.repetition_penalty) for i, p in enumerate(PROMPTS)}
        # the penalty matters on these prompts (or the test could not fail)
        assert sum(want[f"{tag}{i}"] != plain[f"g{i}"] for i in range(len(PROMPTS))) >= 2
    groups = {"g": GREEDY, "p": REPETITION, "q": REPEAT_MORE}  # unpenalised rows in the same batches
    reqs = {f"{tag}{i}": (p, sp) for tag, sp in groups.items() for i, p in enumerate(PROMPTS)}
    engine = make_engine(model_dir, max_num_seqs=15)
    got = collect(engine, reqs)
    assert {rid: tokens for rid, (tokens, _, _) in got.items()} == want | plain
    assert_all_blocks_free(engine)


def test_presence_and_frequency_match_the_formula_by_hand(tiny_checkpoint):
    model_dir = tiny_checkpoint("llama")
    prompts, groups = PROMPTS, {"o": OPENAI, "n": LOOP, "a": ALL}
    want = {f"{tag}{i}": by_hand(model_dir, p, sp) for tag, sp in groups.items() for i, p in enumerate(prompts)}
    plain = [hf_greedy(model_dir, p, N) for p in prompts]
    for tag in groups:  # the penalties matter on these prompts (or the test could not fail)
        assert sum(want[f"{tag}{i}"] != plain[i] for i in range(len(prompts))) >= 2
    distinct = lambda tag: sum(len(set(want[f"{tag}{i}"])) for i in range(len(prompts)))
    assert distinct("o") > sum(len(set(o)) for o in plain) > distinct("n")  # fewer repeats, more repeats
    engine = make_engine(model_dir, max_num_seqs=15)
    reqs = {f"{tag}{i}": (p, sp) for tag, sp in groups.items() for i, p in enumerate(prompts)}
    got = collect(engine, reqs)
    assert {rid: tokens for rid, (tokens, _, _) in got.items()} == want
    # greedy with penalties is deterministic: again, on the same engine (slots reused)
    again = collect(engine, {f"{rid}-again": r for rid, r in reqs.items()})
    assert {rid[:-6]: tokens for rid, (tokens, _, _) in again.items()} == want
    assert_all_blocks_free(engine)


def test_logit_bias_matches_the_formula_by_hand(tiny_checkpoint):
    """OpenAI's logit_bias: -100 on every prompt's greedy first token (with a frequency penalty on
    top) == the by-hand loop, and those first tokens change; +100 on one token makes every output
    token that one; unbiased rows in the same batches stay plain greedy."""
    model_dir = tiny_checkpoint("llama")
    plain = {f"g{i}": hf_greedy(model_dir, p, N) for i, p in enumerate(PROMPTS)}
    firsts = sorted({out[0] for out in plain.values()})
    ban = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, frequency_penalty=0.5,
                         logit_bias=tuple((t, -100.0) for t in firsts))
    force = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logit_bias=((7, 100.0),))
    want = {f"b{i}": by_hand(model_dir, p, ban) for i, p in enumerate(PROMPTS)}
    assert all(want[f"b{i}"][0] not in firsts for i in range(len(PROMPTS)))
    groups = {"b": ban, "f": force, "g": GREEDY}
    reqs = {f"{tag}{i}": (p, sp) for tag, sp in groups.items() for i, p in enumerate(PROMPTS)}
    got = collect(make_engine(model_dir, max_num_seqs=15), reqs)
    want |= plain | {f"f{i}": [7] * N for i in range(len(PROMPTS))}
    assert {rid: tokens for rid, (tokens, _, _) in got.items()} == want


def test_min_tokens_holds_back_stop_tokens_and_eos(tiny_checkpoint):
    """min_tokens=6 with the greedy 2nd token as a stop token: the request cannot stop before its
    6th token (the banned token's place goes to the next best, as a by-hand loop with that token
    at -inf finds), then the stop token ends it as usual; without min_tokens it stops at token 2.
    A migrated request (output_position_offset) counts its earlier tokens toward min_tokens."""
    model_dir = tiny_checkpoint("llama")
    prompt = PROMPTS[0]
    plain = hf_greedy(model_dir, prompt, N)
    stop = plain[1]
    base = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, stop_token_ids=(stop,))
    held = dataclasses.replace(base, min_tokens=6)
    engine = make_engine(model_dir)
    got = collect(engine, {"plain": (prompt, base), "held": (prompt, held)})
    assert got["plain"][0] == plain[:2] and got["plain"][1] == FinishReason.STOP
    tokens, finish = got["held"][0], got["held"][1]
    banned = by_hand(model_dir, prompt, dataclasses.replace(base, stop_token_ids=(), logit_bias=((stop, -1e9),)))
    assert stop not in tokens[:6] and tokens[:6] == banned[:6]
    assert finish == FinishReason.LENGTH or (finish == FinishReason.STOP and tokens[-1] == stop and len(tokens) > 6)
    # migrated after its first token with min_tokens=1: that token counts, so the stop token (the
    # greedy next one) may come at once; had it not counted, the stop token would be held back
    once = dataclasses.replace(base, min_tokens=1)
    got = collect(engine, {"migrated": (prompt + plain[:1], dataclasses.replace(once, max_tokens=N - 1,
                                                                                   output_position_offset=1)),
                           "fresh": (prompt + plain[:1], once)})
    assert got["migrated"][0] == [stop] and got["migrated"][1] == FinishReason.STOP
    assert got["fresh"][0][0] != stop
    assert_all_blocks_free(engine)


def test_preemption_keeps_the_counts(tiny_checkpoint):
    """12 blocks of 4 tokens for five requests: preempted requests recompute their KV and keep
    their penalty counts (nothing counted twice, nothing lost)."""
    model_dir = tiny_checkpoint("llama")
    want = run_all(make_engine(model_dir), PROMPTS, OPENAI)
    engine = make_engine(model_dir, num_kv_blocks=12, blocks_per_segment=4, max_num_seqs=5)
    assert run_all(engine, PROMPTS, OPENAI) == want
    assert engine.stats().num_preemptions > 0
    assert_all_blocks_free(engine)


def test_migrated_request_goes_on_token_identically(tiny_checkpoint):
    """What the router re-issues after a decode worker died: prompt + the k tokens generated so far,
    max_tokens - k, output_position_offset k. The k tokens count as output, not as prompt."""
    model_dir = tiny_checkpoint("llama")
    engine = make_engine(model_dir)
    prompt, k = PROMPTS[0], 5
    whole = run_all(engine, [prompt], ALL, prefix="whole")["whole0"]
    resumed = dataclasses.replace(ALL, max_tokens=N - k, output_position_offset=k)  # as router/request_flow.py
    rest = run_all(engine, [prompt + whole[:k]], resumed, prefix="rest")["rest0"]
    assert whole[:k] + rest == whole
    as_prompt = run_all(engine, [prompt + whole[:k]], dataclasses.replace(resumed, output_position_offset=0),
                        prefix="as-prompt")["as-prompt0"]
    assert as_prompt != rest  # had they counted as prompt, the stream would have changed
    assert_all_blocks_free(engine)


def test_disaggregated_equals_colocated(tiny_checkpoint):
    """Prefill in A samples the first token (repetition sees the prompt; no output yet), B decodes
    on from it: the same tokens as one engine alone."""
    model_dir = tiny_checkpoint("llama")
    colocated = run_all(make_engine(model_dir), PROMPTS, ALL)
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    handles = prefill(a, PROMPTS, ALL)
    out = {}
    for i, p in enumerate(PROMPTS):
        first = transfer(a, b, handles[f"r{i}"], p, ALL)
        assert first.finish_reason is None
        out[f"r{i}"] = list(first.token_ids)
    while b.has_work():
        for d in b.step().deltas:
            out[d.request_id] += d.token_ids
            assert d.finish_reason in (None, FinishReason.LENGTH)
    assert out == colocated
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)


def test_no_penalised_request_allocates_nothing(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"))
    run_all(engine, PROMPTS)
    assert engine.token_counts.num_slots == 0 and not engine.token_counts.slots


def test_a_request_finished_in_flight_is_no_penalty_row_and_passes_its_slot_on():
    """A step may sample a request that finished after the step's forward was queued (a grammar's
    step reads the step in flight there: Engine._launch); its token is dropped, so it takes no
    penalty row, and a new request in the same step may take its slot without sharing it."""
    from workers.engine.penalties import TokenCounts
    from workers.engine.request import Request, RequestStatus

    counts = TokenCounts(vocab_size=16, device=torch.device("cpu"), num_slots=2)
    old = [Request(f"old{i}", [1, 2], OPENAI, block_size=4) for i in range(2)]
    first = counts.rows(old)
    assert first.rows is None and sorted(first.slots.tolist()) == [0, 1] and not counts.free_slots
    old[0].status = RequestStatus.FINISHED  # its last token was read while this step was queued
    slot = counts.slots[old[0]]
    new = Request("new", [3], OPENAI, block_size=4)
    rows = counts.rows([old[0], old[1], new])
    assert rows.rows.tolist() == [1, 2] and rows.slots.tolist() == [counts.slots[old[1]], slot]
    assert old[0] not in counts.slots and counts.slots[new] == slot  # its slot went to the new request
