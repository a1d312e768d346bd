"""Structured output in the engine (xgrammar over a real tiny checkpoint): each kind's output
follows its grammar and ends with "stop" once complete (greedy and seeded); grammar rows share a
batch with free ones, whose outputs stay generate's; prefill on engine A + import into engine B
equals colocated (the prefill side's first token is masked too); a resumed request (migration:
its output so far as the prompt's tail) continues token for token; bad specs and resumed tokens
that break the grammar are InvalidRequestError; a reasoning model's thinking before the answer
stays free (SamplingParams.reasoning: the grammar holds after the end marker). No block is left in
use. Both scheduling modes."""

import dataclasses
import json
import re

import jsonschema
import pytest
import torch

from tests.workers.engine.helpers import GREEDY, assert_all_blocks_free, collect, drain, hf_greedy, make_engine
from tests.workers.engine.test_split import prefill, transfer
from workers.protocol import FinishReason, InvalidRequestError, ReasoningMarkers, SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
          "required": ["n", "tag", "ok"], "additionalProperties": False}
SPECS = {
    "json_schema": StructuredOutput("json_schema", json.dumps(SCHEMA)),
    "json_object": StructuredOutput("json_object"),
    "regex": StructuredOutput("regex", r"[0-9]{3}-[a-c]{2}"),
    "choice": StructuredOutput("choice", json.dumps(["café", "tea", "日本"])),
    "grammar": StructuredOutput("grammar", 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z] | [0-9]'),
}
PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


def constrained(kind: str, **kw) -> SamplingParams:
    return SamplingParams(**({"max_tokens": 120, "temperature": 0} | kw), structured=SPECS[kind])


def assert_follows(engine, kind: str, tokens: list[int], complete: bool = True) -> None:
    """A fresh matcher takes every token (the last being EOS when complete) and the text is what
    the kind promises."""
    m = engine.grammars.matcher(SPECS[kind])
    assert all(m.accept_token(t) for t in tokens), (kind, tokens)
    assert m.is_terminated() == complete
    if not complete:
        return
    assert tokens[-1] in engine.runner.eos_token_ids  # the grammar ends on EOS, not shown as text
    text = engine.tokenizer.decode(tokens[:-1])
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(SPECS["regex"].spec, text), text
    elif kind == "choice":
        assert text in json.loads(SPECS["choice"].spec)
    else:
        assert re.fullmatch(r"\([a-z0-9](,[a-z0-9])*\)", text), text


def test_each_kind_follows_its_grammar_and_a_free_request_in_the_batch_is_untouched(model_dir):
    engine = make_engine(model_dir)
    requests = {f"{kind}-greedy": (PROMPT, constrained(kind)) for kind in SPECS}
    requests |= {f"{kind}-seeded": (PROMPT[::-1], constrained(kind, temperature=1.0, seed=11)) for kind in SPECS}
    requests["free"] = (PROMPT, GREEDY)
    got = collect(engine, requests)
    for rid, (tokens, finish, error) in got.items():
        if rid == "free":
            assert (tokens, finish, error) == (hf_greedy(model_dir, PROMPT, GREEDY.max_tokens), FinishReason.LENGTH,
                                               None)
            continue
        kind = rid.split("-")[0]
        # a random model writes one endless string into an open JSON object: all it can be held to
        # there is a valid prefix; every other grammar here bounds the output
        assert error is None and finish == (FinishReason.LENGTH if kind == "json_object" else FinishReason.STOP), rid
        assert_follows(engine, kind, tokens, complete=finish == FinishReason.STOP)
    # the grammar changes what the model says: its free greedy output is no JSON
    assert got["json_schema-greedy"][0] != hf_greedy(model_dir, PROMPT, len(got["json_schema-greedy"][0]))
    assert_all_blocks_free(engine)


def test_max_tokens_cuts_a_constrained_output_short(model_dir):
    """Out of tokens before the grammar is complete: "length", and what came out is a valid prefix."""
    engine = make_engine(model_dir)
    (tokens, finish, error), = collect(engine, {"r": (PROMPT, constrained("json_schema", max_tokens=3))}).values()
    assert (len(tokens), finish, error) == (3, FinishReason.LENGTH, None)
    assert_follows(engine, "json_schema", tokens, complete=False)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("kind", ["json_schema", "regex"])
def test_prefill_on_a_import_on_b_equals_colocated(model_dir, kind):
    sampling = constrained(kind, temperature=0.8, seed=3)
    want = collect(make_engine(model_dir), {"r0": (PROMPT, sampling)})["r0"][0]
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    handle = prefill(a, [PROMPT], sampling)["r0"]
    first = transfer(a, b, handle, PROMPT, sampling)
    out = {"r0": list(first.token_ids)}
    drain(b, out)
    assert out["r0"] == want
    assert_follows(b, kind, want)
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)


def test_a_resumed_request_continues_its_grammar(model_dir):
    """A migration resumes with the output so far as the prompt's tail (output_position_offset):
    the matcher replays it, and the rest is what the uninterrupted request made."""
    engine = make_engine(model_dir)
    sampling = constrained("json_schema", temperature=0.7, seed=5)
    whole = collect(engine, {"r": (PROMPT, sampling)})["r"][0]
    k = 4
    resumed = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - k, output_position_offset=k)
    rest = collect(engine, {"again": (PROMPT + whole[:k], resumed)})["again"]
    assert rest == (whole[k:], FinishReason.STOP, None)
    # an output that breaks the grammar cannot be resumed under it
    bad = [engine.tokenizer.encode("x")[0]]
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", PROMPT + bad, dataclasses.replace(sampling, output_position_offset=1))
    assert e.value.param == "response_format" and "do not follow" in e.value.message
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("spec, says", [
    (StructuredOutput("json_schema", '{"type": "nope"}'), 'Unsupported type "nope"'),
    (StructuredOutput("regex", "[0-9"), "Unclosed '['"),
    (StructuredOutput("grammar", 'start ::= "a"'), 'root rule with name "root" is not found'),
    (StructuredOutput("regex", ""), "regex for structured output is empty"),
    (StructuredOutput("yaml", "a: 1"), "kind must be one of"),
])
def test_bad_specs_are_invalid_requests(model_dir, spec, says):
    engine = make_engine(model_dir)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", PROMPT, SamplingParams(structured=spec))
    assert says in e.value.message and e.value.param == "response_format"
    assert not engine.requests
    with pytest.raises(InvalidRequestError, match="min_tokens cannot be combined"):
        engine.add_request("bad", PROMPT, SamplingParams(structured=SPECS["regex"], min_tokens=2))
    assert_all_blocks_free(engine)


def test_json_strings_with_a_length_hold_no_raw_control_characters(model_dir):
    """xgrammar 0.2.9 lets a string with minLength/maxLength hold raw control characters (not
    JSON: a random model wrote a \\x0b there and json.loads refused the answer); pdserve's grammar
    takes JSON's own characters there, and the engine's output parses."""
    engine = make_engine(model_dir)
    spec = StructuredOutput("json_schema", json.dumps({"type": "string", "minLength": 1, "maxLength": 12}))
    m = engine.grammars.matcher(spec)
    assert m.accept_string('"') and not m.accept_string("\x0b") and not m.accept_string("\t")
    assert m.accept_string("ok é") and m.accept_string('"')
    sampling = SamplingParams(max_tokens=40, temperature=1.0, seed=0, structured=spec)
    got = collect(engine, {f"r{i}": ([5 + i, 6, 7], dataclasses.replace(sampling, seed=i)) for i in range(8)})
    for tokens, finish, _ in got.values():
        assert finish == FinishReason.STOP
        assert 1 <= len(json.loads(engine.tokenizer.decode(tokens[:-1]))) <= 12
    assert_all_blocks_free(engine)


def test_allowed_token_ids_alone_and_with_a_grammar(model_dir):
    """vLLM's allowed_token_ids: only those tokens come out, seeded or greedy, beside free requests
    (which stay generate's), and together with a grammar both hold; out of the vocabulary: a 400."""
    engine = make_engine(model_dir)
    allowed = tuple(range(40, 60)) + (300, 383)
    chars = engine.tokenizer.convert_tokens_to_ids(list("0123456789-abc")) + list(engine.runner.eos_token_ids)
    requests = {
        "greedy": (PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, allowed_token_ids=allowed)),
        "seeded": (PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=4, ignore_eos=True,
                                          allowed_token_ids=allowed)),
        "free": (PROMPT, GREEDY),
        "both": (PROMPT, constrained("regex", allowed_token_ids=tuple(chars))),
        "none left": (PROMPT, constrained("regex", allowed_token_ids=tuple(chars[:10])))}  # no "-" after 3 digits
    got = collect(engine, requests)
    for rid in ("greedy", "seeded"):
        assert got[rid][1] == FinishReason.LENGTH and set(got[rid][0]) <= set(allowed), got[rid]
    assert got["free"][0] == hf_greedy(model_dir, PROMPT, GREEDY.max_tokens)
    assert got["both"][1] == FinishReason.STOP and set(got["both"][0]) <= set(chars)  # one character a token
    assert_follows(engine, "regex", got["both"][0])
    assert got["none left"][1:] == (FinishReason.ERROR, "its grammar and allowed_token_ids leave no token to sample")
    assert len(got["none left"][0]) == 3
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        engine.add_request("bad", PROMPT, SamplingParams(allowed_token_ids=(5, 10_000)))
    assert_all_blocks_free(engine)


def test_grammar_steps_stay_in_flight_and_equal_the_synchronous_engine(model_dir):
    """Async scheduling keeps a constrained request's steps in flight: the step in flight is read
    back after the next forward pass is queued and before that step's sampling (whose mask needs
    its token). Tokens equal the synchronous engine's, with more requests than slots (new ones
    start as others finish, while a step that computes the finished ones is queued), requests
    finishing at different steps, penalties (the slot of a finished request passes on untouched)
    and a stop string."""
    requests = {f"{kind}-{seed}": (PROMPT[seed:], constrained(kind, temperature=1.0, seed=seed, max_tokens=40,
                                                            presence_penalty=0.5 * seed))
                for kind in SPECS for seed in (0, 1)}
    requests["stop"] = (PROMPT, constrained("grammar", stop=[","]))
    requests["free"] = (PROMPT[::-1], SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3))
    got, overlapped = {}, {}
    for mode in (False, True):
        engine = make_engine(model_dir, async_scheduling=mode, max_num_seqs=4)
        got[mode] = collect(engine, requests)
        overlapped[mode] = engine.num_overlapped_steps
        assert_all_blocks_free(engine)
    assert got[True] == got[False]
    assert got[True]["stop"][1] == FinishReason.STOP and len({tuple(t) for t, *_ in got[True].values()}) > 8
    assert overlapped[False] == 0 and overlapped[True] > 20, overlapped



# -- a reasoning model's thinking before a constrained answer (SamplingParams.reasoning) -------------
S, E = 300, 301  # stand-ins for <think> / </think>: two tokens of the tiny vocabulary


def thinking(kind: str, opened: bool, **kw) -> SamplingParams:
    return constrained(kind, reasoning=ReasoningMarkers(S, E, opened=opened), **kw)


def split_at_end(tokens: list[int]) -> tuple[list[int], list[int]]:
    i = tokens.index(E)
    return tokens[:i], tokens[i + 1:]


def test_the_reasoning_stays_free_and_the_grammar_holds_after_it(model_dir):
    """Prompt opened the reasoning: free tokens up to the end marker (the tiny model is pushed
    towards it by a logit_bias), then the grammar holds to EOS; a resumed request (inside the
    reasoning, and after it) and prefill on A + import into B continue token for token."""
    engine = make_engine(model_dir)
    sampling = thinking("regex", opened=True, temperature=1.0, seed=2, logit_bias=((E, 4.0),))
    (tokens, finish, error), = collect(engine, {"r": (PROMPT, sampling)}).values()
    thought, answer = split_at_end(tokens)
    assert (finish, error) == (FinishReason.STOP, None) and len(thought) >= 2
    m = engine.grammars.matcher(SPECS["regex"])
    assert not all(m.accept_token(t) for t in thought)  # the reasoning was not held to the grammar
    assert_follows(engine, "regex", answer)
    for k in (1, len(thought) + 2):  # resumed inside the reasoning, then inside the answer
        resumed = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - k, output_position_offset=k)
        assert collect(engine, {f"again{k}": (PROMPT + tokens[:k], resumed)})[f"again{k}"] == (tokens[k:], finish,
                                                                                                 None)
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    handle = prefill(a, [PROMPT], sampling)["r0"]
    out = {"r0": list(transfer(a, b, handle, PROMPT, sampling).token_ids)}
    drain(b, out)
    assert out["r0"] == tokens
    for e in (engine, a, b):
        assert_all_blocks_free(e)


def test_the_first_token_may_open_the_reasoning(model_dir):
    """Prompt did not open it: the first token is the start marker or what the grammar allows.
    Pushed towards both markers, the model opens, thinks, closes and answers under the grammar;
    left alone, it answers under the grammar from its first token."""
    engine = make_engine(model_dir)
    got = collect(engine, {
        "opens": (PROMPT, thinking("json_schema", opened=False, temperature=1.0, seed=1,
                                   logit_bias=((S, 8.0), (E, 8.0)))),
        "answers": (PROMPT, thinking("regex", opened=False))})
    tokens, finish, _ = got["opens"]
    thought, answer = split_at_end(tokens)
    assert thought[0] == S and finish == FinishReason.STOP
    assert_follows(engine, "json_schema", answer)
    tokens, finish, _ = got["answers"]
    assert S not in tokens[:1] and finish == FinishReason.STOP
    assert_follows(engine, "regex", tokens)
    assert_all_blocks_free(engine)


def test_grammar_state_masks_and_phases(model_dir):
    """GrammarState's rows for fill_bitmasks: the grammar's tokens plus the start marker first
    (maybe), every token while thinking, the grammar's after the end marker."""
    from workers.engine.structured_output import GrammarState, fill_bitmasks

    engine = make_engine(model_dir)
    vocab = engine.vocab_size
    grammar_only = fill_bitmasks([(GrammarState(engine.grammars.matcher(SPECS["regex"])), None)], vocab)

    def allowed(mask) -> set[int]:
        bits = ((mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
        return set(torch.nonzero(bits[:vocab]).flatten().tolist())

    state = GrammarState(engine.grammars.matcher(SPECS["regex"]), ReasoningMarkers(S, E, opened=False))
    assert allowed(fill_bitmasks([(state, None)], vocab)) == allowed(grammar_only) | {S}
    assert state.accept_token(S) and state.phase == "thinking" and not state.is_terminated()
    assert allowed(fill_bitmasks([(state, None)], vocab)) == set(range(vocab))
    assert state.accept_token(S) and state.accept_token(E) and state.phase is None
    assert allowed(fill_bitmasks([(state, None)], vocab)) == allowed(grammar_only)
    digit = engine.tokenizer.convert_tokens_to_ids("7")
    straight = GrammarState(engine.grammars.matcher(SPECS["regex"]), ReasoningMarkers(S, E, opened=False))
    assert straight.accept_token(digit) and straight.phase is None and not straight.accept_token(S)


def test_constrained_requests_survive_preemption_in_both_modes(model_dir):
    """12 blocks of 4 tokens for five constrained requests (greedy and seeded, one thinking
    first): preempted requests recompute their KV with their grammar state kept; async ==
    sync == unpressured, and every output follows its grammar."""
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(5)]
    requests = {f"r{i}": (p, constrained("regex" if i % 2 else "choice", max_tokens=30,
                                         **({"temperature": 1.0, "seed": i} if i % 3 else {})))
                for i, p in enumerate(prompts)}
    requests["thinking"] = (PROMPT, thinking("regex", opened=True, temperature=1.0, seed=2, logit_bias=((E, 4.0),)))
    want = collect(make_engine(model_dir, async_scheduling=False), requests)
    for mode in (False, True):
        engine = make_engine(model_dir, async_scheduling=mode, num_kv_blocks=12, blocks_per_segment=4, max_num_seqs=5)
        assert collect(engine, requests) == want
        assert engine.stats().num_preemptions > 0
        assert_all_blocks_free(engine)
    for rid, (tokens, finish, error) in want.items():
        kind = "choice" if rid in ("r0", "r2", "r4") else "regex"
        assert error is None and finish == FinishReason.STOP, rid
        assert_follows(engine, kind, split_at_end(tokens)[1] if rid == "thinking" else tokens)
