"""QuantLinear and quantize_model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efficient_ops import backends
from efficient_ops.nn import QuantLinear, quantize_model
from efficient_ops.quant import dequantize_weight

from conftest import rel_err


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
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
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
