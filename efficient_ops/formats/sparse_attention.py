"""Sparse-attention domain types (``sparse_attention`` family): block masks, the seed papers' sparsity patterns
as mask builders, and the page summaries of page-selecting sparse decode. Plain PyTorch; the ops that consume
them (``block_sparse_attention``, ``select_pages``, ``paged_sparse_decode``, ``sparse_decode_attention``) are in
:mod:`efficient_ops.ops.sparse_attention`.

Prefill: one block-sparse kernel (``block_sparse_attention``) runs every pattern. A
:class:`BlockSparseMask` lists, for each (batch, head, query block), the KV blocks to attend, in
FlexAttention's forward layout. The patterns build such masks:

- :func:`streaming`: attention sinks plus a local window (LServe / DuoAttention streaming heads), with
  dense heads mixed in per head;
- :func:`vertical_slash`: MInference's estimate from the last queries (top columns and top diagonals);
- :func:`anchor`: AnchorAttention (key blocks whose pooled-query score is within theta of the anchor);
- :func:`centroid_select` with :func:`kmeans_keys`: Squeezed Attention for a fixed context;
- :func:`topk_blocks`: generic top fraction of mean-pooled block scores.

Decode: a :class:`PageSummary` keeps each page's elementwise key min and max (Quest / LServe);
``select_pages`` scores pages by ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` and keeps the best within a
token budget plus the first and the newest page; ``paged_sparse_decode`` attends over an explicit page
list; ``sparse_decode_attention`` does both.

The KV cache is contiguous: ``[B, Hkv, S_max, D]`` with ``seq_lens`` [B].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

BLOCK_SIZES = (16, 32, 64, 128)
PAGE_SIZES = (16, 64)


def _blocks(n: int, size: int) -> int:
    return -(-n // size)


def _check_block_size(value, name):
    if value not in BLOCK_SIZES:
        raise ValueError(f"{name}: must be one of {BLOCK_SIZES}, got {value!r}")


def validate_block_mask(kv_num_blocks, kv_indices, block_m: int, block_n: int, q_len: int, kv_len: int,
                        batch: Optional[int] = None, heads: Optional[int] = None, device=None,
                        values: bool = False) -> None:
    """Check a block mask in FlexAttention's forward layout (see :class:`BlockSparseMask`), naming the argument.

    The structure always: block sizes, int32 tensors ``[B|1, H|1, Mq]`` and ``[B|1, H|1, Mq, Nk]`` with
    ``Mq = ceil(q_len / block_m)``, ``Nk = ceil(kv_len / block_n)``, on one device (``device`` when given).
    With ``batch`` / ``heads`` the broadcast dims must be 1 or those. With ``values`` also the entries (this reads
    the device's data, so callers skip it inside CUDA-graph capture): counts in ``[0, Nk]``, listed indices in
    ``[0, Nk)`` and distinct per query block.
    """
    _check_block_size(block_m, "block_m")
    _check_block_size(block_n, "block_n")
    if q_len < 0 or kv_len < 0:
        raise ValueError(f"q_len, kv_len: must be non-negative, got {q_len}, {kv_len}")
    mq, nk = _blocks(q_len, block_m), _blocks(kv_len, block_n)
    for name, t, dims in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dims:
            raise ValueError(f"{name}: expected an int32 tensor with {dims} dimensions, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
        want = kv_num_blocks.device if device is None else device
        if t.device != want:
            raise ValueError(f"{name}: on {t.device}, but {'kv_num_blocks' if device is None else 'q'} is on {want}")
    bm, hm = kv_num_blocks.shape[:2]
    if kv_num_blocks.shape[2] != mq or (batch is not None and bm not in (1, batch)) or \
            (heads is not None and hm not in (1, heads)):
        dims = f"1|{'B' if batch is None else batch}, 1|{'H' if heads is None else heads}"
        raise ValueError(f"kv_num_blocks: expected [{dims}, Mq={mq}] for q_len={q_len}, block_m={block_m}, got "
                         f"{list(kv_num_blocks.shape)}")
    if kv_indices.shape != (bm, hm, mq, nk):
        raise ValueError(f"kv_indices: expected [{bm}, {hm}, {mq}, Nk={nk}] for kv_len={kv_len}, block_n={block_n}, "
                         f"got {list(kv_indices.shape)}")
    if not values or kv_indices.numel() == 0:
        return
    if ((kv_num_blocks < 0) | (kv_num_blocks > nk)).any():
        raise ValueError(f"kv_num_blocks: every entry must be in [0, Nk = {nk}]")
    listed = torch.arange(nk, device=kv_indices.device) < kv_num_blocks[..., None]
    if (listed & ((kv_indices < 0) | (kv_indices >= nk))).any():
        raise ValueError(f"kv_indices: listed block indices must be in [0, Nk = {nk})")
    unlisted = nk + torch.arange(nk, device=kv_indices.device, dtype=torch.int32)  # distinct fillers, sorted last
    ordered = torch.where(listed, kv_indices, unlisted).sort(-1).values
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ValueError("kv_indices: a query block lists the same KV block twice")


def listed_blocks(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """The bool block map ``[B|1, H|1, Mq, Nk]`` of a mask in FlexAttention's layout: only the first
    ``kv_num_blocks`` entries of each ``kv_indices`` row count (what follows them, zero padding, -1 or garbage,
    is ignored, as the kernels ignore it); listed indices outside ``[0, Nk)`` select nothing."""
    nk = kv_indices.shape[-1]
    index = torch.arange(nk, device=kv_indices.device)
    listed = (index < kv_num_blocks[..., None]) & (kv_indices >= 0) & (kv_indices < nk)
    slots = torch.where(listed, kv_indices.long(), nk)  # every unlisted entry lands in a spare column
    dense = torch.zeros((*kv_indices.shape[:-1], nk + 1), dtype=torch.bool, device=kv_indices.device)
    return dense.scatter_(-1, slots, True)[..., :nk]


def _flex_element_classes(block_mask, blocks, q_len, kv_len, chunk=4096):
    """For the listed partial blocks of a FlexAttention ``BlockMask`` (``blocks`` [P, 4]: b, h, m, n), whether its
    ``mask_mod`` keeps every element, none, or exactly the end-aligned causal ones (inside the sequences)."""
    bm, bn = block_mask.BLOCK_SIZE
    offset = kv_len - q_len
    classes = []
    for part in blocks.split(chunk):
        b, h = part[:, 0, None, None], part[:, 1, None, None]
        rows = part[:, 2, None, None] * bm + torch.arange(bm, device=part.device)[None, :, None]
        cols = part[:, 3, None, None] * bn + torch.arange(bn, device=part.device)[None, None, :]
        inside = (rows < q_len) & (cols < kv_len)
        try:
            keep = block_mask.mask_mod(b, h, rows.clamp_max(q_len - 1), cols.clamp_max(kv_len - 1))
        except Exception as exc:  # any failure of user code: say whose it is
            raise ValueError(f"block_mask: its mask_mod could not be evaluated on broadcast index tensors "
                             f"({type(exc).__name__}: {exc})") from exc
        keep = keep.to(torch.bool).expand(inside.shape) & inside
        causal = inside & (cols <= rows + offset)
        classes.append(torch.stack([(keep == inside).all((1, 2)), ~keep.any((1, 2)), (keep == causal).all((1, 2))], 1))
    return torch.cat(classes) if classes else torch.zeros(0, 3, dtype=torch.bool)


@dataclass(frozen=True)
class BlockSparseMask:
    """Which KV blocks each query block attends (FlexAttention's forward layout).

    Attributes:
        kv_num_blocks: int32 ``[B|1, H|1, Mq]``: how many KV blocks query block m attends.
        kv_indices: int32 ``[B|1, H|1, Mq, Nk]``: their indices first (the rest is ignored).
        block_m, block_n: query and KV block sizes, each in 16, 32, 64, 128.
        q_len, kv_len: sequence lengths; ``Mq = ceil(q_len / block_m)``, ``Nk = ceil(kv_len / block_n)``.
        causal: also mask key position > query position inside blocks, with queries aligned to the end of the
            keys (query i sits at position ``i + kv_len - q_len``).

    A batch or head dimension of 1 broadcasts. H counts query heads.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    causal: bool = False

    def __post_init__(self):
        validate_block_mask(self.kv_num_blocks, self.kv_indices, self.block_m, self.block_n, self.q_len, self.kv_len)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B|1, H|1, Mq, Nk)``."""
        return tuple(self.kv_indices.shape)

    @classmethod
    def from_dense(cls, blocks: torch.Tensor, block_m: int, block_n: int, q_len: Optional[int] = None,
                   kv_len: Optional[int] = None, causal: bool = False) -> "BlockSparseMask":
        """From a bool ``[B|1, H|1, Mq, Nk]`` block map (True = attend). ``q_len`` and ``kv_len`` default to
        ``Mq * block_m`` and ``Nk * block_n``. Indices are listed in increasing order."""
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 4:
            raise ValueError(f"blocks: expected a [B|1, H|1, Mq, Nk] tensor, got {list(getattr(blocks, 'shape', []))}")
        blocks = blocks.bool()
        mq, nk = blocks.shape[2:]
        q_len = mq * block_m if q_len is None else q_len
        kv_len = nk * block_n if kv_len is None else kv_len
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)  # selected first, in index order
        return cls(blocks.sum(-1, dtype=torch.int32), order.to(torch.int32), block_m, block_n, q_len, kv_len, causal)

    @classmethod
    def from_flex(cls, block_mask, causal: Optional[bool] = None) -> "BlockSparseMask":
        """From a FlexAttention ``BlockMask``, computing exactly what ``flex_attention`` computes with it, or
        raising ValueError naming ``block_mask`` when no BlockSparseMask can.

        Full blocks are attended whole. On every partial block the ``mask_mod`` is evaluated: a block it keeps
        whole is attended whole, one it masks out entirely is dropped, and one it masks exactly as the causal
        rule (key <= query + kv_len - q_len) is attended causally. ``causal`` None picks whichever of non-causal
        or causal reproduces the mask; sliding windows inside blocks, key padding inside a block, or a causal
        ``mask_mod`` start-aligned where q_len != kv_len cannot be expressed and raise.
        """
        block_m, block_n = block_mask.BLOCK_SIZE
        q_len, kv_len = block_mask.seq_lengths
        partial = listed_blocks(block_mask.kv_num_blocks.int(), block_mask.kv_indices.int())
        full = torch.zeros_like(partial) if block_mask.full_kv_num_blocks is None else \
            listed_blocks(block_mask.full_kv_num_blocks.int(), block_mask.full_kv_indices.int())
        where = partial.nonzero()
        whole, empty, causal_like = _flex_element_classes(block_mask, where, q_len, kv_len).unbind(1)
        kept = where[~empty]
        partial = torch.zeros_like(partial)
        partial[tuple(kept.T)] = True
        # causality cuts a block unless its first row already sees its last key
        m = torch.arange(partial.shape[2], device=partial.device)[:, None]
        n = torch.arange(partial.shape[3], device=partial.device)[None, :]
        uncut = (m * block_m + kv_len - q_len) >= torch.clamp_max((n + 1) * block_n, kv_len) - 1
        options = {False: bool(whole[~empty].all()),
                   True: bool(causal_like[~empty].all()) and bool((uncut | ~full).all())}
        chosen = [c for c in ((False, True) if causal is None else (bool(causal),)) if options[c]]
        if not chosen:
            raise ValueError(f"block_mask: its mask_mod masks elements inside partial blocks in a way a BlockSparseMask "
                             f"(whole blocks{', causal' if causal else ''}, queries end-aligned) cannot express; "
                             f"flex_attention's result would not be reproduced")
        return cls.from_dense(full | partial, block_m, block_n, q_len, kv_len, chosen[0])

    def to_dense(self) -> torch.Tensor:
        """The bool block map ``[B|1, H|1, Mq, Nk]``."""
        return listed_blocks(self.kv_num_blocks, self.kv_indices)

    def to_flex(self):
        """The equivalent FlexAttention ``BlockMask``: the same blocks, and a ``mask_mod`` that applies the block
        map (and causality) per element, so flex_attention computes exactly this mask even unfused."""
        from torch.nn.attention.flex_attention import BlockMask

        dense, bm, bn, causal = self.to_dense(), self.block_m, self.block_n, self.causal
        offset = self.kv_len - self.q_len
        per_batch, per_head = dense.shape[0] > 1, dense.shape[1] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            keep = dense[b if per_batch else 0, h if per_head else 0, q_idx // bm, kv_idx // bn]
            return keep & (kv_idx <= q_idx + offset) if causal else keep

        canonical = BlockSparseMask.from_dense(dense, bm, bn, self.q_len, self.kv_len)  # no stray unlisted entries
        return BlockMask.from_kv_blocks(canonical.kv_num_blocks, canonical.kv_indices, BLOCK_SIZE=(bm, bn),
                                        mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len))

    def to(self, device) -> "BlockSparseMask":
        """The mask with its index tensors on ``device``."""
        return BlockSparseMask(self.kv_num_blocks.to(device), self.kv_indices.to(device), self.block_m, self.block_n,
                               self.q_len, self.kv_len, self.causal)

    def density(self) -> float:
        """Selected blocks over all blocks (over the broadcast dims as stored)."""
        return float(self.kv_num_blocks.sum()) / max(1, self.kv_indices.numel())


# ---------------------------------------------------------------------------------------------------- helpers

def _query_positions(q_len, kv_len, block_m, device):
    """Absolute positions of each query block's first and last row, [Mq] each (queries end-aligned)."""
    starts = torch.arange(0, q_len, block_m, device=device)
    offset = kv_len - q_len
    return starts + offset, torch.clamp_max(starts + block_m, q_len) - 1 + offset


def _causal_blocks(q_len, kv_len, block_m, block_n, device):
    """Bool [Mq, Nk]: key block n holds a key visible to some row of query block m under causality."""
    _, last = _query_positions(q_len, kv_len, block_m, device)
    key_start = torch.arange(0, kv_len, block_n, device=device)
    return key_start[None, :] <= last[:, None]


def _first_key_blocks(q_len, kv_len, block_m, block_n, device):
    """Bool [Mq, Nk]: the key blocks holding the last key visible to each query block's first row and to its last
    row (queries end-aligned). With both kept, every row of the query block sees at least one key, whatever
    ``kv_len - q_len`` is modulo ``block_n``."""
    first, last = _query_positions(q_len, kv_len, block_m, device)
    blocks = torch.zeros(len(first), _blocks(kv_len, block_n), dtype=torch.bool, device=device)
    m = torch.arange(len(first), device=device)
    blocks[m, first // block_n] = True
    blocks[m, last // block_n] = True
    return blocks


def _check_causal_lengths(q_len, kv_len):
    """Causal patterns align queries to the end of the keys: q_len <= kv_len."""
    if not (isinstance(q_len, int) and isinstance(kv_len, int) and 0 <= q_len <= kv_len):
        raise ValueError(f"q_len: a causal pattern needs integers 0 <= q_len <= kv_len (queries end-aligned), got "
                         f"q_len={q_len!r}, kv_len={kv_len!r}")


def _check_count(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _check_finite(value, name):
    if not isinstance(value, (int, float)) or not abs(float(value)) < float("inf"):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _gqa_keys(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """k [B, Hkv, S, D] repeated to n_heads query heads."""
    if n_heads % k.shape[1]:
        raise ValueError(f"q: {n_heads} heads is not a multiple of k's {k.shape[1]} KV heads")
    return k.repeat_interleave(n_heads // k.shape[1], dim=1)


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per KV head."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q: {q.shape[1]} heads is not a multiple of k's {k.shape[1]} KV heads")
    return q.shape[1] // k.shape[1]


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of ``block`` rows along dim 2 (the last block may be short), float32."""
    b, h, s, d = x.shape
    n = _blocks(s, block)
    padded = torch.zeros(b, h, n * block, d, dtype=torch.float32, device=x.device)
    padded[:, :, :s] = x.float()
    counts = torch.clamp_max(s - torch.arange(n, device=x.device) * block, block).float()
    return padded.view(b, h, n, block, d).sum(3) / counts[:, None]


def _check_qk(q, k):
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point [B, H, S, D] tensor, got "
                             f"{list(getattr(t, 'shape', []))}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k: shape {list(k.shape)} does not match q {list(q.shape)} in batch or head_dim")
    if q.device != k.device:
        raise ValueError(f"k: on {k.device}, but q is on {q.device}")


# ---------------------------------------------------------------------------------------------------- patterns

def streaming(q_len: int, kv_len: int, sink: int, window: int, block_m: int = 64, block_n: int = 64,
              n_heads: int = 1, dense_heads: Sequence[int] = (), device=None) -> BlockSparseMask:
    """Attention sinks plus a local window, causal (LServe / DuoAttention streaming heads).

    Query block m attends the KV blocks holding the first ``sink`` keys and those holding any key within
    ``window`` positions back from one of its queries (the query itself included), rounded out to whole
    blocks. Heads listed in ``dense_heads`` attend causally to everything instead. Returns a mask of shape
    ``[1, n_heads, Mq, Nk]`` (``[1, 1, ...]`` when every head streams and n_heads is 1).
    """
    _check_block_size(block_m, "block_m")
    _check_block_size(block_n, "block_n")
    if sink < 0 or window < 1:
        raise ValueError(f"sink, window: need sink >= 0 and window >= 1, got {sink}, {window}")
    dense_heads = sorted(set(int(h) for h in dense_heads))
    if any(h < 0 or h >= n_heads for h in dense_heads):
        raise ValueError(f"dense_heads: every head must be in [0, n_heads = {n_heads}), got {dense_heads}")
    first, last = _query_positions(q_len, kv_len, block_m, device)
    key_start = torch.arange(0, kv_len, block_n, device=device)
    key_end = torch.clamp_max(key_start + block_n, kv_len) - 1
    sinks = key_start < sink
    local = (key_end[None, :] > first[:, None] - window) & (key_start[None, :] <= last[:, None])
    stream = (sinks[None, :] | local)[None, None].expand(1, n_heads, -1, -1).clone()
    if dense_heads:
        stream[:, dense_heads] = _causal_blocks(q_len, kv_len, block_m, block_n, device)
    return BlockSparseMask.from_dense(stream, block_m, block_n, q_len, kv_len, causal=True)


def vertical_slash(q: torch.Tensor, k: torch.Tensor, n_vertical: int, n_slash: int, last_q: int = 64,
                   block_m: int = 64, block_n: int = 64, scale: Optional[float] = None) -> BlockSparseMask:
    """MInference's vertical-slash pattern, causal, estimated per (batch, head).

    The last ``last_q`` queries attend (causally, in float32) to every key; summing their attention per key
    column gives the vertical scores and per diagonal (query position - key position) the slash scores. The
    top ``n_vertical`` columns and ``n_slash`` diagonals are kept (the first column, the sink, and the main
    diagonal always), and a block is selected when a kept column or diagonal crosses it.
    """
    _check_qk(q, k)
    _check_block_size(block_m, "block_m")
    _check_block_size(block_n, "block_n")
    _check_count(n_vertical, "n_vertical", 0)
    _check_count(n_slash, "n_slash", 0)
    _check_count(last_q, "last_q", 1)
    b, h, q_len, d = q.shape
    kv_len, group = k.shape[2], _group(q, k)
    _check_causal_lengths(q_len, kv_len)
    scale = d ** -0.5 if scale is None else scale
    last_q = min(last_q, q_len)
    pos = torch.arange(q_len - last_q, q_len, device=q.device) + (kv_len - q_len)
    keys = torch.arange(kv_len, device=q.device)
    future = keys[None, :] > pos[:, None]
    offsets = (pos[:, None] - keys[None, :]).clamp_min(0).flatten()  # the diagonal of each (row, key)
    columns, diagonals = [], []
    for head in range(h):  # one head at a time: [B, last_q, S] scores at most
        scores = (q[:, head, -last_q:].float() @ k[:, head // group].float().transpose(-1, -2)) * scale
        attn = torch.softmax(scores.masked_fill(future, float("-inf")), -1)
        vertical = attn.sum(1)  # [B, S]
        slash = torch.zeros(b, kv_len, device=q.device).scatter_add_(1, offsets.expand(b, -1), attn.reshape(b, -1))
        vertical[:, 0] = float("inf")
        slash[:, 0] = float("inf")
        columns.append(vertical.topk(min(max(n_vertical, 1), kv_len), -1).indices)
        diagonals.append(slash.topk(min(max(n_slash, 1), kv_len), -1).indices.sort(-1).values)
    columns, diagonals = torch.stack(columns, 1), torch.stack(diagonals, 1)  # [B, H, n]

    first, last = _query_positions(q_len, kv_len, block_m, q.device)
    key_start = torch.arange(0, kv_len, block_n, device=q.device)
    key_end = torch.clamp_max(key_start + block_n, kv_len) - 1
    column_blocks = torch.zeros(b, h, len(key_start), dtype=torch.bool, device=q.device)
    column_blocks.scatter_(-1, columns // block_n, True)
    blocks = column_blocks[:, :, None, :].expand(-1, -1, len(first), -1).clone()
    # diagonal o crosses block (m, n) when some row position a in [first, last] has key a - o in [start, end]
    lo = (first[:, None] - key_end[None, :]).flatten()  # smallest offset through the block
    hi = (last[:, None] - key_start[None, :]).flatten()
    flat = diagonals.reshape(b * h, -1).contiguous()
    count = (torch.searchsorted(flat, hi.expand(b * h, -1).contiguous(), right=True)
             - torch.searchsorted(flat, lo.expand(b * h, -1).contiguous(), right=False))
    blocks |= (count > 0).view(b, h, len(first), len(key_start))
    blocks &= _causal_blocks(q_len, kv_len, block_m, block_n, q.device)
    return BlockSparseMask.from_dense(blocks, block_m, block_n, q_len, kv_len, causal=True)


def anchor(q: torch.Tensor, k: torch.Tensor, theta: float, block_m: int = 64, block_n: int = 64,
           init_blocks: int = 1, local_blocks: int = 1, scale: Optional[float] = None) -> BlockSparseMask:
    """AnchorAttention's selection, causal.

    Each query block's mean-pooled query scores every key (causally, against the block's last row). The
    anchor is the highest score in the first ``init_blocks`` KV blocks and the ``local_blocks`` KV blocks
    ending at the query block's diagonal; a KV block is kept when its highest score is at least
    ``anchor - theta``. The initial and local blocks are always kept.
    """
    _check_qk(q, k)
    _check_block_size(block_m, "block_m")
    _check_block_size(block_n, "block_n")
    _check_finite(theta, "theta")
    _check_count(init_blocks, "init_blocks", 0)
    _check_count(local_blocks, "local_blocks", 1)
    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    _check_causal_lengths(q_len, kv_len)
    scale = d ** -0.5 if scale is None else scale
    nk, group = _blocks(kv_len, block_n), _group(q, k)
    _, last = _query_positions(q_len, kv_len, block_m, q.device)
    future = torch.arange(kv_len, device=q.device)[None, :] > last[:, None]
    pooled = _pool(q, block_m)  # [B, H, Mq, D]
    block_max = []
    for head in range(h):  # one head at a time: [B, Mq, S] scores at most
        scores = (pooled[:, head] @ k[:, head // group].float().transpose(-1, -2)) * scale
        scores = F.pad(scores.masked_fill(future, float("-inf")), (0, nk * block_n - kv_len), value=float("-inf"))
        block_max.append(scores.view(b, len(last), nk, block_n).amax(-1))
    block_max = torch.stack(block_max, 1)  # [B, H, Mq, Nk]
    n = torch.arange(nk, device=q.device)
    diagonal = (last // block_n)[:, None]
    always = (n[None, :] < init_blocks) | ((n[None, :] <= diagonal) & (n[None, :] > diagonal - local_blocks))
    always |= _first_key_blocks(q_len, kv_len, block_m, block_n, q.device)
    anchor_score = block_max.masked_fill(~always, float("-inf")).amax(-1, keepdim=True)
    blocks = (block_max >= anchor_score - theta) | always
    blocks &= _causal_blocks(q_len, kv_len, block_m, block_n, q.device)
    return BlockSparseMask.from_dense(blocks, block_m, block_n, q_len, kv_len, causal=True)


def kmeans_keys(k: torch.Tensor, n_clusters: int, iters: int = 10,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cluster each (batch, KV head)'s keys offline with Lloyd's k-means (Squeezed Attention).

    Returns ``centroids`` float32 ``[B, Hkv, C, D]`` and ``cluster_of_key`` int64 ``[B, Hkv, S]``. Starts from
    ``n_clusters`` distinct random keys; an emptied cluster keeps its centroid.
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k: expected [B, Hkv, S, D], got {list(getattr(k, 'shape', []))}")
    if not k.is_floating_point():
        raise TypeError(f"k: expected a floating-point tensor, got {k.dtype}")
    b, h, s, d = k.shape
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or not 1 <= n_clusters <= s:
        raise ValueError(f"n_clusters: must be an integer in [1, S = {s}], got {n_clusters!r}")
    _check_count(iters, "iters", 0)
    keys = k.float().reshape(b * h, s, d)
    start = torch.rand(b * h, s, generator=generator, device="cpu").argsort(-1)[:, :n_clusters].to(k.device)
    centroids = keys.gather(1, start[..., None].expand(-1, -1, d))
    for _ in range(iters):
        assign = torch.cdist(keys, centroids).argmin(-1)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, d), keys)
        counts = torch.zeros(b * h, n_clusters, device=k.device).scatter_add_(1, assign, torch.ones_like(keys[..., 0]))
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centroids)
    assign = torch.cdist(keys, centroids).argmin(-1)
    return centroids.view(b, h, n_clusters, d), assign.view(b, h, s)


def centroid_select(q: torch.Tensor, centroids: torch.Tensor, cluster_of_key: torch.Tensor,
                    threshold: Optional[float] = None, top_k: Optional[int] = None, block_m: int = 64,
                    block_n: int = 64, causal: bool = True, scale: Optional[float] = None) -> BlockSparseMask:
    """Squeezed Attention's online selection over a fixed, clustered context.

    Each query block's mean-pooled query scores the centroids. With ``top_k`` the best ``top_k`` clusters are
    kept; with ``threshold`` the clusters whose estimated attention mass (softmax of the centroid scores
    weighted by cluster sizes) is at least ``threshold``. A KV block is kept when it holds a key of a kept
    cluster. With ``causal`` (queries end-aligned), blocks past a query block are dropped and the diagonal
    block is always kept.
    """
    if (threshold is None) == (top_k is None):
        raise ValueError("centroid_select: pass exactly one of threshold and top_k")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected [B, H, S, D], got {list(getattr(q, 'shape', []))}")
    b, h, q_len, d = q.shape
    if centroids.dim() != 4 or centroids.shape[0] != b or centroids.shape[3] != d:
        raise ValueError(f"centroids: expected [B={b}, Hkv, C, D={d}], got {list(centroids.shape)}")
    if cluster_of_key.shape[:2] != centroids.shape[:2] or cluster_of_key.dim() != 3:
        raise ValueError(f"cluster_of_key: expected [B, Hkv, S] matching centroids, got {list(cluster_of_key.shape)}")
    kv_len, n_clusters = cluster_of_key.shape[2], centroids.shape[2]
    if cluster_of_key.dtype != torch.int64 or cluster_of_key.device != q.device or cluster_of_key.numel() and (
            int(cluster_of_key.min()) < 0 or int(cluster_of_key.max()) >= n_clusters):
        raise ValueError(f"cluster_of_key: expected int64 cluster ids in [0, C = {n_clusters}) on {q.device}")
    if top_k is not None:
        _check_count(top_k, "top_k", 1)
    elif not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ValueError(f"threshold: expected an attention mass in [0, 1], got {threshold!r}")
    _check_block_size(block_m, "block_m")
    _check_block_size(block_n, "block_n")
    if causal:
        _check_causal_lengths(q_len, kv_len)
    scale = d ** -0.5 if scale is None else scale
    scores = (_pool(q, block_m) @ _gqa_keys(centroids.float(), h).transpose(-1, -2)) * scale  # [B, H, Mq, C]
    if top_k is not None:
        best = scores.topk(min(top_k, n_clusters), -1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
    else:
        ones = torch.ones_like(cluster_of_key, dtype=torch.float)
        sizes = torch.zeros(*centroids.shape[:3], device=q.device).scatter_add_(-1, cluster_of_key, ones)
        mass = torch.softmax(scores + torch.log(_gqa_keys(sizes[..., None], h)[..., 0])[:, :, None, :], -1)
        chosen = mass >= threshold
    # which clusters each KV block holds, [B, Hkv, Nk, C]; a block is kept when it holds a chosen cluster
    nk = _blocks(kv_len, block_n)
    slot = (torch.arange(kv_len, device=q.device) // block_n) * n_clusters + cluster_of_key
    holds = torch.zeros(*centroids.shape[:2], nk * n_clusters, device=q.device).scatter_(-1, slot, 1.0)
    holds = _gqa_keys(holds.view(*centroids.shape[:2], nk, n_clusters), h)
    blocks = (chosen.float() @ holds.transpose(-1, -2)) > 0  # [B, H, Mq, Nk]
    if causal:
        blocks &= _causal_blocks(q_len, kv_len, block_m, block_n, q.device)
        blocks |= _first_key_blocks(q_len, kv_len, block_m, block_n, q.device)
    return BlockSparseMask.from_dense(blocks, block_m, block_n, q_len, kv_len, causal=causal)


def topk_blocks(q: torch.Tensor, k: torch.Tensor, density: float, block_m: int = 64, block_n: int = 64,
                causal: bool = True, scale: Optional[float] = None) -> BlockSparseMask:
    """Generic block top-k: mean-pooled q and k per block score every block pair; each query block keeps the
    top ``ceil(density * reachable blocks)`` KV blocks; when causal, always the blocks holding the last key its
    first and its last row see, so no row is left without a key."""
    _check_qk(q, k)
    if not 0 < density <= 1:
        raise ValueError(f"density: must be in (0, 1], got {density}")
    _check_block_size(block_m, "block_m")
    _check_block_size(block_n, "block_n")
    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    if causal:
        _check_causal_lengths(q_len, kv_len)
    scale = d ** -0.5 if scale is None else scale
    scores = (_pool(q, block_m) @ _gqa_keys(_pool(k, block_n), h).transpose(-1, -2)) * scale  # [B, H, Mq, Nk]
    mq, nk = scores.shape[2:]
    reachable = (_causal_blocks(q_len, kv_len, block_m, block_n, q.device) if causal
                 else torch.ones(mq, nk, dtype=torch.bool, device=q.device))
    keep = torch.ceil(density * reachable.sum(-1).float()).long()  # [Mq]
    forced = _first_key_blocks(q_len, kv_len, block_m, block_n, q.device) if causal else torch.zeros_like(reachable)
    scores = scores.masked_fill(forced, float("inf")).masked_fill(~reachable, float("-inf"))
    rank = torch.argsort(torch.argsort(scores, dim=-1, descending=True, stable=True), dim=-1)
    blocks = ((rank < keep[:, None]) | forced) & reachable
    return BlockSparseMask.from_dense(blocks, block_m, block_n, q_len, kv_len, causal=causal)


# ---------------------------------------------------------------------------------------------------- decode

def check_lengths(seq_lens, batch: int, s_max: Optional[int], name: str = "seq_lens") -> None:
    """Integer lengths ``[batch]`` in ``[0, s_max]``; the range check reads the data, so it is skipped inside
    CUDA-graph capture (where the consumers clamp)."""
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype.is_floating_point or seq_lens.dtype == torch.bool \
            or seq_lens.dtype.is_complex or seq_lens.shape != (batch,):
        raise ValueError(f"{name}: expected an integer tensor of shape [{batch}], got "
                         f"{getattr(seq_lens, 'dtype', type(seq_lens).__name__)} {list(getattr(seq_lens, 'shape', []))}")
    capturing = seq_lens.is_cuda and torch.cuda.is_current_stream_capturing()
    if s_max is not None and not capturing and seq_lens.device.type != "meta" and seq_lens.numel() and \
            bool(((seq_lens < 0) | (seq_lens > s_max)).any()):
        raise ValueError(f"{name}: every entry must be in [0, S_max = {s_max}], got {seq_lens.tolist()}")


@dataclass
class PageSummary:
    """Per page and KV head, the elementwise min and max of the page's keys (Quest / LServe).

    Attributes:
        kmin, kmax: ``[B, Hkv, n_pages, D]`` in the cache's dtype, ``n_pages = ceil(S_max / page_size)``; pages
            (or page tails) past a row's length do not count, and an empty page holds zeros.
        page_size: 16 or 64 tokens.
        seq_lens: int64 ``[B]``, the lengths summarised.
    """

    kmin: torch.Tensor
    kmax: torch.Tensor
    page_size: int
    seq_lens: torch.Tensor

    @classmethod
    def build(cls, k_cache: torch.Tensor, seq_lens: torch.Tensor, page_size: int = 16) -> "PageSummary":
        """Summarise ``k_cache`` ``[B, Hkv, S_max, D]`` up to ``seq_lens`` [B]."""
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size: must be one of {PAGE_SIZES}, got {page_size}")
        if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or not k_cache.is_floating_point():
            raise ValueError(f"k_cache: expected a floating-point [B, Hkv, S_max, D] tensor, got "
                             f"{getattr(k_cache, 'dtype', None)} {list(getattr(k_cache, 'shape', []))}")
        b, h, s_max, d = k_cache.shape
        n_pages = _blocks(s_max, page_size)
        empty = torch.zeros(b, h, n_pages, d, dtype=k_cache.dtype, device=k_cache.device)
        summary = cls(empty, empty.clone(), page_size, torch.zeros(b, dtype=torch.long, device=k_cache.device))
        summary._summarise(k_cache, torch.arange(n_pages, device=k_cache.device).expand(b, -1), seq_lens)
        return summary

    def update(self, k_cache: torch.Tensor, seq_lens: torch.Tensor, max_new_tokens: Optional[int] = None) -> None:
        """Bring the summary up to ``seq_lens`` after tokens were appended to ``k_cache`` or rolled back (a
        speculative step's rejected tokens): only the pages between each row's previous and new lengths are
        recomputed (one page per decode step).

        With ``max_new_tokens`` (a bound on how many tokens any row's length changed by, up or down) the update
        has fixed shapes and no host synchronisation, so it can be captured in a CUDA graph; without it the span
        is read from the lengths.
        """
        check_lengths(seq_lens, self.seq_lens.shape[0], k_cache.shape[2] if k_cache.dim() == 4 else None)
        seq_lens = seq_lens.to(self.seq_lens.device).long()
        first = torch.div(torch.minimum(self.seq_lens, seq_lens), self.page_size, rounding_mode="floor")
        last = torch.div((torch.maximum(self.seq_lens, seq_lens) - 1).clamp_min(0), self.page_size,
                         rounding_mode="floor")
        if max_new_tokens is not None:
            span = (max_new_tokens + self.page_size - 2) // self.page_size + 1  # pages a run of new tokens can touch
        else:
            span = int((last - first).clamp_min(0).max()) + 1 if seq_lens.numel() else 0
        pages = (first[:, None] + torch.arange(span, device=first.device)).clamp_max(self.kmin.shape[2] - 1)
        self._summarise(k_cache, pages, seq_lens)

    def _summarise(self, k_cache, pages, seq_lens):
        """Recompute the listed pages ([B, n] page indices) of every head from the cache."""
        b, h, s_max, d = k_cache.shape
        if (b, h, d) != (self.kmin.shape[0], self.kmin.shape[1], self.kmin.shape[3]):
            raise ValueError(f"k_cache: shape {list(k_cache.shape)} does not match the summary's "
                             f"{list(self.kmin.shape)}")
        check_lengths(seq_lens, b, s_max)
        seq_lens = seq_lens.to(k_cache.device).long()
        p = self.page_size
        positions = pages[:, :, None] * p + torch.arange(p, device=k_cache.device)  # [B, n, P]
        valid = positions < torch.clamp_max(seq_lens, s_max)[:, None, None]
        index = positions.clamp_max(s_max - 1).reshape(b, 1, -1, 1).expand(b, h, -1, d)
        tokens = k_cache.gather(2, index).view(b, h, pages.shape[1], p, d)
        mask = valid[:, None, :, :, None]
        any_valid = valid.any(-1)[:, None, :, None]
        kmin = torch.where(mask, tokens, torch.full_like(tokens, float("inf"))).amin(3)
        kmax = torch.where(mask, tokens, torch.full_like(tokens, float("-inf"))).amax(3)
        scatter = pages[:, None, :, None].expand(b, h, -1, d)
        self.kmin.scatter_(2, scatter, torch.where(any_valid, kmin, 0))
        self.kmax.scatter_(2, scatter, torch.where(any_valid, kmax, 0))
        self.seq_lens.copy_(seq_lens)  # in place: a captured graph keeps reading the same tensor
