"""The global LLM: the chat prompt around the video, timestamp embeddings, prefill (dense SDPA, or
block-sparse per segment through :func:`efficient_ops.block_sparse_attention`) and greedy decoding.

Any Hugging Face causal LM works (Qwen3 in Tempo-6B), e.g. after :func:`efficient_ops.nn.quantize_model`.
Block-sparse prefill registers one attention function with transformers' ``AttentionInterface``: while a
mask is active (only during :meth:`TempoLLM.generate`'s prefill forward) every layer's attention over the
prompt runs :func:`efficient_ops.block_sparse_attention`; any other call falls through to SDPA.
"""

from __future__ import annotations

import contextvars
import time
from typing import List, Optional, Sequence, Tuple

import torch

import efficient_ops

VIDEO_PLACEHOLDER = "<video>"
ATTENTION_NAME = "efficient_ops_tempo_block_sparse"
_ACTIVE_MASK: contextvars.ContextVar = contextvars.ContextVar("tempo_block_mask", default=None)
_REGISTERED = False


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = _ACTIVE_MASK.get()
    if mask is None or (query.shape[2], key.shape[2]) != (mask.q_len, mask.kv_len):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = efficient_ops.block_sparse_attention(query, key, value, mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _attention)
        _REGISTERED = True


class TempoLLM:
    """A causal LM and its tokenizer, driven with a packed visual context.

    Args:
        model: a Hugging Face causal LM (eval mode).
        tokenizer: its tokenizer; its chat template (if any) frames the prompt, else Qwen's ChatML.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.hidden_size = model.config.hidden_size
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def prompt_ids(self, query: str) -> Tuple[List[int], List[int]]:
        """Token ids before and after the video in the chat prompt ``user: <video>\\n{query}``."""
        content = f"{VIDEO_PLACEHOLDER}\n{query}"
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
        else:
            text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        before, after = text.split(VIDEO_PLACEHOLDER)
        encode = self.tokenizer.encode
        return encode(before, add_special_tokens=False), encode(after, add_special_tokens=False)

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), d]`` input embeddings."""
        return self.model.get_input_embeddings()(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    @torch.no_grad()
    def timestamp_embeddings(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(stamps [n, L, d], lengths int64 [n])``: the embedded timestamp texts, zero-padded to the longest."""
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        longest = max(len(i) for i in ids)
        table = torch.zeros((len(ids), longest), dtype=torch.long, device=self.device)
        for row, i in enumerate(ids):
            table[row, :len(i)] = torch.tensor(i, device=self.device)
        stamps = self.model.get_input_embeddings()(table)
        lengths = torch.tensor([len(i) for i in ids], device=self.device)
        stamps = stamps * (torch.arange(longest, device=self.device)[None, :] < lengths[:, None])[..., None]
        return stamps, lengths

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int = 64, mask=None) -> Tuple[List[int], float]:
        """Greedy answer to the prompt ``embeds [S, d]``; ``mask`` (a BlockSparseMask over the S prompt
        positions) makes the prefill block-sparse. Returns ``(new token ids, time to first token in s)``."""
        sync = torch.cuda.synchronize if embeds.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        if mask is not None:
            _register()
            previous = self.model.config._attn_implementation
            self.model.set_attn_implementation(ATTENTION_NAME)
            token = _ACTIVE_MASK.set(mask)
        try:
            out = self.model(inputs_embeds=embeds[None], use_cache=True)
        finally:
            if mask is not None:
                _ACTIVE_MASK.reset(token)
                self.model.set_attn_implementation(previous)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        next_id = int(out.logits[0, -1].argmax())
        sync()
        ttft = time.perf_counter() - start
        tokens = [next_id]
        while len(tokens) < max_new_tokens and next_id not in self.eos_ids:
            ids = torch.tensor([[next_id]], device=embeds.device)
            out = self.model(input_ids=ids, cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
            tokens.append(next_id)
        return tokens, ttft

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True).strip()


def load_llm(path: str, dtype: Optional[torch.dtype] = None, device=None) -> TempoLLM:
    """A :class:`TempoLLM` from a Hugging Face causal-LM folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=device).eval()
    return TempoLLM(model, AutoTokenizer.from_pretrained(path))
