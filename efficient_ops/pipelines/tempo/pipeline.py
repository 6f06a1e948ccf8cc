"""``TempoPipeline``: video + question -> answer, through compressor, ATA, packing and the global LLM.

Methods (the same API for Tempo and its baselines, so they run side by side at equal budget):

==================== ==============================================================================
``tempo``            ATA (``allocate_tokens``, k_min 4), head truncation: Tempo as released
``tempo_fill``       ATA plus the budget it leaves unused handed back (``fill=True``)
``tail`` / ``tome``  ATA counts, keeping each segment's last tokens / merging its K tokens (ToMe)
``uniform``          uniform allocation: ``min(K, B // n)`` tokens per segment
``no_ata``           all K tokens per segment, the sequence cut at the budget (tail truncation)
``uniform_sampling`` ``8 * (B // K)`` frames sampled uniformly, every segment keeps all K tokens
==================== ==============================================================================

The budget counts memory tokens; each kept segment adds its timestamp tokens on top (as in Tempo).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .allocation import K_MIN, allocate_tokens, truncated_allocation, uniform_allocation
from .assembly import pack_context, segment_block_mask
from .compressor import TEMPO_PREFIX, QwenVLCompressor, _is_tempo_checkpoint, tempo_state_dict
from .llm import TempoLLM, load_llm
from .video import SEGMENT_FRAMES, load_video, segment, timestamp_texts

METHODS = ("tempo", "tempo_fill", "tail", "tome", "uniform", "no_ata", "uniform_sampling")
ATTENTION = ("dense", "block_sparse")


@dataclass
class TempoAnswer:
    """The answer and how it was reached.

    Attributes:
        text: the LLM's answer (``str(answer)`` is the text).
        allocation: int64 ``[n]`` memory tokens kept per segment.
        scores: float32 ``[n]`` relevance per segment.
        timestamps: ``[n]`` segment centres in seconds.
        visual_tokens_used: ``allocation.sum()``, at most the budget.
        context_tokens: visual context length including the timestamp tokens.
        budget, method: what was asked.
        ttft_s: prefill + first token time; ``timings`` has every stage in seconds.
    """

    text: str
    allocation: torch.Tensor
    scores: torch.Tensor
    timestamps: List[float]
    visual_tokens_used: int
    context_tokens: int
    budget: int
    method: str
    ttft_s: float
    tokens: List[int] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


class TempoPipeline:
    """Tempo end to end: ``pipe(video, query, budget=8192) -> TempoAnswer``.

    Args:
        compressor: a :class:`~.compressor.Compressor` (e.g. :class:`QwenVLCompressor`) whose memory tokens
            have the LLM's width.
        llm: a :class:`~.llm.TempoLLM`.
    """

    def __init__(self, compressor, llm: TempoLLM):
        if compressor.output_size != llm.hidden_size:
            raise ValueError(f"compressor: produces {compressor.output_size}-wide memory tokens, but the LLM's "
                             f"hidden size is {llm.hidden_size}")
        self.compressor, self.llm = compressor, llm

    @classmethod
    def from_pretrained(cls, compressor_dir: str, llm_dir: Optional[str] = None, vlm_config_dir: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, device=None, quantize_bits: Optional[float] = None,
                        num_memory_tokens: int = 128) -> "TempoPipeline":
        """Load both models.

        Args:
            compressor_dir: a compressor folder (see :meth:`QwenVLCompressor.from_pretrained`), or a Tempo
                checkpoint (then ``llm_dir`` defaults to it and ``vlm_config_dir`` is the base Qwen3-VL folder).
            llm_dir: a Hugging Face causal-LM folder (Qwen3).
            quantize_bits: replace the LLM's linears by :func:`efficient_ops.nn.quantize_model` at these bits.
            num_memory_tokens: K for a plain Qwen3-VL compressor (smart-initialised memory tokens).
        """
        if llm_dir is None:
            if not os.path.isdir(compressor_dir) or not _is_tempo_checkpoint(compressor_dir):
                raise ValueError("llm_dir: required unless compressor_dir is a Tempo checkpoint holding both models")
            llm = _load_tempo_llm(compressor_dir, dtype, device)
        else:
            llm = load_llm(llm_dir, dtype, device)
        if quantize_bits is not None:
            from efficient_ops.nn import quantize_model
            quantize_model(llm.model, bits=quantize_bits)
        compressor = QwenVLCompressor.from_pretrained(compressor_dir, output_size=llm.hidden_size,
                                                      num_memory_tokens=num_memory_tokens,
                                                      vlm_config_dir=vlm_config_dir, dtype=dtype, device=device)
        return cls(compressor, llm)

    def __call__(self, video, query: str, budget: int = 8192, fps: Optional[float] = None, method: str = "tempo",
                 k_min: int = K_MIN, max_new_tokens: int = 64, attention: str = "dense", window: int = 1,
                 block: int = 64, batch_size: Optional[int] = None, progress: bool = False,
                 backend: Optional[str] = None) -> TempoAnswer:
        """Answer ``query`` about ``video`` within ``budget`` visual (memory) tokens.

        Args:
            video: a file path or a uint8 ``[T, 3, H, W]`` tensor (then ``fps`` is required).
            query: the question.
            budget: visual-token budget (4096 and 8192 in the paper); at least the number of segments.
            method: one of :data:`METHODS` (see the module docstring).
            attention: "dense" (SDPA) or "block_sparse" prefill (``window`` previous segments, ``block``-token
                blocks; see :func:`~.assembly.segment_block_mask`).
            batch_size: segments per compressor forward (default: all in one).
            progress: progress bar over segments.
            backend: kernel backend for :func:`efficient_ops.pack_segments` / ``segment_relevance``.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query: expected a non-empty question string")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if attention not in ATTENTION:
            raise ValueError(f"attention: expected one of {ATTENTION}, got {attention!r}")
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget: expected a positive int, got {budget!r}")
        k = self.compressor.num_memory_tokens
        timings = {}
        t0 = time.perf_counter()
        if method == "uniform_sampling":
            frames = SEGMENT_FRAMES * max(1, budget // k)
            clip = load_video(video, fps, min_frames=frames, max_frames=frames)
        else:
            clip = load_video(video, fps)
        segments = segment(clip)
        n = len(segments)
        if budget < n:
            raise ValueError(f"budget: {budget} visual tokens cannot give each of the {n} segments one token; raise "
                             f"the budget to at least {n}")
        timings["video_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        compressed = self.compressor.compress(segments, query, batch_size=batch_size, progress=progress)
        timings["compress_s"] = time.perf_counter() - t0

        scores = compressed.scores.float().cpu()
        if method in ("tempo", "tempo_fill", "tail", "tome"):
            counts = allocate_tokens(scores, budget, k, k_min, fill=method == "tempo_fill")
        elif method == "uniform":
            counts = uniform_allocation(n, budget, k)
        elif method == "no_ata":
            counts = truncated_allocation(n, budget, k)
        else:
            counts = torch.full((n,), min(k, budget), dtype=torch.long)
        strategy = method if method in ("tail", "tome") else "head"

        t0 = time.perf_counter()
        centres = segments.centers.tolist()
        stamps, stamp_lens = self.llm.timestamp_embeddings(timestamp_texts(segments.centers))
        memory = compressed.memory.to(self.llm.device, self.llm.dtype)
        packed, cu = pack_context(memory, counts, stamps, stamp_lens, strategy, backend)
        before, after = self.llm.prompt_ids(query)
        embeds = torch.cat([self.llm.embed(before), packed, self.llm.embed(after)])
        mask = None
        if attention == "block_sparse":
            mask = segment_block_mask(len(before), cu, embeds.shape[0], block, window, device=embeds.device)
        timings["assemble_s"] = time.perf_counter() - t0

        tokens, ttft = self.llm.generate(embeds, max_new_tokens, mask)
        timings["ttft_s"] = ttft
        return TempoAnswer(self.llm.decode(tokens), counts, scores, centres, int(counts.sum()), packed.shape[0],
                           budget, method, ttft, tokens, timings)


def _load_tempo_llm(path: str, dtype, device) -> TempoLLM:
    """The Qwen3 LLM of a Tempo checkpoint: every tensor outside the compressor (``model.vision_tower_aux_list``)
    and projector (``model.mm_projector``) under its own name, in a Qwen3 config built from the checkpoint's."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    known = Qwen3Config().to_dict()
    config = Qwen3Config(**{k: v for k, v in cfg.items() if k in known and k not in ("model_type", "architectures")})
    model = Qwen3ForCausalLM(config)
    state = {k: v for k, v in tempo_state_dict(path).items()
             if not k.startswith(TEMPO_PREFIX) and not k.startswith("model.mm_projector.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"llm: the Tempo checkpoint's LLM weights do not match a Qwen3 model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model = model.to(device or "cpu", dtype or torch.bfloat16).eval()
    return TempoLLM(model, AutoTokenizer.from_pretrained(path))
