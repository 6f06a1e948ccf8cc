"""Ops of the speculative-decoding verification step (public API and semantics: :mod:`efficient_ops.speculative`).

- ``tree_attention``: backends ``cuda``, ``triton`` (flash-decoding split over the prefix plus the masked
  T x T tree part, merged by log-sum-exp) and ``reference``.
- ``merge_attention_states``: tensor code on any device.
- ``verify_greedy``, ``verify_typical``: batched tensor code on any device (Python loops over tree depth
  only). ``verify_sampling``: backend ``triton`` walks each batch row's tree in one program on the device;
  ``reference`` runs batched tensor code (loops over tree depth and sibling rank). The reference module
  walks each tree one node at a time.
- ``compact_kv``: in place, one launch for all layers; backends ``cuda``, ``triton``, ``reference``.

Value checks that need the device's data (prefix lengths within the cache, tree parents, accepted paths)
run outside CUDA-graph capture; inside it only shapes are checked, and the kernels clamp indices so that
no input makes them access memory out of bounds.
"""

from typing import Optional

import torch

from .. import backends
from ..reference import speculative as reference
from ..speculative import tree_depths, tree_mask, validate_parents
from ._library import DTYPE_NAMES, KERNEL_DTYPES, checking_values, impl, lib, sm_count, stream

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


def _check_parents(parents, b: int, t: int, device) -> None:
    _check_int(parents, "parents")
    if parents.dim() not in (1, 2) or parents.shape[-1] != t or (parents.dim() == 2 and parents.shape[0] not in (1, b)):
        raise ValueError(f"parents: expected shape [{t}] or [{b}, {t}] (T from the other inputs), got "
                         f"{list(parents.shape)}")
    if parents.device != device:
        raise ValueError(f"parents: on {parents.device}, but the other inputs are on {device}")
    if checking_values(parents):
        validate_parents(parents)


# ---------------------------------------------------------------------------------------------------- tree attention

def _check_tree_attention(q, k_cache, v_cache, prefix_lens, parents):
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
    _check_parents(parents, b, t, q.device)
    if checking_values(prefix_lens) and b and ((prefix_lens < 0) | (prefix_lens > s_max - t)).any():
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
    return None


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
    _check_tree_attention(q, k_cache, v_cache, prefix_lens, parents)
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
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------------- merge

def _merge_attention_states(o_a, lse_a, o_b, lse_b):
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
    return reference.merge_attention_states(o_a, lse_a, o_b, lse_b)


impl("merge_attention_states", _merge_attention_states)


@torch.library.register_fake("efficient_ops::merge_attention_states")
def _merge_attention_states_fake(o_a, lse_a, o_b, lse_b):
    return torch.empty_like(o_a), torch.empty_like(lse_a)


# ---------------------------------------------------------------------------------------------------- verification

def _check_verify(tokens, parents, probs, probs_name):
    _check_int(tokens, "tokens")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens: expected shape [B, T] with T >= 1, got {list(tokens.shape)}")
    b, t = tokens.shape
    _check_parents(parents, b, t, tokens.device)
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise TypeError(f"{probs_name}: expected a floating-point tensor [B, T, V]")
    if probs.dim() != 3 or probs.shape[:2] != (b, t) or probs.shape[2] == 0:
        raise ValueError(f"{probs_name}: expected shape [B={b}, T={t}, V], got {list(probs.shape)}")
    if probs.device != tokens.device:
        raise ValueError(f"{probs_name}: on {probs.device}, but tokens are on {tokens.device}")
    if checking_values(tokens) and ((tokens < 0) | (tokens >= probs.shape[2])).any():
        raise ValueError(f"tokens: every token must be in [0, V = {probs.shape[2]})")
    return b, t, (parents if parents.dim() == 2 else parents[None]).long().expand(b, t)


def _path_to(node, mask, depth, max_depth):
    """accepted_nodes [B, max_depth + 1]: the root-to-``node`` path (ancestors sorted by depth), -1 padded."""
    b, t = depth.shape
    ancestors = mask[torch.arange(b, device=node.device), node]  # [B, T]
    slots = torch.full((b, max_depth + 2), -1, dtype=torch.long, device=node.device)
    nodes = torch.arange(t, device=node.device).expand(b, t)
    slots.scatter_(1, torch.where(ancestors, depth, max_depth + 1), nodes)  # non-ancestors land in the extra column
    return slots[:, : max_depth + 1]


def _deepest(ok, depth):
    """Per row, the deepest node where ``ok`` holds (the first in node order on ties); the root always is."""
    t = ok.shape[1]
    score = torch.where(ok, depth * t + (t - 1 - torch.arange(t, device=ok.device)), -1)
    return score.argmax(1)


def _accept_along_paths(passes, parents, first_only):
    """The accepted node per row: the deepest whose every non-root ancestor-or-self passes. With
    ``first_only`` a node also needs no earlier passing sibling (a walk that takes the first match)."""
    t = parents.shape[1]
    if first_only:
        index = torch.arange(t, device=parents.device)
        earlier_sibling = (parents[:, :, None] == parents[:, None, :]) & (index[None, :] < index[:, None])
        passes = passes & ~(earlier_sibling & passes[:, None, :]).any(-1)
    mask = tree_mask(parents)
    passes = passes.clone()
    passes[:, 0] = True
    ok = ~(mask & ~passes[:, None, :]).any(-1)
    depth = tree_depths(parents)
    node = _deepest(ok, depth)
    return node, _path_to(node, mask, depth, int(depth.max())), depth


def _verify_greedy(tokens, parents, target_logits):
    b, t, parents = _check_verify(tokens, parents, target_logits, "target_logits")
    best = target_logits.argmax(-1)  # [B, T]: the target's token after each node
    passes = tokens == best.gather(1, parents.clamp_min(0))
    node, accepted, depth = _accept_along_paths(passes, parents, first_only=True)
    rows = torch.arange(b, device=tokens.device)
    return depth[rows, node], accepted, best[rows, node]


impl("verify_greedy", _verify_greedy)


def _verify_fake(tokens, parents, probs, *args, **kwargs):
    b = tokens.shape[0]
    max_depth = torch.library.get_ctx().new_dynamic_size()
    return (tokens.new_empty((b,)), tokens.new_empty((b, max_depth + 1)), tokens.new_empty((b,)))


torch.library.register_fake("efficient_ops::verify_greedy")(_verify_fake)


def _children_table(parents):
    """[B, T, C]: node n's children in node order, -1 padded (C: the largest child count)."""
    b, t = parents.shape
    index = torch.arange(t, device=parents.device)
    rank = ((parents[:, :, None] == parents[:, None, :]) & (index[None, :] < index[:, None])).sum(-1)
    count = torch.zeros(b, t, dtype=torch.long, device=parents.device)
    count.scatter_add_(1, parents[:, 1:], torch.ones_like(parents[:, 1:]))
    table = torch.full((b, t, max(1, int(count.max()))), -1, dtype=torch.long, device=parents.device)
    rows = torch.arange(b, device=parents.device)[:, None].expand(b, t - 1)
    table[rows, parents[:, 1:], rank[:, 1:]] = index[1:].expand(b, t - 1)
    return table


def _normalized(p, fallback):
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / torch.where(total > 0, total, 1.0), fallback)


def sample_rows(p, u):
    """Per row, the inverse-CDF draw from the non-negative weights ``p`` [B, V] with uniforms ``u`` [B]: the
    first index whose cumulative weight exceeds ``u * sum``; never a zero-weight index."""
    cdf = torch.cumsum(p, -1)
    index = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).clamp_max(p.shape[1] - 1)
    last = torch.where(p > 0, torch.arange(p.shape[1], device=p.device), -1).argmax(-1, keepdim=True)
    return torch.where(p.gather(1, index) > 0, index, last)[:, 0]


def verify_sampling_with_uniforms(tokens, parents, target_probs, draft_probs, mode, u_accept, u_final,
                                  backend="reference"):
    """The rejection rules with given uniforms (``u_accept`` [B, T]: node c's test; ``u_final`` [B]: the
    residual draw), so tests can compare exactly with the one-node-at-a-time reference. ``backend``
    "triton" walks each row's tree in one Triton program; "reference" runs batched tensor code."""
    b, t = tokens.shape
    rows = torch.arange(b, device=tokens.device)
    children = _children_table(parents)
    depth = tree_depths(parents)
    max_depth = int(depth.max())
    if backend == "triton":
        from ..triton_kernels import speculative as kernels  # imported on first use: Triton is optional
        return kernels.verify_sampling(tokens.contiguous(), children, target_probs.contiguous(),
                                       draft_probs.contiguous(), mode, u_accept, u_final, max_depth)
    p = target_probs[:, 0].double()
    q = draft_probs[:, 0].double()
    node = torch.zeros(b, dtype=torch.long, device=tokens.device)
    done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    for _ in range(max_depth):  # one tree level per step, every batch row at once
        moved = torch.zeros_like(done)
        for k in range(children.shape[2]):  # the current node's k-th child, tried in order
            child = children[rows, node, k]
            active = ~done & ~moved & (child >= 0)
            c = child.clamp_min(0)
            x = tokens[rows, c][:, None]
            px, qx, u = p.gather(1, x)[:, 0], q.gather(1, x)[:, 0], u_accept[rows, c].double()
            accept = active & (u * (p.sum(-1) if mode == "deterministic" else qx) < px)
            reject = (active & ~accept)[:, None]
            if mode == "deterministic":
                p = torch.where(reject, _normalized(p.scatter(1, x, 0.0), p), p)
            else:
                p_residual = _normalized((p - q).clamp_min(0), p)
                if mode == "without_replacement":
                    q = torch.where(reject, _normalized(q.scatter(1, x, 0.0), q), q)
                p = torch.where(reject, p_residual, p)
            node = torch.where(accept, c, node)
            p = torch.where(accept[:, None], target_probs[rows, c].double(), p)
            q = torch.where(accept[:, None], draft_probs[rows, c].double(), q)
            moved |= accept
        done |= ~moved
    mask = tree_mask(parents)
    return depth[rows, node], _path_to(node, mask, depth, max_depth), sample_rows(p, u_final)


def _verify_sampling_unsupported(backend) -> Optional[str]:
    return "verify_sampling has no cuda backend (use triton or reference)" if backend == "cuda" else None


def _verify_sampling(tokens, parents, target_probs, draft_probs, mode, generator=None, backend=None):
    b, t, parents = _check_verify(tokens, parents, target_probs, "target_probs")
    if not isinstance(draft_probs, torch.Tensor) or draft_probs.shape != target_probs.shape:
        raise ValueError(f"draft_probs: expected the shape of target_probs {list(target_probs.shape)}, got "
                         f"{list(getattr(draft_probs, 'shape', []))}")
    if not draft_probs.is_floating_point() or draft_probs.device != tokens.device:
        raise TypeError(f"draft_probs: expected a floating-point tensor on {tokens.device}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    u_accept = torch.rand((b, t), generator=generator, device=tokens.device, dtype=torch.float64)
    u_final = torch.rand((b,), generator=generator, device=tokens.device, dtype=torch.float64)
    name = backends.select("verify_sampling", tokens.device, backend, _verify_sampling_unsupported)
    return verify_sampling_with_uniforms(tokens, parents, target_probs, draft_probs, mode, u_accept, u_final, name)


impl("verify_sampling", _verify_sampling)
torch.library.register_fake("efficient_ops::verify_sampling")(_verify_fake)


def _verify_typical(tokens, parents, target_probs, posterior_threshold=0.09, posterior_alpha=0.3):
    b, t, parents = _check_verify(tokens, parents, target_probs, "target_probs")
    p = target_probs.double()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [B, T]
    cutoff = torch.clamp_max(posterior_alpha * torch.exp(-entropy), posterior_threshold)
    up = parents.clamp_min(0)
    rows = torch.arange(b, device=tokens.device)[:, None]
    passes = p[rows, up, tokens] > cutoff.gather(1, up)  # node c's token under its parent's distribution
    node, accepted, depth = _accept_along_paths(passes, parents, first_only=False)
    rows = rows[:, 0]
    return depth[rows, node], accepted, p[rows, node].argmax(-1)


impl("verify_typical", _verify_typical)
torch.library.register_fake("efficient_ops::verify_typical")(_verify_fake)


# ---------------------------------------------------------------------------------------------------- KV compaction

def _check_compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len):
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
    if not checking_values(k_cache) or b == 0:
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
    return torch.empty_like(prefix_lens)
