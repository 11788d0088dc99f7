"""``POST /v1/embeddings``: last-token embeddings of one input or a batch (``LLM.embed`` behind the server)."""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import Request
from starlette.responses import Response

from pagedllm.core.pooling import EmbeddingRequestOutput, PoolingParams
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
        # the engine checks dimensions and cuts the inputs (PoolingParams: a 400 naming the field)
        params = PoolingParams(dimensions=request.dimensions, normalize=request.normalize,
                               truncate_prompt_tokens=request.truncate_prompt_tokens)
        inputs = await self.input_token_ids(request.input, request.add_special_tokens, "input")
        request_id = random_id("embd")
        stream = await self.add(request_id, inputs, [params] * len(inputs), arrival, {}, "input", model=model)
        outputs: list[EmbeddingRequestOutput] = await self.collect(stream, raw_request)  # type: ignore[assignment]
        data = [EmbeddingData(index=i, embedding=encode_embedding(o.outputs.embedding, request.encoding_format))
                for i, o in enumerate(outputs)]
        num_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return json_response(EmbeddingResponse(id=request_id, model=model, data=data,
                                               usage=UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens)))
