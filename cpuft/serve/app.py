"""The FastAPI app: OpenAI-compatible routes in front of one `Engine`.

Routes: POST /v1/chat/completions, POST /v1/completions (both streamed over SSE with
`"stream": true`, ending in `data: [DONE]`), GET /v1/models, GET /v1/models/{id}, GET /health
(no key needed; 503 once the model worker has stopped), and vLLM's POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (adapters mode, only with an API key: without one anyone who reaches the
port could make the server read any adapter path on its disk, so they answer 403).

A request's `model` picks the served model (in adapters mode, the adapter); logprobs, echo and
penalties are computed by the engine (engine.py says how) and shaped here as OpenAI's.

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 malformed JSON, a wrong type, a missing or unknown field, a value out of range, a prompt
that with max_tokens does not fit the context (code context_length_exceeded); 401 a missing or
wrong `Authorization: Bearer KEY` when the server has an API key; 403 adapter loading without an
API key; 404 an unknown model or route;
429 the queue is full (Retry-After: 1); 503 the worker has stopped; 500 a failed generation.

A client that closes its connection before its reply is complete, streamed or not, has its request
dropped from the queue or its row stopped at the next token, counted in /health's `cancelled`.

Prompts are tokenized here, on the event loop (the tokenizer is fast and only read, never
reconfigured, so sharing it with the worker thread is safe); the model runs only in the worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cpuft.errors import UserError, first_line
from cpuft.inference.generate import prompt_ids
from cpuft.serve import protocol
from cpuft.serve.engine import (
    AdapterRefused,
    Completion,
    Delta,
    Engine,
    EngineStopped,
    Failed,
    Finished,
    QueueFull,
    ServedModel,
)


@dataclass(frozen=True)
class ServeConfig:
    model_name: str  # the served ids, for /health and messages (the engine holds the live list)
    context_length: int  # prompt + max_tokens may not exceed this
    default_max_tokens: int = 256  # when a request names none (capped by what is left of the context)
    api_key: str | None = None


class APIError(Exception):
    """An error a client caused or should know about, answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.type, self.param, self.code), self.status, headers=self.headers)


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="cpuft serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the"
                           " key the server was started with (--api-key).", "authentication_error", code="invalid_api_key")

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        message, param = describe_validation_errors(exc.errors())
        return JSONResponse(protocol.error_body(message, param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; cpuft serve has /v1/chat/completions, /v1/completions, /v1/models and /health"
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(protocol.error_body(message, code=str(exc.status_code)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return JSONResponse(protocol.error_body(f"internal error: {first_line(exc)}", "server_error"), 500)

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        names = [m.name for m in engine.served()]
        body = {"status": "ok" if engine.alive else "stopped", "model": ", ".join(names), "models": names,
                "precision": engine.loaded.precision, "max_batch_size": engine.max_batch_size,
                "max_queue": engine.max_queue, "context_length": config.context_length, **engine.stats()}
        return JSONResponse(body, 200 if engine.alive else 503)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models():
        return {"object": "list", "data": [protocol.model_card(m.name, m.created) for m in engine.served()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def get_model(model_id: str):
        served = check_model(model_id)
        return protocol.model_card(served.name, served.created)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: protocol.ChatCompletionRequest, http_request: Request):
        served = check_model(request.model)
        tokenizer = served.tokenizer
        if not tokenizer.chat_template:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions with plain text.", param="messages")
        messages = [m.for_template() for m in request.messages]
        ids = tokenize(lambda: prompt_ids(tokenizer, messages=messages), "messages")
        job = submit(request, ids, served)
        request_id = protocol.new_id("chatcmpl")
        want_logprobs = request.logprobs is True
        if not request.stream:
            result = await outcome(job, http_request)
            return protocol.chat_completion(request_id, served.name, result.text, result.finish_reason,
                                            result.prompt_tokens, result.completion_tokens,
                                            protocol.chat_logprobs(result.logprobs) if want_logprobs else None)

        def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
            return protocol.chat_chunk(request_id, served.name, delta, finish_reason, logprobs)

        def delta_chunk(event: Delta) -> dict | None:
            if not event.text and not event.logprobs:
                return None
            return chunk({"content": event.text}, logprobs=protocol.chat_logprobs(event.logprobs) if want_logprobs else None)

        first = chunk({"role": "assistant", "content": ""})
        return sse_response(stream_events(job, request, [first], delta_chunk, lambda reason: chunk({}, reason),
                                          request_id, "chat.completion.chunk", served.name))

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(request: protocol.CompletionRequest, http_request: Request):
        served = check_model(request.model)
        tokenizer = served.tokenizer
        token_ids = request.prompt_token_ids
        if token_ids is not None:
            vocabulary = len(tokenizer)
            if max(token_ids) >= vocabulary:
                raise APIError(400, f"the prompt has token id {max(token_ids)}, beyond this model's vocabulary of"
                               f" {vocabulary} tokens.", param="prompt")
            ids = list(token_ids)
            prompt_text = tokenizer.decode(ids)
        else:
            prompt_text = request.prompt_text
            ids = tokenize(lambda: prompt_ids(tokenizer, text=prompt_text), "prompt")
        job = submit(request, ids, served)
        request_id = protocol.new_id("cmpl")
        want_logprobs = request.logprobs is not None
        echoed = prompt_text if request.echo else ""
        if not request.stream:
            result = await outcome(job, http_request)
            logprobs = None
            if want_logprobs:
                logprobs = protocol.completion_logprobs(result.prompt_logprobs or ())
                for key, values in protocol.completion_logprobs(result.logprobs, len(echoed)).items():
                    logprobs[key] += values
            return protocol.text_completion(request_id, served.name, echoed + result.text, result.finish_reason,
                                            result.prompt_tokens, result.completion_tokens, logprobs)

        sent = [len(echoed)]  # characters of this choice's text sent so far, for text_offset

        def chunk(text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
            return protocol.completion_chunk(request_id, served.name, text, finish_reason, logprobs)

        def delta_chunk(event: Delta) -> dict | None:
            if event.prompt_logprobs is not None:  # echo with logprobs: the prompt's, with the echoed prompt
                return chunk(echoed, logprobs=protocol.completion_logprobs(event.prompt_logprobs))
            if not event.text and not event.logprobs:
                return None
            logprobs = protocol.completion_logprobs(event.logprobs, sent[0]) if want_logprobs else None
            sent[0] += len(event.text)
            return chunk(event.text, logprobs=logprobs)

        # Echo without logprobs: the prompt goes first, as it is; with logprobs it comes with them.
        first = [chunk(echoed)] if echoed and not want_logprobs else []
        return sse_response(stream_events(job, request, first, delta_chunk, lambda reason: chunk("", reason),
                                          request_id, "text_completion", served.name))

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(require_key)])
    async def load_lora_adapter(request: protocol.LoadLoraAdapterRequest):
        require_adapter_admin()
        job = adapter_control(lambda: engine.load_adapter(request.lora_name, request.lora_path))
        result = await job.result()
        if isinstance(result, Failed):
            raise APIError(400, f"cannot load the adapter '{request.lora_name}': {result.message}", param="lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(require_key)])
    async def unload_lora_adapter(request: protocol.UnloadLoraAdapterRequest):
        require_adapter_admin()
        job = adapter_control(lambda: engine.unload_adapter(request.lora_name))
        result = await job.result()
        if isinstance(result, Failed):
            raise APIError(500, f"unloading the adapter '{request.lora_name}' failed: {result.message}", "server_error")
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    # ------------------------------------------------------------------ helpers

    def require_adapter_admin() -> None:
        if config.api_key is None:
            raise APIError(403, "loading and unloading adapters needs an API key: restart cpuft serve with --api-key"
                           " (or CPUFT_API_KEY), since without one anyone who reaches the port could make the server"
                           " read any adapter directory on its disk.", "permission_error", code="api_key_required")

    def adapter_control(start):
        try:
            return start()
        except AdapterRefused as exc:
            raise APIError(exc.status, str(exc), param="lora_name",
                           code="model_not_found" if exc.status == 404 else None) from None
        except EngineStopped as exc:
            raise APIError(503, f"{exc}; restart cpuft serve.", "server_error", code="unavailable") from None

    def check_model(name: str) -> ServedModel:
        served = engine.lookup(name)
        if served is None:
            names = ", ".join(f"'{m.name}'" for m in engine.served())
            raise APIError(404, f"the model '{name}' does not exist; this server serves {names} (GET /v1/models).",
                           param="model", code="model_not_found")
        return served

    def tokenize(encode, param: str) -> list[int]:
        try:
            ids = encode()["input_ids"][0].tolist()
        except UserError as exc:
            raise APIError(400, str(exc), param=param) from None
        except Exception as exc:  # a chat template that refuses the conversation (e.g. roles must alternate)
            raise APIError(400, f"cannot format the {param}: {first_line(exc)}", param=param) from None
        if not ids:
            raise APIError(400, f"the {param} is empty.", param=param)
        return ids

    def submit(request: protocol.ChatCompletionRequest | protocol.CompletionRequest, ids: list[int], served: ServedModel):
        room = config.context_length - len(ids)
        asked = request.requested_max_tokens()
        if room < (0 if asked == 0 else 1) or (asked is not None and asked > room):
            wanted = f" and max_tokens asks for {asked} ({len(ids) + asked} in all)" if asked is not None else ""
            raise APIError(400, f"this model's maximum context length is {config.context_length} tokens; the prompt has"
                           f" {len(ids)} tokens{wanted}. Shorten the prompt or lower max_tokens.",
                           param="messages" if isinstance(request, protocol.ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        top = request.top_logprobs_count()
        echo = isinstance(request, protocol.CompletionRequest) and request.echo
        completion = Completion(
            prompt_ids=tuple(ids), max_tokens=asked if asked is not None else min(config.default_max_tokens, room),
            temperature=request.temperature, top_p=request.top_p, seed=request.seed,
            stop=request.stop_sequences, ignore_eos=request.ignore_eos, stream=request.stream,
            logprobs=top, prompt_logprobs=echo and top is not None,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        )
        try:
            return engine.submit(completion, served)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}. Retry shortly.", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineStopped as exc:
            raise APIError(503, f"{exc}; restart cpuft serve.", "server_error", code="unavailable") from None

    async def outcome(job, http_request: Request) -> Finished:
        """The job's result; if its client hangs up first, the job is cancelled (counted in
        /health's `cancelled`) and nobody is answered.

        Starlette cancels a streamed response whose client leaves (stream_events' `finally`), but
        a plain response is only sent once the result is ready: without this watch a closed
        connection kept the model generating up to max_tokens for nobody.
        """
        result = asyncio.ensure_future(job.result())
        hang_up = asyncio.ensure_future(client_gone(http_request))
        try:
            await asyncio.wait((result, hang_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
            if not result.done():
                result.cancel()  # a cancelled row sends no event, so nothing would ever end this wait
            engine.cancel(job)  # a no-op once finished; stops the row if the client left or this handler was cancelled
        if result.cancelled():
            # 499 (nginx's "client closed request"): uvicorn drops it, as the connection is gone; it shows in the access log.
            raise APIError(499, "the client closed the connection before the reply was ready; its generation was stopped.",
                           code="client_closed_request")
        result = result.result()
        if isinstance(result, Failed):
            raise APIError(500, result.message, "server_error")
        return result

    async def client_gone(http_request: Request) -> None:
        """Returns once the client has closed its connection. The body is already read, so the
        only message left to receive is http.disconnect (as Starlette's StreamingResponse listens)."""
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    async def stream_events(job, request, first: list[dict], delta_chunk, final_chunk, request_id: str, obj: str,
                            model: str) -> AsyncIterator[str]:
        include_usage = request.include_usage
        try:
            for payload in first:
                yield sse(payload, include_usage)
            async for event in job.events():
                if isinstance(event, Delta):
                    payload = delta_chunk(event)
                    if payload is not None:
                        yield sse(payload, include_usage)
                elif isinstance(event, Finished):
                    yield sse(final_chunk(event.finish_reason), include_usage)
                    if include_usage:
                        yield sse(protocol.usage_chunk(request_id, model, obj, event.prompt_tokens, event.completion_tokens))
                else:
                    yield sse(protocol.error_body(event.message, "server_error"))
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream (the response task is cancelled), or the stream ended
            engine.cancel(job)

    return app


def sse(payload: dict, include_usage: bool = False) -> str:
    if include_usage and "usage" not in payload:
        payload = {**payload, "usage": None}  # OpenAI sends usage: null on every chunk but the last
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors -> one message naming each bad field, and the first field (OpenAI's `param`).

    A value that fits no branch of a union (stop: 5 is neither a string nor a list) gives one error
    per branch, located under the branch's type name; they are merged into one line for the field.
    """
    grouped: dict[str | None, list[dict]] = {}
    for error in errors:
        loc = () if error.get("type") == "json_invalid" else error.get("loc", ())  # its loc ends in a character offset
        path = [str(part) for part in loc if part != "body" and not _is_union_branch(part)]
        grouped.setdefault(".".join(path) or None, []).append(error)
    parts = []
    for param, group in list(grouped.items())[:5]:
        first = group[0]
        kind = first.get("type")
        if kind == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "invalid JSON")
            where = first.get("loc", ())[-1] if len(first.get("loc", ())) > 1 else None
            parts.append(f"the request body is not valid JSON ({reason}{f' at character {where}' if isinstance(where, int) else ''})")
        elif kind == "missing" and param is None:
            parts.append("the request body is missing: send a JSON object with Content-Type: application/json")
        elif param is None:
            parts.append(f"the request body must be a JSON object: {first.get('msg')}")
        elif kind == "extra_forbidden":
            parts.append(f"{param}: unknown field; cpuft serve does not support it (docs/serve.md lists the fields it does)")
        elif kind == "missing":
            parts.append(f"{param}: required field missing")
        elif kind == "value_error":
            parts.append(f"{param}: {first.get('msg', '').removeprefix('Value error, ')}")
        else:
            wanted = " or ".join(dict.fromkeys(
                e.get("msg", "") if i == 0 else e.get("msg", "").removeprefix("Input should be ") for i, e in enumerate(group)
            ))
            parts.append(f"{param}: {wanted} (got {json.dumps(first.get('input'), default=str)[:80]})")
    if len(grouped) > 5:
        parts.append(f"and {len(grouped) - 5} more")
    return "; ".join(parts) + ".", next((p for p in grouped if p), None)


def _is_union_branch(part) -> bool:
    # Branch names are types ("str", "list[str]", "TextPart"); field names are lower-case identifiers.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())
