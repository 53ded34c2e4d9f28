"""`zhtune deploy`: an OpenAI-compatible server that holds under bad requests and concurrent load.

Two parts. (1) The real server: `python -m zhtune deploy` on the embedded Gemma 3 270M on a free
loopback port, one process shared by the module, driven with the official `openai` client and raw
HTTP (httpx). (2) The app in-process under uvicorn on a fake engine, for what a real model cannot be
made to do on demand: fail, block, or be left by its client.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

KEY = "sk-zhtune-test"
NAME = "zh-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "zhtune", "deploy", "--model_type", "gemma3-270m", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server on the embedded model: its base URL (…/v1) and port."""
    port = free_port()
    log = tmp_path_factory.mktemp("deploy") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(deploy_cmd("--port", str(port), "--api_key", KEY, "--served_model_name", NAME,
                                           "--max_new_tokens", "16", "--max_concurrency", "16"),
                                stdout=out, stderr=subprocess.STDOUT, env=env())
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up:\n" + log.read_text()
            time.sleep(0.3)
        yield {"base": f"http://127.0.0.1:{port}/v1", "port": port, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"], api_key=KEY, max_retries=0, timeout=120)


def post(server, path: str, body, headers=AUTH, timeout=60) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server["base"] + path, content=data, headers={"Content-Type": "application/json", **headers},
                      timeout=timeout)


def assert_error_shape(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "any":
        assert error["param"] == param, error
    return error


def sse(response: httpx.Response) -> list:
    """The data lines of an event stream: parsed JSON, or the string '[DONE]'."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def hi(**extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2, **extra}


# -- the real server ------------------------------------------------------------------------------

def test_models_health_and_api_key(server, client):
    root = server["base"].removesuffix("/v1")
    assert httpx.get(f"{root}/health", timeout=5).json()["status"] == "ok"  # no key needed
    assert_error_shape(httpx.get(server["base"] + "/models", timeout=5), 401)
    assert_error_shape(httpx.get(server["base"] + "/models", headers={"Authorization": "Bearer nope"}, timeout=5), 401)
    assert_error_shape(post(server, "/chat/completions", hi(), headers={}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"], api_key="wrong", max_retries=0).models.list()
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_reply_cut_by_max_tokens_says_length_with_usage(client):
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "讲一个很长的故事。"}],
                                           max_tokens=3, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == NAME
    assert abs(reply.created - time.time()) < 120
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    usage = reply.usage
    assert usage.completion_tokens == 3 and usage.prompt_tokens > 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_role_first_finish_reason_last_then_done(server, client):
    with httpx.stream("POST", server["base"] + "/chat/completions", headers=AUTH, timeout=60,
                      json=hi(max_tokens=3, stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == NAME for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    # the openai client reads the same stream
    pieces = list(client.chat.completions.create(**hi(max_tokens=3, stream=True)))
    assert pieces[-1].choices[0].finish_reason == "length"
    assert "".join(p.choices[0].delta.content or "" for p in pieces)


def test_text_completions(client):
    reply = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3 and reply.choices[0].text
    pieces = list(client.completions.create(model=NAME, prompt="1, 2, 3,", max_tokens=2, stream=True))
    assert pieces[-1].choices[0].finish_reason == "length"


MALFORMED = {
    "not json": (b'{"messages": [', None),
    "empty body": (b"", None),
    "not an object": (b"[1, 2]", None),
    "NaN": (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
    "no messages": ({"model": NAME}, "messages"),
    "empty messages": ({"messages": []}, "messages"),
    "messages not a list": ({"messages": "hi"}, "messages"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    "role order": ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "image content": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                      "messages[0].content[0].type"),
    "tool message": ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    "max_tokens 0": (hi(max_tokens=0), "max_tokens"),
    "max_tokens negative": (hi(max_tokens=-5), "max_tokens"),
    "max_tokens a string": (hi(max_tokens="8"), "max_tokens"),
    "max_tokens a float": (hi(max_tokens=1.5), "max_tokens"),
    "max_completion_tokens 0": (hi(max_completion_tokens=0), "max_completion_tokens"),
    "temperature too high": (hi(temperature=3), "temperature"),
    "temperature a string": (hi(temperature="hot"), "temperature"),
    "top_p 0": (hi(top_p=0), "top_p"),
    "seed negative": (hi(seed=-1), "seed"),
    "n 2": (hi(n=2), "n"),
    "tools": (hi(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    "logprobs": (hi(logprobs=True), "logprobs"),
    "presence_penalty": (hi(presence_penalty=1.0), "presence_penalty"),
    "json response_format": (hi(response_format={"type": "json_object"}), "response_format"),
    "five stops": (hi(stop=["a", "b", "c", "d", "e"]), "stop"),
    "stream not bool": (hi(stream="yes"), "stream"),
    "stream_options without stream": (hi(stream_options={"include_usage": True}), "stream_options"),
    "unknown field": (hi(foo=1), "foo"),
    "stream with max_tokens 0": (hi(stream=True, max_tokens=0), "max_tokens"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "你好 " * 40000}], "max_tokens": 1},
                                "messages"),
}


@pytest.mark.parametrize("body,param", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_chat_request_is_400_and_the_server_answers_at_once(server, body, param):
    error = assert_error_shape(post(server, "/chat/completions", body), 400, param if param else "any")
    assert error["type"] == "invalid_request_error"
    start = time.monotonic()
    assert httpx.get(server["base"] + "/models", headers=AUTH, timeout=5).status_code == 200
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("body,param", [({"model": NAME}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                                        ({"prompt": "a", "echo": True}, "echo"),
                                        ({"prompt": "a", "max_tokens": 0}, "max_tokens")],
                         ids=["no prompt", "batch", "echo", "max_tokens 0"])
def test_malformed_completion_request_is_400(server, body, param):
    assert_error_shape(post(server, "/completions", body), 400, param)


def test_unknown_model_and_route_are_404_in_openai_shape(server):
    assert_error_shape(post(server, "/chat/completions", {**hi(), "model": "gpt-4"}), 404, "model")
    assert_error_shape(post(server, "/embeddings", {"input": "x"}), 404)


def test_after_bad_requests_a_good_one_is_served_at_once(server):
    for body in (b"{", hi(max_tokens=0), hi(stream=True, max_tokens=-1)):
        post(server, "/chat/completions", body)
    start = time.monotonic()
    reply = post(server, "/chat/completions", hi(max_tokens=1), timeout=30)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert time.monotonic() - start < 20


def test_24_concurrent_requests_all_succeed(client):
    def one(i):
        return client.chat.completions.create(model=NAME, max_tokens=2,
                                              messages=[{"role": "user", "content": f"数到{i}"}])

    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(one, range(24)))
    assert all(r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 2 for r in replies)
    assert len({r.id for r in replies}) == 24


def test_40_concurrent_streams_all_end_with_a_finish_reason(server):
    def one(i):
        with httpx.stream("POST", server["base"] + "/chat/completions", headers=AUTH, timeout=120,
                          json=hi(max_tokens=2, stream=True, messages=[{"role": "user", "content": f"说{i}"}])) as r:
            assert r.status_code == 200
            return sse(r)

    with ThreadPoolExecutor(40) as pool:
        streams = list(pool.map(one, range(40)))
    for events in streams:
        assert events[-1] == "[DONE]"
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def test_port_in_use_or_out_of_range_is_one_line_before_loading(server):
    for port, words in ((server["port"], "already in use"), (70000, "65535")):
        start = time.monotonic()
        done = subprocess.run(deploy_cmd("--port", str(port)), check=False, capture_output=True, text=True, timeout=60, env=env())
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "loading" not in done.stderr, done.stderr
        assert time.monotonic() - start < 30


# -- the app on a fake engine ---------------------------------------------------------------------

class FakeTokenizer:
    def encode(self, text, add_special_tokens=True):
        return [0] * len(text.split())


class FakeEngine:
    """Words in, words out. The first word of the last message picks a behaviour."""
    name = "fake"
    max_model_len = 16
    tokenizer = FakeTokenizer()
    MODES: typing.ClassVar = {"fail": 1, "failmid": 2, "block": 3}

    def __init__(self):
        self.settings = []
        self.closed = threading.Event()

    def encode_prompt(self, messages):
        from zhtune.templates.base import check_messages
        check_messages(messages, for_generation=True)
        words = messages[-1]["content"].split()
        return [self.MODES.get(words[0], 0)] + [0] * (len(words) - 1)

    def stream_ids(self, prompt, settings):
        from zhtune.infer.base import Delta
        self.settings.append(settings)
        if prompt[0] == 1:
            raise RuntimeError("CUDA out of memory (fake)")
        if prompt[0] == 2:
            yield Delta("partial")
            raise RuntimeError("boom mid-stream")
        if prompt[0] == 3:
            try:
                for _ in range(3000):
                    time.sleep(0.01)
                    yield Delta("x")
            finally:
                self.closed.set()
            return
        words = ["one", " two", " three"][:settings.max_new_tokens]
        yield from (Delta(w) for w in words)
        yield Delta("", "length" if settings.max_new_tokens <= 3 else "stop", len(prompt), len(words))


@contextmanager
def app_server(engine, **options):
    import uvicorn

    from zhtune.infer.base import GenerationSettings
    from zhtune.serve.app import create_app

    app = create_app(engine, GenerationSettings(max_new_tokens=8), model_name="fake", **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def say(text, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_failing_generation_is_500_with_the_reason_and_the_next_request_is_served():
    with app_server(FakeEngine()) as base:
        error = assert_error_shape(httpx.post(f"{base}/chat/completions", json=say("fail"), timeout=10), 500)
        assert "CUDA out of memory (fake)" in error["message"] and error["type"] == "server_error"
        for text in ("fail", "failmid now"):  # after the 200 headers: an error event, then [DONE]
            with httpx.stream("POST", f"{base}/chat/completions", json=say(text, stream=True), timeout=10) as r:
                events = sse(r)
            assert r.status_code == 200 and events[-1] == "[DONE]" and "error" in events[-2], events
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "boom mid-stream" in events[-2]["error"]["message"]
        assert [c["choices"][0]["delta"].get("content") for c in events[1:-2]] == ["partial"]
        reply = httpx.post(f"{base}/chat/completions", json=say("hello"), timeout=10).json()
        assert reply["choices"][0]["message"]["content"] == "one two three"


def test_max_tokens_is_capped_to_the_context_and_long_prompts_refused():
    engine = FakeEngine()
    with app_server(engine) as base:
        ten = " ".join(["w"] * 10)
        reply = httpx.post(f"{base}/chat/completions", json=say(ten, max_tokens=1000), timeout=10)
        assert reply.status_code == 200 and engine.settings[-1].max_new_tokens == 16 - 10
        httpx.post(f"{base}/chat/completions", json=say(ten), timeout=10)  # the server's default (8) fits
        assert engine.settings[-1].max_new_tokens == 6
        error = assert_error_shape(httpx.post(f"{base}/chat/completions", json=say(" ".join(["w"] * 16)),
                                              timeout=10), 400, "messages")
        assert error["code"] == "context_length_exceeded"
        reply = httpx.post(f"{base}/chat/completions", json=say("hi", max_tokens=2), timeout=10).json()
        assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 2


def test_stop_strings_cut_the_text_and_say_stop():
    with app_server(FakeEngine()) as base:
        reply = httpx.post(f"{base}/chat/completions", json=say("hi", stop=[" tw", "zzz"]), timeout=10).json()
        assert reply["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "one"},
                                       "finish_reason": "stop", "logprobs": None}
        with httpx.stream("POST", f"{base}/chat/completions", json=say("hi", stop=" th", stream=True), timeout=10) as r:
            events = sse(r)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[1:-1])
        assert text == "one two" and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_full_queue_is_503_and_the_slot_comes_back():
    engine = FakeEngine()
    with app_server(engine, max_concurrency=1, max_queue_size=0) as base:
        with httpx.stream("POST", f"{base}/chat/completions", json=say("block", stream=True), timeout=10) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the role chunk: the blocking request holds the only slot
            deadline = time.monotonic() + 5
            while not engine.settings:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = httpx.post(f"{base}/chat/completions", json=say("hello"), timeout=10)
            error = assert_error_shape(busy, 503)
            assert error["type"] == "server_error"
        assert engine.closed.wait(5)  # the client left: its generation was closed
        deadline = time.monotonic() + 5
        while (reply := httpx.post(f"{base}/chat/completions", json=say("hello"), timeout=10)).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert reply.status_code == 200


def test_client_disconnect_closes_the_engine_stream():
    for stream in (True, False):
        engine = FakeEngine()
        with app_server(engine) as base:
            if stream:
                with httpx.stream("POST", f"{base}/chat/completions", json=say("block", stream=True), timeout=10) as r:
                    lines = r.iter_lines()
                    next(lines), next(lines)
            else:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{base}/chat/completions", json=say("block"), timeout=0.5)
            assert engine.closed.wait(5), f"stream={stream}: the generation went on after the client left"
            health = httpx.get(f"{base.removesuffix('/v1')}/health", timeout=5).json()
            deadline = time.monotonic() + 5
            while health["running"] or health["waiting"]:
                assert time.monotonic() < deadline, health
                time.sleep(0.05)
                health = httpx.get(f"{base.removesuffix('/v1')}/health", timeout=5).json()
