"""The CUDA kernels of the sparse-attention family (block-sparse prefill attention, paged sparse decode) without a
GPU: their block programs emulated on the CPU under AddressSanitizer, and the extension's host-side argument
checks."""

import pytest
import torch

from efficient_ops import backends

from conftest import build_emulation, extension_has, run_emulation


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """The emulation binary (built once per module)."""
    return build_emulation(tmp_path_factory, "sparse_attention", harness="sparse_attention_emulation")


def test_sparse_attention_block_programs_emulated_under_asan(emulation):
    stdout = run_emulation(emulation)
    assert "host checks ok" in stdout
    assert ("all 12 block-sparse and 20 decode kernel variants, all 16 block-size pairs and both load paths ran"
            in stdout)
    assert "emulation: 80 cases ok, 0 failed" in stdout


needs_block_sparse = pytest.mark.skipif(not extension_has("block_sparse_attention"),
                                        reason="efficient_ops._C is not built with block_sparse_attention")
needs_decode = pytest.mark.skipif(not extension_has("paged_sparse_decode"),
                                  reason="efficient_ops._C is not built with paged_sparse_decode")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU launch error")

# Pointers only need to pass the alignment checks: without a GPU (or with the checks failing) nothing is
# dereferenced. B=2, Hq=8, Hkv=2, Sq=100, Skv=300, D=128, block 64 x 32: Mq=2, Nk=10.
BSA = dict(q_ptr=4096, k_ptr=8192, v_ptr=12288, out_ptr=16384, lse_ptr=20480, kv_num_blocks_ptr=24576,
           kv_indices_ptr=28672, B=2, Hq=8, Hkv=2, Sq=100, Skv=300, D=128, block_m=64, block_n=32, Mq=2, Nk=10,
           num_blocks_strides=[16, 2], indices_strides=[160, 20, 10], causal=True,
           q_strides=[8 * 100 * 128, 100 * 128, 128], k_strides=[2 * 300 * 128, 300 * 128, 128],
           v_strides=(2 * 300 * 128, 300 * 128, 128), out_strides=[8 * 100 * 128, 100 * 128, 128],
           scale=0.088, dtype="bfloat16", stream=0)


@needs_block_sparse
@pytest.mark.parametrize("change, match", [
    (dict(dtype="float32"), "dtype must be 'float16' or 'bfloat16'"),
    (dict(B=0), "B must be"),
    (dict(Hq=0), "Hq must be"),
    (dict(Hkv=3), "Hkv must"),
    (dict(Hkv=0), "Hkv must"),
    (dict(Sq=-1), "Sq must be"),
    (dict(Skv=-1), "Skv must be"),
    (dict(D=96), "D must be 64 or 128"),
    (dict(block_m=48), "block_m must be"),
    (dict(block_n=256), "block_n must be"),
    (dict(Mq=3), "Mq must be ceil"),
    (dict(Nk=9), "Nk must be ceil"),
    (dict(num_blocks_strides=[16]), "num_blocks_strides must have 2 entries"),
    (dict(num_blocks_strides=[16, -2]), "num_blocks_strides must be"),
    (dict(indices_strides=[160, 20]), "indices_strides must have 3 entries"),
    (dict(indices_strides=[160, 20, 2 ** 41]), "indices_strides must be"),
    (dict(q_strides=[1, 2, 3, 4]), "q_strides must have 3 entries"),
    (dict(k_strides=[-1, 128, 128]), "k_strides must be"),
    (dict(v_strides=[0, 2 ** 40, 0]), "v_strides must be"),
    (dict(out_strides=[1, 1]), "out_strides must have 3 entries"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(q_ptr=0), "q, k, v and out must not be null"),
    (dict(out_ptr=0), "q, k, v and out must not be null"),
    (dict(kv_num_blocks_ptr=0), "kv_num_blocks must not be null"),
    (dict(kv_indices_ptr=0), "kv_indices must not be null"),
    (dict(k_ptr=8193), "2-byte aligned"),
    (dict(lse_ptr=20482), "lse must be 4-byte aligned"),
    (dict(kv_indices_ptr=28674), "kv_num_blocks and kv_indices must be 4-byte aligned"),
    (dict(B=2 ** 20, Hq=2 ** 10, Hkv=1, Sq=2 ** 20, Mq=2 ** 14), "too large"),
])
def test_block_sparse_extension_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match="^block_sparse_attention: .*" + match):
        backends.extension().block_sparse_attention(**{**BSA, **change})


@needs_block_sparse
def test_block_sparse_sq_zero_launches_nothing():
    backends.extension().block_sparse_attention(**{**BSA, "Sq": 0, "Mq": 0})


@needs_block_sparse
@no_gpu
@pytest.mark.parametrize("change", [
    dict(),
    dict(lse_ptr=0, causal=False, dtype="float16"),
    dict(D=64, block_m=16, block_n=128, Mq=7, Nk=3, indices_strides=[0, 0, 3], num_blocks_strides=[0, 0]),
    dict(Skv=0, Nk=0, kv_indices_ptr=0),                # no key anywhere: kv_indices is never read
    dict(q_ptr=4098, out_strides=[8 * 100 * 130, 100 * 130, 130]),  # the scalar load / store paths
])
def test_block_sparse_extension_accepts_and_reaches_the_launch(change):
    with pytest.raises(RuntimeError, match="block_sparse_attention: CUDA launch failed"):
        backends.extension().block_sparse_attention(**{**BSA, **change})


# B=2, Hq=32, Hkv=8, D=128, S_max=4096, page_size=16, n_sel=64.
PSD = dict(q_ptr=4096, k_ptr=8192, v_ptr=12288, out_ptr=16384, seq_lens_ptr=20480, page_indices_ptr=24576,
           workspace_ptr=28672, B=2, Hq=32, Hkv=8, D=128, S_max=4096, page_size=16, n_sel=64, num_splits=4,
           q_strides=[32 * 128, 128], k_strides=[8 * 4096 * 128, 4096 * 128, 128],
           v_strides=(8 * 4096 * 128, 4096 * 128, 128), out_strides=[32 * 128, 128], scale=0.088,
           dtype="float16", stream=0)


@needs_decode
@pytest.mark.parametrize("change, match", [
    (dict(dtype="bf16"), "dtype must be 'float16' or 'bfloat16'"),
    (dict(B=0), "B must be"),
    (dict(Hq=0), "Hq must be"),
    (dict(Hkv=5), "Hkv must"),
    (dict(Hkv=1), "at most 16 query heads per KV head"),
    (dict(D=256), "D must be 64 or 128"),
    (dict(S_max=-1), "S_max must be"),
    (dict(page_size=32), "page_size must be 16 or 64"),
    (dict(n_sel=-1), "n_sel must be"),
    (dict(num_splits=0), "num_splits must be in 1..1024"),
    (dict(num_splits=1025), "num_splits must be in 1..1024"),
    (dict(q_strides=[1, 2, 3]), "q_strides must have 2 entries"),
    (dict(k_strides=[1, 2]), "k_strides must have 3 entries"),
    (dict(v_strides=[0, -1, 0]), "v_strides must be"),
    (dict(out_strides=[2 ** 40, 128]), "out_strides must be"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(v_ptr=0), "q, k_cache, v_cache and out must not be null"),
    (dict(out_ptr=16385), "2-byte aligned"),
    (dict(seq_lens_ptr=0), "seq_lens must be a non-null 8-byte aligned pointer"),
    (dict(seq_lens_ptr=20484), "seq_lens must be a non-null 8-byte aligned pointer"),
    (dict(page_indices_ptr=0), "page_indices must be a non-null 4-byte aligned pointer"),
    (dict(page_indices_ptr=24578), "page_indices must be a non-null 4-byte aligned pointer"),
    (dict(workspace_ptr=0), "workspace must be a non-null 16-byte aligned pointer"),
    (dict(workspace_ptr=28680), "workspace must be a non-null 16-byte aligned pointer"),
])
def test_decode_extension_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match="^paged_sparse_decode: .*" + match):
        backends.extension().paged_sparse_decode(**{**PSD, **change})


@needs_decode
@no_gpu
@pytest.mark.parametrize("change", [
    dict(),
    dict(n_sel=0, page_indices_ptr=0),  # nothing selected: page_indices is never read
    dict(Hq=128, Hkv=8, D=64, page_size=64, num_splits=1, q_strides=[128 * 64, 64], out_strides=[128 * 64, 64],
         dtype="bfloat16"),
    dict(k_ptr=8194),                    # the scalar load path
])
def test_decode_extension_accepts_and_reaches_the_launch(change):
    with pytest.raises(RuntimeError, match="paged_sparse_decode: CUDA launch failed"):
        backends.extension().paged_sparse_decode(**{**PSD, **change})


@needs_decode
def test_decode_extension_workspace_bytes_and_splits():
    ext = backends.extension()
    # float32 o [splits, B * Hq, D], then lse [splits, B * Hq], each part rounded up to 256 bytes.
    assert ext.paged_sparse_decode_workspace_bytes(B=2, Hq=32, D=128, num_splits=4) == 4 * 64 * 128 * 4 + 4 * 64 * 4
    assert ext.paged_sparse_decode_workspace_bytes(B=1, Hq=3, D=64, num_splits=1) == 768 + 256
    for bad in (dict(B=0, Hq=1, D=64, num_splits=1), dict(B=1, Hq=1, D=96, num_splits=1),
                dict(B=1, Hq=1, D=64, num_splits=0), dict(B=1, Hq=1, D=64, num_splits=1025)):
        with pytest.raises(ValueError, match="paged_sparse_decode_workspace_bytes"):
            ext.paged_sparse_decode_workspace_bytes(**bad)
    splits = ext.paged_sparse_decode_num_splits
    assert splits(B=1, Hkv=8, n_sel=2048, page_size=16, sm_count=132) >= 16   # batch 1, 32K tokens: split wide
    assert splits(B=64, Hkv=8, n_sel=2048, page_size=16, sm_count=132) <= 2   # enough blocks already
    assert splits(B=1, Hkv=8, n_sel=4, page_size=16, sm_count=132) == 1       # 64 tokens: no split
    assert splits(B=1, Hkv=1, n_sel=0, page_size=16, sm_count=132) == 1
    assert 1 <= splits(B=1, Hkv=1, n_sel=10 ** 6, page_size=64, sm_count=10 ** 6) <= 1024
