"""The model names the server answers to (``--served-model-name``, and each ``--lora-modules`` adapter's name) and
``GET /v1/models``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from pagedllm.core.config import EngineConfig
from pagedllm.core.lora.request import LoRARequest, check_adapter, read_adapter_config
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ModelCard, ModelList


class OpenAIServingModels:
    """The served model: ``name`` is what clients put in ``model``; ``root`` is the checkpoint it serves;
    ``loras`` the LoRA adapters served beside it, by the name clients give (each request naming one runs
    through it); ``max_lora_rank`` the engine's (None: LoRA not enabled), which adapters loaded at run time
    (:meth:`load_lora`) are checked against."""

    def __init__(self, name: str, root: str, max_model_len: int,
                 loras: Mapping[str, LoRARequest] | None = None, max_lora_rank: int | None = None) -> None:
        self.name = name
        self.root = root
        self.max_model_len = max_model_len
        self.loras = dict(loras or {})
        self.max_lora_rank = max_lora_rank
        self._next_lora_id = max((lora.lora_int_id for lora in self.loras.values()), default=0) + 1

    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter in ``path`` as ``name`` from now on (``POST /v1/load_lora_adapter``). It takes an
        id no adapter has had, so neither the engine's adapter slots nor its prefix cache can mistake it for one
        unloaded before, even from the same directory. Raises a 400 :class:`OpenAIError` when LoRA is not
        enabled, the name is taken, or the adapter cannot run (its message names the problem)."""
        if self.max_lora_rank is None:
            raise OpenAIError("LoRA is not enabled on this server (start it with --enable-lora)", 400)
        if not name or not path:
            raise OpenAIError("both lora_name and lora_path are needed", 400,
                              param="lora_name" if not name else "lora_path")
        if name == self.name or name in self.loras:
            raise OpenAIError(f"the LoRA adapter {name!r} has already been loaded", 400, param="lora_name")
        lora = LoRARequest(name, self._next_lora_id, path)
        read_adapter_config.cache_clear()  # the directory may hold another adapter since it was last read
        try:
            check_adapter(lora, self.max_lora_rank)
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param="lora_path") from exc
        self.loras[name] = lora
        self._next_lora_id += 1

    def unload_lora(self, name: str, lora_int_id: int | None = None) -> None:
        """Stop serving the adapter ``name`` (``POST /v1/unload_lora_adapter``): requests already running keep it
        to their end; new ones naming it get a 404. Raises a 404 :class:`OpenAIError` for a name not served, or
        an ``lora_int_id`` that is not its id."""
        lora = self.loras.get(name)
        if lora is None or (lora_int_id is not None and lora_int_id != lora.lora_int_id):
            raise OpenAIError(f"no LoRA adapter {name!r}" + (f" with id {lora_int_id}" if lora_int_id else "")
                              + f" is loaded; loaded: {list(self.loras)}", 404, param="lora_name",
                              code="model_not_found")
        del self.loras[name]

    def check(self, model: str | None) -> str:
        """Return the served name for a request's ``model`` (None or empty means the base model): the base
        model's or an adapter's. Raises a 404 :class:`OpenAIError` for any other name."""
        if not model or model == self.name:
            return self.name
        if model in self.loras:
            return model
        served = [self.name, *self.loras]
        raise OpenAIError(f"the model {model!r} does not exist; this server serves {served}", 404,
                          param="model", code="model_not_found")

    def lora(self, served_name: str) -> LoRARequest | None:
        """The adapter a served name (from :meth:`check`) runs through, or None for the base model."""
        return self.loras.get(served_name)

    def list(self) -> ModelList:
        """The answer of ``GET /v1/models``: the base model, then each adapter (its ``parent`` the base model)."""
        cards = [ModelCard(id=self.name, root=self.root, max_model_len=self.max_model_len)]
        cards += [ModelCard(id=name, root=lora.lora_path, parent=self.name, max_model_len=self.max_model_len)
                  for name, lora in self.loras.items()]
        return ModelList(data=cards)


def parse_lora_modules(specs: Sequence[str], config: EngineConfig) -> dict[str, LoRARequest]:
    """The adapters of ``--lora-modules`` (vLLM's forms: ``NAME=PATH``, or ``{"name": ..., "path": ...}``), ids 1,
    2, ... in order, each adapter's directory checked now. Raises ValueError naming the problem: LoRA not
    enabled, a malformed entry, a name given twice, or an adapter the engine cannot run."""
    if specs and not config.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    loras: dict[str, LoRARequest] = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                entry = json.loads(spec)
                name, path = entry["name"], entry["path"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"--lora-modules entry {spec!r}: expected {{\"name\": ..., \"path\": ...}}") from exc
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules entry {spec!r}: expected NAME=PATH")
        if name in loras:
            raise ValueError(f"--lora-modules names {name!r} twice")
        loras[name] = LoRARequest(name, len(loras) + 1, path)
        check_adapter(loras[name], config.max_lora_rank)
    return loras
