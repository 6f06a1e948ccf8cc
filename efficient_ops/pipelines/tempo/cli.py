"""``efficient-ops tempo VIDEO "QUESTION" --budget 4096 --compressor DIR --llm DIR``, and ``--demo`` (tiny
random models and a generated video, fully offline). Prints the answer and the allocation per segment and
writes a PNG of relevance and tokens kept along the video's timeline."""

from __future__ import annotations

import argparse
import os
import tempfile

DEMO_QUESTION = "What colour is the needle scene?"
DEMO_K, DEMO_BUDGET = 16, 96


def add_parser(subparsers) -> None:
    """Register the ``tempo`` subcommand."""
    p = subparsers.add_parser("tempo", help="answer a question about a long video with Tempo",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", help="video file (any format FFmpeg reads)")
    p.add_argument("question", nargs="?", help="the question")
    p.add_argument("--budget", type=int, default=None, help="visual-token budget (default 4096; 96 with --demo)")
    p.add_argument("--compressor", help="compressor folder (Qwen3-VL, or a Tempo checkpoint)")
    p.add_argument("--llm", help="LLM folder (Hugging Face causal LM); omit for a Tempo checkpoint")
    p.add_argument("--vlm-config", help="base Qwen3-VL folder (config + tokenizer) for a Tempo checkpoint")
    p.add_argument("--method", default="tempo", help="tempo, tempo_fill, tail, tome, uniform, no_ata, "
                                                     "uniform_sampling (default tempo)")
    p.add_argument("--attention", default="dense", choices=("dense", "block_sparse"), help="LLM prefill")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None, help="segments per compressor forward (default all)")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cuda if available, else cpu)")
    p.add_argument("--plot", default="tempo_allocation.png", help="PNG path ('' to skip)")
    p.add_argument("--demo", action="store_true", help="tiny random models + a generated video (offline)")
    p.set_defaults(func=run)


def plot_allocation(answer, path: str, k_max: int, title: str = "") -> str:
    """Relevance and tokens kept per segment along the timeline, as a PNG (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the allocation plot needs matplotlib: pip install 'efficient_ops[tempo]'") from exc
    t = answer.timestamps
    width = (t[1] - t[0]) * 0.9 if len(t) > 1 else 1.0
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(9, 5))
    ax1.plot(t, answer.scores.tolist(), "o-", color="tab:red")
    ax1.set_ylabel("relevance")
    ax1.set_title(title or f"{answer.method}: {answer.visual_tokens_used} / {answer.budget} visual tokens")
    ax2.bar(t, answer.allocation.tolist(), width=width, color="tab:blue")
    ax2.axhline(k_max, color="grey", linestyle="--", linewidth=1, label=f"K = {k_max}")
    ax2.set_ylabel("tokens kept")
    ax2.set_xlabel("time (s, segment centre)")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _demo(workdir: str):
    from .compressor import QwenVLCompressor
    from .demo import DEMO_SCENES, scene_frames, tiny_qwen3, tiny_qwen3_vl, tiny_tokenizer, write_video
    from .llm import TempoLLM
    from .pipeline import TempoPipeline

    tok = tiny_tokenizer()
    comp = QwenVLCompressor.from_vlm(tiny_qwen3_vl(tok), tok, output_size=64, num_memory_tokens=DEMO_K)
    video = write_video(os.path.join(workdir, "tempo_demo.mp4"), scene_frames(DEMO_SCENES))
    return TempoPipeline(comp, TempoLLM(tiny_qwen3(tok), tok)), video


def run(args) -> int:
    import torch

    from .pipeline import TempoPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as workdir:
        if args.demo:
            pipe, video = _demo(workdir)
            pipe.compressor.to(device)
            pipe.llm.model.to(device)
            question = args.question or DEMO_QUESTION
            budget = args.budget or DEMO_BUDGET
            print(f"demo: tiny random Qwen3-VL compressor (K={DEMO_K}) and Qwen3 LLM, generated video {video}; "
                  "the answer is noise, the allocation mechanics are real")
        else:
            if not args.video or not args.question:
                raise SystemExit("efficient-ops tempo: VIDEO and QUESTION are required (or --demo)")
            if not args.compressor:
                raise SystemExit("efficient-ops tempo: --compressor DIR is required (or --demo)")
            pipe = TempoPipeline.from_pretrained(args.compressor, args.llm, vlm_config_dir=args.vlm_config,
                                                 device=device)
            video, question, budget = args.video, args.question, args.budget or 4096
        answer = pipe(video, question, budget=budget, method=args.method, attention=args.attention,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True)
        k = pipe.compressor.num_memory_tokens
        print(f"\nQ: {question}\nA: {answer.text!r}\n")
        print(f"{'segment':>7} {'centre s':>8} {'relevance':>9} {'tokens':>6}")
        for i, (t, s, c) in enumerate(zip(answer.timestamps, answer.scores.tolist(), answer.allocation.tolist())):
            print(f"{i:7d} {t:8.1f} {s:9.4f} {c:6d}")
        unused = budget - answer.visual_tokens_used
        print(f"\nvisual tokens: {answer.visual_tokens_used} of {budget} ({unused} unused, "
              f"{100 * unused / budget:.0f}%); context with timestamps {answer.context_tokens}; "
              f"TTFT {answer.ttft_s * 1e3:.1f} ms; compressor {answer.timings['compress_s']:.2f} s")
        if args.method == "tempo":
            from .allocation import allocate_tokens
            filled = int(allocate_tokens(answer.scores, budget, k, fill=True).sum())
            print(f"the budget-filling variant (--method tempo_fill) would use {filled} of {budget}")
        if args.plot:
            print(f"plot: {plot_allocation(answer, args.plot, k)}")
    return 0
