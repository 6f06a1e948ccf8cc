"""The compressor: a small VLM that turns each segment into K memory tokens and a relevance score.

:class:`Compressor` is the protocol the pipeline needs; :class:`QwenVLCompressor` implements it over
transformers' ``Qwen3VLForConditionalGeneration`` the way Tempo does:

- per segment the chat prompt is Tempo's system prompt, then the user turn with the segment's frames (one
  ``"<t seconds><|vision_start|><|video_pad|>...<|vision_end|>"`` group per temporal patch of 2 frames, t the
  mean time of the two frames, as Qwen3-VL's processor writes them) and ``"\\nQuery:\\n{query}"``, then the
  assistant header;
- the K learnable memory-token embeddings are placed right after each prompt's last token (prompts are
  right-padded to the longest; padding follows the memory tokens and is masked);
- one batched forward of the VLM's language model; the last hidden states at the K memory positions,
  projected by ``mm_projector`` to the LLM width, are the segment's memory tokens;
- relevance = ``sigmoid((lm_head[Yes] - lm_head[No]) . h)`` at the last prompt position (just before the
  first memory token, so the memory tokens cannot influence it under causal attention), via
  :func:`efficient_ops.segment_relevance`.

Loading (:meth:`QwenVLCompressor.from_pretrained`):

- a directory this class saved (a Qwen3-VL checkpoint plus ``tempo_compressor.safetensors`` with
  ``memory_tokens`` and ``projector.*``, and ``tempo_compressor.json``);
- a Tempo checkpoint (Vision-CAIR/Tempo-6B layout, detected by its ``model.vision_tower_aux_list.0.`` keys);
  parameter names are mapped as
  ``model.vision_tower_aux_list.0.vlm.model.* -> Qwen3-VL model.*``,
  ``model.vision_tower_aux_list.0.compression_tokens [1, K, d] -> memory_tokens [K, d]``,
  ``model.mm_projector.* -> projector.*`` (``mm_projector_type`` from its config, e.g. ``mlp2x_gelu``),
  ``model.vision_tower_aux_list.0.linear_layer.weight [1, d]`` (when saved) ``-> w_yes - w_no``; the
  Qwen3-VL config (and tokenizer) come from ``vlm_config_dir`` (the base Qwen3-VL-2B-Instruct folder; weights
  there are not needed), and the Yes/No rows otherwise from the tied embedding;
- a plain Qwen3-VL checkpoint: memory tokens are drawn from ``N(mean, std)`` of the LLM embedding table per
  dimension (Tempo's "smart init") and the projector is freshly initialised; both are untrained then.

Frames are normalised with mean = std = 0.5 (Qwen3-VL's processor defaults) and cut into 16-px patches in
the processor's layout (temporal pairs, 2x2 merge blocks contiguous); resizing happens in :mod:`.video`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence

import torch
from torch import nn

import efficient_ops

from .video import Segments, timestamp_text

SYSTEM_PROMPT = ("You are a query-conditioned visual compressor. "
                 "Store in the provided memory tokens the minimal visual information needed to answer the Query. "
                 "Ignore irrelevant details. "
                 "Now, before compressing, answer exactly 'Yes' or 'No': is this segment relevant to the Query?")
NUM_MEMORY_TOKENS = 128
TEMPO_PREFIX = "model.vision_tower_aux_list.0."
EXTRA_WEIGHTS, EXTRA_CONFIG = "tempo_compressor.safetensors", "tempo_compressor.json"


@dataclass
class Compressed:
    """What a compressor returns for n segments.

    Attributes:
        memory: ``[n, K, d_llm]`` memory tokens, in the order the segment's tokens were produced (Tempo keeps
            the first k: the memory tokens are trained to front-load the information).
        scores: float32 ``[n]`` relevance in [0, 1].
    """

    memory: torch.Tensor
    scores: torch.Tensor


class Compressor(Protocol):
    """Segments + query -> :class:`Compressed`. ``num_memory_tokens`` is K, ``output_size`` the LLM width."""

    num_memory_tokens: int
    output_size: int

    def compress(self, segments: Segments, query: str, batch_size: Optional[int] = None,
                 progress: bool = False) -> Compressed: ...


def build_projector(kind: str, in_features: int, out_features: int) -> nn.Module:
    """Tempo's ``mm_projector``: "linear", "mlp{N}x_gelu" (Linear, then (GELU, Linear) x N-1) or "identity"."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "identity":
        if in_features != out_features:
            raise ValueError(f"projector: identity needs equal widths, got {in_features} -> {out_features}")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None:
        raise ValueError(f"projector: unknown kind {kind!r} (linear, identity or mlp<N>x_gelu)")
    layers: List[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


def patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int, mean=0.5, std=0.5):
    """uint8 ``[n, T, 3, H, W]`` -> ``(pixel_values [n * t * h * w, 3 * temporal * patch^2], grid_thw [n, 3])``
    in Qwen3-VL's flattened patch order (what its vision tower expects)."""
    n, t, c, hh, ww = frames.shape
    if t % temporal or hh % (patch * merge) or ww % (patch * merge):
        raise ValueError(f"frames: {t} frames of {hh}x{ww} px do not tile into {temporal}-frame, "
                         f"{patch * merge}-px merged patches")
    x = (frames.float() / 255 - mean) / std
    gt, gh, gw = t // temporal, hh // patch, ww // patch
    x = x.view(n, gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(n * gt * gh * gw, c * temporal * patch * patch)
    return x, torch.tensor([[gt, gh, gw]] * n)


def _token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer: {token!r} must be a single token for the relevance score, got {ids}")
    return ids[0]


class QwenVLCompressor(nn.Module):
    """Tempo's compressor over a Qwen3-VL model (see the module docstring).

    Args:
        vlm: a ``Qwen3VLForConditionalGeneration``.
        tokenizer: its tokenizer (Qwen special tokens, single-token "Yes" and "No").
        memory_tokens: ``[K, d_vlm]`` learnable memory-token embeddings.
        projector: maps ``d_vlm`` to the LLM width (``output_size``).
        w_yes, w_no: ``[d_vlm]`` LM-head rows of "Yes" / "No" (default: read from ``vlm``'s LM head).
    """

    def __init__(self, vlm, tokenizer, memory_tokens: torch.Tensor, projector: nn.Module, output_size: int,
                 w_yes: Optional[torch.Tensor] = None, w_no: Optional[torch.Tensor] = None,
                 projector_kind: str = "custom"):
        super().__init__()
        self.vlm, self.tokenizer, self.projector = vlm, tokenizer, projector
        d = vlm.config.text_config.hidden_size
        if memory_tokens.dim() != 2 or memory_tokens.shape[1] != d:
            raise ValueError(f"memory_tokens: expected [K, {d}] (the VLM's hidden size), got "
                             f"{list(memory_tokens.shape)}")
        self.memory_tokens = nn.Parameter(memory_tokens.detach().clone(), requires_grad=False)
        if w_yes is None or w_no is None:
            head = vlm.get_output_embeddings().weight
            w_yes, w_no = head[_token_id(tokenizer, "Yes")], head[_token_id(tokenizer, "No")]
        self.register_buffer("w_yes", w_yes.detach().clone(), persistent=False)
        self.register_buffer("w_no", w_no.detach().clone(), persistent=False)
        self.num_memory_tokens, self.output_size, self.projector_kind = memory_tokens.shape[0], output_size, \
            projector_kind
        vc = vlm.config.vision_config
        self.patch, self.temporal, self.merge = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
        self.video_token_id = vlm.config.video_token_id

    # -------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_vlm(cls, vlm, tokenizer, output_size: int, num_memory_tokens: int = NUM_MEMORY_TOKENS,
                 projector: str = "mlp2x_gelu", seed: int = 0) -> "QwenVLCompressor":
        """Fresh (untrained) memory tokens by Tempo's smart init and a fresh projector over ``vlm``."""
        gen = torch.Generator().manual_seed(seed)
        emb = vlm.get_input_embeddings().weight.detach().float().cpu()
        mean, std = emb.mean(0), emb.std(0)
        memory = mean + std * torch.randn(num_memory_tokens, emb.shape[1], generator=gen)
        d = vlm.config.text_config.hidden_size
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            proj = build_projector(projector, d, output_size)
        param = next(vlm.parameters())
        return cls(vlm, tokenizer, memory.to(param.dtype), proj.to(param.device, param.dtype), output_size,
                   projector_kind=projector)

    @classmethod
    def from_pretrained(cls, path: str, output_size: Optional[int] = None, num_memory_tokens: int = NUM_MEMORY_TOKENS,
                        projector: str = "mlp2x_gelu", vlm_config_dir: Optional[str] = None, dtype=None,
                        device=None) -> "QwenVLCompressor":
        """Load from a directory saved by :meth:`save_pretrained`, a Tempo checkpoint (needs
        ``vlm_config_dir``) or a plain Qwen3-VL checkpoint (needs ``output_size``); see the module docstring."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

        if not os.path.isdir(path):
            raise FileNotFoundError(f"compressor: no such directory {path!r}")
        if _is_tempo_checkpoint(path):
            if vlm_config_dir is None:
                raise ValueError("vlm_config_dir: a Tempo checkpoint needs the base Qwen3-VL folder (config and "
                                 "tokenizer; e.g. Qwen3-VL-2B-Instruct) to build its compressor")
            return _load_tempo_compressor(cls, path, vlm_config_dir, dtype, device)
        vlm = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto", device_map=device)
        vlm.eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if os.path.isfile(os.path.join(path, EXTRA_CONFIG)):
            with open(os.path.join(path, EXTRA_CONFIG)) as f:
                meta = json.load(f)
            extra = load_file(os.path.join(path, EXTRA_WEIGHTS))
            param = next(vlm.parameters())
            proj = build_projector(meta["projector"], vlm.config.text_config.hidden_size, meta["output_size"])
            proj.load_state_dict({k[len("projector."):]: v for k, v in extra.items() if k.startswith("projector.")})
            return cls(vlm, tokenizer, extra["memory_tokens"].to(param.device, param.dtype),
                       proj.to(param.device, param.dtype), meta["output_size"], projector_kind=meta["projector"])
        if output_size is None:
            raise ValueError("output_size: a plain Qwen3-VL checkpoint needs the LLM's hidden size for its projector")
        return cls.from_vlm(vlm, tokenizer, output_size, num_memory_tokens, projector)

    def save_pretrained(self, path: str) -> None:
        """Save the VLM, its tokenizer, the memory tokens and the projector (reloadable by from_pretrained)."""
        from safetensors.torch import save_file

        self.vlm.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        tensors = {"memory_tokens": self.memory_tokens.detach().contiguous()}
        tensors.update({f"projector.{k}": v.contiguous() for k, v in self.projector.state_dict().items()})
        save_file(tensors, os.path.join(path, EXTRA_WEIGHTS))
        with open(os.path.join(path, EXTRA_CONFIG), "w") as f:
            json.dump({"projector": self.projector_kind, "output_size": self.output_size,
                       "num_memory_tokens": self.num_memory_tokens}, f, indent=2)

    # ----------------------------------------------------------------------------------------------- inference

    def prompt(self, frame_times: Sequence[float], frame_tokens: int, query: str) -> str:
        """The chat prompt of one segment (before the memory tokens)."""
        video = "".join(f"{timestamp_text((frame_times[i] + frame_times[i + self.temporal - 1]) / 2)}"
                        f"<|vision_start|>{'<|video_pad|>' * frame_tokens}<|vision_end|>"
                        for i in range(0, len(frame_times), self.temporal))
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{video}\nQuery:\n{query}"
                f"<|im_end|>\n<|im_start|>assistant\n")

    @torch.no_grad()
    def compress(self, segments: Segments, query: str, batch_size: Optional[int] = None,
                 progress: bool = False) -> Compressed:
        """Memory tokens and relevance of every segment; ``batch_size`` segments per forward (default: all in
        one batched forward), with a progress bar over segments when ``progress``."""
        from tqdm.auto import tqdm

        if not isinstance(query, str) or not query.strip():
            raise ValueError("query: expected a non-empty question string")
        n = len(segments)
        batch_size = batch_size or n
        memory, scores = [], []
        with tqdm(total=n, desc="compressing segments", unit="seg", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                m, s = self._forward(segments.frames[start:start + batch_size],
                                     segments.frame_times[start:start + batch_size], query)
                memory.append(m)
                scores.append(s)
                bar.update(m.shape[0])
        return Compressed(torch.cat(memory), torch.cat(scores))

    def _forward(self, frames: torch.Tensor, frame_times: torch.Tensor, query: str):
        device = self.memory_tokens.device
        b, k = frames.shape[0], self.num_memory_tokens
        pixels, grid = patchify(frames, self.patch, self.temporal, self.merge)
        frame_tokens = int(grid[0, 1] * grid[0, 2]) // self.merge ** 2
        prompts = [self.tokenizer.encode(self.prompt(t.tolist(), frame_tokens, query), add_special_tokens=False)
                   for t in frame_times]
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        seq = int(lengths.max()) + k
        pad = self.tokenizer.pad_token_id
        ids = torch.full((b, seq), pad, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, device=device)
        pos = torch.arange(seq, device=device)
        is_memory = (pos >= lengths[:, None]) & (pos < lengths[:, None] + k)
        attention_mask = ((pos < lengths[:, None]) | is_memory).long()
        embeds = self.vlm.get_input_embeddings()(ids)
        embeds[is_memory] = self.memory_tokens.to(embeds.dtype).repeat(b, 1)
        position_ids, _ = self.vlm.model.get_rope_index(
            ids, (ids == self.video_token_id).int() * 2, video_grid_thw=grid.to(device),
            attention_mask=attention_mask)
        hidden = self.vlm.model(input_ids=None, inputs_embeds=embeds, attention_mask=attention_mask,
                                position_ids=position_ids, pixel_values_videos=pixels.to(device, embeds.dtype),
                                video_grid_thw=grid.to(device)).last_hidden_state
        rows = torch.arange(b, device=device)
        scores = efficient_ops.segment_relevance(hidden[rows, lengths - 1], self.w_yes.to(hidden.dtype),
                                                 self.w_no.to(hidden.dtype))
        memory = self.projector(hidden[is_memory].view(b, k, -1))
        return memory, scores


def _is_tempo_checkpoint(path: str) -> bool:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return any(key.startswith(TEMPO_PREFIX) for key in json.load(f)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, "pt") as f:
            return any(key.startswith(TEMPO_PREFIX) for key in f.keys())
    return False


def tempo_state_dict(path: str) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def _load_tempo_compressor(cls, path: str, vlm_config_dir: str, dtype, device):
    from transformers import AutoConfig, AutoTokenizer, Qwen3VLForConditionalGeneration

    with open(os.path.join(path, "config.json")) as f:
        tempo_cfg = json.load(f)
    state = tempo_state_dict(path)
    vlm_cfg = AutoConfig.from_pretrained(vlm_config_dir)
    vlm = Qwen3VLForConditionalGeneration(vlm_cfg)
    vlm_prefix = TEMPO_PREFIX + "vlm."
    vlm_state = {k[len(vlm_prefix):]: v for k, v in state.items() if k.startswith(vlm_prefix)}
    missing, unexpected = vlm.load_state_dict(vlm_state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not vlm_cfg.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"compressor: the Tempo checkpoint's VLM weights do not match the Qwen3-VL config in "
                         f"{vlm_config_dir!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    vlm.tie_weights()
    kind = tempo_cfg.get("mm_projector_type", "linear")
    output_size = tempo_cfg["hidden_size"]
    proj = build_projector(kind, vlm_cfg.text_config.hidden_size, output_size)
    proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in state.items()
                          if k.startswith("model.mm_projector.")})
    w_yes = w_no = None
    router = state.get(TEMPO_PREFIX + "linear_layer.weight")
    if router is not None:
        w_yes, w_no = router[0], torch.zeros_like(router[0])
    dtype = dtype or torch.bfloat16
    vlm = vlm.to(device or "cpu", dtype).eval()
    comp = cls(vlm, AutoTokenizer.from_pretrained(vlm_config_dir),
               state[TEMPO_PREFIX + "compression_tokens"][0].to(vlm.device, dtype), proj.to(vlm.device, dtype),
               output_size, w_yes, w_no, projector_kind=kind)
    return comp
