"""The OpenAI-compatible HTTP server behind ``pagedllm serve``.

Serve-only: these modules import FastAPI, uvicorn, pydantic and prometheus-client at the top, so nothing
outside the serve path imports this package (``pagedllm.entrypoints.cli_serve`` imports it lazily).

- ``protocol``: every pydantic request/response model;
- ``errors``: the OpenAI error shape and the exception handlers;
- ``auth``: the ``--api-key`` check on ``/v1/*``;
- ``tokenization``: the HTTP side's own tokenizer and chat template, off the event loop;
- ``serving_base``, ``serving_models``, ``serving_completion``, ``serving_chat``, ``serving_tokenization``:
  one class per endpoint family;
- ``streaming``: server-sent events and streamed deltas;
- ``metrics``: the Prometheus metrics;
- ``api_server``: the FastAPI app and the uvicorn runner.
"""
