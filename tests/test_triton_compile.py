"""Ahead-of-time compiles of every family's Triton kernels to sm_90 cubins, at every configuration the wrappers
pick (no GPU needed; a subprocess without the interpreter). They catch what the interpreter lets through:
atomics and spin-waits (rsparse), data-dependent ancestor walks and dynamic loops (speculative), the float32
and tensor-core dots at every block shape, bfloat16 code paths the CPU tests cannot run."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

PRELUDE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile(fn, signature, const, **options):
    signature = {**signature, **dict.fromkeys(const, "constexpr")}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, **options})

ints = lambda *names: dict.fromkeys(names, "i32")
"""

SCRIPTS = {
    # every packed format alone and PTQ1.61's two mixed layouts, on the GEMV (M 1, 8) and GEMM (M 256) paths
    "lowbit": """
from efficient_ops.triton_kernels.lowbit import FMT_CODES, _config, _lowbit_kernel

names = ["x_ptr", "bias_ptr", "out_ptr", "perm_ptr", "qa_ptr", "sa_ptr", "za_ptr", "qb_ptr", "sb_ptr", "zb_ptr"]
ptrs = dict(zip(names, ["*bf16", "*bf16", "*bf16", "*i32", "*i32", "*bf16", "*bf16", "*i32", "*bf16", "*bf16"]))
for fmt_a, fmt_b in [("w4", None), ("w3", None), ("w2", None), ("ternary", None), ("w1", None), ("w4", "w1"),
                     ("w4", "ternary")]:
    segments = [(fmt_a, 1280, 128)] + ([(fmt_b, 1280, 1280)] if fmt_b else [])
    for m in (1, 8, 256):
        cfg = _config(m, 4096, segments, torch.device("cpu"))
        const = dict(FMT_A=FMT_CODES[fmt_a], GROUP_A=128, FMT_B=FMT_CODES[fmt_b or fmt_a], GROUP_B=1280,
                     HAS_B=fmt_b is not None, HAS_BIAS=True, DOT_PRECISION="tf32", GROUP_M=8,
                     **{k: v for k, v in cfg.items() if k.isupper()})
        compile(_lowbit_kernel, {**ptrs, **ints("M", "N", "K_total", "K_a", "K_b", "tiles_a", "tiles_b", "stride_xm",
                                                "stride_om", "stride_qa", "stride_sa", "stride_qb", "stride_sb",
                                                "k_tiles_per_split")},
                const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
""",
    "rsparse": """
from efficient_ops.triton_kernels.rsparse import BLOCK_M, _config, _rsparse_kernel

ptrs = ["x_ptr", "wt_ptr", "c_ptr", "v_ptr", "us_ptr", "bias_ptr", "out_ptr", "ws_ptr"]
for dtype in ("fp16", "bf16"):
    types = ["*" + dtype, "*" + dtype, "*fp32", "*" + dtype, "*" + dtype, "*" + dtype, "*" + dtype, "*fp32"]
    for has_bias in (False, True):
        cfg = _config(1, 4096, 4096, 512, torch.device("cpu"))
        const = dict(HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, **{k: v for k, v in cfg.items() if k.isupper()})
        sizes = ints("M", "K", "N", "R", "stride_xm", "stride_om", *(k for k in cfg if not k.isupper()))
        compile(_rsparse_kernel, {**dict(zip(ptrs, types)), "threshold": "fp32", **sizes}, const)
""",
    "sparse_attention": """
from efficient_ops.triton_kernels.sparse_attention import _block_sparse_attention, _paged_decode_split, num_warps

for dtype in ("fp16", "bf16"):
    for d in (64, 128, 256):
        for bm, bn in ((16, 16), (64, 64), (128, 128), (128, 32)):
            compile(_block_sparse_attention,
                    {"q_ptr": "*" + dtype, "k_ptr": "*" + dtype, "v_ptr": "*" + dtype, "out_ptr": "*" + dtype,
                     "lse_ptr": "*fp32", "num_ptr": "*i32", "idx_ptr": "*i32",
                     **ints("sqb", "sqh", "sqs", "skb", "skh", "sks", "svb", "svh", "svs", "sob", "soh", "sos", "snb",
                            "snh", "sib", "sih", "sim", "n_heads", "G", "Sq", "Skv", "Nk"), "qk_scale": "fp32"},
                    dict(CAUSAL=True, D=d, BLOCK_M=bm, BLOCK_N=bn), num_warps=num_warps(bm, bn, d))
        for page in ((16, 64) if d < 256 else ()):
            compile(_paged_decode_split,
                    {"q_ptr": "*" + dtype, "k_ptr": "*" + dtype, "v_ptr": "*" + dtype, "seq_ptr": "*i64",
                     "pages_ptr": "*i32", "o_part": "*fp32", "lse_part": "*fp32",
                     **ints("sqb", "sqh", "skb", "skh", "sks", "svb", "svh", "svs", "n_kv_heads", "G", "S_max",
                            "n_sel", "per_split", "n_splits"), "qk_scale": "fp32"},
                    dict(D=d, PAGE=page, BLOCK_G=16))
""",
    "speculative": """
from efficient_ops.triton_kernels.attention import _merge_splits
from efficient_ops.triton_kernels.speculative import (_compact_kv, _tree_attention_split, _verify_sampling_kernel,
                                                      blocks)

for dtype in ("fp16", "bf16"):
    for d in (64, 128):
        for t in (1, 64, 256):
            block_m, block_n, block_t = blocks(4, t)
            compile(_tree_attention_split,
                    {"q_ptr": "*" + dtype, "k_ptr": "*" + dtype, "v_ptr": "*" + dtype, "prefix_ptr": "*i64",
                     "parents_ptr": "*i64", "o_part": "*fp32", "lse_part": "*fp32",
                     **ints("sqb", "sqh", "sqt", "skb", "skh", "sks", "svb", "svh", "svs", "parents_stride", "T", "G",
                            "n_kv_heads", "S_max", "chunk", "n_splits"), "qk_scale": "fp32"},
                    dict(D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=block_t))
        compile(_merge_splits, {"o_part": "*fp32", "lse_part": "*fp32", "out_ptr": "*" + dtype,
                                **ints("sob", "soh", "sot", "n_heads", "T", "n_parts")}, dict(D=d, BLOCK_S=8))
        compile(_compact_kv, {"k_ptr": "*" + dtype, "v_ptr": "*" + dtype, "prefix_ptr": "*i64", "accepted_ptr": "*i64",
                              "accept_len_ptr": "*i64",
                              **ints("n_batch", "n_kv_heads", "S_max", "P", "skl", "skb", "skh", "sks", "svl", "svb",
                                     "svh", "svs", "acc_stride")}, dict(D=d, BLOCK_D=d))
    for mode in (0, 1, 2):
        compile(_verify_sampling_kernel,
                {"tokens_ptr": "*i64", "children_ptr": "*i64", "target_ptr": "*" + dtype, "draft_ptr": "*fp32",
                 "u_ptr": "*fp64", "u_final_ptr": "*fp64", "res_p_ptr": "*fp64", "res_q_ptr": "*fp64",
                 "accept_len_ptr": "*i64", "accepted_ptr": "*i64", "next_ptr": "*i64",
                 **ints("T", "C", "V", "path_len", "s_tb", "s_tt", "s_db", "s_dt")}, dict(MODE=mode, BLOCK_V=4096))
""",
}


@pytest.mark.parametrize("family", sorted(SCRIPTS))
def test_triton_kernels_compile_for_hopper(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = PRELUDE + SCRIPTS[family] + '\nprint("compiled")\n'
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
