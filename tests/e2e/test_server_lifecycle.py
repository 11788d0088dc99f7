"""``pagedllm serve`` as an operator meets it: the start-up log, ``--chat-template``, no API key, bad
options failing in one line, Ctrl-C while the model loads, and a clean stop on SIGTERM while a stream is in
flight (uvicorn handles both signals alike; these two tests cover both of pagedllm's paths)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pagedllm.testing.server import ServerProcess  # noqa: E402

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}|{{ m['content'] }}>>{% endfor %}"


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory: pytest.TempPathFactory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    args = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes",
            str(1 << 20), "--chat-template", str(template), "--graceful-shutdown-timeout-s", "0.2",
            "--scheduling-policy", "priority"]
    with ServerProcess(llama_dir, args) as process:
        yield process


def test_startup_log(server: ServerProcess, llama_dir) -> None:
    log = server.log()
    assert "backend cpu" in log
    assert str(llama_dir) in log
    assert "KV pool 127 blocks x 16 tokens = 2032 tokens" in log
    assert f"listening on {server.url}" in log


def test_served_name_defaults_to_model_and_no_key_needed(server: ServerProcess, llama_dir) -> None:
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [str(llama_dir)]
    reply = server.client().completions.create(model=str(llama_dir), prompt="hello", max_tokens=3)
    assert reply.usage.completion_tokens >= 1


def test_chat_template_option(server: ServerProcess, llama_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    messages = [{"role": "user", "content": "hi there"}]
    answer = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert answer["tokens"] == tokenizer("<<user|hi there>>", add_special_tokens=False).input_ids
    reply = server.client().chat.completions.create(model=str(llama_dir), messages=messages, max_tokens=3)
    assert reply.usage.prompt_tokens == answer["count"]


def test_priority_scheduling_option(server: ServerProcess, llama_dir) -> None:
    """Under --scheduling-policy priority, completions and chats take vLLM's ``priority`` field."""
    client = server.client()
    reply = client.completions.create(model=str(llama_dir), prompt="hello", max_tokens=3, temperature=0.0,
                                      extra_body={"priority": -5})
    plain = client.completions.create(model=str(llama_dir), prompt="hello", max_tokens=3, temperature=0.0)
    assert reply.choices[0].text == plain.choices[0].text and reply.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model=str(llama_dir), messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, extra_body={"priority": 7})
    assert chat.usage.completion_tokens >= 1


def test_bad_option_fails_in_one_line(llama_dir) -> None:
    result = subprocess.run([sys.executable, "-m", "pagedllm", "serve", str(llama_dir), "--device", "cpu",
                             "--chat-template", "/no/such/template.jinja"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "pagedllm serve: error: chat template file '/no/such/template.jinja' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_while_loading_exits_quietly(llama_dir) -> None:
    process = subprocess.Popen([sys.executable, "-m", "pagedllm", "serve", str(llama_dir), "--device", "cpu",
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    try:
        for line in process.stdout:  # the registry logs the device before the engine loads the model
            lines.append(line)
            if "device cpu" in line:
                process.send_signal(signal.SIGINT)
                break
        output = "".join(lines) + process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopped" in output and "Traceback" not in output


def test_sigterm_mid_stream_stops_cleanly(server: ServerProcess, llama_dir) -> None:
    """Last in the module: SIGTERM while a long stream is open. The stream outlives the graceful period, so
    it ends with a "shutting down" error event; the process ends with status 0 and no traceback."""
    started = threading.Event()
    received: list[str] = []
    errors: list[str] = []

    def stream() -> None:
        client = server.client(timeout=30)
        try:
            for chunk in client.completions.create(model=str(llama_dir), prompt="while True:", max_tokens=490,
                                                   stream=True, extra_body={"ignore_eos": True}):
                received.append(chunk.choices[0].text if chunk.choices else "")
                started.set()
        except openai.APIError as exc:
            errors.append(exc.message)
        finally:
            started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    begin = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout_s=30) == 0
    assert time.monotonic() - begin < 15
    reader.join(30)
    assert received
    assert len(errors) == 1 and "shutting down" in errors[0]
    log = server.log()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
