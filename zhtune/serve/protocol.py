"""The OpenAI API's request and response bodies as pydantic models (the subset zhtune serves).

Requests are validated strictly (`"5"` is not an int, `true` is not a number) and unknown fields are
refused, as OpenAI's own API does. Fields that OpenAI defines but this server cannot honour (`n` > 1,
`tools`, `logprobs`, ...) are accepted by the schema and refused by `unsupported()` with a message
that names the field. `APIError` carries one error in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

# -- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def param_name(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_type_tag(part) -> bool:
    """pydantic puts the union member tried into an error's loc ('str', 'list[...]', 'TextPart')."""
    if isinstance(part, int):
        return False
    return (part in ("str", "int", "float", "bool", "list", "dict", "none") or part[:1].isupper()
            or any(c in part for c in "[-"))


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field."""
    err = e.errors()[0]
    param = param_name(tuple(p for p in err["loc"] if not _is_type_tag(p)))
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if err["type"] == "missing":
        return APIError(400, f"'{param}' is a required property", param=param, code="missing_required_parameter")
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return APIError(400, f"Invalid value for '{param}': {err['msg']} (got {shown}).", param=param,
                    code="invalid_value")


# -- requests ------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """image_url, input_audio, file ...: recognised so the error says they are unsupported."""
    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vllm's; accepted, usage comes in the last chunk only


class _SamplingRequest(_Strict):
    """Fields the chat and the text completion endpoints share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vllm's extension; -1 or 0: off
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)  # vllm's extension
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> APIError | None:
        """The first field set to something this server cannot do, as a 400 naming it."""
        if self.n != 1:
            return _unsupported("n", f"n={self.n} is not supported: this server returns one choice per request.")
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return _unsupported(name, f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead.")
        if self.logit_bias:
            return _unsupported("logit_bias", "logit_bias is not supported.")
        if self.stream_options is not None and not self.stream:
            return _unsupported("stream_options", "stream_options is only allowed with stream: true.")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            return APIError(400, "stop: give at most 4 non-empty strings.", param="stop", code="invalid_value")
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def unsupported(self) -> APIError | None:
        for name in ("tools", "tool_choice", "functions", "function_call", "audio", "reasoning_effort",
                     "top_logprobs"):
            if getattr(self, name) not in (None, [], "none"):
                return _unsupported(name, f"{name} is not supported by this server.")
        if self.logprobs:
            return _unsupported("logprobs", "logprobs is not supported by this server.")
        if self.parallel_tool_calls:
            return _unsupported("parallel_tool_calls", "parallel_tool_calls is not supported (no tools).")
        if self.response_format and self.response_format.get("type") != "text":
            return _unsupported("response_format", "only response_format {\"type\": \"text\"} is supported.")
        if self.modalities and self.modalities != ["text"]:
            return _unsupported("modalities", "only the text modality is supported.")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            return APIError(400, "max_tokens and max_completion_tokens differ: give one of them.",
                            param="max_completion_tokens", code="invalid_value")
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function") or m.tool_calls or m.tool_call_id:
                return _unsupported(f"messages[{i}].role", f"messages[{i}]: tool and function messages are not "
                                    "supported; roles are system, user and assistant.")
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if not isinstance(part, TextPart):
                        return _unsupported(f"messages[{i}].content[{j}].type", f"messages[{i}].content[{j}]: "
                                            f"content of type '{part.type}' is not supported; send text.")
            elif m.content is None:
                return APIError(400, f"messages[{i}] has no content.", param=f"messages[{i}].content",
                                code="invalid_value")
        return super().unsupported()

    def reply_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        """The messages as the templates take them: {"role", "content"} with text content."""
        out = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported(self) -> APIError | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return _unsupported("prompt", "give one prompt per request (a string), not a batch.")
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                return _unsupported(name, f"{name} is not supported by this server.")
        if self.best_of not in (None, 1):
            return _unsupported("best_of", f"best_of={self.best_of} is not supported.")
        return super().unsupported()

    def reply_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# -- responses -----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int = 0
    finish_reason: FinishReason | None = None
    logprobs: None = None


class _Reply(BaseModel):
    """What every completion object and chunk carries besides its object name and choices."""
    id: str
    created: int
    model: str
    usage: Usage | None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletionResponse(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """As OpenAI sends it: only the keys that are set (the role first, then content, then `{}`)."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Choice):
    delta: DeltaMessage


class ChatCompletionChunk(_Reply):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Reply):
    """Also each chunk of a streamed text completion (with `usage` None but in the last)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zhtune"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
