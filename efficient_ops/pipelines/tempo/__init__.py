"""Tempo: query-aware long-video compression (Fei et al., 2026).

A small VLM compresses each 8-frame segment of a 2-fps video into K memory tokens and a Yes/No relevance
score (one batched forward); Adaptive Token Allocation splits a strict visual-token budget across segments
by relevance; the kept head of each segment's tokens, each preceded by its text timestamp, is packed into
the global LLM's prompt (:func:`efficient_ops.pack_segments`), which prefills it (dense, or block-sparse per
segment) and answers. Stages: :mod:`.video`, :mod:`.compressor`, :mod:`.allocation`, :mod:`.assembly`,
:mod:`.llm`, :mod:`.pipeline`; offline stand-ins in :mod:`.demo`.
"""

from efficient_ops import pack_segments, segment_relevance

from .allocation import allocate_tokens, truncated_allocation, uniform_allocation
from .compressor import Compressed, Compressor, QwenVLCompressor
from .llm import TempoLLM
from .pipeline import METHODS, TempoAnswer, TempoPipeline
from .video import Segments, Video, load_video, segment

__all__ = ["pack_segments", "segment_relevance", "allocate_tokens", "uniform_allocation", "truncated_allocation",
           "Compressed", "Compressor", "QwenVLCompressor", "TempoLLM", "TempoPipeline", "TempoAnswer", "METHODS",
           "Segments", "Video", "load_video", "segment"]
