"""Ops of the speculative-decoding verification step and their public wrappers (tree helpers:
:mod:`efficient_ops.formats.speculative`; the maths: :mod:`efficient_ops.reference.speculative`; kernels:
``triton_kernels/speculative.py``, ``csrc/speculative/``).

- ``tree_attention``: backends ``cuda``, ``triton`` (flash-decoding split over the prefix plus the masked
  T x T tree part, merged by log-sum-exp) and ``reference``.
- ``merge_attention_states``: tensor code on any device.
- ``verify_greedy``, ``verify_typical``: batched tensor code on any device (Python loops over tree depth
  only), in the reference module next to its one-node-at-a-time walks. ``verify_sampling``: backend
  ``triton`` walks each batch row's tree in one program on the device; ``reference`` runs the batched
  tensor code (loops over tree depth and sibling rank).
- ``compact_kv``: in place, one launch for all layers; backends ``cuda``, ``triton``, ``reference``.

Value checks that need the device's data (prefix lengths within the cache, tree parents, accepted paths)
run outside CUDA-graph capture; inside it only shapes are checked, and the kernels clamp indices so that
no input makes them access memory out of bounds.
"""

from typing import Optional, Tuple

import torch

from .. import backends
from ..formats.speculative import tree_children, tree_depths, validate_parents
from ..reference import speculative as reference
from ._library import (DTYPE_NAMES, KERNEL_DTYPES, check_finite_scale, checking_values, impl, interpreter_unsupported,
                       lib, sm_count, stream)

KERNEL_HEAD_DIMS = (64, 128)
KERNEL_MAX_TREE = 256
MODES = ("iid", "without_replacement", "deterministic")

lib.define("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, Tensor parents, "
           "float? scale=None, str? backend=None) -> Tensor")
lib.define("merge_attention_states(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b) -> (Tensor, Tensor)")
lib.define("verify_greedy(Tensor tokens, Tensor parents, Tensor target_logits) -> (Tensor, Tensor, Tensor)")
lib.define("verify_sampling(Tensor tokens, Tensor parents, Tensor target_probs, Tensor draft_probs, str mode, "
           "Generator? generator=None, str? backend=None) -> (Tensor, Tensor, Tensor)")
lib.define("verify_typical(Tensor tokens, Tensor parents, Tensor target_probs, float posterior_threshold=0.09, "
           "float posterior_alpha=0.3) -> (Tensor, Tensor, Tensor)")
lib.define("compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor prefix_lens, Tensor accepted_nodes, "
           "Tensor accept_len, str? backend=None) -> Tensor")


def _check_int(t, name, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _check_same_device(device, **tensors):
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name}: on {t.device}, but q is on {device}")


def _check_parents(parents, b: int, t: int, device, values=True) -> None:
    _check_int(parents, "parents")
    if parents.dim() not in (1, 2) or parents.shape[-1] != t or (parents.dim() == 2 and parents.shape[0] not in (1, b)):
        raise ValueError(f"parents: expected shape [{t}] or [{b}, {t}] (T from the other inputs), got "
                         f"{list(parents.shape)}")
    if parents.device != device:
        raise ValueError(f"parents: on {parents.device}, but the other inputs are on {device}")
    if values and checking_values(parents):
        validate_parents(parents)


# ---------------------------------------------------------------------------------------------------- tree attention

def _check_tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale, values=True):
    check_finite_scale(scale)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions, got shape {list(t.shape)}")
    b, hq, t, d = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: shape {list(v_cache.shape)} differs from k_cache's {list(k_cache.shape)}")
    kb, hkv, s_max, kd = k_cache.shape
    if kb != b or kd != d:
        raise ValueError(f"k_cache: expected [B={b}, Hkv, S_max, D={d}], got {list(k_cache.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of the caches' {hkv} KV heads")
    if t == 0:
        raise ValueError("q: the tree has no nodes (T = 0)")
    if s_max < t:
        raise ValueError(f"k_cache: S_max = {s_max} cannot hold the T = {t} tree tokens")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {c.dtype} differs from q's {q.dtype}")
    _check_same_device(q.device, k_cache=k_cache, v_cache=v_cache, prefix_lens=prefix_lens)
    _check_int(prefix_lens, "prefix_lens", (b,))
    _check_parents(parents, b, t, q.device, values)
    if values and checking_values(prefix_lens) and b and ((prefix_lens < 0) | (prefix_lens > s_max - t)).any():
        raise ValueError(f"prefix_lens: every entry must be in [0, S_max - T] = [0, {s_max - t}] (the tree tokens sit "
                         f"at prefix_len .. prefix_len + T - 1), got {prefix_lens.tolist()}")


def _tree_attention_unsupported(backend, q, k_cache, v_cache) -> Optional[str]:
    if backend == "reference":
        return None
    if q.dtype not in KERNEL_DTYPES:
        return f"the {backend} backend of tree_attention needs float16/bfloat16 (got {q.dtype})"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"the {backend} backend of tree_attention needs head_dim in {KERNEL_HEAD_DIMS} (got {q.shape[-1]})"
    if q.shape[2] > KERNEL_MAX_TREE:
        return (f"the {backend} backend of tree_attention takes trees of at most {KERNEL_MAX_TREE} nodes "
                f"(got {q.shape[2]})")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            return f"the {backend} backend of tree_attention needs {name}'s last dimension contiguous"
    return interpreter_unsupported(backend, q)


def _run_tree_attention_cuda(q, k_cache, v_cache, prefix_lens, parents, scale):
    ext = backends.extension()
    b, hq, t, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    sms = sm_count(q.device)
    n_splits = ext.tree_attention_num_splits(B=b, Hq=hq, Hkv=hkv, T=t, S_max=s_max, sm_count=sms)
    workspace = torch.empty(ext.tree_attention_workspace_bytes(B=b, Hq=hq, T=t, D=d, num_splits=n_splits),
                            dtype=torch.uint8, device=q.device)
    out = torch.empty_like(q)
    ext.tree_attention(q_ptr=q.data_ptr(), k_ptr=k_cache.data_ptr(), v_ptr=v_cache.data_ptr(), out_ptr=out.data_ptr(),
                       prefix_lens_ptr=prefix_lens.data_ptr(), parents_ptr=parents.data_ptr(),
                       workspace_ptr=workspace.data_ptr(), B=b, Hq=hq, Hkv=hkv, T=t, D=d, S_max=s_max,
                       num_splits=n_splits, q_strides=list(q.stride()[:3]), k_strides=list(k_cache.stride()[:3]),
                       v_strides=list(v_cache.stride()[:3]), out_strides=list(out.stride()[:3]),
                       parents_batch_stride=parents.stride(0) if parents.shape[0] > 1 else 0, scale=scale,
                       dtype=DTYPE_NAMES[q.dtype], stream=stream(q))
    return out


def _run_tree_attention_triton(q, k_cache, v_cache, prefix_lens, parents, scale):
    from ..triton_kernels import speculative as kernels  # imported on first use: Triton is optional
    return kernels.tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale)


_TREE_RUNNERS = {"cuda": _run_tree_attention_cuda, "triton": _run_tree_attention_triton}


def _tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale=None, backend=None):
    _check_tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = backends.select("tree_attention", q.device, backend,
                           lambda bk: _tree_attention_unsupported(bk, q, k_cache, v_cache))
    if name == "reference" or q.numel() == 0:
        return reference.tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale)
    parents = (parents if parents.dim() == 2 else parents[None]).long().contiguous()
    with backends.device_guard(q.device):
        return _TREE_RUNNERS[name](q, k_cache, v_cache, prefix_lens.long().contiguous(), parents, scale)


impl("tree_attention", _tree_attention)


@torch.library.register_fake("efficient_ops::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, prefix_lens, parents, scale=None, backend=None):
    _check_tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale, values=False)
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------------- merge

def _check_merge(o_a, lse_a, o_b, lse_b, values=True):
    for name, o in (("o_a", o_a), ("o_b", o_b)):
        if not isinstance(o, torch.Tensor) or not o.is_floating_point() or o.dim() < 1:
            raise TypeError(f"{name}: expected a floating-point tensor [..., D]")
    if o_a.shape != o_b.shape or o_a.dtype != o_b.dtype:
        raise ValueError(f"o_b: shape {list(o_b.shape)} / dtype {o_b.dtype} differs from o_a's "
                         f"{list(o_a.shape)} / {o_a.dtype}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or lse.shape != o_a.shape[:-1]:
            raise ValueError(f"{name}: expected float32 of shape {list(o_a.shape[:-1])}, got "
                             f"{getattr(lse, 'dtype', None)} {list(getattr(lse, 'shape', []))}")
    _check_same_device(o_a.device, o_b=o_b, lse_a=lse_a, lse_b=lse_b)
    if values and checking_values(lse_a):
        for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
            if (torch.isnan(lse) | torch.isposinf(lse)).any():
                raise ValueError(f"{name}: a log-sum-exp is finite, or -inf for no keys; got NaN or +inf")


def _merge_attention_states(o_a, lse_a, o_b, lse_b):
    _check_merge(o_a, lse_a, o_b, lse_b)
    return reference.merge_attention_states(o_a, lse_a, o_b, lse_b)


impl("merge_attention_states", _merge_attention_states)


@torch.library.register_fake("efficient_ops::merge_attention_states")
def _merge_attention_states_fake(o_a, lse_a, o_b, lse_b):
    _check_merge(o_a, lse_a, o_b, lse_b, values=False)
    return torch.empty_like(o_a), torch.empty_like(lse_a)


# ---------------------------------------------------------------------------------------------------- verification

def _check_distributions(probs, name, rows=None):
    """Rows of ``probs`` [B, T, V] (those ``rows`` [B, T] selects, default all) are probability distributions:
    finite, non-negative, summing to 1 (1e-3; 1e-2 in 16-bit). Both backends assume it and disagree without it."""
    tol = 1e-2 if probs.element_size() == 2 else 1e-3
    bad = ~torch.isfinite(probs).all(-1) | (probs < 0).any(-1) | ((probs.sum(-1, dtype=torch.float64) - 1).abs() > tol)
    if rows is not None:
        bad &= rows
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: row [{b}, {i}] is not a probability distribution (finite, >= 0, sum 1 +- {tol}; "
                         f"sum {float(probs[b, i].sum(dtype=torch.float64)):.4g}): pass softmax outputs, not logits")


def _empty_verify(tokens, parents):
    """The outputs of a verify op for a batch of 0 rows."""
    depth = int(tree_depths(parents).max()) if parents.dim() == 1 or parents.shape[0] else 0
    return tokens.new_zeros((0,)).long(), tokens.new_zeros((0, depth + 1)).long(), tokens.new_zeros((0,)).long()


def _check_verify(tokens, parents, probs, probs_name, values=True):
    _check_int(tokens, "tokens")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens: expected shape [B, T] with T >= 1, got {list(tokens.shape)}")
    b, t = tokens.shape
    _check_parents(parents, b, t, tokens.device, values)
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise TypeError(f"{probs_name}: expected a floating-point tensor [B, T, V]")
    if probs.dim() != 3 or probs.shape[:2] != (b, t) or probs.shape[2] == 0:
        raise ValueError(f"{probs_name}: expected shape [B={b}, T={t}, V], got {list(probs.shape)}")
    if probs.device != tokens.device:
        raise ValueError(f"{probs_name}: on {probs.device}, but tokens are on {tokens.device}")
    if values and checking_values(tokens) and ((tokens < 0) | (tokens >= probs.shape[2])).any():
        raise ValueError(f"tokens: every token must be in [0, V = {probs.shape[2]})")
    return b, t, (parents if parents.dim() == 2 else parents[None]).long().expand(b, t)


def _verify_greedy(tokens, parents, target_logits):
    b, _, expanded = _check_verify(tokens, parents, target_logits, "target_logits")
    if b == 0:
        return _empty_verify(tokens, parents)
    if checking_values(target_logits) and torch.isnan(target_logits).any():  # argmax would take the NaN
        raise ValueError("target_logits: contains NaN")
    parents = expanded
    return reference.verify_greedy_batched(tokens, parents, target_logits)


impl("verify_greedy", _verify_greedy)


def _verify_fake(tokens, parents, probs, *args, probs_name="target_probs", **kwargs):
    _check_verify(tokens, parents, probs, probs_name, values=False)
    b = tokens.shape[0]
    max_depth = torch.library.get_ctx().new_dynamic_size()
    return (tokens.new_empty((b,)), tokens.new_empty((b, max_depth + 1)), tokens.new_empty((b,)))


@torch.library.register_fake("efficient_ops::verify_greedy")
def _verify_greedy_fake(tokens, parents, target_logits):
    return _verify_fake(tokens, parents, target_logits, probs_name="target_logits")


def verify_sampling_with_uniforms(tokens, parents, target_probs, draft_probs, mode, u_accept, u_final,
                                  backend="reference"):
    """The rejection rules with given uniforms (``u_accept`` [B, T]: node c's test; ``u_final`` [B]: the
    residual draw), so tests can compare exactly with the one-node-at-a-time reference. ``backend``
    "triton" walks each row's tree in one Triton program; "reference" runs the batched tensor code of
    :func:`efficient_ops.reference.speculative.verify_sampling_batched`. ``parents``: int64 ``[B, T]``."""
    if backend != "triton":
        return reference.verify_sampling_batched(tokens, parents, target_probs, draft_probs, mode, u_accept, u_final)
    from ..triton_kernels import speculative as kernels  # imported on first use: Triton is optional
    max_depth = int(tree_depths(parents).max())
    return kernels.verify_sampling(tokens.contiguous(), tree_children(parents), target_probs.contiguous(),
                                   draft_probs.contiguous(), mode, u_accept, u_final, max_depth)


def _verify_sampling_unsupported(backend) -> Optional[str]:
    return "verify_sampling has no cuda backend (use triton or reference)" if backend == "cuda" else None


def _verify_sampling(tokens, parents, target_probs, draft_probs, mode, generator=None, backend=None):
    b, t, expanded = _check_verify(tokens, parents, target_probs, "target_probs")
    if not isinstance(draft_probs, torch.Tensor) or draft_probs.shape != target_probs.shape:
        raise ValueError(f"draft_probs: expected the shape of target_probs {list(target_probs.shape)}, got "
                         f"{list(getattr(draft_probs, 'shape', []))}")
    if not draft_probs.is_floating_point() or draft_probs.device != tokens.device:
        raise TypeError(f"draft_probs: expected a floating-point tensor on {tokens.device}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if b == 0:
        return _empty_verify(tokens, parents)
    parents = expanded
    if checking_values(target_probs):
        _check_distributions(target_probs, "target_probs")
        if mode != "deterministic":  # q is read at the nodes whose children are tested
            has_children = torch.zeros(b, t, dtype=torch.bool, device=tokens.device)
            has_children.scatter_(1, parents[:, 1:], True)
            _check_distributions(draft_probs, "draft_probs", has_children)
    u_accept = torch.rand((b, t), generator=generator, device=tokens.device, dtype=torch.float64)
    u_final = torch.rand((b,), generator=generator, device=tokens.device, dtype=torch.float64)
    name = backends.select("verify_sampling", tokens.device, backend, _verify_sampling_unsupported)
    return verify_sampling_with_uniforms(tokens, parents, target_probs, draft_probs, mode, u_accept, u_final, name)


impl("verify_sampling", _verify_sampling)
torch.library.register_fake("efficient_ops::verify_sampling")(_verify_fake)


def _verify_typical(tokens, parents, target_probs, posterior_threshold=0.09, posterior_alpha=0.3):
    b, _, expanded = _check_verify(tokens, parents, target_probs, "target_probs")
    for name, value in (("posterior_threshold", posterior_threshold), ("posterior_alpha", posterior_alpha)):
        if not 0 <= value < float("inf"):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    if b == 0:
        return _empty_verify(tokens, parents)
    if checking_values(target_probs):
        _check_distributions(target_probs, "target_probs")
    parents = expanded
    return reference.verify_typical_batched(tokens, parents, target_probs, posterior_threshold, posterior_alpha)


impl("verify_typical", _verify_typical)
torch.library.register_fake("efficient_ops::verify_typical")(_verify_fake)


# ---------------------------------------------------------------------------------------------------- KV compaction

def _check_compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len, values=True):
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() not in (4, 5):
            raise ValueError(f"{name}: expected [B, Hkv, S_max, D] or [L, B, Hkv, S_max, D], got "
                             f"{list(getattr(c, 'shape', []))}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache: shape {list(v_cache.shape)} / dtype {v_cache.dtype} differs from k_cache's "
                         f"{list(k_cache.shape)} / {k_cache.dtype}")
    b, s_max = k_cache.shape[-4], k_cache.shape[-2]
    _check_int(prefix_lens, "prefix_lens", (b,))
    _check_int(accept_len, "accept_len", (b,))
    _check_int(accepted_nodes, "accepted_nodes")
    if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] != b or accepted_nodes.shape[1] == 0:
        raise ValueError(f"accepted_nodes: expected shape [B={b}, P] with P >= 1, got {list(accepted_nodes.shape)}")
    for name, t in (("v_cache", v_cache), ("prefix_lens", prefix_lens), ("accepted_nodes", accepted_nodes),
                    ("accept_len", accept_len)):
        if t.device != k_cache.device:
            raise ValueError(f"{name}: on {t.device}, but k_cache is on {k_cache.device}")
    if not values or not checking_values(k_cache) or b == 0:
        return
    p = accepted_nodes.shape[1]
    if ((accept_len < 0) | (accept_len >= p)).any():
        raise ValueError(f"accept_len: every entry must be in [0, P - 1] = [0, {p - 1}], got {accept_len.tolist()}")
    slot = torch.arange(p, device=k_cache.device)
    on_path = slot[None, :] <= accept_len[:, None]
    steps = accepted_nodes[:, 1:] - accepted_nodes[:, :-1]
    if ((accepted_nodes[:, 0] != 0).any() or (on_path[:, 1:] & (steps <= 0)).any()):
        raise ValueError("accepted_nodes: each row must start with the root 0 and increase along the path "
                         "(as verify_greedy / verify_sampling return it)")
    last = prefix_lens + accepted_nodes.gather(1, accept_len[:, None].long())[:, 0]
    if ((prefix_lens < 0) | (last >= s_max)).any():
        raise ValueError(f"prefix_lens: the accepted tree slots prefix_len + node must lie in [0, S_max = {s_max})")


def _compact_kv_unsupported(backend, k_cache, v_cache) -> Optional[str]:
    if backend == "reference":
        return None
    if k_cache.element_size() not in (2, 4):
        return f"the {backend} backend of compact_kv moves 2- or 4-byte elements (got {k_cache.dtype})"
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1:
            return f"the {backend} backend of compact_kv needs {name}'s last dimension contiguous"
    return None


def _run_compact_kv_cuda(k5, v5, prefix_lens, accepted, accept_len):
    ext = backends.extension()
    n_layers, b, hkv, s_max, d = k5.shape
    ext.compact_kv(k_ptr=k5.data_ptr(), v_ptr=v5.data_ptr(), prefix_lens_ptr=prefix_lens.data_ptr(),
                   accepted_ptr=accepted.data_ptr(), accept_len_ptr=accept_len.data_ptr(), L=n_layers, B=b, Hkv=hkv,
                   S_max=s_max, D=d, P=accepted.shape[1], k_strides=list(k5.stride()[:4]),
                   v_strides=list(v5.stride()[:4]), accepted_batch_stride=accepted.stride(0),
                   elem_bytes=k5.element_size(), stream=stream(k5))


def _run_compact_kv_triton(k5, v5, prefix_lens, accepted, accept_len):
    from ..triton_kernels import speculative as kernels  # imported on first use: Triton is optional
    kernels.compact_kv(k5, v5, prefix_lens, accepted, accept_len)


_COMPACT_RUNNERS = {"cuda": _run_compact_kv_cuda, "triton": _run_compact_kv_triton}


def _compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len, backend=None):
    _check_compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len)
    name = backends.select("compact_kv", k_cache.device, backend,
                           lambda bk: _compact_kv_unsupported(bk, k_cache, v_cache))
    if name == "reference" or k_cache.numel() == 0:
        return reference.compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len)
    k5 = k_cache if k_cache.dim() == 5 else k_cache[None]
    v5 = v_cache if v_cache.dim() == 5 else v_cache[None]
    with backends.device_guard(k_cache.device):
        _COMPACT_RUNNERS[name](k5, v5, prefix_lens.long().contiguous(), accepted_nodes.long().contiguous(),
                               accept_len.long().contiguous())
    return prefix_lens + accept_len.to(prefix_lens.dtype) + 1


impl("compact_kv", _compact_kv)


@torch.library.register_fake("efficient_ops::compact_kv")
def _compact_kv_fake(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len, backend=None):
    _check_compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len, values=False)
    return torch.empty_like(prefix_lens)


# ---------------------------------------------------------------------------------------------------- public wrappers

def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
                   parents: torch.Tensor, scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Attention of a flattened draft tree over the committed prefix and the tree itself.

    Args:
        q: ``[B, Hq, T, D]``, the tree tokens' queries, float16/bfloat16 (any float dtype on the reference
            backend); the kernels take D in 64, 128 and T <= 256.
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` in q's dtype, Hq a multiple of Hkv (GQA). Row b holds the
            committed prefix at positions ``[0, prefix_lens[b])`` and the tree tokens' keys/values at
            ``[prefix_lens[b], prefix_lens[b] + T)``.
        prefix_lens: integer ``[B]``, ragged, 0 allowed, at most ``S_max - T``.
        parents: ``[T]`` or ``[B, T]`` (see :mod:`efficient_ops.formats.speculative`).
        scale: softmax scale, default ``D ** -0.5``.
        backend: "cuda", "triton" or "reference"; default ``$EFFICIENT_OPS_BACKEND``, else the best available.

    Returns:
        ``[B, Hq, T, D]``: node i's attention over every prefix position and over its ancestors and itself.
        Fixed shapes and no host synchronisation inside CUDA-graph capture (value checks run outside it).
    """
    return torch.ops.efficient_ops.tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale, backend)


def merge_attention_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                           lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each.

    ``o_a``, ``o_b``: ``[..., D]`` (same shape and dtype); ``lse_a``, ``lse_b``: float32 ``[...]``, the natural-log
    log-sum-exp of each side's scaled scores. Returns ``(o, lse)``, o in o_a's dtype (math in float32). A side
    with lse = -inf (no keys) contributes nothing; both -inf give o = 0 and lse = -inf.
    """
    return torch.ops.efficient_ops.merge_attention_states(o_a, lse_a, o_b, lse_b)


def verify_greedy(tokens: torch.Tensor, parents: torch.Tensor,
                  target_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a draft tree against the target's argmax.

    Args:
        tokens: int ``[B, T]``, each node's token (the root's is the last accepted token and is not checked).
        parents: ``[T]`` or ``[B, T]``.
        target_logits: ``[B, T, V]``; row i is the target's prediction for the child of node i.

    Returns:
        ``accept_len`` [B] (accepted draft nodes, root excluded), ``accepted_nodes`` [B, max_depth + 1] (the
        accepted path's node indices from the root 0, padded with -1; max_depth is the tree's over the batch)
        and ``next_token`` [B] (the argmax at the last accepted node). From the root, the walk takes the
        first child (in node order) whose token is the argmax, until none is.
    """
    return torch.ops.efficient_ops.verify_greedy(tokens, parents, target_logits)


def verify_sampling(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                    draft_probs: torch.Tensor, mode: str = "iid", generator: Optional[torch.Generator] = None,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless stochastic verification: the emitted tokens (accepted drafts, then ``next_token``) are
    distributed exactly as sampling from the target one token at a time.

    Args:
        tokens, parents: the draft tree (as :func:`verify_greedy`).
        target_probs: ``[B, T, V]``, the target's distribution after each node. Apply temperature, top-k and
            top-p to it *before* calling: the guarantee is with respect to the distribution given here.
        draft_probs: ``[B, T, V]``, the distribution q_i node i's children were drawn from.
        mode: how the children were drawn, which fixes the rule:
            ``"iid"``: independently from q_i (SpecInfer): try children in order, accept child x with
            probability min(1, p(x)/q(x)); on rejection p <- norm(max(0, p - q)), q unchanged.
            ``"without_replacement"`` (Sequoia / RSD): as iid, but the rejected x is also removed from q and
            q renormalised.
            ``"deterministic"``: the children are q's top-k (EAGLE-2 style): accept x with probability
            p(x) / sum(p); on rejection p(x) <- 0, renormalised. This rule never reads q, so it is lossless
            whatever the children are.
            When no child is accepted, ``next_token`` is drawn from the current residual p.
        generator: for the uniforms (one per node tested, one for the final draw), drawn on the tokens' device.
        backend: "triton" (each row's walk in one program on the device) or "reference" (batched PyTorch);
            default the best available.

    Returns:
        ``(accept_len, accepted_nodes, next_token)`` as :func:`verify_greedy`.
    """
    return torch.ops.efficient_ops.verify_sampling(tokens, parents, target_probs, draft_probs, mode, generator,
                                                   backend)


def verify_typical(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                   posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Medusa's typical acceptance (lossy): node c passes when its token's probability under its parent's
    target distribution exceeds ``min(posterior_threshold, posterior_alpha * exp(-entropy))``. The deepest node
    whose whole path passes is accepted (the first in node order on ties) and ``next_token`` is the argmax
    there. Same outputs as :func:`verify_greedy`; ``target_probs`` [B, T, V] after temperature.
    """
    return torch.ops.efficient_ops.verify_typical(tokens, parents, target_probs, posterior_threshold, posterior_alpha)


def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
               accepted_nodes: torch.Tensor, accept_len: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Move the accepted path's keys and values (root included) from their tree slots
    ``prefix_len + node`` to the contiguous slots ``prefix_len + 0, 1, ..., accept_len``, in place.

    Args:
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` or every layer stacked, ``[L, B, Hkv, S_max, D]`` (one launch).
        prefix_lens: integer ``[B]``, the committed lengths before the tree.
        accepted_nodes, accept_len: as returned by the verify functions.
        backend: "cuda", "triton" or "reference".

    Returns:
        The new prefix lengths ``prefix_lens + accept_len + 1``. Overlapping moves (path [0, 2, 5] reads slot 2
        while slot 2 is written) are race-free. Fixed shapes, capturable in a CUDA graph.
    """
    return torch.ops.efficient_ops.compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len, backend)
