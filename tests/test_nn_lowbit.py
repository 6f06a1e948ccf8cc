"""QuantLinear, MixedQuantLinear and quantize_model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efficient_ops import backends
from efficient_ops.nn import MixedQuantLinear, QuantLinear, quantize_model
from efficient_ops import dequantize_weight, select_salient_channels

from conftest import rel_err, tiny_llama


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group_size", [64, -1])
def test_quant_linear_matches_dequantized_dense(bias, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(200, 48, bias=bias)
    q = QuantLinear.from_linear(linear, group_size=group_size)
    x = torch.randn(2, 5, 200)
    ref = F.linear(x, dequantize_weight(q.quantized_weight, torch.float32), linear.bias)
    assert rel_err(q(x), ref) < 1e-5
    assert rel_err(q(x), linear(x)) < 0.15  # and it is still the layer it replaced, up to 4-bit error
    assert "bits=4" in repr(q)
    assert q.quantized_weight.dtype == torch.float32  # the original weight dtype, with or without bias


@pytest.mark.parametrize("bits, bound", [(3, 0.3), (2, 0.45), (1.58, 0.55), (1, 0.7)])
def test_quant_linear_every_format(bits, bound):
    torch.manual_seed(1)
    linear = nn.Linear(300, 40)
    q = QuantLinear.from_linear(linear, bits=bits, group_size=64)
    x = torch.randn(3, 300)
    assert rel_err(q(x), F.linear(x, dequantize_weight(q.quantized_weight, torch.float32), linear.bias)) < 1e-5
    assert rel_err(q(x), linear(x)) < bound
    fresh = QuantLinear(300, 40, bits=bits, group_size=64, dtype=torch.float32)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


def test_mixed_quant_linear():
    torch.manual_seed(2)
    linear = nn.Linear(200, 24)
    x = torch.randn(64, 200) * (1 + 5 * (torch.rand(200) > 0.8))  # a fifth of the channels are large
    salient = select_salient_channels(x, 0.2)
    q = MixedQuantLinear.from_linear(linear, salient)
    assert q.salient_features == 40 and "salient=40 x 4 bits" in repr(q)
    assert rel_err(q(x), F.linear(x, dequantize_weight(q.quantized_weight, torch.float32), linear.bias)) < 1e-5
    binary = QuantLinear.from_linear(linear, bits=1, group_size=-1, center=True)
    assert rel_err(q(x), linear(x)) < rel_err(binary(x), linear(x))  # salient channels in 4 bits pay off
    fresh = MixedQuantLinear(200, 24, 40, dtype=torch.float32)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(ValueError, match="salient_features"):
        MixedQuantLinear(200, 24, 200)


@pytest.mark.skipif(not backends.interpreter_enabled(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_quant_linear_backend_pin():
    linear = nn.Linear(130, 20).half()
    q = QuantLinear.from_linear(linear, group_size=32)
    x = torch.randn(3, 130).half()
    ref = q(x)
    q.backend = "triton"
    assert rel_err(q(x), ref) < 1e-2
    q.backend = "cuda"
    with pytest.raises(backends.BackendUnavailableError):
        q(x)


def test_state_dict_round_trip():
    q = QuantLinear.from_linear(nn.Linear(96, 40).to(torch.bfloat16))
    fresh = QuantLinear(96, 40, bias=True, dtype=torch.bfloat16)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), q(x))


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_quantize_model_swaps_linears_and_honours_skip():
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
    model.add_module("lm_head", nn.Linear(32, 10))
    x = torch.randn(3, 64)
    before = model(x)
    assert quantize_model(model, group_size=32, progress=False) is model
    assert isinstance(model.block[0], QuantLinear) and isinstance(model.block[2], QuantLinear)
    assert type(model.lm_head) is nn.Linear
    assert rel_err(model(x), before) < 0.2


def test_quantize_hf_causal_lm():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
        quantize_model(model, group_size=32, progress=False)
        quant = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 2 * 7 and type(model.lm_head) is nn.Linear
    assert quant.shape == dense.shape and rel_err(quant, dense) < 0.2
    assert generated.shape == (1, 16)


@pytest.mark.parametrize("kwargs, module_type", [(dict(bits=1.58, group_size=64), QuantLinear),
                                                 (dict(bits=1, group_size=-1, salient_fraction=0.25), MixedQuantLinear)])
def test_quantize_hf_causal_lm_low_bits(kwargs, module_type):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    calib = [torch.randint(0, 128, (1, 16)) for _ in range(2)] if "salient_fraction" in kwargs else None
    with torch.no_grad():
        dense = model(ids).logits
        quantize_model(model, calib_batches=calib, progress=False, **kwargs)
        quant = model(ids).logits
    assert sum(isinstance(m, module_type) for m in model.modules()) == 2 * 7
    assert torch.isfinite(quant).all() and rel_err(quant, dense) < 1.0


def test_quantize_model_mixed_needs_calibration():
    with pytest.raises(ValueError, match="calib_batches"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), bits=1, salient_fraction=0.2, progress=False)
