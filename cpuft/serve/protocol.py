"""The OpenAI wire format that `cpuft serve` speaks: request models, response and chunk shapes, errors.

Requests are validated by pydantic models in strict mode with unknown fields forbidden, so a
wrong type ("max_tokens": "ten"), a missing field, a typo ("max_token") or a feature the server
does not have ("tools", "n": 2) is a 400 that names the field, never a silent default.

The subset: /v1/chat/completions and /v1/completions with model, messages / prompt (one string,
or one prompt of token ids as lm-evaluation-harness sends), max_tokens (chat also
max_completion_tokens; completions may ask 0 with echo), temperature, top_p, stop (a string or up
to 4), seed, stream, stream_options.include_usage, user (ignored), n = 1, presence_penalty and
frequency_penalty (-2..2, OpenAI's definition), logprobs (chat: true plus top_logprobs 0..20;
completions: an int 0..20) and echo (completions), and vLLM's `ignore_eos` extension (generate
exactly max_tokens tokens; for benchmarks). Defaults follow OpenAI: temperature 1, top_p 1.
Also vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter bodies.

Logprobs are the log-softmax of the model's raw logits (before penalties, temperature and top_p),
as vLLM reports them by default.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (its completions allow 5; vLLM allows more)


class _Strict(BaseModel):
    # strict: "0.5" is not a float and 1.0 is not an int, as in OpenAI's API; forbid: a typo is an error.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value):
        if value != 1:
            raise ValueError(f"cpuft serve returns one choice per request; n must be 1, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence may not be empty")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; k: the chosen token's logprob and the k most likely alternatives."""
        return None


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError('top_logprobs needs "logprobs": true (as in OpenAI\'s API)')
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    # One prompt: a string, a list of one string, token ids, or a list of one list of token ids
    # (lm-evaluation-harness's local-completions sends the last form).
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
             | Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1, max_length=1)])
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 with echo: score the prompt, generate nothing
    echo: Annotated[bool, Field(validate_default=True)] = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _nothing_to_do(cls, value, info):
        if not value and info.data.get("max_tokens") == 0:
            raise ValueError('max_tokens 0 generates nothing; send it with "echo": true, to score the prompt')
        return value

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, value):
        if value not in (None, 1):
            raise ValueError(f"best_of must be 1 (cpuft serve generates one candidate), got {value}")
        return value

    @property
    def prompt_text(self) -> str | None:
        """The prompt as text; None when it was sent as token ids (`prompt_token_ids`)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if isinstance(self.prompt[0], str) else None

    @property
    def prompt_token_ids(self) -> list[int] | None:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], str):
            return None
        return self.prompt[0] if isinstance(self.prompt[0], list) else self.prompt


class LoadLoraAdapterRequest(_Strict):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)]


class UnloadLoraAdapterRequest(_Strict):
    """vLLM's POST /v1/unload_lora_adapter body (lora_int_id, vLLM's other key, is not used here)."""

    lora_name: Annotated[str, Field(min_length=1)]


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                    logprobs: dict | None = None) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def text_completion(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                    logprobs: dict | None = None) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {
        "id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def chat_logprobs(entries) -> dict:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}.
    `entries`: the engine's TokenLogprob list (one per generated text token)."""
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in e.top or ()]}
        for e in entries
    ], "refusal": None}


def completion_logprobs(entries, offset: int = 0) -> dict:
    """OpenAI's (legacy) completions `logprobs`: parallel lists; a prompt's first token has null
    logprob and null top_logprobs (nothing precedes it). `offset` is added to each text_offset
    (the length of the text already sent, for a stream's later chunks)."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        # dict per token, most likely first; tokens that decode alike share a key (OpenAI's shape has no room for both)
        "top_logprobs": [None if e.top is None else {t: lp for t, lp, _ in e.top} for e in entries],
        "text_offset": [offset + e.offset for e in entries],
    }


def usage_chunk(request_id: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "cpuft"}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
