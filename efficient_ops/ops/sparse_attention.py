"""Ops of sparse attention and their public wrappers (the domain types: :mod:`efficient_ops.formats.sparse_attention`;
the maths: :mod:`efficient_ops.reference.sparse_attention`; kernels: ``triton_kernels/sparse_attention.py``,
``csrc/sparse_attention/``).

- ``block_sparse_attention``: backends ``cuda``, ``triton``, ``reference``; returns (out, lse).
- ``select_pages``: tensor code on any device (fixed shapes, no host synchronisation), run by the reference
  backend (:func:`efficient_ops.reference.sparse_attention.select_pages_batched`).
- ``paged_sparse_decode``: backends ``cuda``, ``triton`` (flash-decoding over the listed pages), ``reference``.

Value checks that need the device's data (block indices, page indices, lengths) run outside CUDA-graph
capture; the kernels clamp indices so that no input makes them access memory out of bounds.
"""

from typing import Optional, Tuple, Union

import torch

from .. import backends
from ..formats.sparse_attention import PAGE_SIZES, BlockSparseMask, PageSummary, check_lengths, validate_block_mask
from ..reference import sparse_attention as reference
from ._library import (DTYPE_NAMES, KERNEL_DTYPES, check_finite_scale, checking_values, impl, interpreter_unsupported,
                       lib, sm_count, stream)

KERNEL_HEAD_DIMS = {"cuda": (64, 128), "triton": (64, 128, 256)}  # head_dim 256: block-sparse prefill on Triton
CUDA_MAX_GROUP = 16  # query heads per KV head in the CUDA decode kernel

lib.define("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
           "int block_m, int block_n, bool causal, float? scale=None, str? backend=None) -> (Tensor, Tensor)")
lib.define("select_pages(Tensor q, Tensor kmin, Tensor kmax, Tensor seq_lens, int page_size, int token_budget) "
           "-> Tensor")
lib.define("paged_sparse_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor page_indices, "
           "int page_size, float? scale=None, str? backend=None) -> Tensor")


def _check_attention_inputs(q, k, v, q_dims, names=("q", "k", "v")):
    for name, t, dims in zip(names, (q, k, v), (q_dims, 4, 4)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dimensions, got shape {list(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{names[2]}: shape {list(v.shape)} differs from {names[1]}'s {list(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[-1]:
        raise ValueError(f"{names[1]}: expected [B={q.shape[0]}, Hkv, S, D={q.shape[-1]}], got {list(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{names[0]}: {q.shape[1]} query heads is not a multiple of the {k.shape[1]} KV heads")
    for name, t in zip(names[1:], (k, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from {names[0]}'s {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but {names[0]} is on {q.device}")


def _kernel_unsupported(op, backend, q, tensors) -> Optional[str]:
    if backend == "reference":
        return None
    if q.dtype not in KERNEL_DTYPES:
        return f"the {backend} backend of {op} needs float16/bfloat16 (got {q.dtype})"
    dims = KERNEL_HEAD_DIMS[backend] if op == "block_sparse_attention" else KERNEL_HEAD_DIMS["cuda"]
    if q.shape[-1] not in dims:
        return f"the {backend} backend of {op} needs head_dim in {dims} (got {q.shape[-1]})"
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            return f"the {backend} backend of {op} needs {name}'s last dimension contiguous"
    return interpreter_unsupported(backend, q)


# ---------------------------------------------------------------------------------------------------- prefill

def _run_block_sparse_cuda(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale):
    ext = backends.extension()
    b, hq, sq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)

    def strides(t, dims):  # broadcast (size-1) mask dimensions read row 0
        return [0 if t.shape[i] == 1 else t.stride(i) for i in dims]

    ext.block_sparse_attention(
        q_ptr=q.data_ptr(), k_ptr=k.data_ptr(), v_ptr=v.data_ptr(), out_ptr=out.data_ptr(), lse_ptr=lse.data_ptr(),
        kv_num_blocks_ptr=kv_num_blocks.data_ptr(), kv_indices_ptr=kv_indices.data_ptr(), B=b, Hq=hq, Hkv=k.shape[1],
        Sq=sq, Skv=k.shape[2], D=d, block_m=block_m, block_n=block_n, Mq=kv_indices.shape[2], Nk=kv_indices.shape[3],
        num_blocks_strides=strides(kv_num_blocks, (0, 1)),
        indices_strides=strides(kv_indices, (0, 1)) + [kv_indices.stride(2)], causal=causal,
        q_strides=list(q.stride()[:3]), k_strides=list(k.stride()[:3]), v_strides=list(v.stride()[:3]),
        out_strides=list(out.stride()[:3]), scale=scale, dtype=DTYPE_NAMES[q.dtype], stream=stream(q))
    return out, lse


def _run_block_sparse_triton(*args):
    from ..triton_kernels import sparse_attention as kernels  # imported on first use: Triton is optional
    return kernels.block_sparse_attention(*args)


_PREFILL_RUNNERS = {"cuda": _run_block_sparse_cuda, "triton": _run_block_sparse_triton}


def _check_block_sparse(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, scale, values=True):
    _check_attention_inputs(q, k, v, 4)
    validate_block_mask(kv_num_blocks, kv_indices, block_m, block_n, q.shape[2], k.shape[2], batch=q.shape[0],
                        heads=q.shape[1], device=q.device, values=values and checking_values(kv_indices))
    check_finite_scale(scale)


def _block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale=None, backend=None):
    _check_block_sparse(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = backends.select("block_sparse_attention", q.device, backend,
                           lambda bk: _kernel_unsupported("block_sparse_attention", bk, q, {"q": q, "k": k, "v": v}))
    if name == "reference" or q.numel() == 0 or k.shape[2] == 0:
        return reference.block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale)
    # The kernels read kv_num_blocks with unit stride along the query blocks (the CUDA binding takes two of its
    # strides, Triton indexes + m_block) and kv_indices' last dim with unit stride: a few bytes to copy.
    kv_num_blocks, kv_indices = kv_num_blocks.contiguous(), kv_indices.contiguous()
    with backends.device_guard(q.device):
        return _PREFILL_RUNNERS[name](q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale)


impl("block_sparse_attention", _block_sparse_attention)


@torch.library.register_fake("efficient_ops::block_sparse_attention")
def _block_sparse_attention_fake(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale=None,
                                 backend=None):
    _check_block_sparse(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, scale, values=False)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------- decode

def _check_decode(q, k_cache, v_cache, seq_lens, page_size, scale, values=True):
    _check_attention_inputs(q, k_cache, v_cache, 3, ("q", "k_cache", "v_cache"))
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size: must be one of {PAGE_SIZES}, got {page_size}")
    check_finite_scale(scale)
    check_lengths(seq_lens, q.shape[0], k_cache.shape[2] if values else None)
    if seq_lens.device != q.device:
        raise ValueError(f"seq_lens: on {seq_lens.device}, but q is on {q.device}")


def _check_select_pages(q, kmin, kmax, seq_lens, page_size, token_budget, values=True):
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q: expected a floating-point [B, Hq, D] tensor, got {getattr(q, 'dtype', None)} "
                         f"{list(getattr(q, 'shape', []))}")
    b, hq, d = q.shape
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device != q.device:
            raise ValueError(f"{name}: expected a floating-point tensor on q's device {q.device}")
    if kmin.dim() != 4 or kmin.shape != kmax.shape or kmin.shape[0] != b or kmin.shape[3] != d:
        raise ValueError(f"kmin, kmax: expected equal shapes [B={b}, Hkv, n_pages, D={d}], got {list(kmin.shape)} "
                         f"and {list(kmax.shape)}")
    hkv = kmin.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of the summary's {hkv} KV heads")
    if page_size not in PAGE_SIZES or token_budget < 1:
        raise ValueError(f"page_size, token_budget: need page_size in {PAGE_SIZES} and token_budget >= 1, got "
                         f"{page_size}, {token_budget}")
    check_lengths(seq_lens, b, kmin.shape[2] * page_size if values else None)  # S_max as far as the summary knows
    if seq_lens.device != q.device:
        raise ValueError(f"seq_lens: on {seq_lens.device}, but q is on {q.device}")


def _select_pages(q, kmin, kmax, seq_lens, page_size, token_budget):
    _check_select_pages(q, kmin, kmax, seq_lens, page_size, token_budget)
    return reference.select_pages_batched(q, kmin, kmax, seq_lens, page_size, token_budget)


impl("select_pages", _select_pages)


@torch.library.register_fake("efficient_ops::select_pages")
def _select_pages_fake(q, kmin, kmax, seq_lens, page_size, token_budget):
    _check_select_pages(q, kmin, kmax, seq_lens, page_size, token_budget, values=False)
    n_sel = min(max(2, token_budget // page_size), kmin.shape[2])
    return q.new_empty((q.shape[0], kmin.shape[1], n_sel), dtype=torch.int32)


def _check_pages(page_indices, q, k_cache, page_size, values=True):
    b, hkv, s_max = q.shape[0], k_cache.shape[1], k_cache.shape[2]
    if not isinstance(page_indices, torch.Tensor) or page_indices.dtype != torch.int32 or page_indices.dim() != 3 \
            or page_indices.shape[:2] != (b, hkv):
        raise ValueError(f"page_indices: expected int32 [B={b}, Hkv={hkv}, n_sel], got "
                         f"{getattr(page_indices, 'dtype', None)} {list(getattr(page_indices, 'shape', []))}")
    if page_indices.device != q.device:
        raise ValueError(f"page_indices: on {page_indices.device}, but q is on {q.device}")
    if values and checking_values(page_indices) and page_indices.numel():
        n_pages = -(-s_max // page_size)
        if ((page_indices < -1) | (page_indices >= n_pages)).any():
            raise ValueError(f"page_indices: entries must be -1 (unused) or pages in [0, {n_pages})")
        ordered = page_indices.sort(-1).values
        if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
            raise ValueError("page_indices: a KV head lists the same page twice")


def _run_decode_cuda(q, k_cache, v_cache, seq_lens, pages, page_size, scale):
    ext = backends.extension()
    b, hq, d = q.shape
    hkv, s_max, n_sel = k_cache.shape[1], k_cache.shape[2], pages.shape[2]
    sms = sm_count(q.device)
    n_splits = ext.paged_sparse_decode_num_splits(B=b, Hkv=hkv, n_sel=n_sel, page_size=page_size, sm_count=sms)
    workspace = torch.empty(ext.paged_sparse_decode_workspace_bytes(B=b, Hq=hq, D=d, num_splits=n_splits),
                            dtype=torch.uint8, device=q.device)
    out = torch.empty_like(q)
    ext.paged_sparse_decode(
        q_ptr=q.data_ptr(), k_ptr=k_cache.data_ptr(), v_ptr=v_cache.data_ptr(), out_ptr=out.data_ptr(),
        seq_lens_ptr=seq_lens.data_ptr(), page_indices_ptr=pages.data_ptr(), workspace_ptr=workspace.data_ptr(), B=b,
        Hq=hq, Hkv=hkv, D=d, S_max=s_max, page_size=page_size, n_sel=n_sel, num_splits=n_splits,
        q_strides=list(q.stride()[:2]), k_strides=list(k_cache.stride()[:3]), v_strides=list(v_cache.stride()[:3]),
        out_strides=list(out.stride()[:2]), scale=scale, dtype=DTYPE_NAMES[q.dtype], stream=stream(q))
    return out


def _run_decode_triton(*args):
    from ..triton_kernels import sparse_attention as kernels  # imported on first use: Triton is optional
    return kernels.paged_sparse_decode(*args)


_DECODE_RUNNERS = {"cuda": _run_decode_cuda, "triton": _run_decode_triton}


def _decode_unsupported(backend, q, k_cache, v_cache) -> Optional[str]:
    reason = _kernel_unsupported("paged_sparse_decode", backend, q, {"q": q, "k_cache": k_cache, "v_cache": v_cache})
    if reason is None and backend == "cuda" and q.shape[1] // k_cache.shape[1] > CUDA_MAX_GROUP:
        reason = f"the cuda backend of paged_sparse_decode takes at most {CUDA_MAX_GROUP} query heads per KV head"
    return reason


def _paged_sparse_decode(q, k_cache, v_cache, seq_lens, page_indices, page_size, scale=None, backend=None):
    _check_decode(q, k_cache, v_cache, seq_lens, page_size, scale, values=checking_values(seq_lens))
    _check_pages(page_indices, q, k_cache, page_size)
    pages = page_indices
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = backends.select("paged_sparse_decode", q.device, backend,
                           lambda bk: _decode_unsupported(bk, q, k_cache, v_cache))
    if name == "reference" or q.numel() == 0 or pages.shape[2] == 0:
        return reference.paged_sparse_decode(q, k_cache, v_cache, seq_lens, pages, page_size, scale)
    with backends.device_guard(q.device):
        return _DECODE_RUNNERS[name](q, k_cache, v_cache, seq_lens.long().contiguous(), pages.contiguous(), page_size,
                                     scale)


impl("paged_sparse_decode", _paged_sparse_decode)


@torch.library.register_fake("efficient_ops::paged_sparse_decode")
def _paged_sparse_decode_fake(q, k_cache, v_cache, seq_lens, page_indices, page_size, scale=None, backend=None):
    _check_decode(q, k_cache, v_cache, seq_lens, page_size, scale, values=False)
    _check_pages(page_indices, q, k_cache, page_size, values=False)
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------------- public wrappers

def select_pages(q: torch.Tensor, summary: PageSummary, seq_lens: torch.Tensor, token_budget: int) -> torch.Tensor:
    """The pages each KV head attends: int32 ``[B, Hkv, n_sel]``, increasing, -1 padded.

    ``n_sel = max(2, token_budget // page_size)`` (capped at the page count): always the first (sink) page and
    the newest page, then the others with the highest Quest bound ``sum_d max(q_d * kmax_d, q_d * kmin_d)``
    summed over the KV head's query heads. Fixed shapes for CUDA graphs.
    """
    return torch.ops.efficient_ops.select_pages(q, summary.kmin, summary.kmax, seq_lens, summary.page_size,
                                                token_budget)


def paged_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                        page_indices: torch.Tensor, page_size: int, scale: Optional[float] = None,
                        backend: Optional[str] = None) -> torch.Tensor:
    """Decode attention over listed pages: query head h attends every position ``s < seq_lens[b]`` of the pages
    ``page_indices[b, h // G]`` (-1 = unused slot) lists.

    Args:
        q: ``[B, Hq, D]`` float16/bfloat16 (any float on the reference backend); D in 64, 128 on the kernels.
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` in q's dtype.
        seq_lens: integer ``[B]``.
        page_indices: int32 ``[B, Hkv, n_sel]`` (from :func:`select_pages`), distinct per row.
        page_size: 16 or 64.
        scale: default ``D ** -0.5``.
        backend: "cuda", "triton" or "reference".

    Returns:
        ``[B, Hq, D]``; a head with no key gets zeros. Fixed shapes, CUDA-graph capturable.
    """
    return torch.ops.efficient_ops.paged_sparse_decode(q, k_cache, v_cache, seq_lens, page_indices, page_size, scale,
                                                       backend)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                            summary: PageSummary, token_budget: int, scale: Optional[float] = None,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Quest-style sparse decode: :func:`select_pages` then :func:`paged_sparse_decode`."""
    pages = select_pages(q, summary, seq_lens, token_budget)
    return paged_sparse_decode(q, k_cache, v_cache, seq_lens, pages, summary.page_size, scale, backend)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                           scale: Optional[float] = None, return_lse: bool = False,
                           backend: Optional[str] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over exactly the keys of the KV blocks ``mask`` selects.

    Args:
        q: ``[B, Hq, Sq, D]`` float16/bfloat16 (any float on the reference backend); D in 64, 128 on the kernels
            (256 on triton).
        k, v: ``[B, Hkv, Skv, D]`` in q's dtype; Hq a multiple of Hkv (GQA).
        mask: a :class:`BlockSparseMask` with ``q_len = Sq``, ``kv_len = Skv`` and batch/head dims 1, B or Hq.
        scale: default ``D ** -0.5``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Sq]`` of the scaled scores.
        backend: "cuda", "triton" or "reference".

    Returns:
        ``[B, Hq, Sq, D]`` (and the lse). Query row i attends key j when j's block is selected for i's block,
        and, when ``mask.causal``, ``j <= i + Skv - Sq``. A row with no key gets zeros and lse = -inf.
    """
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask: expected a BlockSparseMask, got {type(mask).__name__}")
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4 and \
            (mask.q_len, mask.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(f"mask: built for q_len={mask.q_len}, kv_len={mask.kv_len}, but q and k have "
                         f"{q.shape[2]} and {k.shape[2]} positions")
    out, lse = torch.ops.efficient_ops.block_sparse_attention(q, k, v, mask.kv_num_blocks, mask.kv_indices,
                                                              mask.block_m, mask.block_n, mask.causal, scale, backend)
    return (out, lse) if return_lse else out
