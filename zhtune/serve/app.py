"""The FastAPI app: /health, /v1/models, /v1/chat/completions and /v1/completions on one engine.

Every request is checked in full before it is admitted: the JSON, each field's type and range
(protocol.py), the roles (the template's `check_messages`), and the length: the prompt must leave
room in `engine.max_model_len`, and `max_tokens` is capped to that room. A bad request is a 400 in
OpenAI's error shape naming the field; nothing of it reaches the engine. Generation goes through
`Scheduler` (generation.py). A failure in the engine is a 500 with its reason (in a stream, whose
200 headers are already sent: an error event, then `data: [DONE]`). A client that goes away stops its
generation.
"""

import hmac
import json
from contextlib import asynccontextmanager
from dataclasses import replace

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhtune.errors import UserError
from zhtune.infer.base import Engine, GenerationSettings
from zhtune.log import logger
from zhtune.infer.base import Delta
from zhtune.serve.generation import GenerationFailed, Scheduler, Ticket
from zhtune.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
    validation_error,
)

MAX_BODY_BYTES = 16 * 1024 * 1024


def create_app(engine: Engine, defaults: GenerationSettings, *, model_name: str | None = None,
               max_concurrency: int = 32, max_queue_size: int = 256, api_key: str | None = None) -> FastAPI:
    """`defaults`: the settings a request starts from (its max_tokens, temperature, ... override them)."""
    model_name = model_name or engine.name
    started = now()
    scheduler: Scheduler | None = None

    def get_scheduler() -> Scheduler:  # made inside the event loop, on first use
        nonlocal scheduler
        if scheduler is None:
            scheduler = Scheduler(engine, max_concurrency, max_queue_size)
        return scheduler

    @asynccontextmanager
    async def lifespan(app):
        yield
        if scheduler is not None:
            scheduler.shutdown()

    app = FastAPI(title="zhtune", summary=f"OpenAI-compatible API serving {model_name}", docs_url="/docs",
                  redoc_url=None, lifespan=lifespan)
    app.state.model_name = model_name

    # -- errors, all in OpenAI's shape ------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}; the API is GET /v1/models, POST "
                   "/v1/chat/completions, POST /v1/completions, GET /health") if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        logger.error(f"{request.method} {request.url.path} failed: {type(e).__name__}: {e}")
        return JSONResponse(APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error",
                                     code="internal_error").body(), status_code=500)

    # -- helpers ---------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' "
                           "with the server's --api_key.", code="invalid_api_key")

    async def parse(request: Request, cls):
        authorize(request)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2 ** 20} MiB.", code="body_too_large")
        if not raw.strip():
            raise APIError(400, "the request body is empty: send a JSON object.", code="invalid_json")
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}.",
                           code="invalid_json")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        problem = req.unsupported()
        if problem is not None:
            raise problem
        if req.model not in (None, "", model_name, engine.name):
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{model_name}`.",
                           param="model", code="model_not_found")
        return req

    def settings_for(req, prompt_tokens: int) -> GenerationSettings:
        room = engine.max_model_len - prompt_tokens if engine.max_model_len else None
        if room is not None and room < 1:
            raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens; the prompt "
                           f"has {prompt_tokens}. Shorten the messages.", param="messages",
                           code="context_length_exceeded")
        wanted = req.reply_limit() or defaults.max_new_tokens
        values = {"max_new_tokens": min(wanted, room) if room is not None else wanted, "seed": req.seed}
        if req.temperature is not None:
            values.update(temperature=req.temperature, do_sample=req.temperature > 0)
        if req.top_p is not None:
            values["top_p"] = req.top_p
        if req.top_k is not None:
            values["top_k"] = max(req.top_k, 0)
        if req.repetition_penalty is not None:
            values["repetition_penalty"] = req.repetition_penalty
        return replace(defaults, **values)

    async def encode(fn, *a) -> list[int]:
        try:
            return await run_in_threadpool(fn, *a)
        except UserError as e:
            raise APIError(400, str(e), param="messages", code="invalid_messages") from None

    # -- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        s = scheduler
        return {"status": "ok", "model": model_name, "running": s.running if s else 0,
                "waiting": s.waiting if s else 0}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return ModelList(data=[ModelCard(id=model_name, created=started, max_model_len=engine.max_model_len)])

    async def serve(request: Request, req, prompt: list[int], id_prefix: str, events):
        """Admit and start the generation: (id, created, the event stream | the whole reply | 499)."""
        settings = settings_for(req, len(prompt))
        ticket = get_scheduler().admit()
        pieces = get_scheduler().generate(ticket, prompt, settings, req.stop_list())
        rid, created = new_id(id_prefix), now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return rid, created, EventStream(events(pieces, rid, created, model_name, include_usage), ticket)
        last = await collect(request, pieces, ticket)
        return rid, created, Response(status_code=499) if last is None else last  # 499: the client left

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        prompt = await encode(engine.encode_prompt, req.conversation())
        rid, created, reply = await serve(request, req, prompt, "chatcmpl", _chat_events)
        if not isinstance(reply, _Whole):
            return reply  # the event stream, or 499 for a client that left
        last = reply
        return ChatCompletionResponse(id=rid, created=created, model=model_name, usage=last.usage,
                                      choices=[ChatChoice(message=AssistantMessage(content=last.text),
                                                          finish_reason=last.finish_reason)])

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompt = await encode(lambda text: engine.tokenizer.encode(text), req.prompt_text())
        rid, created, reply = await serve(request, req, prompt, "cmpl", _completion_events)
        if not isinstance(reply, _Whole):
            return reply
        last = reply
        return CompletionResponse(id=rid, created=created, model=model_name, usage=last.usage,
                                  choices=[CompletionChoice(text=last.text, finish_reason=last.finish_reason)])

    return app


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _Whole:
    def __init__(self, text: str, last: Delta):
        self.text, self.finish_reason = text, last.finish_reason
        self.usage = Usage.of(last.prompt_tokens, last.completion_tokens)


async def collect(request: Request, pieces, ticket: Ticket) -> _Whole | None:
    """A whole reply; None when the client disconnected first (its generation is then stopped)."""
    result: list = []
    failed: list[GenerationFailed] = []

    async def run(scope: anyio.CancelScope):
        text = ""
        try:
            async for piece in pieces:
                text += piece.text
                if piece.finish_reason is not None:
                    result.append(_Whole(text, piece))
        except GenerationFailed as e:
            failed.append(e)
        scope.cancel()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run, group.cancel_scope)
            group.start_soon(_until_disconnect, request.receive, group.cancel_scope)
    finally:
        ticket.abandon()
        await pieces.aclose()
    if failed:
        raise APIError(500, f"generation failed: {failed[0]}", type="server_error", code="generation_failed")
    return result[0] if result else None


async def _until_disconnect(receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _sse(obj) -> str:
    data = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def _error_event(e: BaseException) -> str:
    if isinstance(e, GenerationFailed):
        error = APIError(500, f"generation failed: {e}", type="server_error", code="generation_failed")
    elif isinstance(e, APIError):
        error = e
    else:
        error = APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error",
                         code="internal_error")
    logger.warning(f"stream ended with an error: {error.message}")
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\ndata: [DONE]\n\n"


async def _chat_events(pieces, rid: str, created: int, model: str, include_usage: bool):
    def chunk(delta: DeltaMessage, finish=None, usage=None, choices=True) -> str:
        return _sse(ChatCompletionChunk(id=rid, created=created, model=model, usage=usage,
                                        choices=[ChatChunkChoice(delta=delta, finish_reason=finish)] if choices else []))

    yield chunk(DeltaMessage(role="assistant", content=""))
    try:
        async for piece in pieces:
            if piece.text:
                yield chunk(DeltaMessage(content=piece.text))
            if piece.finish_reason is not None:
                yield chunk(DeltaMessage(), piece.finish_reason)
                if include_usage:
                    yield chunk(DeltaMessage(), usage=Usage.of(piece.prompt_tokens, piece.completion_tokens),
                                choices=False)
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes into the stream
        yield _error_event(e)
    finally:
        await pieces.aclose()


async def _completion_events(pieces, rid: str, created: int, model: str, include_usage: bool):
    def chunk(text: str, finish=None, usage=None, choices=True) -> str:
        return _sse(CompletionResponse(id=rid, created=created, model=model, usage=usage,
                                       choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else []))

    try:
        async for piece in pieces:
            if piece.text or piece.finish_reason is not None:
                yield chunk(piece.text, piece.finish_reason)
            if piece.finish_reason is not None and include_usage:
                yield chunk("", usage=Usage.of(piece.prompt_tokens, piece.completion_tokens), choices=False)
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001
        yield _error_event(e)
    finally:
        await pieces.aclose()


class EventStream(Response):
    """Server-sent events from an async generator. Unlike starlette's StreamingResponse it always
    listens for the client leaving (also while the request waits for a slot) and always closes the
    generator and the request's ticket, however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, events, ticket: Ticket):
        self.events, self.ticket = events, ticket
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream():
                    try:
                        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                        async for event in self.events:
                            await send({"type": "http.response.body", "body": event.encode("utf-8"),
                                        "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # the client is gone
                        pass
                    finally:
                        group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(_until_disconnect, receive, group.cancel_scope)
        finally:
            self.ticket.abandon()
            with anyio.CancelScope(shield=True):
                await self.events.aclose()


__all__ = ["MAX_BODY_BYTES", "EventStream", "create_app"]
