"""Greedy router turns from the real vLLM engine, for tests/test_router.py.

usage: python tests/vllm_routes.py CHECKPOINT PROMPTS.json OUT.json
Runs as a script (vLLM's engine starts worker processes, so it needs a __main__ guard).
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    checkpoint, prompts_path, out_path = sys.argv[1:4]
    prompts = json.loads(open(prompts_path).read())
    llm = LLM(model=checkpoint, dtype="float32", gpu_memory_utilization=0.5, max_model_len=4096, seed=0,
              enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=32, skip_special_tokens=True)
    outputs = llm.generate(prompts, params)
    with open(out_path, "w") as handle:
        json.dump([o.outputs[0].text for o in outputs], handle)
