"""``POST /v1/embeddings``: last-token embeddings of one input or a batch (``LLM.embed`` behind the server)."""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import Request
from starlette.responses import Response

from pagedllm.core.pooling import EmbeddingRequestOutput, PoolingParams
from pagedllm.core.sampling_params import truncated_prompt
from pagedllm.entrypoints.openai.errors import from_value_error, invalid_param
from pagedllm.entrypoints.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, json_response, random_id


def encode_embedding(values: list[float], encoding_format: str) -> list[float] | str:
    """``values`` as the response carries them: the list, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
    return values


class OpenAIServingEmbedding(OpenAIServing):
    """Embeddings through the engine's pooling requests, batched with whatever else it runs."""

    async def create_embedding(self, request: EmbeddingRequest, raw_request: Request) -> Response:
        """Validate, queue one pooling request per input, and answer with every embedding in input order."""
        arrival = time.monotonic()
        model = self.models.check(request.model)
        self.warn_unknown_fields(request)
        if request.dimensions is not None and not 1 <= request.dimensions <= self.hidden_size:
            raise invalid_param(f"dimensions must be between 1 and the model's hidden size {self.hidden_size}, got "
                                f"{request.dimensions}", "dimensions")
        params = PoolingParams(dimensions=request.dimensions, normalize=request.normalize)

        def truncate(ids: list[int]) -> list[int]:  # the context but the one token the pooling step samples
            try:
                return truncated_prompt(ids, request.truncate_prompt_tokens, self.max_model_len - 1)
            except ValueError as exc:
                raise from_value_error(exc, {"truncate_prompt_tokens": "truncate_prompt_tokens"}) from exc

        inputs = await self.input_token_ids(request.input, request.add_special_tokens, "input", truncate)
        request_id = random_id("embd")
        stream = await self.add(request_id, inputs, [params] * len(inputs), arrival, {}, "input")
        outputs: list[EmbeddingRequestOutput] = await self.collect(stream, raw_request)  # type: ignore[assignment]
        data = [EmbeddingData(index=i, embedding=encode_embedding(o.outputs.embedding, request.encoding_format))
                for i, o in enumerate(outputs)]
        num_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return json_response(EmbeddingResponse(id=request_id, model=model, data=data,
                                               usage=UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens)))
