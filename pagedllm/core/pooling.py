"""Embeddings from a decoder model (vLLM's ``LLM.embed`` and ``/v1/embeddings``): the final hidden state of a
prompt's last token (last-token pooling, what Qwen3-Embedding, gte-Qwen2 and e5-mistral use), optionally cut to
its first ``dimensions`` features (Matryoshka) and L2-normalized.

A pooling request runs through the engine as a one-token generation whose token is discarded: the step that
computes the prompt's last token also copies that row's final hidden state (after the model's last norm) to
the host, and the request's output is an :class:`EmbeddingRequestOutput` instead of a ``RequestOutput``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedllm.core.host_copy import HostCopy

POOLING_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_weightedmean_tokens": "weighted mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean sqrt len"}
"""sentence-transformers' ``1_Pooling/config.json`` switches and the pooling each names."""


def checkpoint_pooling(model_dir: str | Path) -> str | None:
    """The pooling a sentence-transformers checkpoint declares (``modules.json`` naming a ``Pooling`` module whose
    ``config.json`` sets one of :data:`POOLING_MODES`), or None for a checkpoint that declares none. Called once
    per engine, on its first embedding request."""
    root = Path(model_dir)
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for module in modules if isinstance(modules, list) else []:
        if str(module.get("type", "")).endswith("Pooling"):
            try:
                config = json.loads((root / module.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                return None
            return next((mode for key, mode in POOLING_MODES.items() if config.get(key)), None)
    return None


@dataclass(slots=True)
class PoolingParams:
    """How a prompt becomes an embedding. ``dimensions``: keep the first that many features (None: all of
    ``hidden_size``); ``normalize``: divide by the L2 norm (after the cut). ``truncate_prompt_tokens``: keep only
    the prompt's last that many tokens (-1: as many as the model takes), as ``SamplingParams`` does."""

    dimensions: int | None = None
    normalize: bool = True
    truncate_prompt_tokens: int | None = None

    def verify(self, hidden_size: int) -> None:
        """Raise ValueError unless ``dimensions`` is between 1 and ``hidden_size``."""
        if self.dimensions is not None and not 1 <= self.dimensions <= hidden_size:
            raise ValueError(f"PoolingParams.dimensions must be between 1 and the model's hidden size "
                             f"{hidden_size}, got {self.dimensions}")

    def pool(self, hidden: torch.Tensor) -> list[float]:
        """The embedding of one prompt from its last token's final hidden state ``hidden: [hidden_size]``."""
        x = hidden.float()
        if self.dimensions is not None:
            x = x[: self.dimensions]
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=0)
        return x.tolist()


@dataclass(slots=True)
class EmbeddingOutput:
    """One prompt's embedding."""

    embedding: list[float]


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """What ``LLM.embed`` returns per prompt, as vLLM's: ``outputs.embedding``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass(slots=True)
class PooledRows(HostCopy):
    """One step's last-token hidden states of the pooling requests it finished prefilling: ``hidden[i]`` (``[n,
    hidden_size]`` float32) belongs to ``request_ids[i]``; copied to the host without waiting (``wait()`` first,
    :class:`~pagedllm.core.host_copy.HostCopy`)."""

    request_ids: list[str]
    hidden: torch.Tensor
    _copied: torch.Event | None = None

    @staticmethod
    def start_copy(request_ids: list[str], hidden: torch.Tensor) -> PooledRows:
        """Queue the copy of ``hidden`` (on the device) to the host and mark its end (called right after the
        forward, so reading it back never waits for steps launched later)."""
        rows = PooledRows(request_ids, hidden.float().to("cpu", non_blocking=True))
        rows._mark_copied(hidden.device)
        return rows
