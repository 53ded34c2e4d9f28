"""`zhtune deploy` answers a real HTTP client on loopback, in OpenAI's format."""

import json
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_serves_chat_completions(tiny_models, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "zhtune", "deploy", "--model_id_or_path", str(tiny_models["gemma2"]),
                               "--port", str(port), "--max_new_tokens", "5"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        for _ in range(120):
            try:
                models = json.load(urllib.request.urlopen(f"{base}/models", timeout=2))
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        assert models["data"][0]["id"] == "gemma2-9b-instruct"
        request = urllib.request.Request(f"{base}/chat/completions", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"messages": [{"role": "user", "content": "你好"}],
                                                          "temperature": 0, "max_tokens": 4}).encode())
        reply = json.load(urllib.request.urlopen(request, timeout=60))
        assert reply["object"] == "chat.completion"
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        bad = urllib.request.Request(f"{base}/chat/completions", method="POST", data=b"{}")
        try:
            urllib.request.urlopen(bad, timeout=10)
            raise AssertionError("a body without messages must be rejected")
        except urllib.error.HTTPError as e:
            assert e.code == 400 and "messages" in json.load(e)["error"]["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
