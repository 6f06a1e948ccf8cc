"""bench/perplexity.py on a tiny random Llama: the perplexity arithmetic, the held-out calibration split, and
a rejected format giving a row instead of an exception (no model download, no GPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from efficient_ops.bench import perplexity as ppl  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_perplexity_is_exp_mean_nll_over_windows(tiny_llama):
    ids = torch.randint(0, 128, (3 * 16 + 5,))  # three full windows and a short one
    got = ppl.perplexity(tiny_llama, ids, seq_len=16, progress=False)
    with torch.no_grad():
        full = tiny_llama(ids[:48].view(3, 16)).logits  # the full windows as one batch
        tail = tiny_llama(ids[None, 48:]).logits
    nll = (F.cross_entropy(full[:, :-1].reshape(-1, 128), ids[:48].view(3, 16)[:, 1:].reshape(-1), reduction="sum")
           + F.cross_entropy(tail[0, :-1], ids[49:], reduction="sum"))
    assert got["predicted"] == 3 * 15 + 4
    assert got["perplexity"] == pytest.approx(math.exp(nll.item() / got["predicted"]), rel=1e-5)


def test_split_keeps_calibration_apart():
    ids = torch.arange(100)
    eval_ids, calib = ppl.split_tokens(ids, seq_len=10, max_tokens=0, calib_windows=2)
    assert torch.equal(eval_ids, torch.arange(80)) and [c.tolist() for c in calib] == [
        [list(range(80, 90))], [list(range(90, 100))]]
    assert ppl.split_tokens(ids, seq_len=10, max_tokens=25, calib_windows=2)[0].numel() == 25


def test_format_row(tiny_llama):
    ids = torch.randint(0, 128, (40,))
    row = ppl.evaluate_format(tiny_llama, "w4g32", dict(bits=4, group_size=32), ids, [], 16, dense_ppl=1.0,
                              progress=False)
    assert row["quantized_linears"] == 2 * 7 and row["note"] == ""
    assert row["bits_per_weight"] > 4 and math.isfinite(row["perplexity"])
    assert type(tiny_llama.model.layers[0].mlp.up_proj) is torch.nn.Linear  # the dense model is untouched


def test_rejected_format_is_a_row(tiny_llama, monkeypatch):
    def reject(model, **kwargs):
        raise TypeError("quantize_model() got an unexpected keyword argument 'grid'")
    monkeypatch.setattr(ppl, "quantize_model", reject)
    row = ppl.evaluate_format(tiny_llama, "w2g64-seq", ppl.FORMATS["w2g64-seq"], torch.arange(40), [], 16,
                              dense_ppl=1.0, progress=False)
    assert row["note"].startswith("not supported by this build") and "perplexity" not in row
    assert "| w2g64-seq | - | - |" in ppl._table([row])
