"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``, shaped as vLLM's."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from pagedllm.core.config import EngineConfig
from pagedllm.core.engine import LLMEngine
from pagedllm.core.inputs import PromptType, is_single_prompt
from pagedllm.core.lora.request import LoRARequest
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.pooling import EmbeddingRequestOutput, PoolingParams
from pagedllm.core.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.entrypoints.beam_search import BeamSearchOutput, BeamSearchParams, beam_search


def per_prompt(params: object, cls: type, num_prompts: int, wrong_type: str) -> list:
    """One ``cls`` instance for every prompt: ``params`` itself repeated, or a sequence of one per prompt.
    Raises ValueError with ``wrong_type`` for anything but ``cls`` instances, or naming both counts."""
    if isinstance(params, cls):
        return [params] * num_prompts
    if not isinstance(params, Sequence) or isinstance(params, str) or not all(isinstance(p, cls) for p in params):
        raise ValueError(wrong_type)
    if len(params) != num_prompts:
        kind = "sampling" if cls is SamplingParams else "pooling"
        raise ValueError(f"got {len(params)} {kind} params for {num_prompts} prompts")
    return list(params)


class LLM:
    """Generate completions for a batch of prompts with continuous batching.

    Takes the :class:`EngineConfig` fields as keyword arguments (``model``, ``device``, ``dtype``,
    ``kv_cache_dtype``, ``quantization``, ``block_size``, ``max_model_len``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``kv_cache_memory_bytes``, ``seed``, ``load_format``, ``enable_prefix_caching``,
    ``tensor_parallel_size``, ...). ``model=None`` uses the built-in demo model.
    """

    def __init__(self, model: str | None = None, **kwargs: object) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))  # type: ignore[arg-type]
        self._counter = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """Build from a ready :class:`EngineConfig` (the CLI's path)."""
        llm = cls.__new__(cls)
        llm.llm_engine = LLMEngine(config)
        llm._counter = itertools.count()
        return llm

    def get_tokenizer(self) -> object:
        """The Hugging Face tokenizer of the model."""
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """Defaults from the model's generation config."""
        return self.llm_engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; returns one :class:`RequestOutput` per prompt, in order.

        ``prompts``: one prompt or a list of them, each text, token ids, ``{"prompt": text}`` or
        ``{"prompt_token_ids": ids}`` (vLLM's ``TextPrompt`` / ``TokensPrompt``). ``sampling_params``: one for all
        prompts or one per prompt (default: the model's generation config). ``lora_request``: a LoRA adapter for
        every prompt, or one (or None) per prompt (needs ``enable_lora``). ``priority``: one int per prompt, under
        ``scheduling_policy="priority"`` (lower runs first). Invalid parameters or malformed or impossible prompts
        raise ValueError before anything runs.
        """
        prompts = [prompts] if is_single_prompt(prompts) else list(prompts)  # type: ignore[arg-type,list-item]
        params_list = per_prompt(sampling_params or self.get_default_sampling_params(), SamplingParams, len(prompts),
                                 "LLM.generate takes SamplingParams (for embeddings with PoolingParams, use LLM.embed)")
        final_only = {id(p): dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list}
        params_list = [final_only[id(p)] for p in params_list]  # only finished outputs are kept: skip snapshots
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
        return self._add_and_run(prompts, params_list, use_tqdm, priority, loras)  # type: ignore[return-value]

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """The embedding of every prompt (vLLM's ``LLM.embed``): the final hidden state of its last token,
        L2-normalized by default (:class:`PoolingParams`); one :class:`EmbeddingRequestOutput` per prompt, in order,
        ``outputs.embedding`` a list of floats. Prompts as :meth:`generate` takes them; they share the batch with
        any generation in flight. Invalid parameters or prompts raise ValueError before anything runs."""
        prompts = [prompts] if is_single_prompt(prompts) else list(prompts)  # type: ignore[arg-type,list-item]
        params_list = per_prompt(pooling_params or PoolingParams(), PoolingParams, len(prompts),
                                 "LLM.embed takes PoolingParams (for completions, SamplingParams: use LLM.generate)")
        return self._add_and_run(prompts, params_list, use_tqdm)  # type: ignore[return-value]

    def _add_and_run(self, prompts: list[PromptType], params_list: list[SamplingParams] | list[PoolingParams],
                     use_tqdm: bool, priority: Sequence[int] | None = None,
                     loras: Sequence[LoRARequest | None] | None = None,
                     ) -> list[RequestOutput] | list[EmbeddingRequestOutput]:
        """Add every prompt with its params, priority and adapter (aborting those added if one is refused), then
        run them to the end."""
        engine = self.llm_engine
        ids = []
        priorities = priority if priority is not None else [0] * len(prompts)
        adapters = loras if loras is not None else [None] * len(prompts)
        try:
            for prompt, params, rank, lora in zip(prompts, params_list, priorities, adapters, strict=True):
                ids.append(engine.add_request(f"offline-{next(self._counter)}", prompt, params, priority=rank,
                                              lora_request=lora))
        except ValueError:
            engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.finished:
                            done[output.request_id] = output
                            bar.update(1)
        except BaseException:
            # an error in a step or Ctrl-C: abort this call's requests so their KV blocks are not stranded
            engine.abort_request(ids)
            raise
        return [done[i] for i in ids]

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams
                    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt (vLLM's ``LLM.beam_search``): ``params.beam_width`` beams of at most
        ``params.max_tokens`` new tokens; returns one :class:`BeamSearchOutput` per prompt, best beam first
        (:mod:`pagedllm.entrypoints.beam_search`). Each step is one engine call over every live beam, which
        shares its prompt's blocks through prefix caching when the engine has it on."""
        engine = self.llm_engine
        if 2 * params.beam_width > engine.config.max_logprobs:
            raise ValueError(f"BeamSearchParams.beam_width must be <= {engine.config.max_logprobs // 2} "
                             f"(half of max_logprobs), got {params.beam_width}")
        items = [prompts] if is_single_prompt(prompts) else list(prompts)  # type: ignore[arg-type,list-item]
        token_lists = [engine.prompt_token_ids(item)[1] for item in items]
        tokenizer = engine.tokenizer
        decode = None if tokenizer is None else lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        return beam_search(lambda batch, sp: self.generate(batch, sp, use_tqdm=False), token_lists, params,
                           engine.eos_token_ids, decode)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        prompts: list[PromptType] = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=True, return_dict=False,
            )
            prompts.append(list(ids))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
