"""Video input: frame sampling at 2 fps, resizing, and 8-frame segments with their timestamps.

Sampling follows Tempo's released code: ``round(duration * fps)`` frames clamped to ``[min_frames, max_frames]``
(8..1024), at source-frame indices ``floor(linspace(0, total - 1, n))``. Frames are resized so that the longer
edge is at most 512 px, each side a multiple of 32 (Qwen3-VL's 16-px patches merged 2 x 2; Tempo rounds to
16 and its Qwen preprocessing to 32). Segments are 8 consecutive sampled frames, stride 8; a trailing short
segment is padded by repeating its last frame, so every segment has the same shape for one batched forward.

A file is read with PyAV, seeking to each sampled frame's keyframe instead of decoding the whole stream
(consecutive targets within a couple of seconds share one decode run).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

SAMPLE_FPS = 2.0
MIN_FRAMES, MAX_FRAMES = 8, 1024
SEGMENT_FRAMES = 8
MAX_EDGE = 512
SIZE_MULTIPLE = 32
RESEEK_SECONDS = 2.0  # decode forward instead of seeking when the next target is this close


@dataclass
class Video:
    """Sampled, resized frames of one video.

    Attributes:
        frames: uint8 ``[T, 3, H, W]`` (RGB), the sampled frames.
        times: float64 ``[T]``, each sampled frame's time in seconds in the source video.
        duration: the source video's length in seconds.
        sample_fps: sampled frames per second of video actually achieved (``T / duration``; 2 unless clamped).
    """

    frames: torch.Tensor
    times: torch.Tensor
    duration: float
    sample_fps: float


@dataclass
class Segments:
    """A video cut into fixed-length segments.

    Attributes:
        frames: uint8 ``[n, 8, 3, H, W]``; the last segment is padded by repeating its last frame.
        frame_times: float64 ``[n, 8]``, the time of every frame (padding repeats the last time).
        centers: float64 ``[n]``, each segment's centre, ``(8 i + 4) / sample_fps`` as Tempo stamps it.
        lengths: int64 ``[n]``, real (unpadded) frames per segment.
    """

    frames: torch.Tensor
    frame_times: torch.Tensor
    centers: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.frames.shape[0]


def sample_indices(total_frames: int, fps: float, sample_fps: float = SAMPLE_FPS, min_frames: int = MIN_FRAMES,
                   max_frames: int = MAX_FRAMES) -> torch.Tensor:
    """Source-frame indices to sample: ``round(total / fps * sample_fps)`` clamped to ``[min, max]`` frames,
    ``floor(linspace(0, total - 1, n))`` (indices repeat when the video is shorter than ``min_frames``)."""
    if total_frames <= 0:
        raise ValueError(f"video: has no frames (total_frames={total_frames})")
    if not fps > 0:
        raise ValueError(f"fps: must be positive, got {fps}")
    if total_frames == 1:
        return torch.zeros(min_frames, dtype=torch.long)
    n = min(max(round(total_frames / fps * sample_fps), min_frames), max_frames)
    return torch.linspace(0, total_frames - 1, n, dtype=torch.float64).floor().long()


def frame_size(height: int, width: int, max_edge: int = MAX_EDGE, multiple: int = SIZE_MULTIPLE):
    """``(h, w)`` with the longer edge at most ``max_edge`` and each side a positive multiple of ``multiple``."""
    scale = min(1.0, max_edge / max(height, width))
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def _resize(frames: torch.Tensor, size) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    out = F.interpolate(frames.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _decode_file(path: str, sample_fps: float, min_frames: int, max_frames: int, max_edge: int):
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading a video file needs PyAV: pip install 'efficient_ops[tempo]' (or pip install av)") \
            from exc
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video: no such file {path!r}")
    try:
        container = av.open(path)
    except av.FFmpegError as exc:
        raise ValueError(f"video: {path!r} is not a readable video file ({exc})") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"video: {path!r} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        else:
            duration = 0.0
        total = stream.frames or round(duration * fps)
        if total <= 0 or fps <= 0:
            raise ValueError(f"video: {path!r} has no decodable frames (frames={total}, fps={fps})")
        indices = sample_indices(total, fps, sample_fps, min_frames, max_frames)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        targets = (indices.double() / fps).tolist()
        size = frame_size(stream.codec_context.height, stream.codec_context.width, max_edge)
        frames, times = [], []
        decoder, current, last = None, None, -math.inf
        for t in targets:
            if decoder is None or t < last or t > last + RESEEK_SECONDS:
                container.seek(int((start + t) / stream.time_base), stream=stream, backward=True, any_frame=False)
                decoder, current, last = container.decode(stream), None, -math.inf
            # the first frame whose time reaches t (half a frame early counts), or the last one decoded
            while current is None or last < t - 0.5 / fps:
                frame = next(decoder, None)
                if frame is None:
                    break
                current, last = frame, float(frame.pts * stream.time_base) - start if frame.pts is not None else t
            if current is None:
                raise ValueError(f"video: {path!r}: no frame could be decoded at {t:.2f} s")
            frames.append(torch.from_numpy(current.reformat(width=size[1], height=size[0], format="rgb24")
                                           .to_ndarray()).permute(2, 0, 1))
            times.append(t)
    return torch.stack(frames), torch.tensor(times, dtype=torch.float64), total / fps


def load_video(video: Union[str, os.PathLike, torch.Tensor], fps: Optional[float] = None,
               sample_fps: float = SAMPLE_FPS, min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES,
               max_edge: int = MAX_EDGE) -> Video:
    """Sample and resize a video the way Tempo does.

    Args:
        video: a file path (decoded with PyAV, seeking per sampled frame) or a uint8 ``[T, 3, H, W]`` tensor.
        fps: the tensor's frame rate (required for a tensor, ignored for a file).
        sample_fps, min_frames, max_frames: frames are sampled at ``sample_fps``, clamped to this range.
        max_edge: the longer edge after resizing (each side a multiple of 32).

    Returns:
        A :class:`Video`.
    """
    if isinstance(video, (str, os.PathLike)):
        frames, times, duration = _decode_file(os.fspath(video), sample_fps, min_frames, max_frames, max_edge)
    elif isinstance(video, torch.Tensor):
        if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[1] != 3:
            raise ValueError(f"video: expected a uint8 [T, 3, H, W] tensor, got {video.dtype} {list(video.shape)}")
        if fps is None:
            raise ValueError("fps: required with a tensor video (frames per second of the tensor)")
        indices = sample_indices(video.shape[0], float(fps), sample_fps, min_frames, max_frames)
        frames = _resize(video[indices], frame_size(video.shape[2], video.shape[3], max_edge))
        times, duration = indices.double() / fps, video.shape[0] / fps
    else:
        raise TypeError(f"video: expected a file path or a uint8 [T, 3, H, W] tensor, got {type(video).__name__}")
    return Video(frames, times, duration, frames.shape[0] / duration if duration > 0 else sample_fps)


def segment(video: Video, frames_per_segment: int = SEGMENT_FRAMES) -> Segments:
    """Cut ``video`` into non-overlapping segments of ``frames_per_segment`` frames (stride = length)."""
    t = video.frames.shape[0]
    n = -(-t // frames_per_segment)
    pad = n * frames_per_segment - t
    index = torch.cat([torch.arange(t), torch.full((pad,), t - 1)])
    frames = video.frames[index].reshape(n, frames_per_segment, *video.frames.shape[1:])
    frame_times = video.times[index].reshape(n, frames_per_segment)
    centers = (torch.arange(n, dtype=torch.float64) * frames_per_segment + frames_per_segment / 2) / video.sample_fps
    lengths = torch.full((n,), frames_per_segment, dtype=torch.long)
    lengths[-1] -= pad
    return Segments(frames, frame_times, centers, lengths)


def timestamp_text(seconds: float) -> str:
    """Tempo's text timestamp, ``"<{t:.1f} seconds>"``."""
    return f"<{seconds:.1f} seconds>"


def timestamp_texts(centers: torch.Tensor) -> List[str]:
    """The timestamp of every segment centre."""
    return [timestamp_text(float(c)) for c in centers]
