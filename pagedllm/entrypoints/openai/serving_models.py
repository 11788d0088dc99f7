"""The model names the server answers to (``--served-model-name``) and ``GET /v1/models``."""

from __future__ import annotations

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ModelCard, ModelList


class OpenAIServingModels:
    """The served model: ``name`` is what clients put in ``model``; ``root`` is the checkpoint it serves."""

    def __init__(self, name: str, root: str, max_model_len: int) -> None:
        self.name = name
        self.root = root
        self.max_model_len = max_model_len

    def check(self, model: str | None) -> str:
        """Return the served name for a request's ``model`` (None or empty means the served one).

        Raises a 404 :class:`OpenAIError` for any other name.
        """
        if not model or model == self.name:
            return self.name
        raise OpenAIError(f"the model {model!r} does not exist; this server serves {self.name!r}", 404,
                          param="model", code="model_not_found")

    def list(self) -> ModelList:
        """The answer of ``GET /v1/models``."""
        return ModelList(data=[ModelCard(id=self.name, root=self.root, max_model_len=self.max_model_len)])
