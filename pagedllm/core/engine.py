"""The engine: add requests, step (schedule -> run -> sample -> update), emit RequestOutputs; optionally
pipelined (asynchronous scheduling: step k+1 is launched before step k's tokens are read back)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pagedllm.backends.interface import Backend
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.config import (
    W4A16_NAMES,
    EngineConfig,
    ModelConfig,
    load_model_config,
    resolve_async_scheduling,
    resolve_kv_cache_dtype,
    resolve_scheduler_limits,
)
from pagedllm.core.executor import Executor, UniProcExecutor
from pagedllm.core.inputs import PromptType, parse_prompt
from pagedllm.core.lora.request import LoRARequest, check_adapter
from pagedllm.core.model_runner import ModelRunnerOutput
from pagedllm.core.output_processor import OutputProcessor, ParentRequest
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.pooling import PoolingParams, checkpoint_pooling
from pagedllm.core.reasoning import REASONING_TAGS, prompt_closes_thinking
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.sampler import Sampler, SamplerOutput
from pagedllm.core.sampling_params import (
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
    bad_words_token_ids,
    truncated_prompt,
)
from pagedllm.core.scheduler import Scheduler, SchedulerOutput
from pagedllm.core.spec_decode import (
    SpeculativeConfig,
    accepted_drafts,
    context_tokens,
    propose_ngram,
    takes_drafts,
)
from pagedllm.core.structured_output import GrammarMatcher, StructuredOutputs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine for metrics and logs."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_wasted_slots: int
    num_preemptions: int
    prefix_cache_queries_tokens: int
    prefix_cache_hit_tokens: int
    spec_decode_num_draft_tokens: int = 0  # speculative decoding: drafts run, and those accepted
    spec_decode_num_accepted_tokens: int = 0
    max_loras: int = 0  # LoRA: adapter slots (0: LoRA off), and the adapters of running and waiting requests
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: its forward's output, then its sampling (None until started, or when
    no row's request still runs), the request of each sampled row (``row_ids``; a request with drafts has one
    row per position) and the last row of each, and the draft tokens each request ran."""

    runner_output: ModelRunnerOutput
    sampled: SamplerOutput | None = None
    rows: dict[str, int] = field(default_factory=dict)
    row_ids: list[str] = field(default_factory=list)
    drafts: dict[str, list[int]] = field(default_factory=dict)


def pick_block_size(requested: int | None, supported: Sequence[int]) -> int:
    """The configured block size if the backend supports it, else its first (preferred) one.

    Raises ValueError when an explicit size is not supported.
    """
    if requested is None:
        return 16 if 16 in supported else supported[0]
    if requested not in supported:
        raise ValueError(f"block_size {requested} is not supported by this backend; supported: {list(supported)}")
    return requested


class LLMEngine:
    """Continuous-batching engine over one backend; the caller drives :meth:`step` (with
    ``async_scheduling`` each call also launches the next step before reading back the current one)."""

    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.backends.registry import get_registry

        self.backend_cls: type[Backend] = get_registry().resolve_backend(config.device)
        capabilities = self.backend_cls().capabilities()
        # the settings as run: scheduler limits and asynchronous scheduling resolved for this backend (workers
        # get this copy)
        max_num_seqs, max_num_batched_tokens = resolve_scheduler_limits(config, capabilities)
        config = replace(config, max_num_seqs=max_num_seqs,
                         async_scheduling=resolve_async_scheduling(config, capabilities.runs_asynchronously))
        self.config = config
        model_path = config.resolved_model()
        if config.model is None:
            logger.info("no model given: using the built-in demo model at %s", model_path)
        self.model_config: ModelConfig = load_model_config(model_path, config.dtype, config.max_model_len)
        mc = self.model_config
        if mc.dtype not in capabilities.dtypes:
            raise ValueError(f"backend {self.backend_cls.name!r} does not support dtype {mc.dtype}; "
                             f"supported: {[str(d) for d in capabilities.dtypes]}")
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, mc.dtype)
        if kv_dtype not in capabilities.kv_cache_dtypes:
            raise ValueError(f"backend {self.backend_cls.name!r} does not support kv_cache_dtype "
                             f"{config.kv_cache_dtype!r} ({kv_dtype}); supported: "
                             f"{[str(d) for d in capabilities.kv_cache_dtypes]}")
        if mc.quantization is not None:  # a quantized checkpoint runs in its scheme, asked for or not (as in vLLM)
            # vLLM's "fp8" names both fp8 schemes; "awq", "gptq", "compressed-tensors" the 4-bit checkpoints
            aliases = W4A16_NAMES if mc.quantization == "w4a16" else ("fp8",)
            if config.quantization not in (None, mc.quantization, *aliases):
                raise ValueError(f"quantization {config.quantization!r} was asked for, but the checkpoint's weights "
                                 f"are stored in {mc.quantization!r}")
            config = self.config = replace(config, quantization=mc.quantization)
        elif config.quantization in W4A16_NAMES:
            raise ValueError(f"quantization {config.quantization!r} loads a checkpoint stored in 4 bits, but "
                             f"{mc.path}'s weights are not quantized (quantization='w4a16' quantizes them when "
                             f"loaded)")
        if config.quantization is not None and config.quantization not in capabilities.quantizations:
            raise ValueError(f"backend {self.backend_cls.name!r} does not support quantization "
                             f"{config.quantization!r}; supported: {list(capabilities.quantizations) or 'none'}")
        if config.enable_lora and config.quantization is not None:
            raise ValueError(f"LoRA adapters run on unquantized projections: enable_lora cannot be combined with "
                             f"quantization {config.quantization!r}")
        if mc.head_dim not in capabilities.head_sizes:
            raise ValueError(f"backend {self.backend_cls.name!r} does not support head size {mc.head_dim}; "
                             f"supported: {list(capabilities.head_sizes)}")
        soft_cap = getattr(mc.hf_config, "attn_logit_softcapping", None)
        if soft_cap and not capabilities.supports_logits_soft_cap:
            raise ValueError(f"backend {self.backend_cls.name!r} does not support attention logit soft-capping, which "
                             f"{mc.architecture} needs (attn_logit_softcapping={soft_cap})")
        self.block_size = pick_block_size(config.block_size, capabilities.block_sizes)
        self.max_num_batched_tokens = max_num_batched_tokens
        if capabilities.needs_static_shapes and capabilities.token_buckets:
            self.max_num_batched_tokens = min(self.max_num_batched_tokens, max(capabilities.token_buckets))
        chunked = config.enable_chunked_prefill and capabilities.supports_chunked_prefill
        if not chunked:
            self.max_num_batched_tokens = max(self.max_num_batched_tokens, mc.max_model_len)
        self.tokenizer = load_tokenizer(config.tokenizer or model_path, required=config.load_format != "dummy")
        eos_ids = set(mc.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos_ids)  # generation_config's and the tokenizer's
        self._structured_outputs: StructuredOutputs | None = None
        self.speculative = (None if config.speculative_config is None
                            else SpeculativeConfig.from_dict(config.speculative_config))
        self.num_draft_tokens = self.num_accepted_tokens = 0
        self._lora_paths: dict[int, str] = {}  # adapter id -> its directory, as first given
        self.vocab_size = mc.vocab_size  # read once: a transformers 5 config attribute costs ~20 us per read
        self.executor = self._make_executor()

        bytes_per_block = self.executor.bytes_per_block()
        budget = config.kv_cache_memory_bytes
        if budget is None and config.num_kv_blocks is None:
            budget = self.executor.kv_cache_budget_bytes(self.max_num_batched_tokens)
        num_blocks = config.num_kv_blocks or (budget or 0) // bytes_per_block
        if num_blocks < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds {num_blocks} blocks of {bytes_per_block} "
                             f"bytes; at least 2 are needed: raise kv_cache_memory_bytes")
        self.executor.initialize_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   mc.max_model_len, chunked, config.scheduling_policy,
                                   config.max_loras if config.enable_lora else 0)
        self.sampler = Sampler(self.device, config.seed)
        self.output_processor = OutputProcessor(self.tokenizer, mc.max_model_len)
        pool_tokens = (num_blocks - 1) * self.block_size
        logger.info(
            "backend %s, model %s (%s, %s): KV pool (%s) %d blocks x %d tokens = %d tokens (%.1f MiB); max "
            "concurrency %.1fx at max_model_len %d",
            self.backend_cls.name, model_path, mc.architecture, mc.dtype, kv_dtype, num_blocks, self.block_size,
            pool_tokens, num_blocks * bytes_per_block / 2**20, pool_tokens / mc.max_model_len, mc.max_model_len,
        )
        self._request_counter = 0
        self._in_flight: LaunchedStep | None = None  # async scheduling: launched, not yet read back
        self._checkpoint_pooling: str | None = None  # a sentence-transformers checkpoint's pooling, once read

    def _make_executor(self) -> Executor:
        if self.config.tensor_parallel_size > 1:
            from pagedllm.core.distributed import make_distributed_executor

            return make_distributed_executor(self.config, self.model_config, self.backend_cls, self.block_size)
        return UniProcExecutor(self.config, self.model_config, self.backend_cls, self.block_size)

    @property
    def device(self) -> torch.device:
        """The device logits are sampled on (the driver's)."""
        return getattr(self.executor, "device", torch.device("cpu"))

    # ------------------------------------------------------------------ requests
    def default_sampling_params(self) -> SamplingParams:
        """Sampling defaults from the model's ``generation_config.json`` (greedy if it says no sampling)."""
        return SamplingParams(**self.model_config.generation_defaults)  # type: ignore[arg-type]

    def structured_outputs(self) -> StructuredOutputs:
        """The grammar compiler of ``SamplingParams.structured_outputs``, built on first use (raises ValueError
        without a tokenizer or without xgrammar)."""
        if self._structured_outputs is None:
            tokenizer = self._tokenizer_for("SamplingParams.structured_outputs")
            self._structured_outputs = StructuredOutputs(tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        return self._structured_outputs

    def _matcher_factory(self, structured: StructuredOutputsParams, prompt_text: str | None,
                         token_ids: list[int]) -> Callable[[], GrammarMatcher]:
        """A factory of grammar matchers for a request's completions; under ``reasoning_parser`` each waits for
        the end of the thinking unless the prompt already closed it (:func:`prompt_closes_thinking`)."""
        compiled = self.structured_outputs().compile(structured)
        parser = self.config.reasoning_parser
        if parser is None:
            return compiled
        text = prompt_text if prompt_text is not None else self._tokenizer_for("reasoning_parser").decode(token_ids)
        if prompt_closes_thinking(text, parser):
            return compiled
        end = REASONING_TAGS[parser][1]

        def waiting() -> GrammarMatcher:
            matcher = compiled()
            matcher.waits_for = end
            return matcher

        return waiting

    def _check_checkpoint_pooling(self) -> None:
        """Refuse embeddings from a sentence-transformers checkpoint that pools otherwise than by its last token
        (ValueError naming the mode); read once."""
        if self._checkpoint_pooling is None:
            self._checkpoint_pooling = checkpoint_pooling(self.model_config.path) or "last"
        if self._checkpoint_pooling != "last":
            raise ValueError(f"this checkpoint's sentence-transformers configuration pools by "
                             f"{self._checkpoint_pooling!r}; pagedllm computes last-token embeddings only")

    def _tokenizer_for(self, what: str) -> Any:
        """The tokenizer, which ``what`` needs; ValueError naming ``what`` when the model has none."""
        if self.tokenizer is None:
            raise ValueError(f"{what} needs the model's tokenizer, and this model has none")
        return self.tokenizer

    def prompt_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """``(text or None, token ids)`` of one prompt in any form ``add_request`` takes, text tokenized
        (:func:`~pagedllm.core.inputs.parse_prompt`); ValueError for a malformed one."""
        prompt_text, token_ids = parse_prompt(prompt)
        return prompt_text, token_ids if token_ids is not None else self.tokenize(prompt_text)  # type: ignore[arg-type]

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` with the tokenizer's special tokens (e.g. BOS)."""
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer: pass prompts as token ids")
        return list(self.tokenizer(prompt).input_ids)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Queue a prompt for ``params.n`` completions, or for its embedding with :class:`PoolingParams` (the
        request's output is then an :class:`~pagedllm.core.pooling.EmbeddingRequestOutput`); returns the request id.

        ``prompt``: text, token ids, or a :class:`~pagedllm.core.inputs.TextPrompt` /
        :class:`~pagedllm.core.inputs.TokensPrompt` dictionary (:func:`~pagedllm.core.inputs.parse_prompt`).
        ``priority``: under ``scheduling_policy="priority"``, lower runs first (vLLM's rule); any other value
        than 0 under ``"fcfs"`` is refused. ``lora_request``: the PEFT adapter the request's tokens run through
        (needs ``enable_lora``; its config is checked here). Raises ValueError (naming the problem) for a prompt
        that can never run: malformed, empty, out-of-vocabulary ids, or prompt + max_tokens beyond
        ``max_model_len`` or the whole KV pool.
        """
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} was given, but priority scheduling is off: start the engine with "
                             f"scheduling_policy='priority' (--scheduling-policy priority)")
        if lora_request is not None:
            self._check_lora(lora_request)
        prompt_text, token_ids = self.prompt_token_ids(prompt)
        pooling = None
        if isinstance(params, PoolingParams):  # an embedding: a one-token generation whose token is discarded
            pooling = params
            pooling.verify(self.model_config.hidden_size)
            self._check_checkpoint_pooling()
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False,
                                    truncate_prompt_tokens=pooling.truncate_prompt_tokens,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
        params = (params or self.default_sampling_params()).clone()
        # an embedding's prompt may take the whole context but the one token its step samples
        room = self.model_config.max_model_len - (pooling is not None)
        token_ids = truncated_prompt(token_ids, params.truncate_prompt_tokens, room)
        if pooling is not None and len(token_ids) > room:
            raise ValueError(f"the prompt ({len(token_ids)} tokens) is longer than an embedding takes: at most {room} "
                             f"tokens (max_model_len - 1); shorten it or set truncate_prompt_tokens")
        if request_id is None:
            request_id = str(self._request_counter)
            self._request_counter += 1
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab = self.vocab_size
        if token_ids and not (min(token_ids) >= 0 and max(token_ids) < vocab):  # min/max: C loops, not Python's
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(token_ids)}..{max(token_ids)}")
        for name, named in params.named_token_ids():
            if named and not (min(named) >= 0 and max(named) < vocab):
                raise ValueError(f"SamplingParams.{name} must name token ids in [0, {vocab}); got {sorted(named)}")
        if params.bad_words:
            tokenizer = self._tokenizer_for("SamplingParams.bad_words")
            params.bad_words_token_ids = bad_words_token_ids(
                params.bad_words, lambda text: list(tokenizer(text, add_special_tokens=False).input_ids))
        make_matcher = None
        if params.structured_outputs is not None:
            make_matcher = self._matcher_factory(params.structured_outputs, prompt_text, token_ids)
        for name, asked in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if asked is not None and asked > self.config.max_logprobs:
                raise ValueError(f"SamplingParams.{name} must be <= {self.config.max_logprobs} (max_logprobs), "
                                 f"got {asked}")
        if params.max_tokens is None:
            # the rest of the context, but never more than the whole KV pool can hold
            room = min(self.model_config.max_model_len, self.block_manager.pool.num_usable_blocks * self.block_size)
            params.max_tokens = max(1, room - len(token_ids))
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                if params.seed is not None:
                    child_params.seed = params.seed + index
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            children.append(Request(child_id, token_ids, child_params, arrival,
                                    eos_token_ids=self.eos_token_ids, priority=priority, parent_id=request_id,
                                    index=index, lora_request=lora_request,
                                    cache_salt=None if lora_request is None else f"lora-{lora_request.lora_int_id}",
                                    structured=make_matcher() if make_matcher is not None else None,
                                    pooling=pooling))
        for child in children:
            self.scheduler.check_request(child)
        for child in children:
            self.scheduler.add_request(child)
        self.output_processor.add(ParentRequest(request_id, prompt_text, token_ids, children))
        return request_id

    def _check_lora(self, lora_request: LoRARequest) -> None:
        """Refuse an adapter the engine cannot run: LoRA not enabled, a bad adapter directory (see
        :func:`~pagedllm.core.lora.request.check_adapter`), a rank above ``max_lora_rank``, or an id
        already given to another adapter."""
        if not self.config.enable_lora:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} was asked for, but LoRA is off: start the "
                             f"engine with enable_lora=True (--enable-lora)")
        check_adapter(lora_request, self.config.max_lora_rank)
        known = self._lora_paths.setdefault(lora_request.lora_int_id, lora_request.lora_path)
        if known != lora_request.lora_path:
            raise ValueError(f"lora_int_id {lora_request.lora_int_id} names adapter {known!r} already; give "
                             f"{lora_request.lora_path!r} another id")

    def abort_request(self, request_ids: str | Sequence[str]) -> list[str]:
        """Abort user requests (all their children); their KV blocks are freed at once.

        Returns the ids that were still unfinished and are now aborted (unknown or finished ids are skipped).
        """
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        aborted = []
        for request_id in request_ids:
            parent = self.output_processor.parents.get(request_id)
            if parent is None:
                continue
            aborted.append(request_id)
            for child in parent.children:
                if not child.is_finished:
                    self.scheduler.finish_requests([child.request_id], RequestStatus.FINISHED_ABORTED)
                    self.output_processor.mark_finished(child, RequestStatus.FINISHED_ABORTED)
                    self.sampler.forget(child.request_id)
            self.output_processor.make_output(parent)
        return aborted

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs, or a launched step is still to be read back."""
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the current output of every user request that got a token (``CUMULATIVE``
        requests) or finished (all requests).

        With ``async_scheduling`` the step that is read back is the one launched by the previous call
        (or by this one, at the start): the next step is scheduled and launched first, with the pending
        tokens of the running requests taken on the device, so the device is not left waiting for the
        host between steps.
        """
        if not self.config.async_scheduling:
            step = self._launch(self.scheduler.schedule(), None)
            if step is None:
                return []
            self._start_sampling(step, sync=True)
            outputs = self._read_back(step)
            if self.speculative is not None:
                self._propose_drafts(self.speculative)
            return outputs
        try:
            current, self._in_flight = self._in_flight, None
            if current is None:
                current = self._launch(self.scheduler.schedule(), None)
                if current is None:
                    return []
                self._start_sampling(current, sync=False)
            self._add_pending_tokens(current)
            following = self._launch(self.scheduler.schedule(), current)
            outputs = self._read_back(current)
            if following is not None:
                self._start_sampling(following, sync=False)
                self._in_flight = following
            return outputs
        except BaseException:
            self._in_flight = None  # its requests are aborted by the caller or left as they are
            raise

    def _launch(self, scheduler_output: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep | None:
        """Queue the forward of ``scheduler_output`` (None when it is empty). Requests whose last token is
        still pending read it from ``previous``'s sampled tokens on the device."""
        if scheduler_output.is_empty:
            return None
        now = time.monotonic()
        sampled_token_ids = None
        for scheduled in scheduler_output.scheduled:
            request = self.scheduler.requests[scheduled.request_id]
            metrics = request.metrics
            if metrics is not None and metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
            if request.has_pending_token:
                assert previous is not None and previous.sampled is not None
                scheduled.token_from_row = previous.rows[scheduled.request_id]
                sampled_token_ids = previous.sampled.device_token_ids
        drafts = {s.request_id: s.draft_token_ids for s in scheduler_output.scheduled if s.draft_token_ids}
        return LaunchedStep(self.executor.execute(scheduler_output, sampled_token_ids), drafts=drafts)

    def _start_sampling(self, step: LaunchedStep, sync: bool) -> None:
        """Queue the sampling of ``step``'s rows whose requests still run (after the previous step was read
        back, so penalties and stops see every token before it)."""
        output = step.runner_output
        requests = self.scheduler.requests
        rows = [i for i, rid in enumerate(output.request_ids) if rid in requests]
        if not rows:
            return
        logits = output.logits
        if len(rows) != len(output.request_ids):  # some finished in the previous step: skip their rows
            logits = logits[torch.tensor(rows).to(logits.device, non_blocking=True)]
        ids = [output.request_ids[i] for i in rows]
        batch = self.sampler.make_batch([requests[rid] for rid in ids], logits.shape[-1],
                                        self._drafts_before(ids, step.drafts) if step.drafts else None)
        step.sampled = self.sampler(logits, batch, sync=sync)
        step.rows = {rid: row for row, rid in enumerate(ids)}
        step.row_ids = ids

    def _add_pending_tokens(self, step: LaunchedStep) -> None:
        """Give each running request ``step`` samples for a pending token, so the next step can run it.
        A request this token ends (length, EOS, stop) runs one token more, whose row is never sampled;
        the pending token fits its context and KV reservation (it is the token being sampled)."""
        if step.sampled is None:
            return
        for request_id in step.rows:
            request = self.scheduler.requests.get(request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                request.append_pending_token()

    def _read_back(self, step: LaunchedStep) -> list[RequestOutput]:
        """Read ``step``'s sampled tokens (the host's one wait), record them, finish what stops; file the prompt
        logprobs it computed first (a prompt chunk that samples nothing has them too)."""
        prompt = step.runner_output.prompt_logprobs
        if prompt is not None:
            self.output_processor.add_prompt_logprobs(prompt.wait(), self.scheduler.requests)
        pooled = step.runner_output.pooled
        if pooled is not None:
            self.output_processor.add_embeddings(pooled.wait(), self.scheduler.requests)
        sampled = step.sampled
        if sampled is None:
            return []
        sampled.resolve()
        request_ids, rows = step.row_ids, None
        if step.drafts:
            request_ids, rows = self._verify_drafts(step, sampled.token_ids)
        requests = [r for rid in step.rows if (r := self.scheduler.requests.get(rid)) is not None]
        finished = self.output_processor.process(request_ids, sampled, self.scheduler.requests, rows)
        for request, status in finished:
            self.scheduler.finish_requests([request.request_id], status)
            self.sampler.forget(request.request_id)
            if request.metrics is not None:
                request.metrics.finished_time = time.monotonic()
        touched: dict[str, ParentRequest] = {}
        for request in requests:
            parent = self.output_processor.parent_of.get(request.request_id)
            if parent is not None and (request.sampling_params.output_kind is RequestOutputKind.CUMULATIVE
                                       or parent.finished):
                touched[parent.request_id] = parent
        return [self.output_processor.make_output(parent) for parent in touched.values()]

    @staticmethod
    def _drafts_before(row_ids: list[str], drafts: dict[str, list[int]]) -> list[list[int]]:
        """Per sampled row, the drafts its position follows: ``[]``, ``d[:1]``, ``d[:2]``, ... along the rows of a
        request that ran drafts ``d`` (its rows are consecutive), ``[]`` for the others."""
        before, previous, count = [], None, 0
        for request_id in row_ids:
            count = count + 1 if request_id == previous else 0
            previous = request_id
            before.append(drafts.get(request_id, [])[:count])
        return before

    def _verify_drafts(self, step: LaunchedStep, tokens: list[int]) -> tuple[list[str], list[int]]:
        """Check the drafts ``step`` ran against the tokens it sampled (``tokens``, one per row): each request
        keeps the rows up to its first token that differs from its draft (``accepted_drafts``), and gives back
        the computed slots of the drafts it rejects. Returns the request id and row of each token kept."""
        ids, rows = [], []
        row = 0
        while row < len(step.row_ids):
            request_id = step.row_ids[row]
            drafts = step.drafts.get(request_id, [])
            accepted = accepted_drafts(drafts, tokens[row : row + len(drafts) + 1])
            ids += [request_id] * (accepted + 1)
            rows += range(row, row + accepted + 1)
            if drafts:
                self.num_draft_tokens += len(drafts)
                self.num_accepted_tokens += accepted
                self.sampler.keep_draws(request_id, row + accepted)  # a seeded request draws as without drafts
                request = self.scheduler.requests.get(request_id)
                if request is not None:
                    request.num_computed_tokens -= len(drafts) - accepted
            row += len(drafts) + 1
        return ids, rows

    def _propose_drafts(self, config: SpeculativeConfig) -> None:
        """Give each decoding request that can take them (``takes_drafts``) the drafts its context proposes,
        no more than its ``max_tokens`` and the model's length leave room for."""
        max_model_len = self.model_config.max_model_len
        for request in self.scheduler.running:
            if (request.num_computed_tokens != request.num_tokens - 1 or not request.output_token_ids
                    or not takes_drafts(request)):  # decoding only (not a prompt's last chunk)
                continue
            room = min(config.num_speculative_tokens, request.max_tokens - request.num_output_tokens - 1,
                       max_model_len - request.num_tokens)
            drafts = propose_ngram(context_tokens(request), room, config.prompt_lookup_min, config.prompt_lookup_max)
            if drafts and request.structured is not None:
                drafts = request.structured.valid_drafts(drafts)
            request.spec_token_ids = drafts

    # ------------------------------------------------------------------ accounting
    def kv_cache_usage(self) -> float:
        """Fraction of the KV pool held by requests."""
        return self.block_manager.usage()

    def stats(self) -> EngineStats:
        """Running/waiting counts, KV usage and waste, preemptions, prefix-cache and speculative-decoding
        counters, and the LoRA adapters of running and waiting requests (by name, sorted)."""
        bm = self.block_manager
        in_cache = {r.request_id: r.num_computed_tokens for r in self.scheduler.running}

        def adapters(requests: Iterable[Request]) -> tuple[str, ...]:
            return tuple(sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None}))

        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.pool.num_usable_blocks,
            num_wasted_slots=bm.num_wasted_slots(in_cache),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries_tokens=bm.num_prefix_queries_tokens,
            prefix_cache_hit_tokens=bm.num_prefix_hit_tokens,
            spec_decode_num_draft_tokens=self.num_draft_tokens,
            spec_decode_num_accepted_tokens=self.num_accepted_tokens,
            max_loras=self.scheduler.max_loras,
            running_lora_adapters=adapters(self.scheduler.running),
            waiting_lora_adapters=adapters(self.scheduler.waiting),
        )

    def shutdown(self) -> None:
        """Stop the executor's workers."""
        self.executor.shutdown()


def load_tokenizer(path: str, required: bool = True) -> object | None:
    """Load a Hugging Face tokenizer from a local directory.

    Raises FileNotFoundError if there is none and ``required``; else returns None (token-id prompts only,
    as for a config-only directory with dummy weights).
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        if not required:
            logger.info("no tokenizer in %s: prompts must be token ids, outputs are not detokenized", path)
            return None
        raise FileNotFoundError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
