"""The CUDA kernels of the speculative family (tree attention, KV compaction) without a GPU: their block
programs emulated on the CPU under AddressSanitizer, and the extension's host-side argument checks."""

import math

import pytest
import torch

from efficient_ops import backends

from conftest import build_emulation, extension_has, run_emulation


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """The emulation binary (built once per module)."""
    return build_emulation(tmp_path_factory, "speculative", harness="speculative_emulation")


def test_speculative_block_programs_emulated_under_asan(emulation):
    stdout = run_emulation(emulation)
    assert "host checks ok" in stdout
    assert "all 4 attention kernel variants, both load paths of tree_attention and of compact_kv ran" in stdout
    assert "emulation: 137 cases ok, 0 failed" in stdout


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU launch error")
needs_tree_attention = pytest.mark.skipif(not extension_has("tree_attention"),
                                          reason="efficient_ops._C is not built with tree_attention")
needs_compact_kv = pytest.mark.skipif(not extension_has("compact_kv"),
                                      reason="efficient_ops._C is not built with compact_kv")

# Pointers only need to pass the alignment checks: without a GPU (or with the checks failing) nothing is
# dereferenced.
ATTN = dict(q_ptr=4096, k_ptr=8192, v_ptr=12288, out_ptr=16384, prefix_lens_ptr=20480, parents_ptr=24576,
            workspace_ptr=28672, B=2, Hq=8, Hkv=2, T=16, D=128, S_max=1024, num_splits=3,
            q_strides=[8 * 16 * 128, 16 * 128, 128], k_strides=[2 * 1024 * 128, 1024 * 128, 128],
            v_strides=(2 * 1024 * 128, 1024 * 128, 128), out_strides=[8 * 16 * 128, 16 * 128, 128],
            parents_batch_stride=16, scale=0.088, dtype="bfloat16", stream=0)


@needs_tree_attention
@pytest.mark.parametrize("change, match", [
    (dict(dtype="float32"), "dtype must be 'float16' or 'bfloat16'"),
    (dict(B=0), "B must be"),
    (dict(Hq=0), "Hq must be"),
    (dict(Hkv=3), "Hkv must"),
    (dict(Hkv=0), "Hkv must"),
    (dict(T=0), "T must be in 1..256"),
    (dict(T=257), "T must be in 1..256"),
    (dict(D=96), "D must be 64 or 128"),
    (dict(S_max=15), "S_max must be >= T"),
    (dict(num_splits=0), "num_splits must be"),
    (dict(num_splits=1025), "num_splits must be"),
    (dict(q_strides=[1, 2]), "q_strides must have 3 entries"),
    (dict(k_strides=[-1, 0, 128]), "k_strides"),
    (dict(v_strides=[0, 2 ** 40, 128]), "v_strides"),
    (dict(out_strides=[0, 0, -128]), "out_strides"),
    (dict(out_strides=[1, 2, 3, 4]), "out_strides must have 3 entries"),
    (dict(parents_batch_stride=-1), "parents_batch_stride"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(q_ptr=0), "q, k_cache, v_cache and out must not be null"),
    (dict(out_ptr=0), "q, k_cache, v_cache and out must not be null"),
    (dict(q_ptr=4097), "2-byte aligned"),
    (dict(v_ptr=12289), "2-byte aligned"),
    (dict(prefix_lens_ptr=20484), "prefix_lens must be"),
    (dict(prefix_lens_ptr=0), "prefix_lens must be"),
    (dict(parents_ptr=0), "parents must be"),
    (dict(parents_ptr=24580), "parents must be"),
    (dict(workspace_ptr=28680), "workspace must be"),
    (dict(workspace_ptr=0), "workspace must be"),
    (dict(Hq=2 ** 24, Hkv=1, T=256), r"Hq \* T"),
    (dict(B=2 ** 20, Hq=2 ** 9, Hkv=2 ** 9, T=64, num_splits=1024, q_strides=[0, 0, 128], k_strides=[0, 0, 128],
          v_strides=[0, 0, 128], out_strides=[0, 0, 128]), "too large"),
])
def test_tree_attention_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match="^tree_attention: .*" + match):
        backends.extension().tree_attention(**{**ATTN, **change})


@needs_tree_attention
@no_gpu
@pytest.mark.parametrize("change", [
    dict(),
    dict(dtype="float16", D=64, Hkv=8, T=1, num_splits=1),
    dict(T=256, S_max=256, parents_batch_stride=0),          # no room for a prefix: prefix_len clamps to 0
    dict(q_ptr=4098, q_strides=[8 * 16 * 130 + 1, 16 * 130, 130]),  # misaligned and strided: scalar path
])
def test_tree_attention_accepts_and_reaches_the_launch(change):
    with pytest.raises(RuntimeError, match="tree_attention: CUDA launch failed"):
        backends.extension().tree_attention(**{**ATTN, **change})


@needs_tree_attention
def test_tree_attention_sizing():
    ext = backends.extension()
    rows = 1 * 4 * 3 * (2 + 1)  # B * Hq * T * (num_splits + 1)
    assert ext.tree_attention_workspace_bytes(B=1, Hq=4, T=3, D=64, num_splits=2) == (
        math.ceil(rows * 64 * 4 / 256) * 256 + math.ceil(rows * 4 / 256) * 256)
    for bad in (dict(B=0, Hq=4, T=3, D=64, num_splits=2), dict(B=1, Hq=4, T=257, D=64, num_splits=2),
                dict(B=1, Hq=4, T=3, D=80, num_splits=2), dict(B=1, Hq=4, T=3, D=64, num_splits=0)):
        with pytest.raises(ValueError, match="^tree_attention_workspace_bytes: "):
            ext.tree_attention_workspace_bytes(**bad)
    # Short prefixes: one split; long ones: enough splits for two waves, each >= 256 prefix positions.
    assert ext.tree_attention_num_splits(B=1, Hq=32, Hkv=8, T=64, S_max=64 + 200, sm_count=132) == 1
    long = ext.tree_attention_num_splits(B=1, Hq=32, Hkv=8, T=64, S_max=64 + 32768, sm_count=132)
    assert 8 <= long <= 32768 // 256 and 4 * 8 * (long + 1) >= 4 * 132
    assert ext.tree_attention_num_splits(B=1, Hq=32, Hkv=8, T=16, S_max=16 + 1024, sm_count=132) <= 4
    assert ext.tree_attention_num_splits(B=64, Hq=32, Hkv=8, T=128, S_max=128 + 65536, sm_count=132) == 1
    assert ext.tree_attention_num_splits(B=0, Hq=0, Hkv=0, T=0, S_max=0, sm_count=0) == 1


KV = dict(k_ptr=4096, v_ptr=8192, prefix_lens_ptr=12288, accepted_ptr=16384, accept_len_ptr=20480, L=2, B=2, Hkv=2,
          S_max=64, D=64, P=8, k_strides=[2 * 2 * 64 * 64, 2 * 64 * 64, 64 * 64, 64],
          v_strides=(2 * 2 * 64 * 64, 2 * 64 * 64, 64 * 64, 64), accepted_batch_stride=8, elem_bytes=2, stream=0)


@needs_compact_kv
@pytest.mark.parametrize("change, match", [
    (dict(elem_bytes=3), "elem_bytes must be 2 or 4"),
    (dict(L=0), "L must be"),
    (dict(B=0), "B must be"),
    (dict(Hkv=0), "Hkv must be"),
    (dict(S_max=0), "S_max must be"),
    (dict(D=0), "D must be"),
    (dict(P=0), "P must be"),
    (dict(k_strides=[1, 2, 3]), "k_strides must have 4 entries"),
    (dict(v_strides=[0, 0, 0, -64]), "v_strides"),
    (dict(k_strides=[2 ** 40, 0, 0, 64]), "k_strides"),
    (dict(accepted_batch_stride=-1), "accepted_batch_stride"),
    (dict(k_ptr=0), "k_cache and v_cache must not be null"),
    (dict(v_ptr=8193), "aligned to elem_bytes"),
    (dict(elem_bytes=4, k_ptr=4098), "aligned to elem_bytes"),
    (dict(prefix_lens_ptr=0), "prefix_lens must be"),
    (dict(accepted_ptr=16388), "accepted must be"),
    (dict(accept_len_ptr=0), "accept_len must be"),
    (dict(L=2 ** 12, B=2 ** 10, Hkv=2 ** 10, k_strides=[0, 0, 0, 64], v_strides=[0, 0, 0, 64]), "L \\* B \\* Hkv"),
])
def test_compact_kv_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match="^compact_kv: .*" + match):
        backends.extension().compact_kv(**{**KV, **change})


@needs_compact_kv
@no_gpu
@pytest.mark.parametrize("change", [
    dict(),
    dict(elem_bytes=4, D=7, v_ptr=8196, accepted_batch_stride=0),
    dict(L=1, B=1, Hkv=1, S_max=1, P=1),
])
def test_compact_kv_accepts_and_reaches_the_launch(change):
    with pytest.raises(RuntimeError, match="compact_kv: CUDA launch failed"):
        backends.extension().compact_kv(**{**KV, **change})
