"""Tempo's pipeline on tiny random Qwen3-VL / Qwen3 models and a generated video file: video sampling and
seeking, the Qwen3-VL adapter's positions, loading, the whole pipeline within budget, and bad input."""

import json

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("transformers")

from efficient_ops.pipelines.tempo import (METHODS, Compressed, QwenVLCompressor, TempoLLM,  # noqa: E402
                                           TempoPipeline, load_video, segment)
from efficient_ops.pipelines.tempo.compressor import TEMPO_PREFIX, patchify  # noqa: E402
from efficient_ops.pipelines.tempo.demo import (DEMO_SCENES, SCENE_COLOURS, scene_frames, tiny_qwen3,  # noqa: E402
                                                tiny_qwen3_vl, tiny_tokenizer, write_video)
from efficient_ops.pipelines.tempo.video import frame_size, sample_indices  # noqa: E402

QUERY = "What colour is the needle scene?"
K = 16
FPS = 4.0


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    vlm, llm = tiny_qwen3_vl(tok), tiny_qwen3(tok)
    return tok, QwenVLCompressor.from_vlm(vlm, tok, output_size=64, num_memory_tokens=K), TempoLLM(llm, tok)


@pytest.fixture(scope="module")
def frames():
    return scene_frames(DEMO_SCENES, fps=FPS)  # 32 s: green 8, blue 8, red (needle) 4, yellow 8, white 4


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, frames):
    return write_video(str(tmp_path_factory.mktemp("tempo") / "scenes.mp4"), frames, fps=FPS)


# ---------------------------------------------------------------------------------------------------- video

def test_sampling_and_segments():
    assert sample_indices(128, 4.0).tolist() == torch.linspace(0, 127, 64).floor().long().tolist()  # 2 fps
    assert len(sample_indices(10, 30.0)) == 8 and len(sample_indices(10 ** 6, 30.0)) == 1024
    assert frame_size(720, 1280) == (288, 512) and frame_size(64, 96) == (64, 96) and frame_size(10, 20) == (32, 32)
    v = load_video(torch.zeros(44, 3, 64, 96, dtype=torch.uint8), fps=4.0)  # 11 s -> 22 frames -> 3 segments
    s = segment(v)
    assert v.frames.shape[0] == 22 and len(s) == 3 and s.lengths.tolist() == [8, 8, 6]
    assert torch.equal(s.frames[2, 6], s.frames[2, 5]) and torch.equal(s.frames[2, 7], v.frames[-1])
    assert s.centers.tolist() == [2.0, 6.0, 10.0]


def test_file_decoding_seeks_to_the_sampled_frames(video_file, frames):
    v = load_video(video_file)
    want = sample_indices(frames.shape[0], FPS)
    assert v.frames.shape == (len(want), 3, 64, 96) and abs(v.duration - 32.0) < 0.3
    assert torch.allclose(v.times, want.double() / FPS)
    # each decoded frame is the sampled source frame (up to the codec's loss), not a neighbour from another scene
    err = (v.frames.float() - frames[want].float()).abs().mean(dim=(1, 2, 3))
    assert err.max() < 20, err
    scene_of = torch.tensor([i for i, (_, secs) in enumerate(DEMO_SCENES) for _ in range(round(secs * FPS))])
    colours = torch.tensor([SCENE_COLOURS[c] for c, _ in DEMO_SCENES], dtype=torch.float32)
    mean = v.frames.float().mean(dim=(2, 3))
    assert torch.equal((mean[:, None] - colours[None]).norm(dim=-1).argmin(1), scene_of[want])


def test_bad_video_input(tmp_path):
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ValueError, match="not a readable video file"):
        load_video(str(garbage))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_video(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="video: has no frames"):
        load_video(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), fps=2.0)
    with pytest.raises(ValueError, match="fps: required"):
        load_video(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 \\[T, 3, H, W\\]"):
        load_video(torch.zeros(4, 32, 32, 3), fps=2.0)


# ---------------------------------------------------------------------------------------------------- adapter

def test_patchify_matches_the_qwen3_vl_processor_layout():
    processor = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl").Qwen3VLVideoProcessor
    f = torch.randint(0, 256, (3, 8, 3, 64, 96), dtype=torch.uint8)
    want, *_ = processor.patchify(None, (f.float() / 255 - 0.5) / 0.5, 16, 2, 2)
    got, grid = patchify(f, 16, 2, 2)
    assert torch.equal(got, want.reshape(-1, want.shape[-1])) and grid.tolist() == [[4, 4, 6]] * 3


def test_adapter_relevance_and_memory_positions(models, frames):
    tok, comp, _ = models
    s = segment(load_video(frames[:64], fps=FPS))  # 16 s -> 32 frames -> 4 segments
    out = comp.compress(s, QUERY)
    assert out.memory.shape == (4, K, 64) and out.scores.shape == (4,) and out.scores.dtype == torch.float32
    # relevance = P(Yes) of a softmax over the Yes/No logits of the VLM's own forward on the prompt alone
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    for i in range(len(s)):
        pixels, grid = patchify(s.frames[i:i + 1], 16, 2, 2)
        ids = tok.encode(comp.prompt(s.frame_times[i].tolist(), int(grid[0, 1] * grid[0, 2]) // 4, QUERY),
                         add_special_tokens=False)
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = comp.vlm(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,
                              mm_token_type_ids=(ids == comp.video_token_id).int() * 2).logits[0, -1]
        assert torch.allclose(out.scores[i], torch.softmax(logits[[yes, no]].float(), 0)[0], atol=1e-5)
    # the memory tokens come after the relevance position: new memory tokens change them, not the scores
    saved = comp.memory_tokens.data.clone()
    try:
        comp.memory_tokens.data.normal_()
        other = comp.compress(s, QUERY, batch_size=3)  # two forwards (3 + 1 segments)
    finally:
        comp.memory_tokens.data.copy_(saved)
    assert torch.allclose(other.scores, out.scores, atol=1e-6)
    assert not torch.allclose(other.memory, out.memory, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("method", METHODS)
def test_pipeline_answers_within_budget(models, video_file, method):
    _, comp, llm = models
    pipe = TempoPipeline(comp, llm)
    budget = 60
    answer = pipe(video_file, QUERY, budget=budget, method=method, max_new_tokens=4)
    n = 3 if method == "uniform_sampling" else 8  # uniform sampling: 8 * (60 // 16) = 24 frames -> 3 segments
    assert answer.allocation.shape == (n,) and len(answer.timestamps) == n and answer.scores.shape == (n,)
    assert answer.visual_tokens_used == int(answer.allocation.sum()) <= budget
    assert len(answer.tokens) >= 1 and isinstance(answer.text, str) and answer.ttft_s > 0
    assert answer.context_tokens > answer.visual_tokens_used  # the timestamps come on top


def test_greedy_answer_matches_hf_generate_and_block_sparse(models, video_file):
    _, comp, llm = models
    pipe = TempoPipeline(comp, llm)
    dense = pipe(video_file, QUERY, budget=64, max_new_tokens=6)
    full = pipe(video_file, QUERY, budget=64, max_new_tokens=6, attention="block_sparse", window=100, block=16)
    sparse = pipe(video_file, QUERY, budget=64, max_new_tokens=6, attention="block_sparse", window=1, block=16)
    assert full.tokens == dense.tokens and len(sparse.tokens) >= 1
    # the same prompt through transformers' own generate
    from efficient_ops.pipelines.tempo.assembly import pack_context
    from efficient_ops.pipelines.tempo.video import timestamp_texts
    s = segment(load_video(video_file))
    c = comp.compress(s, QUERY)
    stamps, lens = llm.timestamp_embeddings(timestamp_texts(s.centers))
    packed, _ = pack_context(c.memory, dense.allocation, stamps, lens)
    before, after = llm.prompt_ids(QUERY)
    embeds = torch.cat([llm.embed(before), packed, llm.embed(after)])[None]
    with torch.no_grad():
        ref = llm.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, eos_token_id=list(llm.eos_ids) or None)
    ref = ref[0].tolist()
    assert len(ref) >= 1 and dense.tokens[:len(ref)] == ref[:len(dense.tokens)]


class NeedleCompressor:
    """A fixture compressor whose relevance is wired to the needle (red) scene: 1 where a segment's frames are
    mostly red, else 0; memory tokens are random."""

    def __init__(self, k, d):
        self.num_memory_tokens, self.output_size = k, d

    def compress(self, segments, query, batch_size=None, progress=False):
        rgb = segments.frames.float().mean(dim=(1, 3, 4))  # [n, 3]
        red = torch.tensor(SCENE_COLOURS["red"], dtype=torch.float32)
        scores = ((rgb - red).norm(dim=-1) < 40).float()
        return Compressed(torch.randn(len(segments), self.num_memory_tokens, self.output_size), scores)


def test_needle_segment_gets_all_tokens(models, video_file):
    _, _, llm = models
    pipe = TempoPipeline(NeedleCompressor(K, 64), llm)
    answer = pipe(video_file, QUERY, budget=64, max_new_tokens=2)
    needle = 4  # the red scene covers 16-20 s: the fifth 4-s segment
    assert answer.scores.tolist() == [float(i == needle) for i in range(8)]
    assert answer.allocation.tolist() == [K if i == needle else 4 for i in range(8)]
    assert answer.visual_tokens_used == K + 7 * 4 <= 64
    filled = pipe(video_file, QUERY, budget=64, max_new_tokens=2, method="tempo_fill")
    assert filled.visual_tokens_used == 64 and filled.allocation[needle] == K


def test_pipeline_bad_input(models, video_file, tmp_path):
    _, comp, llm = models
    pipe = TempoPipeline(comp, llm)
    with pytest.raises(ValueError, match="budget: 5 visual tokens cannot give each of the 8 segments"):
        pipe(video_file, QUERY, budget=5)
    for query in ("", "   ", None):
        with pytest.raises(ValueError, match="query: expected a non-empty question"):
            pipe(video_file, query)
    with pytest.raises(ValueError, match="method: expected one of"):
        pipe(video_file, QUERY, method="best")
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="not a readable video file"):
        pipe(str(garbage), QUERY)
    with pytest.raises(ValueError, match="compressor: produces 64-wide memory tokens, but the LLM's hidden size"):
        TempoPipeline(NeedleCompressor(K, 64), TempoLLM(tiny_qwen3(llm.tokenizer, hidden=32), llm.tokenizer))


# ---------------------------------------------------------------------------------------------------- loading

def test_from_pretrained_round_trip(models, video_file, tmp_path):
    tok, comp, llm = models
    comp.save_pretrained(str(tmp_path / "compressor"))
    llm.model.save_pretrained(str(tmp_path / "llm"))
    tok.save_pretrained(str(tmp_path / "llm"))
    want = TempoPipeline(comp, llm)(video_file, QUERY, budget=64, max_new_tokens=4)
    got = TempoPipeline.from_pretrained(str(tmp_path / "compressor"), str(tmp_path / "llm"))(
        video_file, QUERY, budget=64, max_new_tokens=4)
    assert torch.allclose(got.scores, want.scores, atol=1e-6) and got.tokens == want.tokens
    # a plain Qwen3-VL folder: memory tokens smart-initialised, K as asked
    comp.vlm.save_pretrained(str(tmp_path / "qwen3vl"))
    tok.save_pretrained(str(tmp_path / "qwen3vl"))
    plain = TempoPipeline.from_pretrained(str(tmp_path / "qwen3vl"), str(tmp_path / "llm"), num_memory_tokens=8)
    assert plain.compressor.num_memory_tokens == 8
    assert plain(video_file, QUERY, budget=64, max_new_tokens=2).visual_tokens_used <= 64


def test_tempo_checkpoint_names_are_mapped(models, video_file, tmp_path):
    """A checkpoint in Tempo-6B's layout (one folder, compressor under model.vision_tower_aux_list.0.)."""
    from safetensors.torch import save_file
    tok, comp, llm = models
    state = {f"{TEMPO_PREFIX}vlm.{k}": v for k, v in comp.vlm.state_dict().items() if k != "lm_head.weight"}
    state[f"{TEMPO_PREFIX}compression_tokens"] = comp.memory_tokens.data[None]
    state.update({f"model.mm_projector.{k}": v for k, v in comp.projector.state_dict().items()})
    state.update({k: v for k, v in llm.model.state_dict().items() if k != "lm_head.weight"})
    folder = tmp_path / "tempo"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    cfg = llm.model.config.to_dict()
    cfg.update(model_type="tempo_qwen", mm_projector_type="mlp2x_gelu", mm_vision_tower_aux_list=["Qwen3-VL"])
    (folder / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(str(folder))
    base = tmp_path / "qwen3vl_config"
    comp.vlm.config.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    with pytest.raises(ValueError, match="vlm_config_dir: a Tempo checkpoint needs"):
        TempoPipeline.from_pretrained(str(folder))
    loaded = TempoPipeline.from_pretrained(str(folder), vlm_config_dir=str(base), dtype=torch.float32)
    want = TempoPipeline(comp, llm)(video_file, QUERY, budget=64, max_new_tokens=4)
    got = loaded(video_file, QUERY, budget=64, max_new_tokens=4)
    assert torch.allclose(got.scores, want.scores, atol=1e-6) and got.tokens == want.tokens


def test_cli_demo_prints_allocation_and_writes_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from efficient_ops.cli import main
    png = tmp_path / "alloc.png"
    assert main(["tempo", "--demo", "--max-new-tokens", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "visual tokens:" in out and "of 96" in out and "budget-filling variant" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="VIDEO and QUESTION are required"):
        main(["tempo"])


def test_from_pretrained_with_a_quantized_llm(models, video_file, tmp_path):
    tok, comp, _ = models
    comp.vlm.save_pretrained(str(tmp_path / "qwen3vl"))
    tok.save_pretrained(str(tmp_path / "qwen3vl"))
    tiny_qwen3(tok, hidden=128).save_pretrained(str(tmp_path / "llm"))
    tok.save_pretrained(str(tmp_path / "llm"))
    pipe = TempoPipeline.from_pretrained(str(tmp_path / "qwen3vl"), str(tmp_path / "llm"), num_memory_tokens=8,
                                         quantize_bits=4)
    assert type(pipe.llm.model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    answer = pipe(video_file, QUERY, budget=40, max_new_tokens=2)
    assert answer.visual_tokens_used <= 40 and len(answer.tokens) >= 1
