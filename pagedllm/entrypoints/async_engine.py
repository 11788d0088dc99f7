"""An asyncio front for the synchronous :class:`LLMEngine`: the engine runs in its own thread.

The engine is not thread-safe, so exactly one thread, the engine thread, ever touches it. asyncio callers
send it commands (add, abort) through a locked queue and get results back through
``loop.call_soon_threadsafe``; the event loop never waits for a model step. The engine thread loops:
run the pending commands, run one step if anything is unfinished, hand the outputs to the per-request
:class:`OutputStream` s on the loop, publish an :class:`EngineStats` snapshot and tell the observers
(metrics); it sleeps while there is nothing to do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pagedllm.core.engine import EngineStats, LLMEngine
from pagedllm.core.lora.request import LoRARequest
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.pooling import PoolingParams
from pagedllm.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# While requests wait but none can run, the thread re-checks this often instead of spinning.
_IDLE_POLL_S = 0.01


class EngineDeadError(RuntimeError):
    """The engine thread stopped: an internal error, or the server is shutting down."""


@dataclass(slots=True)
class GenerationRequest:
    """One engine request: an id unique among unfinished requests, a prompt (text or ids), its parameters."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams | PoolingParams  # PoolingParams: an embedding (EmbeddingRequestOutput)
    priority: int = 0  # under scheduling_policy "priority": lower runs first
    lora: LoRARequest | None = None  # the adapter it runs through


class StepObserver(Protocol):
    """Something told about every engine step, on the engine thread (e.g. the Prometheus metrics)."""

    def observe(self, outputs: Sequence[RequestOutput], aborted_ids: Sequence[str], stats: EngineStats) -> None:
        """Called after each engine-thread iteration with the step's outputs (possibly none), the ids
        aborted just before it, and the engine's stats after it. Must be quick and must not raise."""


class OutputStream:
    """The outputs of the engine requests of one caller, in the order the engine produced them.

    ``async for outputs in stream`` yields lists of :class:`RequestOutput`, the latest one of each request
    that changed since the last iteration (outputs are cumulative, so a slow reader skips nothing but
    intermediate snapshots). It ends once every request finished, and raises :class:`EngineDeadError`
    when the engine stops first.
    """

    def __init__(self, request_ids: Sequence[str]) -> None:
        self.request_ids = list(request_ids)
        self.unfinished_ids: set[str] = set(request_ids)
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    @property
    def finished(self) -> bool:
        """True once every request finished (or the stream failed)."""
        return not self.unfinished_ids

    def put(self, item: RequestOutput | BaseException) -> None:
        """Queue an output or an error; called on the event loop only."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> list[RequestOutput]:
        if self.finished:
            raise StopAsyncIteration
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[str, RequestOutput] = {}
        for item in items:
            if isinstance(item, BaseException):
                self.unfinished_ids.clear()
                raise item
            latest[item.request_id] = item
            if item.finished:
                self.unfinished_ids.discard(item.request_id)
        return list(latest.values())


class AsyncLLMEngine:
    """Runs an :class:`LLMEngine` in a background thread and serves asyncio callers.

    Call :meth:`start` on the event loop before use and :meth:`shutdown` at the end. The ``engine``
    attribute is for reading configuration (``model_config``, ``block_size``); only the engine thread
    calls its methods.
    """

    def __init__(self, engine: LLMEngine, observers: Sequence[StepObserver] = ()) -> None:
        self.engine = engine
        self.observers = list(observers)
        self.latest_stats: EngineStats = engine.stats()
        self.dead_reason: str | None = None
        # (command, the future its caller awaits or None): run in order by the engine thread
        self._commands: deque[tuple[Callable[[], None], concurrent.futures.Future[None] | None]] = deque()
        self._aborted_ids: list[str] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._streams: dict[str, OutputStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will await the outputs."""
        if self._thread is not None:
            raise RuntimeError("the async engine is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread (after its current step), end open streams with :class:`EngineDeadError`
        and shut the engine down."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
        if self.dead_reason is None:
            self.dead_reason = "the server is shutting down"
        error = EngineDeadError(self.dead_reason)
        self._fail_pending(error)
        self._fail_streams(error)
        self.engine.shutdown()

    @property
    def is_alive(self) -> bool:
        """True while the engine thread serves requests."""
        return self.dead_reason is None and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ requests (event loop side)
    async def add_requests(self, requests: Sequence[GenerationRequest], arrival_time: float | None = None
                           ) -> OutputStream:
        """Queue engine requests, all or none; returns the stream of their outputs.

        Raises ValueError (the engine's message) when any request is rejected, in which case none runs;
        :class:`EngineDeadError` when the engine has stopped. ``arrival_time`` (``time.monotonic``) is when
        the caller received the work, for time-to-first-token.
        """
        self._check_alive()
        stream = OutputStream([r.request_id for r in requests])
        for request in requests:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
        for request in requests:
            self._streams[request.request_id] = stream
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        engine = self.engine

        def add() -> None:
            added: list[str] = []
            try:
                for request in requests:
                    engine.add_request(request.request_id, request.prompt, request.params, arrival,
                                       priority=request.priority, lora_request=request.lora)
                    added.append(request.request_id)
            except Exception as exc:
                engine.abort_request(added)
                future.set_exception(exc)
            else:
                future.set_result(None)

        self._submit(add, future)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(stream.request_ids)  # queued after the add: the engine drops them if they were added
            raise
        except BaseException:
            for request in requests:
                self._streams.pop(request.request_id, None)
            raise
        return stream

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort engine requests; their KV blocks are freed before the engine's next step. Never blocks."""
        ids = [i for i in request_ids if self._streams.pop(i, None) is not None]
        if not ids:
            return

        def abort() -> None:
            self.engine.abort_request(ids)
            self._aborted_ids.extend(ids)

        self._submit(abort)

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason}")
        if self._thread is None:
            raise EngineDeadError("the engine is not started")

    def _submit(self, command: Callable[[], None], future: concurrent.futures.Future[None] | None = None) -> None:
        with self._wakeup:
            if self.dead_reason is not None and future is not None:
                future.set_exception(EngineDeadError(f"the engine is not running: {self.dead_reason}"))
                return
            self._commands.append((command, future))
            self._wakeup.notify()

    def _fail_pending(self, error: BaseException) -> None:
        """Fail the futures of commands the engine thread will never run."""
        with self._wakeup:
            pending, self._commands = list(self._commands), deque()
        for _, future in pending:
            if future is not None and not future.done():
                future.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its caller
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_streams(self, error: BaseException) -> None:
        for stream in {id(s): s for s in self._streams.values()}.values():
            stream.put(error)
        self._streams.clear()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        assert self._loop is not None
        loop, engine = self._loop, self.engine
        commands: list[tuple[Callable[[], None], concurrent.futures.Future[None] | None]] = []
        try:
            while True:
                with self._wakeup:
                    while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                        self._wakeup.wait()
                    if self._stopping:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                for command, _ in commands:
                    command()
                outputs = engine.step() if engine.has_unfinished_requests() else []
                if outputs:
                    loop.call_soon_threadsafe(self._deliver, outputs)
                stats = engine.stats()
                self.latest_stats = stats
                aborted, self._aborted_ids = self._aborted_ids, []
                self._notify_observers(outputs, aborted, stats)
                if not outputs and stats.num_running == 0 and stats.num_waiting > 0:
                    with self._wakeup:  # nothing can run now: wait for a command rather than spin
                        if not self._commands and not self._stopping:
                            self._wakeup.wait(_IDLE_POLL_S)
        except Exception as exc:
            logger.exception("the engine thread stopped after an internal error")
            with self._wakeup:
                self.dead_reason = f"internal engine error: {type(exc).__name__}: {exc}"
            error = EngineDeadError(self.dead_reason)
            for _, future in commands:  # the batch that was running when it failed
                if future is not None and not future.done():
                    future.set_exception(error)
            self._fail_pending(error)
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_streams, error)

    def _notify_observers(self, outputs: list[RequestOutput], aborted: list[str], stats: EngineStats) -> None:
        for observer in self.observers:
            try:
                observer.observe(outputs, aborted, stats)
            except Exception:
                logger.exception("step observer %r failed", observer)
