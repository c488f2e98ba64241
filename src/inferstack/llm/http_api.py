"""OpenAI-compatible routes and the KServe generate extension, on the server's HTTP port.

* ``GET /v1/models``, ``GET /v1/models/{model}``
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
  server-sent events ending in ``data: [DONE]``)
* ``POST /v1/embeddings`` (models with ``backend: "embedding"``)
* ``POST /v2/models/{m}[/versions/{v}]/generate`` and ``/generate_stream`` (SSE)

Errors on ``/v1`` use OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with the status of the underlying error (400 bad field, 404 unknown
model, 429 queue full with Retry-After, 503 not ready); the generate extension
answers ``{"error": "..."}`` like the rest of ``/v2``. A client that
disconnects aborts its request: the engine frees the slot at its next step.

This module does not import torch: it talks to engines through their methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from inferstack.core.errors import (
    CancelledError,
    InferenceServerError,
    InvalidArgumentError,
    NotFoundError,
)
from inferstack.llm.params import SamplingParams
from inferstack.observability.logs import request_id_var

if TYPE_CHECKING:
    from inferstack.transports.http import HttpApi

log = logging.getLogger("inferstack.llm.http")

_JSON = "application/json"
_SSE = "text/event-stream"
_ERROR_TYPES = {
    400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
    429: "rate_limit_error", 499: "cancelled", 500: "server_error", 503: "service_unavailable_error",
}


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=_JSON, headers=headers)


def _retry_headers(error: InferenceServerError) -> dict[str, str] | None:
    if error.retry_after is None:
        return None
    return {"Retry-After": str(max(1, round(error.retry_after)))}


def openai_error(error: InferenceServerError) -> Response:
    status = error.http_status
    body = {"error": {
        "message": error.message,
        "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": getattr(error, "param", None),
        "code": getattr(error, "code", None) or (
            "model_not_found" if isinstance(error, NotFoundError) and "model" in error.message else None),
    }}
    return _json(body, status, _retry_headers(error))


class FieldError(InvalidArgumentError):
    """A bad request field; ``param`` names it in OpenAI's error body."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


async def _cancel_on_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[Any]) -> Any:
    from inferstack.transports.http import _cancel_on_disconnect as cancel

    return await cancel(receive, work)


# -- request parsing ------------------------------------------------------------------------


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise FieldError(name, f"{name!r} must be {names}, got {type(value).__name__}")
    return value


def sampling_params(body: dict[str, Any], engine: Any, *, chat: bool) -> SamplingParams:
    """The sampling fields of an OpenAI request, checked one by one (the message names the field)."""
    settings = engine.settings
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise FieldError("n", f"'n' must be 1 (one choice per request), got {n}")
    best_of = _get(body, "best_of", (int,), 1)
    if best_of != 1:
        raise FieldError("best_of", f"'best_of' must be 1, got {best_of}")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0) != 0:
            raise FieldError(name, f"{name!r} is not supported (only 0)")
    if body.get("logit_bias"):
        raise FieldError("logit_bias", "'logit_bias' is not supported")
    if not chat and body.get("echo"):
        raise FieldError("echo", "'echo' is not supported")
    if chat and (body.get("tools") or body.get("functions")):
        raise FieldError("tools", "tool calling is not supported by this server")
    if chat and body.get("response_format") not in (None, {"type": "text"}):
        raise FieldError("response_format", "only response_format {'type': 'text'} is supported")
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      (int,), None)
    if max_tokens is None:
        # OpenAI: completions default to 16 tokens, chat to whatever fits the context.
        max_tokens = settings.default_max_tokens if not chat else engine.max_model_len
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list):
        raise FieldError("stop", "'stop' must be a string or a list of strings")
    if chat:
        logprobs = None
        if _get(body, "logprobs", (bool,), False):
            logprobs = _get(body, "top_logprobs", (int,), 0)
        elif body.get("top_logprobs") is not None:
            raise FieldError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:
        logprobs = _get(body, "logprobs", (int,), None)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_get(body, "temperature", (int, float), settings.default_temperature),
        top_p=_get(body, "top_p", (int, float), settings.default_top_p),
        top_k=_get(body, "top_k", (int,), settings.default_top_k),
        seed=_get(body, "seed", (int,), None),
        stop=stop,
        stop_token_ids=_get(body, "stop_token_ids", (list,), []),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        logprobs=logprobs,
    )
    try:
        params.validate()
    except InvalidArgumentError as exc:
        param = exc.message.split("'")[1] if exc.message.startswith("'") else None
        if chat and param == "logprobs":
            param = "top_logprobs"
        raise FieldError(param or "", exc.message) from None
    return params


def _prompts(body: dict[str, Any], engine: Any) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of lists of ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise FieldError("prompt", "'prompt' is required")
    if isinstance(prompt, str):
        return [engine.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [engine.encode(p) for p in prompt]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise FieldError("prompt", "'prompt' must be a string, a list of strings, a list of token ids, "
                               "or a list of lists of token ids (none empty)")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "'messages' must be a non-empty list of {role, content} objects")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise FieldError("messages", f"'messages[{i}]' must be an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise FieldError("messages", f"'messages[{i}].content': only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise FieldError("messages", f"'messages[{i}].content' must be a string or a list of text parts")
        result.append({"role": message["role"], "content": content})
    return result


class LLMRoutes:
    """The /v1 and generate routes, bound to the server's HttpApi (manager, body limit, counters)."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self.manager = api.manager

    # -- plumbing ---------------------------------------------------------------------

    def handler(self, func: Callable[..., Awaitable[Response]], *, openai: bool) -> Callable[[Request], Awaitable[Response]]:
        name = func.__name__
        api = self.api

        async def endpoint(request: Request) -> Response:
            from inferstack.transports.http import _id_prefix, _ids

            request_id = request.headers.get("x-request-id") or f"{_id_prefix}-{next(_ids)}"
            token = request_id_var.set(request_id)
            try:
                response = await func(request, **request.path_params)
            except InferenceServerError as error:
                api._log_error(request.method, request.url.path, error)
                response = openai_error(error) if openai else _json({"error": error.message}, error.http_status,
                                                                     _retry_headers(error))
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                error = InferenceServerError("internal server error; see the server log")
                response = openai_error(error) if openai else _json({"error": error.message}, 500)
            finally:
                request_id_var.reset(token)
            response.headers["x-request-id"] = request_id
            api.responses[(name, response.status_code)] += 1
            return response

        return endpoint

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await self.api.read_body(request)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidArgumentError(f"malformed JSON in the request body: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgumentError("the request body must be a JSON object")
        return body

    def _engine(self, model: Any, version: str = "") -> Any:
        if not isinstance(model, str) or not model:
            raise FieldError("model", "'model' must be a non-empty string")
        found = self.manager.get(model, version)
        engines = getattr(found, "engines", None)
        if not engines:
            raise FieldError("model", f"model {model!r} is not a generation model "
                                      f"(backend {found.config.backend or found.config.platform!r})")
        return min(engines, key=lambda e: e.load)

    # -- /v1/models -------------------------------------------------------------------

    def _model_card(self, name: str, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "inferstack"}

    def _served(self) -> list[Any]:
        return [v for v in self.manager.loaded_versions()
                if v.state.value == "READY" and (getattr(v, "engines", None) or v.config.backend == "embedding")]

    async def list_models(self, request: Request) -> Response:
        seen: dict[str, Any] = {}
        for version in self._served():
            seen.setdefault(version.name, version)
        created = int(time.time())
        return _json({"object": "list", "data": [self._model_card(n, created) for n in sorted(seen)]})

    async def get_model(self, request: Request, model: str) -> Response:
        for version in self._served():
            if version.name == model:
                return _json(self._model_card(model, int(time.time())))
        raise NotFoundError(f"the model {model!r} does not exist or is not a generation or embedding model")

    # -- completions ------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        body = await self._body(request)
        engine = self._engine(body.get("model"))
        stream = _get(body, "stream", (bool,), False)
        options = _get(body, "stream_options", (dict,), None)
        if options is not None and not stream:
            raise FieldError("stream_options", "'stream_options' is only allowed with 'stream': true")
        include_usage = bool(options and options.get("include_usage"))
        if chat:
            prompts = [engine.apply_chat_template(_messages(body))]
        else:
            prompts = _prompts(body, engine)
        params = sampling_params(body, engine, chat=chat)
        for ids in prompts:
            if len(ids) >= engine.max_model_len:
                raise FieldError("messages" if chat else "prompt",
                                 f"the prompt has {len(ids)} tokens; model {engine.name!r} accepts at most "
                                 f"{engine.max_model_len - 1}", code="context_length_exceeded")
        # Submitted now, before any byte of the answer: a full queue is a 429, not a broken stream.
        streams = []
        try:
            for ids in prompts:
                streams.append(engine.stream(ids, _copy(params)))
        except BaseException:
            for s in streams:
                s.close()
            raise
        name = body["model"]
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if stream:
            events = _chat_events if chat else _completion_events
            return StreamingResponse(
                _sse_stream(events(streams, prompts, engine, name, ident, created, include_usage), streams),
                media_type=_SSE, headers={"Cache-Control": "no-cache"},
            )
        try:
            results = await _cancel_on_disconnect(request.receive, asyncio.gather(*(_collect(s) for s in streams)))
        finally:
            for s in streams:
                s.close()
        if results is None:
            raise CancelledError("client disconnected; request aborted")
        choices = []
        prompt_tokens = completion_tokens = 0
        for index, (text, outputs, final) in enumerate(results):
            prompt_tokens += final.prompt_tokens
            completion_tokens += final.completion_tokens
            if chat:
                choices.append({
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": _chat_logprobs(engine, outputs) if params.logprobs is not None else None,
                    "finish_reason": final.finish_reason,
                })
            else:
                choices.append({
                    "index": index,
                    "text": text,
                    "logprobs": _completion_logprobs(engine, outputs) if params.logprobs is not None else None,
                    "finish_reason": final.finish_reason,
                })
        return _json({
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": name,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        })

    # -- embeddings -------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        from inferstack.llm.embeddings import embeddings_response

        body = await self._body(request)
        return _json(await embeddings_response(self.manager, body, request.receive))

    # -- KServe generate extension -------------------------------------------------------

    def _generate_request(self, body: dict[str, Any], engine: Any) -> tuple[list[int], SamplingParams]:
        from inferstack.llm.backend import sampling_from_json

        text = body.get("text_input")
        if not isinstance(text, str):
            raise InvalidArgumentError("'text_input' must be a string")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgumentError("'parameters' must be a JSON object")
        merged = {k: v for k, v in body.items() if k not in ("text_input", "parameters", "id")}
        merged.update(parameters)
        merged.pop("stream", None)
        return engine.encode(text), sampling_from_json(engine, merged, "parameters: ")

    async def generate(self, request: Request, model: str, version: str = "") -> Response:
        engine = self._engine(model, version)
        body = await self._body(request)
        ids, params = self._generate_request(body, engine)
        stream = engine.stream(ids, params)
        try:
            result = await _cancel_on_disconnect(request.receive, _collect(stream))
        finally:
            stream.close()
        if result is None:
            raise CancelledError("client disconnected; request aborted")
        text, _, final = result
        found = self.manager.get(model, version)
        answer = {"model_name": model, "model_version": found.version_str, "text_output": text,
                  "finish_reason": final.finish_reason, "prompt_tokens": final.prompt_tokens,
                  "completion_tokens": final.completion_tokens}
        if "id" in body:
            answer["id"] = body["id"]
        return _json(answer)

    async def generate_stream(self, request: Request, model: str, version: str = "") -> Response:
        engine = self._engine(model, version)
        found = self.manager.get(model, version)
        body = await self._body(request)
        ids, params = self._generate_request(body, engine)
        stream = engine.stream(ids, params)

        async def events() -> AsyncIterator[bytes]:
            async for output in stream:
                if not output.text and output.finish_reason is None:
                    continue
                event: dict[str, Any] = {"model_name": model, "model_version": found.version_str,
                                         "text_output": output.text}
                if output.finish_reason is not None:
                    event.update(finish_reason=output.finish_reason, prompt_tokens=output.prompt_tokens,
                                 completion_tokens=output.completion_tokens)
                if "id" in body:
                    event["id"] = body["id"]
                yield _sse(event)

        return StreamingResponse(_sse_stream(events(), [stream], done=False), media_type=_SSE,
                                 headers={"Cache-Control": "no-cache"})

    # -- routes -----------------------------------------------------------------------

    def routes(self) -> list[Route]:
        def o(func: Callable[..., Awaitable[Response]]) -> Any:
            return self.handler(func, openai=True)

        def v2(func: Callable[..., Awaitable[Response]]) -> Any:
            return self.handler(func, openai=False)

        routes = [
            Route("/v1/models", o(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", o(self.get_model), methods=["GET"]),
            Route("/v1/completions", o(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", o(self.chat_completions), methods=["POST"]),
            Route("/v1/embeddings", o(self.embeddings), methods=["POST"]),
        ]
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [
                Route(f"{base}/generate", v2(self.generate), methods=["POST"]),
                Route(f"{base}/generate_stream", v2(self.generate_stream), methods=["POST"]),
            ]
        return routes


def routes(api: HttpApi) -> list[Route]:
    """The routes to append to the server's HTTP app."""
    return LLMRoutes(api).routes()


# -- helpers --------------------------------------------------------------------------------


def _copy(params: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))


async def _collect(stream: Any) -> tuple[str, list[Any], Any]:
    """Every output of a stream: (text, outputs, final output)."""
    outputs = []
    async for output in stream:
        outputs.append(output)
    return "".join(o.text for o in outputs), outputs, outputs[-1]


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(engine: Any, token: int) -> str:
    return engine.tokenizer.decode([token])


def _completion_logprobs(engine: Any, outputs: list[Any]) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for output in outputs:
        for choice in output.choices:
            text = _token_text(engine, choice.token)
            tokens.append(text)
            token_logprobs.append(choice.logprob)
            top.append({_token_text(engine, t): lp for t, lp in (choice.top or [])})
            offsets.append(offset)
            offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(engine: Any, outputs: list[Any]) -> dict[str, Any]:
    content = []
    for output in outputs:
        for choice in output.choices:
            text = _token_text(engine, choice.token)
            content.append({
                "token": text, "logprob": choice.logprob, "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": (t := _token_text(engine, tok)), "logprob": lp, "bytes": list(t.encode())}
                    for tok, lp in (choice.top or [])
                ],
            })
    return {"content": content}


async def _merge(streams: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """(index, output) from several streams as they come."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: Any) -> None:
        try:
            async for output in stream:
                await queue.put((index, output, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()


async def _completion_events(streams: list[Any], prompts: list[list[int]], engine: Any, model: str, ident: str,
                             created: int, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    want_logprobs = streams[0].sequence.params.logprobs is not None
    completion = 0
    async for index, output in _merge(streams):
        if not output.text and output.finish_reason is None and not want_logprobs:
            continue  # a token that completes no character yet
        choice: dict[str, Any] = {"index": index, "text": output.text, "logprobs": None,
                                  "finish_reason": output.finish_reason}
        if want_logprobs:
            choice["logprobs"] = _completion_logprobs(engine, [output])
        if output.finish_reason is not None:
            completion += output.completion_tokens
        chunk: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created, "model": model,
                                 "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        yield chunk
    if include_usage:
        yield {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": _usage(sum(len(p) for p in prompts), completion)}


async def _chat_events(streams: list[Any], prompts: list[list[int]], engine: Any, model: str, ident: str,
                       created: int, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    want_logprobs = streams[0].sequence.params.logprobs is not None

    def chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return body

    yield chunk({"role": "assistant", "content": ""}, None)
    completion = 0
    async for _, output in _merge(streams):
        logprobs = _chat_logprobs(engine, [output]) if want_logprobs else None
        if output.finish_reason is None:
            if output.text or want_logprobs:
                yield chunk({"content": output.text}, None, logprobs)
            continue
        completion = output.completion_tokens
        if output.text:
            yield chunk({"content": output.text}, None, logprobs)
        yield chunk({}, output.finish_reason)
    if include_usage:
        yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": _usage(sum(len(p) for p in prompts), completion)}


async def _sse_stream(events: AsyncIterator[Any], streams: list[Any], *, done: bool = True) -> AsyncIterator[bytes]:
    """Server-sent events; an error after the headers went out becomes an ``error`` event.
    Closing (client gone) aborts every request of the stream."""
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event if isinstance(event, bytes) else _sse(event)
    except InferenceServerError as error:
        body = openai_error(error).body if done else orjson.dumps({"error": error.message})
        yield _sse(bytes(body))
    finally:
        for stream in streams:
            stream.close()
    if done:
        yield b"data: [DONE]\n\n"
