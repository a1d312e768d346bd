"""engine.fused_decode's kernels compile for Hopper (sm_90) on a machine without a GPU: Triton's
compiler runs to PTX and a cubin here, as it would at a worker's graph capture, so a kernel that
only the interpreter ever ran (triton_interpret_cases.py) cannot reach a GPU broken; and under PDL
the code holds the grid dependency instructions (griddepcontrol)."""

import pytest
import triton  # a test dependency (pyproject's [test] pins it): missing, this module fails, not skips
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from workers.engine import fused_decode_kernels as fk
from workers.engine import triton_decode_kernels as tk

pytestmark = pytest.mark.parametrize("scheduling", ["once"])  # no engine: one run, not one per mode

HOPPER = GPUTarget("cuda", 90, 32)
BF16_PTRS = ("x_ptr", "w_ptr", "b_ptr", "w2_ptr", "b2_ptr", "y_ptr", "res_ptr", "norm_ptr", "cos_ptr", "sin_ptr",
             "qkv_ptr", "qn_ptr", "kn_ptr")
TYPES = {**{n: "*bf16" for n in BF16_PTRS}, "pos_ptr": "*i64", "eps": "fp32"}
GEMV = dict(M=1, K=2048, BLOCK_N=4, BLOCK_K=2048, NORM=True, GLU=False, ROPE=False, HALF=1, RESIDUAL=False,
            HAS_BIAS=False, PDL=True)
CASES = {  # name -> (kernel, constexprs): each projection of a layer as fused_decode.py launches it
    "gemv_qkv_rope_bias": (fk.fused_gemv_kernel, dict(GEMV, ROPE=True, HALF=32, HAS_BIAS=True)),
    "gemv_gate_up": (fk.fused_gemv_kernel, dict(GEMV, GLU=True)),
    "gemv_down_residual": (fk.fused_gemv_kernel, dict(GEMV, K=8192, BLOCK_N=2, BLOCK_K=8192, NORM=False,
                                                      RESIDUAL=True)),
    "gemv_two_chunks_two_rows": (fk.fused_gemv_kernel, dict(GEMV, M=2, K=14336, BLOCK_N=2, BLOCK_K=8192,
                                                            RESIDUAL=True, PDL=False)),
    "gemv_o_residual": (fk.fused_gemv_kernel, dict(GEMV, NORM=False, RESIDUAL=True)),
    "rope_head_norm": (fk.rope_kernel, dict(HALF=64, HEAD_NORM=True, PDL=True)),
}


def _compile(fn, constexprs):
    signature = {name: "constexpr" if name in constexprs else TYPES.get(name, "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER,
                          options={"num_warps": 4})


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_decode_kernels_compile_for_hopper(case):
    fn, constexprs = CASES[case]
    ptx = _compile(fn, constexprs).asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == constexprs["PDL"], case
    assert ("griddepcontrol.launch_dependents" in ptx) == constexprs["PDL"], case
    if fn is fk.fused_gemv_kernel and constexprs["PDL"]:  # W's first chunk is requested before the wait
        assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), case


@pytest.mark.parametrize("preload,sinks", [(False, False), (True, False), (True, True)])
def test_split_decode_attention_compiles_under_pdl(preload, sinks):
    """The backend's split decode kernel as the fused step launches it (PDL=True), with the L2
    prefetch of its first chunk (decode_prefetch); with decode_preload its first tile's cached K/V
    rows (128 keys x 64 dims, K and V) are loaded before the wait (the step's metadata always is).
    With gpt-oss's attention sinks too (read where rows are normalised: after the wait)."""
    consts = dict(G=4, HKV=8, D=64, BLOCK_D=64, BS=16, BLOCK_M=16, BLOCK_N=128, CHUNK_KEYS=256, BLOCK_G=4,
                  USE_WINDOW=False, WRITE_KV=True, COMBINE_LAST=True, ALL_DECODE=True, INTERPRET=False,
                  DOT_PRECISION="tf32", PDL=True, PREFETCH_LINES=1, PRELOAD=preload, HAS_SINKS=sinks)
    types = {n: "*bf16" for n in ("Q", "K", "V", "O", "anchor", "sinks")}
    types.update({n: "*fp32" for n in ("part_m", "part_l", "part_acc")}, scale="fp32")
    types.update({n: "*i32" for n in ("dec_seq", "seq_q_start", "seq_ctx_len", "seq_blk_start", "n_real", "arrivals")})
    types.update(block_off="*i64", slot_off="*i64", layer_off="i64", kv_off="i64")
    fn = tk.paged_decode_kernel
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=HOPPER,
                         options={"num_warps": 4}).asm["ptx"]
    assert "griddepcontrol.wait" in ptx
    assert "prefetch.global.L2" in ptx  # engine's decode_prefetch: the first chunk's cached K/V asked for first
    before = ptx[:ptx.index("griddepcontrol.wait")].count("ld.global")
    # metadata (context length, block start) always; with preload the tile's block ids and K/V
    # rows too (128 keys x 64 bf16 = 16 KiB each: ~128 vector loads over 128 threads)
    assert before >= 64 if preload else 1 <= before <= 8, before


@pytest.mark.parametrize("kernel", ["general", "combine"])
def test_attention_sinks_compile_for_hopper(kernel):
    """gpt-oss's attention sinks in the general attention kernel (prefill chunks) and in the split
    decode's merge as its own launch, compiled for sm_90 (the interpreter runs them on the CPU;
    the sink is read where rows are normalised)."""
    from workers.engine import triton_kernels as gk

    if kernel == "general":
        fn = gk.paged_attention_kernel
        consts = dict(G=8, HKV=8, D=64, BLOCK_D=64, BS=16, BLOCK_Q=16, BLOCK_M=128, BLOCK_N=64, USE_WINDOW=True,
                      INTERPRET=False, DOT_PRECISION="tf32", SPLIT_DIAGONAL=True, SOFTCAP=0.0, HAS_SINKS=True)
        types = {n: "*bf16" for n in ("Q", "O", "anchor", "sinks")}
        types.update(block_off="*i64", layer_off="i64", kv_off="i64", scale="fp32")
    else:
        fn = tk.decode_combine_kernel
        consts = dict(G=8, HKV=8, D=64, CHUNK_KEYS=256, BLOCK_G=8, BLOCK_D=64, USE_WINDOW=False, ALL_DECODE=True,
                      INTERPRET=False, HAS_SINKS=True)
        types = {n: "*fp32" for n in ("part_m", "part_l", "part_acc")}
        types.update(O="*bf16", sinks="*bf16")
    for name in fn.arg_names:
        if name not in consts and name not in types:
            types[name] = "*i32" if name in ("qb_seq", "qb_start", "seq_q_start", "seq_q_len", "seq_ctx_len",
                                             "seq_blk_start", "dec_seq") else "i32"
    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    loads = {}
    for sinks in (False, True):
        ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=dict(consts, HAS_SINKS=sinks)),
                             target=HOPPER, options={"num_warps": 4}).asm["ptx"]
        loads[sinks] = ptx.count("ld.global")
    assert loads[True] > loads[False], loads  # the sinks are read (HAS_SINKS off: the kernel as before)
