"""Fuzz: the nn modules (QuantLinear, MixedQuantLinear, RSparseLinear): forward against F.linear on their
dequantized weights, state_dict round trips into empty modules, dtype casts, and model conversion."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import efficient_ops as eo

from ._helpers import assert_close, generator, randn, seeds

BITS = st.sampled_from(sorted(eo.FORMATS))


def _linear(k, n, seed, dtype=torch.float32):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(randn((n, k), torch.float32, generator(seed)))
        lin.bias.copy_(randn((n,), torch.float32, generator(seed + 1)))
    return lin.to(dtype)


@given(k=st.integers(2, 200), n=st.integers(1, 24), bits=BITS, group=st.sampled_from([32, 128, -1]),
       mixed=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=seeds)
def test_quant_linear_forward_and_state_dict(k, n, bits, group, mixed, dtype, seed):
    lin = _linear(k, n, seed, dtype)
    if mixed:
        module = eo.nn.MixedQuantLinear.from_linear(lin, list(range(0, k - 1, 3)), rest_bits=bits)
        empty = eo.nn.MixedQuantLinear(k, n, module.salient_features, rest_bits=bits, dtype=dtype,
                                       scale_dtype=module.scales_a.dtype)
    else:
        module = eo.nn.QuantLinear.from_linear(lin, bits, group)
        empty = eo.nn.QuantLinear(k, n, bits=bits, group_size=group, dtype=dtype, scale_dtype=module.scales.dtype)
    x = randn((3, k), dtype, generator(seed + 2))
    ref = F.linear(x.double(), eo.dequantize_weight(module.quantized_weight, torch.float64), lin.bias.double())
    out = module(x)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    empty.load_state_dict(module.state_dict())
    assert torch.equal(empty(x), out)


@given(k=st.integers(2, 64), n=st.integers(1, 24), sparsity=st.sampled_from([0.0, 0.5, 0.8]),
       cast=st.sampled_from(["half", "double", "float"]), seed=seeds)
def test_rsparse_linear_module(k, n, sparsity, cast, seed):
    lin = _linear(k, n, seed)
    module = eo.nn.RSparseLinear.from_linear(lin, randn((32, k), torch.float32, generator(seed + 3)), sparsity)
    module.max_sparse_rows = None
    module = getattr(module, cast)()  # nn.Module dtype casts keep the layer usable
    dtype = module.weight_t.dtype
    x = randn((4, k), dtype, generator(seed + 4))
    rw = module.weights
    m = (x.float().abs() * rw.col_norms.float() > torch.tensor(rw.threshold, dtype=torch.float32)).double()
    ref = (x.double() * m) @ rw.weight_t.double() + ((x.double() * (1 - m)) @ rw.v.double()) @ rw.us_t.double()
    assert_close(module(x), ref + module.bias.double(), dtype)
    empty = eo.nn.RSparseLinear(k, n, module.rank, dtype=dtype)
    empty.load_state_dict(module.state_dict())
    assert torch.equal(empty(x), module(x))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.lm_head = nn.Linear(16, 8)

    def forward(self, x):
        return self.lm_head(self.body(x))


@pytest.mark.parametrize("convert", ["quantize", "rsparsify"])
@given(skip=st.sampled_from(["lm_head", ("lm_head",), ["lm_head", "body.0"], ()]))
def test_conversion_skips_what_is_asked(convert, skip):
    model = _Tiny()
    if convert == "quantize":
        eo.nn.quantize_model(model, skip=skip, progress=False)
    else:
        eo.nn.rsparsify_model(model, [torch.randn(4, 16)], skip=skip, progress=False)
    names = [skip] if isinstance(skip, str) else list(skip)
    for name, module in (("lm_head", model.lm_head), ("body.0", model.body[0]), ("body.2", model.body[2])):
        assert (type(module) is nn.Linear) == (name in names), f"{name} with skip={skip!r}"
