"""pagedllm: paged-KV-cache LLM inference on any accelerator through backend plugins.

``from pagedllm import LLM, SamplingParams`` is the offline API. Importing pagedllm touches no
accelerator: vendor SDKs are imported by the backend that needs them, when it is selected.
"""

from __future__ import annotations

from pagedllm.core.inputs import TextPrompt, TokensPrompt
from pagedllm.core.lora.request import LoRARequest
from pagedllm.core.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.core.pooling import EmbeddingOutput, EmbeddingRequestOutput, PoolingParams
from pagedllm.core.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.entrypoints.beam_search import BeamSearchOutput, BeamSearchParams
from pagedllm.entrypoints.llm import LLM
from pagedllm.version import __version__

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "LoRARequest",
    "Logprob",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]
