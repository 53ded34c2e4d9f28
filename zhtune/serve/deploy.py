"""`zhtune deploy`: an OpenAI-compatible HTTP server (/v1/models, /v1/chat/completions) on one engine.

Plain `http.server` from the standard library: one request at a time, which is what one engine on one
device can serve anyway. Streaming answers use server-sent events like OpenAI's API.
"""

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from zhtune.dry_run import print_dry_run
from zhtune.errors import UserError
from zhtune.infer.base import GenerationSettings
from zhtune.infer.engine import load_engine
from zhtune.log import logger
from zhtune.models.resolve import resolve_from_args


def deploy_main(args) -> int:
    resolved = resolve_from_args(args)
    if args.dry_run:
        print_dry_run("deploy", args, {**resolved.describe(), "url": f"http://{args.host}:{args.port}/v1"})
        return 0
    engine = load_engine(resolved, args)
    server = make_server(engine, GenerationSettings.from_args(args), args.host, args.port,
                         args.served_model_name or engine.name)
    logger.info(f"serving {engine.name} at http://{args.host}:{server.server_port}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def make_server(engine, defaults: GenerationSettings, host: str, port: int, model_name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):  # quiet
            pass

        def _json(self, status: int, body: dict):
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str):
            self._json(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "zhtune"}]})
            else:
                self._error(404, f"no route {self.path}; try /v1/models or POST /v1/chat/completions")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}; POST /v1/chat/completions")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                messages = body["messages"]
                settings = _settings(defaults, body)
            except (ValueError, KeyError, TypeError) as e:
                return self._error(400, f"bad request body ({e}): send JSON with 'messages'")
            try:
                if body.get("stream"):
                    return self._stream(messages, settings)
                reply = engine.generate([messages], settings, batch_size=1)[0]
            except UserError as e:
                return self._error(400, str(e))
            self._json(200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                             "created": int(time.time()), "model": model_name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                          "finish_reason": "stop"}]})

        def _stream(self, messages, settings):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.end_headers()
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            for piece in engine.stream(messages, settings):
                chunk = {"id": cid, "object": "chat.completion.chunk", "model": model_name,
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

    return ThreadingHTTPServer((host, port), Handler)


def _settings(defaults: GenerationSettings, body: dict) -> GenerationSettings:
    values = dict(defaults.__dict__)
    if "max_tokens" in body:
        values["max_new_tokens"] = int(body["max_tokens"])
    for key in ("temperature", "top_p", "seed"):
        if key in body:
            values[key] = body[key]
    if values.get("temperature") == 0:
        values["do_sample"] = False
    return GenerationSettings(**values)
