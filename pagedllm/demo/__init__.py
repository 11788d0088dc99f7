"""The built-in demo model, so pagedllm runs out of the box without a model hub.

``checkpoint/`` beside this file is an ordinary Hugging Face checkpoint directory (a 4.5M-parameter Llama
with a 4096-token byte-level BPE tokenizer, weights in bfloat16 safetensors) trained for about 20 minutes
on one CPU core on the Python standard library's own source, by ``scripts/train_demo_model.py``. It writes
Python-looking code and is meant for demos and tests, not for anything useful. ``TRAINING.md`` beside this
file records how it was made.

Example::

    from pagedllm import LLM, SamplingParams
    from pagedllm.demo import demo_model_path

    llm = LLM(model=demo_model_path(), device="cpu")
    print(llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=64)))
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_MODEL_NAME", "demo_model_path"]

#: The name under which the demo model is served (e.g. the ``model`` field of OpenAI-style requests).
DEMO_MODEL_NAME = "pagedllm-demo"

_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def demo_model_path() -> str:
    """Return the absolute path of the demo checkpoint directory.

    The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
    tokenizer files, and can be passed anywhere a model path is accepted (``LLM(model=...)``,
    ``transformers.AutoModelForCausalLM.from_pretrained``).

    Raises:
        FileNotFoundError: if the checkpoint is missing (e.g. a source tree where it was not built);
            regenerate it with ``python scripts/train_demo_model.py --out pagedllm/demo/checkpoint``.
    """
    if not (_CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the pagedllm demo checkpoint is missing at {_CHECKPOINT_DIR}; regenerate it with "
            "`python scripts/train_demo_model.py --out pagedllm/demo/checkpoint`"
        )
    return str(_CHECKPOINT_DIR)
