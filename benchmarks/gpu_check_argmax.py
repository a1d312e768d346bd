"""benchmarks/gpu_check.py's argmax check: the decode graphs' greedy argmax kernel
(workers/engine/argmax.py) against torch.argmax on the GPU. CUDA only.
"""

from __future__ import annotations

import torch


def check_argmax() -> int:
    """The decode graphs' argmax kernel == torch.argmax on the GPU: Llama-3's vocabulary, 1-32 rows
    (fp32 and bf16), ties across and inside chunks, -inf rows, NaNs. Cases checked."""
    from workers.engine.argmax import greedy_argmax

    gen = torch.Generator(device="cuda").manual_seed(5)
    cases = 0
    for rows in (1, 8, 32):
        x = torch.randn(rows, 128256, device="cuda", generator=gen)
        if rows > 1:
            x[0, 17] = x[0, 128000] = 99.0
            x[-1] = float("-inf")
        if rows > 4:
            x[1, 4100] = float("nan")
            x[2] = x[2].round()
        for t in (x, x.to(torch.bfloat16)):
            got, want = greedy_argmax(t), t.argmax(dim=-1)
            if not torch.equal(got, want):
                raise AssertionError(f"greedy_argmax differs from torch.argmax ({rows} rows, {t.dtype}): "
                                     f"{got.tolist()} vs {want.tolist()}")
            cases += 1
    return cases
