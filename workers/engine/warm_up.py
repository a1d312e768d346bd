"""Real requests an engine runs while it starts, before any user's (engine.warm_up).

The model runner's warm-up feeds padding only, which launches no prefill attention kernel, so on a
GPU the first real prefill paid the Triton compile inside serving (on a decode worker that prefills
locally, with its running decodes stalled behind it; on 2x H200 one such compile took 2.25 s under
load). ``basic``: one prompt of two blocks and a token, two tokens out. ``full`` (auto = on CUDA):
then two prompts filling the step's token budget together (one a whole number of blocks, one not),
and a third arriving while they decode (a mixed step): shapes that specialise kernels anew.
Leaves no trace: nothing cached or published, no counter moved, every block free.
"""

from __future__ import annotations

from workers.protocol import SamplingParams


def warm_up(engine) -> int:
    """Run engine.config.warm_up's requests on ``engine`` (an Engine); returns the steps taken."""
    mode = engine.config.warm_up
    if mode == "auto":
        mode = "full" if engine.runner.device.type == "cuda" else "basic"
    capacity = min(engine.max_model_len - 4, engine.kv_cache.num_blocks * engine.block_size // 4)
    n = min(2 * engine.block_size + 1, capacity)
    if n < 1:
        return 0
    caching, engine.pool.enable_caching = engine.pool.enable_caching, False
    sch = engine.scheduler
    counts = (sch.num_prompt_tokens_queried, sch.num_prompt_tokens_hit, engine.num_overlapped_steps,
              sch.num_preemptions, engine.num_dropped_tokens)
    greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    vocab = engine.vocab_size

    def prompt(length: int, first: int) -> list[int]:
        return [(first + i) % (vocab - 1) + 1 for i in range(length)]

    steps = 0
    try:
        engine.add_request("__pdserve_warm_up__", prompt(n, 0), greedy)
        steps += _until_idle(engine)
        budget = min(engine.config.max_num_batched_tokens, capacity)
        if mode == "full" and budget >= 2 * engine.block_size + 1:
            whole = max(engine.block_size, budget // 2 // engine.block_size * engine.block_size)
            more = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
            engine.add_request("__pdserve_warm_up_a__", prompt(whole, 1), more)
            engine.add_request("__pdserve_warm_up_b__", prompt(budget - whole - 1, 2), more)
            engine.step()  # both prompts (or their first chunks)
            steps += 1
            engine.add_request("__pdserve_warm_up_c__", prompt(budget - 2, 3), greedy)  # beside their decodes
            steps += _until_idle(engine)
    finally:
        engine.pool.enable_caching = caching
        (sch.num_prompt_tokens_queried, sch.num_prompt_tokens_hit, engine.num_overlapped_steps,
         sch.num_preemptions, engine.num_dropped_tokens) = counts
    return steps


def _until_idle(engine) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return steps
