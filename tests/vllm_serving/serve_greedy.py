"""Greedy tokens of a checkpoint served by vLLM (run by the tests in a fresh process per engine):

    python serve_greedy.py DIR TP PROMPTS.json OUT.json

PROMPTS.json holds a list of token-id lists; OUT.json gets the generated token ids per prompt. CPU settings:
the uniprocess executor at TP=1, gloo workers bound to one core each at TP>1, a 64 MiB KV cache."""

import json
import os
import sys


def main():
    folder, tp, prompts_file, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % os.cpu_count()) for i in range(tp)))
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, quantization="efficient_ops", enforce_eager=True, dtype="float32",
              tensor_parallel_size=tp, distributed_executor_backend="uni" if tp == 1 else "mp",
              skip_tokenizer_init=True, max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=64 << 20, seed=0)
    with open(prompts_file) as f:
        prompts = json.load(f)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    with open(out_file, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outs], f)


if __name__ == "__main__":
    main()
