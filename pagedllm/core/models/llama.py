"""Llama-family decoders (Llama 2/3, Mistral, Qwen2, Qwen3) with Hugging Face class and parameter names.

Differences between the family members are mostly configuration: Qwen2 has biases on q/k/v and often ties
its embeddings; Mistral has a sliding window; Qwen3 normalizes each head of q and k (RMSNorm over the head,
before the rotary embedding) and sets its head size apart from the hidden size. q/k/v and gate/up are stored
fused (``qkv_proj``, ``gate_up_proj``); ``load_weights`` maps the Hugging Face names onto them, so
``forward`` never sees the checkpoint layout. With tensor parallelism the attention and MLP blocks return
this rank's partial sum (row-parallel layers built with ``reduce_results=False``); the next RMSNorm sums it
over the ranks together with its residual add, in one kernel where the backend offers it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.backends.interface import AttentionMetadata, AttentionSpec, Backend
from pagedllm.core.checkpoint_quantization import KV_SCALE_TENSOR
from pagedllm.core.distributed.parallel_layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedllm.core.models.layers import (
    Fp8Activation,
    PagedAttention,
    RMSNorm,
    copy_checked,
    fp8_input_of,
    shared_rotary_embedding,
)
from pagedllm.core.sampled_rows import SampledRows

# checkpoint name fragment -> (our fused parameter fragment, part index)
STACKED_PARAMS: dict[str, tuple[str, int]] = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def head_dim_of(hf_config: object) -> int:
    """The attention head size: ``head_dim`` if the config sets it, else hidden / heads."""
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim or hf_config.hidden_size // hf_config.num_attention_heads)


class LlamaAttention(nn.Module):
    """Self-attention: fused q|k|v projection, rotary embedding, paged attention, output projection."""

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__()
        total_num_heads = hf_config.num_attention_heads
        total_num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or total_num_heads
        self.head_dim = head_dim_of(hf_config)
        bias = self.has_qkv_bias(hf_config)
        # Heads are split across tensor-parallel ranks: num_heads / num_kv_heads are this rank's.
        self.qkv_proj = QKVParallelLinear(hf_config.hidden_size, self.head_dim, total_num_heads, total_num_kv_heads,
                                          bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        o_bias = bool(getattr(hf_config, "attention_bias", False))
        self.o_proj = RowParallelLinear(total_num_heads * self.head_dim, hf_config.hidden_size, o_bias,
                                        reduce_results=False)  # summed by the next norm
        self.rotary_emb = shared_rotary_embedding(hf_config, self.head_dim, hf_config.max_position_embeddings,
                                                  backend, layer_type_of(hf_config, layer_idx))
        soft_cap = getattr(hf_config, "attn_logit_softcapping", None)  # Gemma 2
        spec = AttentionSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.attention_scale(hf_config),
                             sliding_window, float(soft_cap) if soft_cap else None)
        self.attn = PagedAttention(spec, backend)

    qkv_bias_default = False

    def attention_scale(self, hf_config: object) -> float:
        """The factor of q.k in the softmax: ``head_dim ** -0.5`` (Granite sets its own)."""
        return self.head_dim**-0.5

    def has_qkv_bias(self, hf_config: object) -> bool:
        """Whether q, k and v have biases: ``attention_bias``, or the family's default (Qwen2: always)."""
        return bool(getattr(hf_config, "attention_bias", False) or self.qkv_bias_default)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Activation,
                metadata: AttentionMetadata, sampled: SampledRows | None = None) -> torch.Tensor:
        """``hidden: [num_tokens, hidden_size]`` -> ``[num_tokens, hidden_size]`` (this rank's partial sum), or
        ``[num_sampled, hidden_size]`` for the ``sampled`` rows only (every token's keys and values stored)."""
        return self.o_proj(self.attn(*self.project_qkv(positions, hidden), metadata, sampled))

    def store_kv(self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Activation,
                 metadata: AttentionMetadata) -> None:
        """Only store the keys and values of ``hidden: [num_tokens, hidden_size]`` (a last layer none of whose
        rows is sampled this step)."""
        _, key, value = self.project_qkv(positions, hidden)
        self.attn.store(key, value, metadata)

    def project_qkv(
        self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Activation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's inputs: ``(q [num_tokens, num_heads, head_dim], k, v [num_tokens, num_kv_heads,
        head_dim])``, q and k rotated, from ``hidden: [num_tokens, hidden_size]`` (quantized for an fp8
        q|k|v projection)."""
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = q.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotate(positions, q, k)
        return q, k, v

    def rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q: [num_tokens, num_heads, head_dim]`` and ``k: [num_tokens, num_kv_heads, head_dim]`` (views of the
        q|k|v output) as the attention reads them: rotated, in Llama; a family member may do more first."""
        return self.rotary_emb(positions, q, k)


class LlamaMLP(nn.Module):
    """SwiGLU MLP with fused gate|up projection, of ``intermediate_size`` features (default: the config's)."""

    def __init__(self, hf_config: object, backend: Backend, intermediate_size: int | None = None) -> None:
        super().__init__()
        bias = bool(getattr(hf_config, "mlp_bias", False))
        inter = intermediate_size or hf_config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hf_config.hidden_size, [inter, inter], bias)
        self.down_proj = RowParallelLinear(inter, hf_config.hidden_size, bias=bias, reduce_results=False)
        self.backend = backend
        self.fp8_activation: str | None = None  # down_proj's fp8 scheme: the activation quantizes its output

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """``x: [num_tokens, hidden_size]`` (quantized for an fp8 gate|up) -> same shape (this rank's partial
        sum)."""
        gate_up = self.gate_up_proj(x)
        if self.fp8_activation is not None:
            act = (self.backend.silu_and_mul_fp8_groups if self.fp8_activation == "fp8_block"
                   else self.backend.silu_and_mul_fp8)
            return self.down_proj(Fp8Activation(*act(gate_up), gate_up.dtype))
        return self.down_proj(self.backend.silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual stream is carried separately so norms can fuse the add."""

    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(hf_config, layer_idx, sliding_window, backend)
        self.mlp = self.make_mlp(hf_config, layer_idx, backend)
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps, backend, reduce_partial_input=True)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps, backend, reduce_partial_input=True)

    def make_mlp(self, hf_config: object, layer_idx: int, backend: Backend) -> nn.Module:
        """The layer's feed-forward block, ``[num_tokens, hidden_size]`` -> the same (this rank's partial sum):
        a :class:`LlamaMLP`; a mixture-of-experts family returns its sparse block where the config has one."""
        return LlamaMLP(hf_config, backend)

    def use_fp8_inputs(self) -> None:
        """Have the norms and the MLP activation quantize their outputs for the fp8 projections after them
        (called by the loader, see ``pagedllm.core.models.layers.use_fp8_inputs``). A sparse MoE block takes
        its input in the model dtype (its router and experts are not fp8)."""
        self.input_layernorm.fp8_output = fp8_input_of(self.self_attn.qkv_proj)
        if isinstance(self.mlp, LlamaMLP):
            self.post_attention_layernorm.fp8_output = fp8_input_of(self.mlp.gate_up_proj)
            self.mlp.fp8_activation = fp8_input_of(self.mlp.down_proj)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        metadata: AttentionMetadata,
        sampled: SampledRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(hidden, residual)``, each ``[num_tokens, hidden_size]`` (``[num_sampled, hidden_size]``
        with ``sampled``: the last layer); the layer output is ``hidden`` summed over the tensor-parallel ranks
        plus ``residual`` (the next norm computes it)."""
        hidden, residual = self.normed_input(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata, sampled)
        if sampled is not None:
            residual = residual[sampled.indices]
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def store_kv(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                 metadata: AttentionMetadata) -> None:
        """Only store the layer's keys and values for the step (the last layer, when no row samples)."""
        self.self_attn.store_kv(positions, self.normed_input(hidden, residual)[0], metadata)

    def normed_input(self, hidden: torch.Tensor, residual: torch.Tensor | None
                     ) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        """``(input_layernorm(hidden + residual), hidden + residual)``; the first layer has no residual yet."""
        if residual is None:
            return self.input_layernorm(hidden), hidden
        return self.input_layernorm(hidden, residual)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, hf_config: object, backend: Backend, layer_cls: type[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            layer_cls(hf_config, i, sliding_window_of(hf_config, i), backend)
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, backend, reduce_partial_input=True)
        self.embedding_multiplier = float(getattr(hf_config, "embedding_multiplier", None) or 1.0)  # Granite

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                sampled: SampledRows | None = None) -> torch.Tensor:
        """``input_ids``, ``positions``: ``[num_tokens]`` -> hidden states ``[num_tokens, hidden_size]``, or
        ``[num_sampled, hidden_size]`` of the ``sampled`` rows: the last layer computes only those."""
        hidden = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        residual = None
        *body, last = self.layers
        for layer in body:
            hidden, residual = layer(positions, hidden, residual, metadata)
        if sampled is not None and not len(sampled):
            last.store_kv(positions, hidden, residual, metadata)
            return hidden.new_empty((0, hidden.shape[-1]))
        hidden, residual = last(positions, hidden, residual, metadata, sampled)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def layer_type_of(hf_config: object, layer_idx: int) -> str | None:
    """Layer ``layer_idx``'s entry of the config's ``layer_types`` (transformers 5), or None."""
    layer_types = getattr(hf_config, "layer_types", None)
    return layer_types[layer_idx] if layer_types else None


def sliding_window_of(hf_config: object, layer_idx: int) -> int | None:
    """The sliding window of layer ``layer_idx``, or None for full attention.

    transformers 5 lists per-layer ``layer_types``; older configs set ``sliding_window`` for every layer
    (Mistral) or gate it with ``use_sliding_window`` (Qwen2).
    """
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(hf_config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaForCausalLM(nn.Module):
    """Causal LM head over :class:`LlamaModel`; the model contract every registered architecture follows.

    - ``forward(input_ids, positions, metadata)`` -> hidden ``[num_tokens, hidden_size]``; a model with
      ``supports_sampled_rows`` also takes ``sampled`` (:class:`SampledRows`, the step's rows whose logits are
      computed) and then returns ``[num_sampled, hidden_size]``, its last layer attending and computing its MLP
      for those rows only (every token's keys and values are still stored);
    - ``compute_logits(hidden [rows, hidden_size])`` -> ``[rows, vocab_size]``: the sampled rows, or (prompt
      logprobs) a slice of a prompt's rows; under tensor parallelism every rank calls it on the same rows;
    - ``load_weights(iterable of (name, tensor))`` with Hugging Face names;
    - ``attention_layers()`` -> the :class:`PagedAttention` modules to bind KV caches to.

    ``supports_tensor_parallel``: the layers shard themselves over the current tensor-parallel group and
    ``load_weights`` accepts lazy safetensors slices (each rank reads only its part).
    """

    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer
    supports_tensor_parallel: bool = True
    supports_sampled_rows: bool = True

    def __init__(self, hf_config: object, backend: Backend) -> None:
        super().__init__()
        self.config = hf_config
        self.model = LlamaModel(hf_config, backend, self.layer_cls)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                sampled: SampledRows | None = None) -> torch.Tensor:
        """See the class docstring."""
        return self.model(input_ids, positions, metadata, sampled)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project the hidden states of the sampled tokens onto the vocabulary."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        """The attention modules in layer order."""
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters; returns the set of our parameter names filled. KV-cache
        scales (``KV_SCALE_TENSOR``; not parameters) go to their layer's :meth:`PagedAttention.load_kv_scale`.

        Raises ValueError naming the parameter on a shape mismatch or an unexpected name.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            kv_scale = KV_SCALE_TENSOR.search(name)
            attention = f"{name[: kv_scale.start()]}.self_attn.attn" if kv_scale else None
            if attention in modules:  # an fp8 cache's scale (the loader passes them only for one)
                try:
                    modules[attention].load_kv_scale(kv_scale.group(1), tensor)
                except ValueError as exc:
                    raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc
                continue
            for fragment, (fused, index) in STACKED_PARAMS.items():
                if fragment in name:
                    target = name.replace(fragment, fused)
                    module_name, _, param_name = target.rpartition(".")
                    if module_name not in modules or not isinstance(getattr(modules[module_name], param_name, None),
                                                                    nn.Parameter):
                        raise ValueError(f"checkpoint tensor {name!r} matches no parameter ({target!r}) of "
                                         f"{type(self).__name__}")
                    try:
                        modules[module_name].load_shard(param_name, index, tensor)
                    except ValueError as exc:
                        raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__}")
                self.load_param(name, params[name], tensor)
                loaded.add(name)
        return loaded

    def load_param(self, name: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (or lazy safetensors slice) into ``param``; a sharded parameter's
        ``weight_loader`` reads only this rank's part."""
        weight_loader = getattr(param, "weight_loader", None)
        if weight_loader is not None:
            try:
                weight_loader(param, tensor)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc
            return
        if not isinstance(tensor, torch.Tensor):
            tensor = tensor[...]
        try:
            copy_checked(param.data, tensor)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama decoder with a sliding attention window (``config.sliding_window``)."""


class MinistralForCausalLM(MistralForCausalLM):
    """Ministral: Mistral with the window on the layers ``layer_types`` names ``sliding_attention`` only."""


class Qwen2Attention(LlamaAttention):
    """Qwen2 attention: like Llama's with biases on q, k and v."""

    qkv_bias_default = True


class Qwen2DecoderLayer(LlamaDecoderLayer):
    """Qwen2 decoder layer."""

    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: q/k/v biases; embeddings often tied; sliding window only where ``layer_types`` says so."""

    layer_cls = Qwen2DecoderLayer


class Qwen3Attention(LlamaAttention):
    """Qwen3 attention: Llama's (q/k/v biases only if ``attention_bias``) with an RMSNorm over each head of q
    and of k (``q_norm``, ``k_norm``: weights ``[head_dim]``, the same for every head and every rank)
    before the rotary embedding, both through the backend's ``qk_norm_rotary_embedding`` (transformers' Qwen3
    norms and rotates in two steps; the default op does too)."""

    def __init__(self, hf_config: object, layer_idx: int, sliding_window: int | None, backend: Backend) -> None:
        super().__init__(hf_config, layer_idx, sliding_window, backend)
        self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps, backend)
        self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps, backend)

    def rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head of q and of k through its RMSNorm, then rotated: one backend op."""
        return self.rotary_emb.with_head_norms(positions, q, k, self.q_norm, self.k_norm)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Qwen3 decoder layer."""

    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense): per-head q/k norms, ``head_dim`` from the config; embeddings tied in the small models;
    sliding window only where ``layer_types`` says so."""

    layer_cls = Qwen3DecoderLayer
