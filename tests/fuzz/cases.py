"""Targeted bad and edge-case inputs for every public op and module, each with the outcome the library promises:
a clear ``TypeError``/``ValueError`` naming the argument, or the right answer.

Each :class:`Case` runs its call and is classified as

- ``clear``: raised the promised error type, naming the argument;
- ``unclear``: raised something else, or an error that does not name the argument, or rejected a valid input;
- ``silent``: returned a wrong answer (or returned where it had to raise);
- ``right``: returned the right answer.

``tests/fuzz/test_cases.py`` asserts every case is ``clear`` or ``right``. Run this file to print the counts
per family (``python -m tests.fuzz.cases`` from the repository root, or ``python tests/fuzz/cases.py``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable

if __name__ == "__main__" and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # the triton cases run under the interpreter on the CPU

import torch
import torch.nn.functional as F
from torch import nn

import efficient_ops as eo
from efficient_ops.backends import BackendUnavailableError

calibrate = eo.calibrate  # R-Sparse calibration's public name

NAN, INF = float("nan"), float("inf")
ERRORS = (TypeError, ValueError)


@dataclasses.dataclass
class Case:
    """One input. ``arg``: the argument an error must name (None: the call must succeed). ``check``: validates a
    returned value (raise AssertionError or return False for a wrong answer); with both, either outcome is kept."""

    family: str
    name: str
    call: Callable[[], object]
    arg: str | None = None
    check: Callable[[object], object] | None = None
    errors: tuple[type, ...] = ERRORS


def classify(case: Case) -> tuple[str, str]:
    """``(outcome, detail)``: outcome one of clear, unclear, silent, right (see the module docstring)."""
    try:
        result = case.call()
    except Exception as exc:  # noqa: BLE001 - every exception is classified
        text = f"{type(exc).__name__}: {exc}"
        if case.arg is not None and isinstance(exc, case.errors) and \
                re.search(rf"(^|\W){re.escape(case.arg)}(\W|$)", str(exc)):
            return "clear", text
        return "unclear", text[:300]
    if case.check is None:
        return "silent", f"returned {_short(result)} instead of raising an error naming {case.arg!r}"
    try:
        ok = case.check(result)
    except Exception as exc:  # noqa: BLE001 - a failing check is a wrong answer
        return "silent", f"{type(exc).__name__}: {exc}"[:300]
    return ("right", "") if ok is not False else ("silent", f"wrong answer: {_short(result)}")


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} {value.dtype}"
    return repr(value)[:80]


# ---------------------------------------------------------------------------------------------------- helpers

def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return INF
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def close(ref, tol=1e-4):
    """A check: the result (or its first element) is within ``tol`` relative error of ``ref()``."""
    def check(out):
        out = out[0] if isinstance(out, tuple) else out
        err = rel(out, ref())
        assert err <= tol, f"relative error {err:.3g} > {tol}"
    return check


def finite(out):
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all(), "non-finite values in the output"


def interp():
    return eo.backends.device_status("triton", torch.device("cpu")) is None


CASES = []


def case(family, name, call, arg=None, check=None, errors=ERRORS):
    CASES.append(Case(family, name, call, arg, check, errors))


# ---------------------------------------------------------------------------------------------------- lowbit

W = randn(24, 200, seed=1)
QW = eo.quantize_weight(W, 4, 32, scale_dtype=torch.float32)
X = randn(3, 200, seed=2)
QW16 = eo.quantize_weight(W.half(), 4, 32)
MIXED = eo.quantize_weight_mixed(W, [3, 50, 120], scale_dtype=torch.float32)


def _dense(qw, x, bias=None):
    return F.linear(x.float(), eo.dequantize_weight(qw, torch.float32), None if bias is None else bias.float())


def _with(obj, **changes):
    return dataclasses.replace(obj, **changes)


def _perm(values):
    p = MIXED.perm.clone()
    for i, v in values.items():
        p[i] = v
    return _with(MIXED, perm=p)


LB = "lowbit"
case(LB, "x integer dtype", lambda: eo.lowbit_linear(X.to(torch.int32), QW), "x")
case(LB, "x float64", lambda: eo.lowbit_linear(X.double(), QW), "x")
case(LB, "x wrong last dim", lambda: eo.lowbit_linear(randn(3, 199), QW), "x")
case(LB, "x 0-dim", lambda: eo.lowbit_linear(torch.tensor(1.0), QW), "x")
case(LB, "x None", lambda: eo.lowbit_linear(None, QW), "x")
case(LB, "qw None", lambda: eo.lowbit_linear(X, None), "qw")
case(LB, "qw a tensor", lambda: eo.lowbit_linear(X, W), "qw")
case(LB, "bias wrong shape", lambda: eo.lowbit_linear(X, QW, torch.zeros(23)), "bias")
case(LB, "bias wrong dtype", lambda: eo.lowbit_linear(X, QW, torch.zeros(24, dtype=torch.float16)), "bias")
case(LB, "bias on meta", lambda: eo.lowbit_linear(X, QW, torch.zeros(24, device="meta")), "bias")
case(LB, "x on meta, weight on cpu", lambda: eo.lowbit_linear(X.to("meta"), QW), "qweight")
case(LB, "scales on meta", lambda: eo.lowbit_linear(X, _with(QW, scales=QW.scales.to("meta"))), "scales")
case(LB, "backend unknown", lambda: eo.lowbit_linear(X, QW, backend="foo"), "backend")
case(LB, "qweight int64", lambda: eo.lowbit_linear(X, _with(QW, qweight=QW.qweight.long())), "qweight")
case(LB, "qweight wrong width", lambda: eo.lowbit_linear(X, _with(QW, qweight=QW.qweight[:, :-1].contiguous())),
     "qweight")
case(LB, "qweight non-contiguous", lambda: eo.lowbit_linear(X, _with(QW, qweight=QW.qweight.t().contiguous().t())),
     "qweight")
case(LB, "scales wrong shape", lambda: eo.lowbit_linear(X, _with(QW, scales=QW.scales[:, :-1].contiguous())),
     "scales")
case(LB, "scales int", lambda: eo.lowbit_linear(X, _with(QW, scales=QW.scales.int())), "scales")
case(LB, "zeros dtype differs", lambda: eo.lowbit_linear(X, _with(QW, zeros=QW.zeros.half())), "zeros")
case(LB, "bits 5", lambda: eo.lowbit_linear(X, _with(QW, bits=5)), "bits")
case(LB, "bits True", lambda: eo.quantize_weight(W, bits=True), "bits")
case(LB, "bits '4'", lambda: eo.quantize_weight(W, bits="4"), "bits")
case(LB, "group_size 48", lambda: eo.quantize_weight(W, group_size=48), "group_size")
case(LB, "group_size 0 in weight", lambda: eo.lowbit_linear(X, _with(QW, group_size=0)), "group_size")
case(LB, "x transposed view", lambda: eo.lowbit_linear(randn(200, 3, seed=4).t(), QW),
     check=close(lambda: _dense(QW, randn(200, 3, seed=4).t())))
case(LB, "x 3-D batch", lambda: eo.lowbit_linear(randn(2, 3, 200), QW),
     check=close(lambda: _dense(QW, randn(2, 3, 200))))
case(LB, "x zero rows", lambda: eo.lowbit_linear(torch.zeros(0, 200), QW),
     check=lambda y: y.shape == (0, 24))
case(LB, "x with bias", lambda: eo.lowbit_linear(X, QW, torch.ones(24)),
     check=close(lambda: _dense(QW, X, torch.ones(24))))
case(LB, "quantize w NaN", lambda: eo.quantize_weight(torch.full((4, 64), NAN)), "w")
case(LB, "quantize w inf", lambda: eo.quantize_weight(W.masked_fill(W > 2, INF)), "w")
case(LB, "quantize w 1-D", lambda: eo.quantize_weight(torch.randn(64)), "w")
case(LB, "quantize w int", lambda: eo.quantize_weight(torch.ones(4, 64, dtype=torch.int32)), "w")
case(LB, "quantize w empty", lambda: eo.quantize_weight(torch.zeros(0, 64)), "w")
case(LB, "quantize scale_dtype int8", lambda: eo.quantize_weight(W, scale_dtype=torch.int8), "scale_dtype")
case(LB, "quantize grid unknown", lambda: eo.quantize_weight(W, grid="nf4"), "grid")
case(LB, "quantize symmetric with seq", lambda: eo.quantize_weight(W, 2, symmetric=True), "symmetric")
case(LB, "quantize center on int", lambda: eo.quantize_weight(W, 4, center=True), "center")


def _roundtrip(w, tol, **kw):
    """A check that the default quantization of ``w`` dequantizes within ``tol`` relative error and finite."""
    def check(qw):
        deq = eo.dequantize_weight(qw, torch.float64)
        err = rel(deq, w)
        assert err <= tol, f"dequantized weight has relative error {err:.3g} > {tol} (scales {qw.scales.dtype})"
    return check


BIG, TINY = randn(8, 128, seed=5, scale=1e6), randn(8, 128, seed=5, scale=1e-8)
case(LB, "fp32 weight |w| ~ 1e6, default scales", lambda: eo.quantize_weight(BIG), "scale_dtype",
     check=_roundtrip(BIG, 0.15))
case(LB, "fp32 weight |w| ~ 1e-8, default scales", lambda: eo.quantize_weight(TINY), "scale_dtype",
     check=_roundtrip(TINY, 0.15))
case(LB, "fp16 scales for |w| ~ 1e6 asked", lambda: eo.quantize_weight(BIG, scale_dtype=torch.float16), "scale_dtype",
     check=_roundtrip(BIG, 0.15))
case(LB, "QuantizedWeight.to(bfloat16)", lambda: QW.to(torch.bfloat16), "dtype",
     check=lambda q: q.qweight.dtype == torch.int32 and torch.equal(q.qweight, QW.qweight))
case(LB, "QuantizedWeight.to('cpu')", lambda: QW.to("cpu"), check=lambda q: torch.equal(q.qweight, QW.qweight))
case(LB, "mixed perm duplicate", lambda: eo.lowbit_linear(X, _perm({1: 3})), "perm")
case(LB, "mixed perm -1", lambda: eo.lowbit_linear(X, _perm({0: -1})), "perm")
case(LB, "mixed perm out of range", lambda: eo.lowbit_linear(X, _perm({0: 200})), "perm")
case(LB, "mixed perm int64", lambda: eo.lowbit_linear(X, _with(MIXED, perm=MIXED.perm.long())), "perm")
case(LB, "mixed dequantize perm duplicate", lambda: eo.dequantize_weight(_perm({1: 3})), "perm")
case(LB, "mixed right answer", lambda: eo.lowbit_linear(X, MIXED), check=close(lambda: _dense(MIXED, X)))
case(LB, "mixed salient duplicate", lambda: eo.quantize_weight_mixed(W, [3, 3, 5]), "salient_channels")
case(LB, "mixed salient float", lambda: eo.quantize_weight_mixed(W, [1.0, 2.0]), "salient_channels")
case(LB, "mixed salient out of range", lambda: eo.quantize_weight_mixed(W, [0, 200]), "salient_channels")
case(LB, "mixed salient all", lambda: eo.quantize_weight_mixed(W, list(range(200))), "salient_channels")
case(LB, "mixed salient empty", lambda: eo.quantize_weight_mixed(W, []), "salient_channels")
case(LB, "select_salient fraction 1.5", lambda: eo.select_salient_channels(X, 1.5), "fraction")
case(LB, "select_salient x int", lambda: eo.select_salient_channels(X.int(), 0.2), "x_calib")
case(LB, "select_salient NaN x", lambda: eo.select_salient_channels(X.masked_fill(X > 1, NAN), 0.2), "x_calib")
case(LB, "dequantize_packed scales wrong", lambda: eo.dequantize_packed(QW.qweight, QW.scales[:1], QW.zeros, 4, 32,
                                                                       200), "scales")
case(LB, "pack_levels level too large", lambda: eo.pack_levels(torch.full((2, 8), 16), 4), "q")
case(LB, "pack_levels float levels", lambda: eo.pack_levels(torch.full((2, 8), 1.5), 4), "q")
case(LB, "unpack_levels wrong width", lambda: eo.unpack_levels(torch.zeros(2, 5, dtype=torch.int32), 3), "qweight")
case(LB, "unpack_levels float words", lambda: eo.unpack_levels(torch.zeros(2, 16), 4), "qweight")
if interp():
    case(LB, "triton bfloat16 under the interpreter",
         lambda: eo.lowbit_linear(X.bfloat16(), eo.quantize_weight(W.bfloat16(), 4, 32), backend="triton"),
         "bfloat16", errors=(BackendUnavailableError,),
         check=close(lambda: _dense(eo.quantize_weight(W.bfloat16(), 4, 32), X.bfloat16()), 1e-2))
    case(LB, "triton float16 right answer", lambda: eo.lowbit_linear(X.half(), QW16, backend="triton"),
         check=close(lambda: _dense(QW16, X.half()), 2e-3))
    case(LB, "triton mixed perm duplicate", lambda: eo.lowbit_linear(X.half(), _with(
        eo.quantize_weight_mixed(W.half(), [3, 50]), perm=torch.zeros(200, dtype=torch.int32)), backend="triton"),
         "perm")

# ---------------------------------------------------------------------------------------------------- rsparse

LIN = nn.Linear(48, 40)
with torch.no_grad():
    LIN.weight.copy_(randn(40, 48, seed=7))
XC = randn(64, 48, seed=8)
RW = calibrate(LIN, XC, 0.5)
XR = randn(3, 48, seed=9)


def _rs_formula(rw, x, bias=None):
    """R-Sparse written out independently: active channels through W, the others through V then (US)^T."""
    xf = x.double()
    m = (x.float().abs() * rw.col_norms > torch.tensor(rw.threshold, dtype=torch.float32)).double()
    y = (xf * m) @ rw.weight_t.double() + ((xf * (1 - m)) @ rw.v.double()) @ rw.us_t.double()
    return y if bias is None else y + bias.double()


RS = "rsparse"
case(RS, "x_calib with one NaN", lambda: calibrate(LIN, XC.masked_fill(XC.abs() > 2.5, NAN)), "x_calib")
case(RS, "x_calib with inf", lambda: calibrate(LIN, XC.masked_fill(XC > 2.5, INF)), "x_calib")
case(RS, "linear weight NaN", lambda: calibrate(torch.full((4, 8), NAN), torch.ones(3, 8)), "linear")
case(RS, "x_calib int", lambda: calibrate(LIN, XC.int()), "x_calib")
case(RS, "x_calib wrong dim", lambda: calibrate(LIN, XC[:, :47]), "x_calib")
case(RS, "x_calib empty", lambda: calibrate(LIN, XC[:0]), "x_calib")
case(RS, "sparsity 1", lambda: calibrate(LIN, XC, 1.0), "sparsity")
case(RS, "sparsity -0.1", lambda: calibrate(LIN, XC, -0.1), "sparsity")
case(RS, "sparsity NaN", lambda: calibrate(LIN, XC, NAN), "sparsity")
case(RS, "alpha 1.5", lambda: calibrate(LIN, XC, 0.5, alpha=1.5), "alpha")
case(RS, "alphas empty", lambda: calibrate(LIN, XC, 0.5, alphas=()), "alphas")
case(RS, "alphas out of range", lambda: calibrate(LIN, XC, 0.5, alphas=(2.0,)), "alphas")
case(RS, "max_search_rows 0", lambda: calibrate(LIN, XC, 0.5, max_search_rows=0), "max_search_rows")
case(RS, "dtype int8", lambda: calibrate(LIN, XC, dtype=torch.int8), "dtype")
case(RS, "linear a 1-D tensor", lambda: calibrate(torch.ones(8), XC), "linear")
case(RS, "x dtype differs", lambda: eo.rsparse_linear(XR.half(), RW), "x")
case(RS, "x int", lambda: eo.rsparse_linear(XR.int(), RW), "x")
case(RS, "x None", lambda: eo.rsparse_linear(None, RW), "x")
case(RS, "x wrong dim", lambda: eo.rsparse_linear(XR[:, :47], RW), "x")
case(RS, "x on meta", lambda: eo.rsparse_linear(XR.to("meta"), RW), "x")
case(RS, "rw None", lambda: eo.rsparse_linear(XR, None), "rw")
case(RS, "bias wrong shape", lambda: eo.rsparse_linear(XR, RW, torch.zeros(41)), "bias")
case(RS, "threshold NaN", lambda: eo.rsparse_linear(XR, _with(RW, threshold=NAN)), "threshold")
case(RS, "threshold a string", lambda: eo.rsparse_linear(XR, _with(RW, threshold="0.1")), "threshold")
case(RS, "col_norms float16", lambda: eo.rsparse_linear(XR, _with(RW, col_norms=RW.col_norms.half())), "col_norms")
case(RS, "col_norms negative", lambda: eo.rsparse_linear(XR, _with(RW, col_norms=-RW.col_norms)), "col_norms")
case(RS, "col_norms NaN", lambda: eo.rsparse_linear(XR, _with(RW, col_norms=RW.col_norms.masked_fill(
    RW.col_norms > 0, NAN))), "col_norms")
case(RS, "v wrong rows", lambda: eo.rsparse_linear(XR, _with(RW, v=RW.v[:-1].contiguous())), "v")
case(RS, "us_t wrong shape", lambda: eo.rsparse_linear(XR, _with(RW, us_t=RW.us_t[:, :-1].contiguous())), "us_t")
case(RS, "weight_t non-contiguous", lambda: eo.rsparse_linear(XR, _with(RW, weight_t=RW.weight_t.t().contiguous().t())),
     "weight_t")
case(RS, "right answer", lambda: eo.rsparse_linear(XR, RW), check=close(lambda: _rs_formula(RW, XR)))
case(RS, "x transposed view", lambda: eo.rsparse_linear(randn(48, 3, seed=3).t(), RW),
     check=close(lambda: _rs_formula(RW, randn(48, 3, seed=3).t())))
case(RS, "sparsity 0 is dense", lambda: eo.rsparse_linear(XR, calibrate(LIN, XC, 0.0)),
     check=close(lambda: F.linear(XR.double(), LIN.weight.double())))
case(RS, "x zero rows", lambda: eo.rsparse_linear(torch.zeros(0, 48), RW), check=lambda y: y.shape == (0, 40))
case(RS, "RSparseWeights.to(float16) keeps col_norms float32", lambda: RW.to(dtype=torch.float16),
     check=lambda r: r.col_norms.dtype == torch.float32 and r.weight_t.dtype == torch.float16)
if interp():
    RW16 = RW.to(dtype=torch.float16)
    case(RS, "triton float16 right answer", lambda: eo.rsparse_linear(XR.half(), RW16, backend="triton"),
         check=close(lambda: _rs_formula(RW16, XR.half()), 2e-3))
    case(RS, "triton bfloat16 under the interpreter",
         lambda: eo.rsparse_linear(XR.bfloat16(), RW.to(dtype=torch.bfloat16), backend="triton"),
         "bfloat16", errors=(BackendUnavailableError,),
         check=close(lambda: _rs_formula(RW.to(dtype=torch.bfloat16), XR.bfloat16()), 1e-2))

# ---------------------------------------------------------------------------------------------------- sparse attention

SA = "sparse_attention"
Q = randn(1, 2, 40, 64, seed=10)
K, V = randn(1, 1, 50, 64, seed=11), randn(1, 1, 50, 64, seed=12)
BLOCKS = torch.rand(1, 1, 3, 4, generator=_g(13)) < 0.6
BLOCKS[..., 0] = True
MASK = eo.BlockSparseMask.from_dense(BLOCKS, 16, 16, 40, 50)


def _sdpa(q, k, v, allowed, scale=None):
    """Independent: SDPA (math) with an explicit bool element mask, GQA by repetition; rows without keys give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    any_key = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=allowed | ~any_key, scale=scale)
    return torch.where(any_key, out, 0.0)


def _elements(blocks, bm, bn, q_len, kv_len, causal):
    rows, cols = torch.arange(q_len), torch.arange(kv_len)
    allowed = blocks[:, :, rows // bm][..., cols // bn]
    if causal:
        allowed = allowed & (cols[None, :] <= rows[:, None] + kv_len - q_len)
    return allowed


def _bsa_ref(q, k, v, blocks, bm, bn, causal=False):
    return _sdpa(q, k, v, _elements(blocks, bm, bn, q.shape[2], k.shape[2], causal))


def _mask_with(mask, **changes):
    fields = {f.name: getattr(mask, f.name) for f in dataclasses.fields(mask)}
    fields.update(changes)
    return eo.BlockSparseMask(**fields)


def _padded_tail(fill):
    """MASK with the unlisted tail of kv_indices set to ``fill`` (what CSR / FlashInfer conversions produce)."""
    idx = MASK.kv_indices.clone()
    listed = torch.arange(idx.shape[-1]) < MASK.kv_num_blocks[..., None]
    return _mask_with(MASK, kv_indices=torch.where(listed, idx, torch.full_like(idx, fill)))


def _nan_outside(k, blocks, bn):
    """k with NaN in every key block no query block selects."""
    used = blocks.any(2)[0, 0]  # [Nk]
    cols = torch.arange(k.shape[2])
    return k.masked_fill(~used[cols // bn][None, None, :, None], NAN)


case(SA, "right answer (reference)", lambda: eo.block_sparse_attention(Q, K, V, MASK),
     check=close(lambda: _bsa_ref(Q, K, V, BLOCKS, 16, 16)))
case(SA, "kv_indices zero-padded tail (reference)", lambda: eo.block_sparse_attention(Q, K, V, _padded_tail(0)),
     check=close(lambda: _bsa_ref(Q, K, V, BLOCKS, 16, 16)))
case(SA, "kv_indices -1 tail (reference)", lambda: eo.block_sparse_attention(Q, K, V, _padded_tail(-1)),
     check=close(lambda: _bsa_ref(Q, K, V, BLOCKS, 16, 16)))
case(SA, "kv_indices garbage tail (reference)", lambda: eo.block_sparse_attention(Q, K, V, _padded_tail(999)),
     check=close(lambda: _bsa_ref(Q, K, V, BLOCKS, 16, 16)))
case(SA, "to_dense with a zero-padded tail", lambda: _padded_tail(0).to_dense(), check=lambda d: torch.equal(d, BLOCKS))
case(SA, "to_dense with a -1 tail", lambda: _padded_tail(-1).to_dense(), check=lambda d: torch.equal(d, BLOCKS))
case(SA, "NaN in unselected key blocks (reference)",
     lambda: eo.block_sparse_attention(Q, _nan_outside(K, BLOCKS, 16), _nan_outside(V, BLOCKS, 16), MASK),
     check=close(lambda: _bsa_ref(Q, K, V, BLOCKS, 16, 16)))


def _topk_case():
    q, k, v = randn(1, 1, 64, 64, seed=14), randn(1, 1, 100, 64, seed=15), randn(1, 1, 100, 64, seed=16)
    mask = eo.topk_blocks(q, k, 0.1, 16, 16)
    return eo.block_sparse_attention(q, k, v, mask, return_lse=True)


def _every_row_has_a_key(result):
    assert torch.isfinite(result[1]).all(), f"{int(torch.isinf(result[1]).sum())} rows attend no key"


case(SA, "topk_blocks kv_len - q_len not a multiple of block_n", _topk_case,
     check=_every_row_has_a_key)


def _strided_num_blocks(backend):
    q, k, v = Q.half(), K.half(), V.half()
    blocks = torch.rand(1, 2, 3, 4, generator=_g(17)) < 0.6
    blocks[..., 0] = True
    m = eo.BlockSparseMask.from_dense(blocks, 16, 16, 40, 50)
    strided = _mask_with(m, kv_num_blocks=m.kv_num_blocks.transpose(1, 2).contiguous().transpose(1, 2),
                         kv_indices=m.kv_indices.transpose(1, 2).contiguous().transpose(1, 2))
    return eo.block_sparse_attention(q, k, v, strided, backend=backend), (q, k, v, blocks)


def _strided_check(result):
    out, (q, k, v, blocks) = result
    assert rel(out, _bsa_ref(q, k, v, blocks, 16, 16)) <= 1e-2


case(SA, "kv_num_blocks strided (reference)", lambda: _strided_num_blocks("reference"), check=_strided_check)
if interp():
    case(SA, "kv_num_blocks strided (triton)", lambda: _strided_num_blocks("triton"), check=_strided_check)
    case(SA, "kv_indices zero-padded tail (triton)", lambda: eo.block_sparse_attention(
        Q.half(), K.half(), V.half(), _padded_tail(0), backend="triton"),
        check=close(lambda: _bsa_ref(Q.half(), K.half(), V.half(), BLOCKS, 16, 16), 1e-2))
    case(SA, "triton bfloat16 under the interpreter", lambda: eo.block_sparse_attention(
        Q.bfloat16(), K.bfloat16(), V.bfloat16(), MASK, backend="triton"), "bfloat16",
        errors=(BackendUnavailableError,), check=close(lambda: _bsa_ref(Q, K, V, BLOCKS, 16, 16), 1e-2))


def _flex(mask_mod, q_len, kv_len, causal_arg):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v = randn(1, 1, q_len, 64, seed=18), randn(1, 1, kv_len, 64, seed=19), randn(1, 1, kv_len, 64, seed=20)
    bm = create_block_mask(mask_mod, 1, 1, q_len, kv_len, device="cpu", BLOCK_SIZE=32)
    expected = flex_attention(q.double(), k.double(), v.double(), block_mask=create_block_mask(
        mask_mod, 1, 1, q_len, kv_len, device="cpu", BLOCK_SIZE=32))

    def call():
        return eo.block_sparse_attention(q, k, v, eo.BlockSparseMask.from_flex(bm, causal=causal_arg))

    def check(out):
        assert rel(out, expected) <= 1e-4, f"differs from flex_attention: {rel(out, expected):.3g}"
    return call, check


for _name, _mod, _ql, _kl in (
        ("causal", lambda b, h, qi, ki: ki <= qi, 64, 64),
        ("sliding window", lambda b, h, qi, ki: (ki <= qi) & (qi - ki < 20), 64, 64),
        ("key padding", lambda b, h, qi, ki: ki < 50, 64, 64),
        ("causal q_len != kv_len", lambda b, h, qi, ki: ki <= qi, 32, 64)):
    _call, _check = _flex(_mod, _ql, _kl, False)
    case(SA, f"from_flex {_name} mask_mod", _call, "block_mask", check=_check)

case(SA, "kv_indices listed out of range", lambda: eo.block_sparse_attention(
    Q, K, V, _mask_with(MASK, kv_indices=MASK.kv_indices.masked_fill(MASK.kv_indices == MASK.kv_indices, 7))),
    "kv_indices")
case(SA, "kv_num_blocks > Nk", lambda: eo.block_sparse_attention(Q, K, V, _mask_with(
    MASK, kv_num_blocks=MASK.kv_num_blocks + 9)), "kv_num_blocks")
case(SA, "kv_num_blocks negative", lambda: eo.block_sparse_attention(Q, K, V, _mask_with(
    MASK, kv_num_blocks=MASK.kv_num_blocks - 9)), "kv_num_blocks")
case(SA, "kv_indices duplicate", lambda: eo.block_sparse_attention(Q, K, V, _mask_with(
    MASK, kv_num_blocks=torch.full_like(MASK.kv_num_blocks, 2), kv_indices=torch.zeros_like(MASK.kv_indices))),
    "kv_indices")
case(SA, "kv_indices int64", lambda: _mask_with(MASK, kv_indices=MASK.kv_indices.long()), "kv_indices")
case(SA, "mask built for other lengths", lambda: eo.block_sparse_attention(Q[:, :, :30], K, V, MASK), "mask")
case(SA, "mask not a BlockSparseMask", lambda: eo.block_sparse_attention(Q, K, V, BLOCKS), "mask")
case(SA, "mask batch 2 for batch 1", lambda: eo.block_sparse_attention(Q, K, V, eo.BlockSparseMask.from_dense(
    BLOCKS.expand(2, 1, 3, 4), 16, 16, 40, 50)), "kv_num_blocks")
case(SA, "block_m 48", lambda: eo.BlockSparseMask.from_dense(BLOCKS, 48, 16, 40, 50), "block_m")
case(SA, "q_len negative", lambda: _mask_with(MASK, q_len=-1), "q_len")
case(SA, "q integer", lambda: eo.block_sparse_attention(Q.int(), K, V, MASK), "q")
case(SA, "q None", lambda: eo.block_sparse_attention(None, K, V, MASK), "q")
case(SA, "k dtype differs", lambda: eo.block_sparse_attention(Q, K.double(), V.double(), MASK), "k")
case(SA, "v shape differs", lambda: eo.block_sparse_attention(Q, K, V[:, :, :49], MASK), "v")
case(SA, "heads not a multiple", lambda: eo.block_sparse_attention(Q[:, :1].expand(1, 3, 40, 64), K.expand(
    1, 2, 50, 64), V.expand(1, 2, 50, 64), MASK), "q")
case(SA, "head_dim differs", lambda: eo.block_sparse_attention(Q, K[..., :32], V[..., :32], MASK), "k")
case(SA, "q on meta, k on cpu", lambda: eo.block_sparse_attention(Q.to("meta"), K, V, MASK), "k")
case(SA, "k on meta", lambda: eo.block_sparse_attention(Q, K.to("meta"), V, MASK), "k")
case(SA, "scale NaN", lambda: eo.block_sparse_attention(Q, K, V, MASK, scale=NAN), "scale")
case(SA, "streaming sink -1", lambda: eo.streaming(64, 64, -1, 16, 16, 16), "sink")
case(SA, "streaming dense_heads out of range", lambda: eo.streaming(64, 64, 4, 16, 16, 16, n_heads=2, dense_heads=[2]),
     "dense_heads")
case(SA, "topk_blocks q_len > kv_len", lambda: eo.topk_blocks(randn(1, 1, 64, 64), randn(1, 1, 32, 64), 0.5, 16, 16),
     "q_len")
case(SA, "streaming block 20", lambda: eo.streaming(64, 64, 4, 16, 20, 16), "block_m")
case(SA, "topk_blocks density 0", lambda: eo.topk_blocks(Q, K, 0.0, 16, 16), "density")
case(SA, "topk_blocks density NaN", lambda: eo.topk_blocks(Q, K, NAN, 16, 16), "density")
case(SA, "topk_blocks k None", lambda: eo.topk_blocks(Q, None, 0.5, 16, 16), "k")
case(SA, "topk_blocks block_n 24", lambda: eo.topk_blocks(Q, K, 0.5, 16, 24), "block_n")
case(SA, "vertical_slash head_dim differs", lambda: eo.vertical_slash(Q, K[..., :32], 4, 4, 16, 16, 16), "k")
case(SA, "vertical_slash n_vertical negative", lambda: eo.vertical_slash(Q, K, -1, 4, 16, 16, 16), "n_vertical")
case(SA, "anchor heads not a multiple", lambda: eo.anchor(Q[:, :1].expand(1, 3, 40, 64), K.expand(1, 2, 50, 64), 1.0,
                                                           16, 16), "q")
case(SA, "anchor theta NaN", lambda: eo.anchor(Q, K, NAN, 16, 16), "theta")
case(SA, "kmeans n_clusters 2.5", lambda: eo.kmeans_keys(K, 2.5), "n_clusters")
case(SA, "kmeans n_clusters 0", lambda: eo.kmeans_keys(K, 0), "n_clusters")
case(SA, "kmeans iters -1", lambda: eo.kmeans_keys(K, 4, iters=-1), "iters")
case(SA, "kmeans k integer", lambda: eo.kmeans_keys(K.int(), 4), "k")
case(SA, "centroid_select both threshold and top_k", lambda: eo.centroid_select(Q, *eo.kmeans_keys(K, 4), 0.1, 2,
                                                                                  16, 16), "threshold")
case(SA, "centroid_select top_k 0", lambda: eo.centroid_select(Q, *eo.kmeans_keys(K, 4), top_k=0, block_m=16,
                                                                block_n=16), "top_k")
case(SA, "centroid_select cluster ids out of range", lambda: eo.centroid_select(
    Q, eo.kmeans_keys(K, 4)[0], torch.full((1, 1, 50), 9), top_k=2, block_m=16, block_n=16), "cluster_of_key")

# decode
QD = randn(2, 4, 64, seed=21)
KC, VC = randn(2, 2, 80, 64, seed=22), randn(2, 2, 80, 64, seed=23)
LENS = torch.tensor([70, 33])
SUM = eo.PageSummary.build(KC, LENS, 16)
PAGES = eo.select_pages(QD, SUM, LENS, 48)


def _decode_ref(q, k, v, lens, pages, page_size):
    s_max = k.shape[2]
    pos = torch.arange(s_max)
    listed = ((pos[None, None, :, None] // page_size) == pages.long()[:, :, None, :]).any(-1)
    allowed = (listed & (pos < lens[:, None, None]))
    g = q.shape[1] // k.shape[1]
    return _sdpa(q[:, :, None], k, v, allowed.repeat_interleave(g, 1)[:, :, None])[:, :, 0]


def _tail_nan(cache, lens):
    pos = torch.arange(cache.shape[2])
    return cache.masked_fill((pos[None, :] >= lens[:, None])[:, None, :, None], NAN)


def _unlisted_nan(cache, pages, page_size):
    pos = torch.arange(cache.shape[2])
    listed = ((pos[None, None, :, None] // page_size) == pages.long()[:, :, None, :]).any(-1)
    return cache.masked_fill(~listed[..., None], NAN)


case(SA, "decode right answer (reference)", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS, PAGES, 16),
     check=close(lambda: _decode_ref(QD, KC, VC, LENS, PAGES, 16)))
case(SA, "decode NaN past seq_len (reference)", lambda: eo.paged_sparse_decode(
    QD, _tail_nan(KC, LENS), _tail_nan(VC, LENS), LENS, PAGES, 16),
    check=close(lambda: _decode_ref(QD, KC, VC, LENS, PAGES, 16)))
case(SA, "decode NaN in unlisted pages (reference)", lambda: eo.paged_sparse_decode(
    QD, _unlisted_nan(KC, PAGES, 16), _unlisted_nan(VC, PAGES, 16), LENS, PAGES, 16),
    check=close(lambda: _decode_ref(QD, KC, VC, LENS, PAGES, 16)))
case(SA, "decode uninitialised (NaN) cache tail, sparse_decode_attention", lambda: eo.sparse_decode_attention(
    QD, _tail_nan(KC, LENS), _tail_nan(VC, LENS), LENS, eo.PageSummary.build(_tail_nan(KC, LENS), LENS, 16), 48),
    check=close(lambda: _decode_ref(QD, KC, VC, LENS, PAGES, 16)))
if interp():
    case(SA, "decode NaN past seq_len (triton)", lambda: eo.paged_sparse_decode(
        QD.half(), _tail_nan(KC, LENS).half(), _tail_nan(VC, LENS).half(), LENS, PAGES, 16, backend="triton"),
        check=close(lambda: _decode_ref(QD.half(), KC.half(), VC.half(), LENS, PAGES, 16), 1e-2))
case(SA, "decode page out of range", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS, PAGES + 10, 16), "page_indices")
case(SA, "decode page duplicate", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS, torch.zeros_like(PAGES), 16),
     "page_indices")
case(SA, "decode page_indices int64", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS, PAGES.long(), 16), "page_indices")
case(SA, "decode seq_lens > S_max", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS + 50, PAGES, 16), "seq_lens")
case(SA, "decode seq_lens negative", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS - 50, PAGES, 16), "seq_lens")
case(SA, "decode seq_lens float", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS.float(), PAGES, 16), "seq_lens")
case(SA, "decode page_size 32", lambda: eo.paged_sparse_decode(QD, KC, VC, LENS, PAGES, 32), "page_size")
case(SA, "decode q 4-D", lambda: eo.paged_sparse_decode(QD[:, :, None], KC, VC, LENS, PAGES, 16), "q")
case(SA, "decode q on meta", lambda: eo.paged_sparse_decode(QD.to("meta"), KC, VC, LENS, PAGES, 16), "k_cache")
case(SA, "select_pages seq_lens > S_max", lambda: eo.select_pages(QD, SUM, LENS + 50, 48), "seq_lens")
case(SA, "select_pages seq_lens negative", lambda: eo.select_pages(QD, SUM, LENS - 50, 48), "seq_lens")
case(SA, "select_pages seq_lens float", lambda: eo.select_pages(QD, SUM, LENS.float(), 48), "seq_lens")
case(SA, "select_pages token_budget 0", lambda: eo.select_pages(QD, SUM, LENS, 0), "token_budget")
case(SA, "select_pages q None", lambda: eo.select_pages(None, SUM, LENS, 48), "q")
case(SA, "select_pages q dtype int", lambda: eo.select_pages(QD.int(), SUM, LENS, 48), "q")
case(SA, "select_pages kmin on meta", lambda: eo.select_pages(QD, dataclasses.replace(
    SUM, kmin=SUM.kmin.to("meta")), LENS, 48), "kmin")
case(SA, "PageSummary.build seq_lens > S_max", lambda: eo.PageSummary.build(KC, LENS + 50, 16), "seq_lens")
case(SA, "PageSummary.build seq_lens negative", lambda: eo.PageSummary.build(KC, LENS - 50, 16), "seq_lens")
case(SA, "PageSummary.build seq_lens float", lambda: eo.PageSummary.build(KC, LENS.float() + 0.5, 16), "seq_lens")
case(SA, "PageSummary.build k_cache int", lambda: eo.PageSummary.build(KC.int(), LENS, 16), "k_cache")


def _update_after_shrink():
    summary = eo.PageSummary.build(KC, torch.tensor([70, 60]), 16)
    summary.update(KC, torch.tensor([40, 20]))
    return summary


def _summary_equal(expected):
    def check(s):
        e = expected()
        assert torch.equal(s.kmin, e.kmin) and torch.equal(s.kmax, e.kmax), "stale pages after the update"
    return check


case(SA, "PageSummary.update after the lengths shrink", _update_after_shrink,
     check=_summary_equal(lambda: eo.PageSummary.build(KC, torch.tensor([40, 20]), 16)))


def _update_grow():
    summary = eo.PageSummary.build(KC, torch.tensor([10, 17]), 16)
    summary.update(KC, torch.tensor([70, 33]))
    return summary


case(SA, "PageSummary.update after the lengths grow", _update_grow,
     check=_summary_equal(lambda: eo.PageSummary.build(KC, torch.tensor([70, 33]), 16)))
case(SA, "PageSummary.update seq_lens > S_max", lambda: eo.PageSummary.build(KC, LENS, 16).update(KC, LENS + 50),
     "seq_lens")

# ---------------------------------------------------------------------------------------------------- speculative

SP = "speculative"
PARENTS = torch.tensor([-1, 0, 0, 1, 1, 2])
TOK = torch.tensor([[5, 1, 2, 3, 4, 0], [5, 2, 1, 0, 3, 4]])
LOGITS = randn(2, 6, 8, seed=30)
PROBS = torch.softmax(LOGITS, -1)
DRAFT = torch.softmax(randn(2, 6, 8, seed=31), -1)


def _gen():
    return torch.Generator().manual_seed(5)


def _verify(probs, draft, backend=None):
    return eo.verify_sampling(TOK, PARENTS, probs, draft, generator=_gen(), backend=backend)


case(SP, "verify_sampling target_probs x2", lambda: _verify(PROBS * 2, DRAFT), "target_probs")
case(SP, "verify_sampling logits as probs", lambda: _verify(LOGITS, DRAFT), "target_probs")
case(SP, "verify_sampling target_probs NaN", lambda: _verify(PROBS.masked_fill(PROBS > 0.3, NAN), DRAFT),
     "target_probs")
case(SP, "verify_sampling draft_probs x0.5", lambda: _verify(PROBS, DRAFT * 0.5), "draft_probs")
case(SP, "verify_sampling draft_probs negative", lambda: _verify(PROBS, DRAFT - 0.1), "draft_probs")
case(SP, "verify_sampling draft_probs shape", lambda: _verify(PROBS, DRAFT[:, :5]), "draft_probs")
case(SP, "verify_sampling mode unknown", lambda: eo.verify_sampling(TOK, PARENTS, PROBS, DRAFT, mode="topk"), "mode")
case(SP, "verify_sampling tokens out of range", lambda: eo.verify_sampling(TOK + 8, PARENTS, PROBS, DRAFT), "tokens")
case(SP, "verify_sampling batch 0", lambda: eo.verify_sampling(TOK[:0], PARENTS, PROBS[:0], DRAFT[:0]), "tokens",
     check=lambda r: r[0].shape == (0,))
case(SP, "verify_sampling tokens None", lambda: eo.verify_sampling(None, PARENTS, PROBS, DRAFT), "tokens")


def _zero_residual(backend):
    # draft == target: every rejection leaves max(0, p - q) = 0; the fallback keeps p, so the final token is valid
    probs = torch.zeros(1, 2, 4)
    probs[..., 1] = 1.0
    return eo.verify_sampling(torch.tensor([[0, 2]]), torch.tensor([-1, 0]), probs, probs.clone(),
                              generator=_gen(), backend=backend)


case(SP, "verify_sampling all-zero residual (reference)", lambda: _zero_residual("reference"),
     check=lambda r: int(r[2][0]) == 1)
if interp():
    case(SP, "verify_sampling all-zero residual (triton)", lambda: _zero_residual("triton"),
         check=lambda r: int(r[2][0]) == 1)
    case(SP, "verify_sampling backends agree on distributions", lambda: (_verify(PROBS, DRAFT, "triton"),
                                                                         _verify(PROBS, DRAFT, "reference")),
         check=lambda r: all(torch.equal(a, b) for a, b in zip(*r)))
case(SP, "verify_greedy NaN logit", lambda: eo.verify_greedy(TOK, PARENTS, LOGITS.masked_fill(
    LOGITS == LOGITS[0, 0].min(), NAN)), "target_logits")
case(SP, "verify_greedy batch 0", lambda: eo.verify_greedy(TOK[:0], PARENTS, LOGITS[:0]), "tokens",
     check=lambda r: r[0].shape == (0,) and r[2].shape == (0,))
case(SP, "verify_greedy tokens float", lambda: eo.verify_greedy(TOK.float(), PARENTS, LOGITS), "tokens")
case(SP, "verify_greedy logits 2-D", lambda: eo.verify_greedy(TOK, PARENTS, LOGITS[0]), "target_logits")
case(SP, "verify_greedy parents not topological", lambda: eo.verify_greedy(TOK, torch.tensor([-1, 0, 3, 1, 1, 2]),
                                                                           LOGITS), "parents")
case(SP, "verify_greedy parents float", lambda: eo.verify_greedy(TOK, PARENTS.float(), LOGITS), "parents")
case(SP, "verify_greedy parents wrong length", lambda: eo.verify_greedy(TOK, PARENTS[:5], LOGITS), "parents")
case(SP, "verify_greedy logits on meta", lambda: eo.verify_greedy(TOK, PARENTS, LOGITS.to("meta")), "target_logits")
case(SP, "verify_greedy tokens None", lambda: eo.verify_greedy(None, PARENTS, LOGITS), "tokens")
case(SP, "verify_typical negative threshold", lambda: eo.verify_typical(TOK, PARENTS, PROBS, -0.1),
     "posterior_threshold")
case(SP, "verify_typical negative alpha", lambda: eo.verify_typical(TOK, PARENTS, PROBS, 0.09, -1.0), "posterior_alpha")
case(SP, "verify_typical threshold NaN", lambda: eo.verify_typical(TOK, PARENTS, PROBS, NAN), "posterior_threshold")
case(SP, "verify_typical probs not distributions", lambda: eo.verify_typical(TOK, PARENTS, LOGITS), "target_probs")
case(SP, "verify_typical batch 0", lambda: eo.verify_typical(TOK[:0], PARENTS, PROBS[:0]), "tokens",
     check=lambda r: r[0].shape == (0,))

TQ = randn(2, 4, 6, 64, seed=32)
TK, TV = randn(2, 2, 30, 64, seed=33), randn(2, 2, 30, 64, seed=34)
PRE = torch.tensor([10, 0])


def _tree_ref(q, k, v, prefix, parents):
    b, hq, t, _ = q.shape
    mask = eo.tree_mask(parents).expand(b, t, t)
    allowed = torch.zeros(b, 1, t, k.shape[2], dtype=torch.bool)
    for i in range(b):
        p = int(prefix[i])
        allowed[i, 0, :, :p] = True
        allowed[i, 0, :, p:p + t] = mask[i]
    return _sdpa(q, k, v, allowed.expand(b, hq, t, k.shape[2]))


def _tail_nan_tree(cache):
    pos = torch.arange(cache.shape[2])
    return cache.masked_fill((pos[None, :] >= (PRE + 6)[:, None])[:, None, :, None], NAN)


case(SP, "tree_attention right answer", lambda: eo.tree_attention(TQ, TK, TV, PRE, PARENTS),
     check=close(lambda: _tree_ref(TQ, TK, TV, PRE, PARENTS)))
case(SP, "tree_attention NaN past the tree (reference)", lambda: eo.tree_attention(
    TQ, _tail_nan_tree(TK), _tail_nan_tree(TV), PRE, PARENTS), check=close(lambda: _tree_ref(TQ, TK, TV, PRE, PARENTS)))
if interp():
    case(SP, "tree_attention NaN past the tree (triton)", lambda: eo.tree_attention(
        TQ.half(), _tail_nan_tree(TK).half(), _tail_nan_tree(TV).half(), PRE, PARENTS, backend="triton"),
        check=close(lambda: _tree_ref(TQ.half(), TK.half(), TV.half(), PRE, PARENTS), 1e-2))
case(SP, "tree_attention prefix too long", lambda: eo.tree_attention(TQ, TK, TV, PRE + 20, PARENTS), "prefix_lens")
case(SP, "tree_attention prefix negative", lambda: eo.tree_attention(TQ, TK, TV, PRE - 11, PARENTS), "prefix_lens")
case(SP, "tree_attention prefix float", lambda: eo.tree_attention(TQ, TK, TV, PRE.float(), PARENTS), "prefix_lens")
case(SP, "tree_attention parents wrong length", lambda: eo.tree_attention(TQ, TK, TV, PRE, PARENTS[:5]), "parents")
case(SP, "tree_attention parents root 0", lambda: eo.tree_attention(TQ, TK, TV, PRE, PARENTS.clamp_min(0)), "parents")
case(SP, "tree_attention q None", lambda: eo.tree_attention(None, TK, TV, PRE, PARENTS), "q")
case(SP, "tree_attention q on meta", lambda: eo.tree_attention(TQ.to("meta"), TK, TV, PRE, PARENTS), "k_cache")
case(SP, "tree_attention caches on meta", lambda: eo.tree_attention(TQ, TK.to("meta"), TV.to("meta"), PRE, PARENTS),
     "k_cache")
case(SP, "tree_attention cache too short", lambda: eo.tree_attention(TQ, TK[:, :, :5], TV[:, :, :5], PRE, PARENTS),
     "k_cache")
case(SP, "tree_attention heads not a multiple", lambda: eo.tree_attention(TQ[:, :3], TK, TV, PRE, PARENTS), "q")
case(SP, "tree_attention scale NaN", lambda: eo.tree_attention(TQ, TK, TV, PRE, PARENTS, scale=NAN), "scale")

OA, OB = randn(2, 3, 8, seed=35), randn(2, 3, 8, seed=36)
LA, LB_ = randn(2, 3, seed=37), randn(2, 3, seed=38)
case(SP, "merge lse -inf with NaN output", lambda: eo.merge_attention_states(
    torch.full_like(OA, NAN), torch.full_like(LA, -INF), OB, LB_), check=lambda r: torch.allclose(r[0], OB))
case(SP, "merge both -inf", lambda: eo.merge_attention_states(OA, torch.full_like(LA, -INF), OB, torch.full_like(
    LB_, -INF)), check=lambda r: bool((r[0] == 0).all()) and bool(torch.isneginf(r[1]).all()))
case(SP, "merge lse float64", lambda: eo.merge_attention_states(OA, LA.double(), OB, LB_), "lse_a")
case(SP, "merge o_b shape", lambda: eo.merge_attention_states(OA, LA, OB[:1], LB_), "o_b")
case(SP, "merge lse +inf", lambda: eo.merge_attention_states(OA, torch.full_like(LA, INF), OB, LB_), "lse_a")
case(SP, "merge o_a None", lambda: eo.merge_attention_states(None, LA, OB, LB_), "o_a")
case(SP, "merge on meta", lambda: eo.merge_attention_states(OA, LA, OB.to("meta"), LB_), "o_b")

CK, CV = randn(2, 2, 20, 8, seed=39), randn(2, 2, 20, 8, seed=40)
ACC = torch.tensor([[0, 2, 5], [0, 1, -1]])
ALEN = torch.tensor([2, 1])
CPRE = torch.tensor([4, 10])


def _compact(k, v, prefix, acc, alen, backend=None):
    return eo.compact_kv(k, v, prefix, acc, alen, backend=backend)


def _compact_ref():
    k, v = CK.clone(), CV.clone()
    for b in range(2):
        n, p = int(ALEN[b]) + 1, int(CPRE[b])
        src = p + ACC[b, :n]
        k[b, :, p:p + n], v[b, :, p:p + n] = CK[b, :, src], CV[b, :, src]
    return k, v


def _compact_case(backend):
    k, v = CK.clone(), CV.clone()
    lens = _compact(k, v, CPRE, ACC, ALEN, backend)
    return lens, k, v


case(SP, "compact_kv right answer", lambda: _compact_case("reference"),
     check=lambda r: torch.equal(r[0], CPRE + ALEN + 1) and torch.equal(r[1], _compact_ref()[0]))
case(SP, "compact_kv accept_len too long", lambda: _compact(CK.clone(), CV.clone(), CPRE, ACC, ALEN + 2),
     "accept_len")
case(SP, "compact_kv accept_len negative", lambda: _compact(CK.clone(), CV.clone(), CPRE, ACC, ALEN - 2),
     "accept_len")
case(SP, "compact_kv path not increasing", lambda: _compact(CK.clone(), CV.clone(), CPRE, torch.tensor(
    [[0, 5, 2], [0, 1, -1]]), ALEN), "accepted_nodes")
case(SP, "compact_kv prefix past the cache", lambda: _compact(CK.clone(), CV.clone(), CPRE + 15, ACC, ALEN),
     "prefix_lens")
case(SP, "compact_kv v_cache dtype", lambda: _compact(CK.clone(), CV.double(), CPRE, ACC, ALEN), "v_cache")
case(SP, "compact_kv prefix float", lambda: _compact(CK.clone(), CV.clone(), CPRE.float(), ACC, ALEN), "prefix_lens")
case(SP, "compact_kv k_cache None", lambda: _compact(None, CV.clone(), CPRE, ACC, ALEN), "k_cache")
case(SP, "compact_kv prefix on meta", lambda: _compact(CK.clone(), CV.clone(), CPRE.to("meta"), ACC, ALEN),
     "prefix_lens")
if interp():
    case(SP, "compact_kv right answer (triton)", lambda: _compact_case("triton"),
         check=lambda r: torch.equal(r[1], _compact_ref()[0]) and torch.equal(r[2], _compact_ref()[1]))
case(SP, "validate_parents root not -1", lambda: eo.validate_parents(torch.tensor([0, 0])), "parents")
case(SP, "validate_parents cycle", lambda: eo.validate_parents(torch.tensor([-1, 2, 1])), "parents")
case(SP, "validate_parents float", lambda: eo.validate_parents(torch.tensor([-1.0, 0.0])), "parents")
case(SP, "validate_parents empty", lambda: eo.validate_parents(torch.zeros(0, dtype=torch.long)), "parents")
case(SP, "tree_positions prefix_lens 2-D", lambda: eo.tree_positions(PARENTS, PRE[None]), "prefix_lens")
case(SP, "tree_positions prefix_lens float", lambda: eo.tree_positions(PARENTS, PRE.float()), "prefix_lens")
case(SP, "tree_paths right answer", lambda: eo.tree_paths(PARENTS),
     check=lambda p: p.tolist() == [[[0, 1, 3], [0, 1, 4], [0, 2, 5]]])

# ---------------------------------------------------------------------------------------------------- nn

NN = "nn"


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 32)

    def forward(self, x):
        return self.lm_head(self.proj(x))


def _quantize_skip_string():
    model = eo.nn.quantize_model(_TinyLM(), skip="lm_head", progress=False)
    return model


case(NN, "quantize_model skip='lm_head' (a string)", _quantize_skip_string,
     check=lambda m: type(m.lm_head) is nn.Linear and type(m.proj) is not nn.Linear)
case(NN, "quantize_model skip=None", lambda: eo.nn.quantize_model(_TinyLM(), skip=None, progress=False), "skip",
     check=lambda m: type(m.lm_head) is not nn.Linear)
case(NN, "quantize_model salient without calibration", lambda: eo.nn.quantize_model(
    _TinyLM(), salient_fraction=0.2, progress=False), "calib_batches")
case(NN, "rsparsify_model skip='lm_head' (a string)", lambda: eo.nn.rsparsify_model(
    _TinyLM(), [randn(4, 64)], skip="lm_head", progress=False),
    check=lambda m: type(m.lm_head) is nn.Linear and type(m.proj) is not nn.Linear)


def _rsparse_half():
    module = eo.nn.RSparseLinear.from_linear(LIN, XC, 0.5).half()
    return module(XR.half()), module


case(NN, "RSparseLinear.half()", _rsparse_half,
     check=lambda r: rel(r[0], _rs_formula(r[1].weights, XR.half(), r[1].bias)) <= 2e-3)


def _rsparse_to_double():
    module = eo.nn.RSparseLinear.from_linear(LIN, XC, 0.5).double()
    return module(XR.double()), module


case(NN, "RSparseLinear.double()", _rsparse_to_double,
     check=lambda r: rel(r[0], _rs_formula(r[1].weights, XR.double(), r[1].bias)) <= 1e-6)


def _quantlinear_bf16():
    module = eo.nn.QuantLinear.from_linear(LIN, 4, 32).to(torch.bfloat16)
    return module(XR.bfloat16()), module


case(NN, "QuantLinear.to(bfloat16)", _quantlinear_bf16,
     check=lambda r: rel(r[0], _dense(r[1].quantized_weight, XR.bfloat16()) + r[1].bias.double()) <= 1e-2)
case(NN, "QuantLinear x wrong dim", lambda: eo.nn.QuantLinear.from_linear(LIN, 4, 32)(XR[:, :47]), "x")
case(NN, "QuantLinear.from_linear of a tensor", lambda: eo.nn.QuantLinear.from_linear(LIN.weight), "linear")
case(NN, "QuantLinear bits 5", lambda: eo.nn.QuantLinear(64, 8, bits=5), "bits")
case(NN, "QuantLinear in_features 0", lambda: eo.nn.QuantLinear(0, 8), "in_features")


def _mixed_bad_state():
    module = eo.nn.MixedQuantLinear.from_linear(LIN, [1, 5, 9])
    module.perm.zero_()
    return module(XR.half() if module.bias.dtype == torch.float16 else XR)


case(NN, "MixedQuantLinear perm overwritten with zeros", _mixed_bad_state, "perm")
case(NN, "RSparseLinear.from_linear x_calib NaN", lambda: eo.nn.RSparseLinear.from_linear(
    LIN, XC.masked_fill(XC > 2.5, NAN)), "x_calib")
case(NN, "RSparseLinear wrong x dtype", lambda: eo.nn.RSparseLinear.from_linear(LIN, XC, 0.5)(XR.half()), "x")


# ---------------------------------------------------------------------------------------------------- report

def run_all(cases=None):
    """Classify every case; returns ``[(case, outcome, detail)]``."""
    import warnings

    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in cases or CASES:
            results.append((c, *classify(c)))
    return results


def table(results) -> str:
    """Markdown counts per family: inputs tried, clear errors, unclear errors, silent wrong answers, right answers."""
    outcomes = ("clear", "unclear", "silent", "right")
    families = sorted({c.family for c, _, _ in results})
    lines = ["| family | inputs | clear errors | unclear errors | silent wrong | right answers |",
             "|---|---|---|---|---|---|"]
    for fam in families + ["all"]:
        rows = [o for c, o, _ in results if fam in ("all", c.family)]
        lines.append(f"| {fam} | {len(rows)} | " + " | ".join(str(rows.count(o)) for o in outcomes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    res = run_all()
    print(table(res))
    verbose = "-v" in sys.argv
    for c, outcome, detail in res:
        if outcome in ("unclear", "silent") or verbose:
            print(f"{outcome:8s} {c.family:16s} {c.name}: {detail}")
