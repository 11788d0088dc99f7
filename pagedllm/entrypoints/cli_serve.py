"""``pagedllm serve [MODEL] ...``: the OpenAI-compatible HTTP server.

FastAPI, uvicorn and prometheus-client are imported only when the server runs (they are the ``serve``
extra, absent from some images), so this module itself imports nothing beyond the standard library.
"""

from __future__ import annotations

import argparse

from pagedllm.entrypoints.engine_args import add_engine_args

SERVE_REQUIREMENTS: tuple[str, ...] = ("fastapi", "uvicorn", "prometheus_client", "pydantic")
# the names of openai.tool_call_formats (kept here: this module imports nothing heavy)
TOOL_CALL_PARSER_NAMES: tuple[str, ...] = ("hermes", "mistral", "llama3_json", "pythonic", "qwen3_coder")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``serve`` sub-command."""
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $PAGEDLLM_API_KEY, else none)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the MODEL argument, or pagedllm-demo)")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template file (or inline template) replacing the tokenizer's")
    parser.add_argument("--max-logprobs", type=int, default=20, help="the most logprobs a request may ask for")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="let chat requests with tools use tool_choice 'auto' (needs --tool-call-parser)")
    parser.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSER_NAMES,
                        help="how a reply's text becomes tool calls under tool_choice 'auto': hermes "
                             "(<tool_call>{...}</tool_call> blocks: Qwen2.5/Qwen3/Hermes), mistral ([TOOL_CALLS] "
                             "[{...}] or [TOOL_CALLS]name[ARGS]{...}: Mistral models), llama3_json ({...}; {...}: "
                             "Llama 3.1-3.3), pythonic ([f(a=1), g()]: Llama 3.2/4), qwen3_coder (<tool_call>"
                             "<function=f><parameter=a>1</parameter></function></tool_call>: Qwen3-Coder)")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                        help="LoRA adapters served beside the model (needs --enable-lora): a request whose model "
                             "is NAME runs through the PEFT adapter in PATH; also {\"name\": ..., \"path\": ...}")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="logprobs name tokens 'token_id:<id>' instead of their text (a request's "
                             "return_tokens_as_token_ids overrides it): for clients that need the exact ids")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="completion and chat usage add prompt_tokens_details.cached_tokens: the prompt tokens "
                             "the prefix cache held (the Responses API always reports them)")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="serve POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter "
                             "{lora_name} (vLLM's routes, which it enables with VLLM_ALLOW_RUNTIME_LORA_UPDATING; "
                             "needs --enable-lora). Anyone who can reach the server can then make it read a "
                             "directory of its machine")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--disable-access-log", action="store_true", help="do not log every HTTP request")
    parser.add_argument("--graceful-shutdown-timeout-s", type=float, default=5.0,
                        help="on Ctrl-C / SIGTERM, how long open requests may finish before they are cut")
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit code."""
    import importlib.util

    missing = [name for name in SERVE_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"the server needs {', '.join(missing)}: pip install 'pagedllm[serve]'")
    from pagedllm.entrypoints.openai.api_server import run_server

    return run_server(args)
