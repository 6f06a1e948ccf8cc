"""Offline stand-ins for the real models and data: a tiny tokenizer, tiny random Qwen3-VL / Qwen3 models and
a generated video (coloured scenes with one "needle" scene), for the tests, the benchmark and
``efficient-ops tempo --demo``. Nothing here downloads anything.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|video_pad|>", "<|image_pad|>"]
CORPUS = ("system user assistant You are a helpful assistant. You are a query-conditioned visual compressor. "
          "Store in the provided memory tokens the minimal visual information needed to answer the Query. "
          "What colour is the needle scene? Which scene shows a red square? Yes No seconds 0.1 2.5 12.0 37.5 "
          "red green blue white black yellow the a is of in video segment relevant")
SCENE_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
                 "white": (240, 240, 240)}


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen's special tokens and single-token "Yes" / "No", trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.add_tokens(["Yes", "No"])
    return fast


def tiny_qwen3_vl(tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen3-VL with a 1-block vision tower (16-px patches, 2x2 merge)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    head_dim = 16
    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, vocab_size=len(tokenizer),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         max_position_embeddings=4096),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=hidden,
                           num_position_embeddings=256, deepstack_visual_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def tiny_qwen3(tokenizer, hidden: int = 64, layers: int = 2, head_dim: int = 16, seed: int = 1):
    """A randomly initialised Qwen3 causal LM (the global LLM)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, vocab_size=len(tokenizer),
                      max_position_embeddings=16384, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def scene_frames(scenes: Sequence[Tuple[str, float]], fps: float = 4.0, size: Tuple[int, int] = (64, 96),
                 seed: int = 0) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` frames: each ``(colour, seconds)`` scene is a flat colour with a moving square and
    a little noise, so that consecutive frames differ and the encoder has something to compress."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    frames = []
    for colour, seconds in scenes:
        base = torch.tensor(SCENE_COLOURS[colour], dtype=torch.float32)[:, None, None].expand(3, h, w)
        for i in range(round(seconds * fps)):
            f = base.clone() + 12 * torch.randn(3, h, w, generator=gen)
            x = (i * 3) % (w - 16)
            f[:, h // 2 - 8:h // 2 + 8, x:x + 16] = 255 - base[:, :16, :16]
            frames.append(f.clamp(0, 255).to(torch.uint8))
    return torch.stack(frames)


def write_video(path: str, frames: torch.Tensor, fps: float = 4.0) -> str:
    """Encode uint8 ``[T, 3, H, W]`` frames to an H.264 (or MPEG-4) file with PyAV; returns ``path``."""
    import av

    with av.open(os.fspath(path), mode="w") as container:
        codecs = av.codecs_available
        stream = container.add_stream("libx264" if "libx264" in codecs else "mpeg4", rate=round(fps))
        stream.height, stream.width = frames.shape[2], frames.shape[3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            frame = av.VideoFrame.from_ndarray(f.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


DEMO_SCENES = [("green", 8.0), ("blue", 8.0), ("red", 4.0), ("yellow", 8.0), ("white", 4.0)]
DEMO_NEEDLE = "red"
