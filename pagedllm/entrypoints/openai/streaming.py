"""Streaming: server-sent events, the new part of each cumulative output, and a response that always closes.

The engine's outputs are cumulative (the whole text so far); a stream sends only what is new. Text that a
stop string may still cut (its first ``len(stop) - 1`` characters can arrive a step before the rest) is
held back until the next step or the finish, so a streamed text always equals the non-streamed one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.core.outputs import CompletionOutput, SampleLogprobs

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    """One server-sent event carrying ``payload`` as JSON (an ``ErrorResponse`` mid-stream is an error event,
    which the OpenAI client raises as an APIError)."""
    return f"data: {payload.model_dump_json()}\n\n"


@dataclass(slots=True)
class CompletionDelta:
    """What one completion gained since the previous chunk."""

    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class DeltaTracker:
    """Follows one completion across cumulative outputs; :meth:`next` returns the new part.

    ``holdback_chars`` is the longest stop string's length minus one: that many trailing characters wait
    while the completion is unfinished, because the stop check may still remove them.
    """

    def __init__(self, holdback_chars: int = 0) -> None:
        self.holdback_chars = max(0, holdback_chars)
        self.num_chars = 0
        self.num_tokens = 0
        self.finished = False

    @classmethod
    def for_stops(cls, stop: list[str] | None) -> DeltaTracker:
        """A tracker holding back enough text for these stop strings."""
        return cls(max((len(s) for s in stop or []), default=1) - 1)

    def next(self, completion: CompletionOutput) -> CompletionDelta | None:
        """The part of ``completion`` not sent yet, or None when there is nothing new to send."""
        if self.finished:
            return None
        finished = completion.finish_reason is not None
        text_len = len(completion.text)
        end = text_len if finished else max(self.num_chars, text_len - self.holdback_chars)
        text = completion.text[self.num_chars : end]
        token_ids = completion.token_ids[self.num_tokens :]
        if not text and not token_ids and not finished:
            return None
        logprobs = None if completion.logprobs is None else completion.logprobs[self.num_tokens :]
        self.num_chars = max(self.num_chars, end)
        self.num_tokens = len(completion.token_ids)
        self.finished = finished
        return CompletionDelta(text, token_ids, logprobs, completion.finish_reason, completion.stop_reason)


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body generator however the response ends.

    When the client disconnects, Starlette cancels the sending task, which may leave the generator
    suspended; closing it here runs its ``finally`` (which aborts the generation) at once instead of
    whenever the generator is garbage-collected.
    """

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._generator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._generator, "aclose", None)
            if aclose is not None:
                await aclose()
