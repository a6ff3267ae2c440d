"""The Starlette application: POST /v1/chat/completions, GET /v1/models[/{id}], GET /health; OpenAI's errors throughout.

A streamed answer sends its role at once, then each delta as the decode thread makes it (`worker`), then one
finish_reason chunk, the usage chunk when stream_options.include_usage, and `data: [DONE]`. A client that
disconnects, streaming or not, marks its job gone: the worker skips or drops it. An error inside the server
is logged with its traceback and answered as a 500 (or, once a stream has started, an error event) without it.
"""

import asyncio
import hmac
import json
import logging

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import protocol
from .protocol import APIError
from .worker import QueueFull, Worker

MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.1
log = logging.getLogger("slm.serve")
INTERNAL_ERROR = APIError(500, "the server failed to decode this request", type_="server_error", code="internal_error")


def error_response(error: APIError, headers=None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def make_app(worker: Worker, model_name: str, api_key: str | None = None) -> Starlette:
    model = {"id": model_name, "object": "model", "created": 0, "owned_by": "slm"}

    def unauthorised(request: Request) -> JSONResponse | None:
        """The 401 for a missing or wrong Bearer token, None when the request may pass."""
        given = request.headers.get("authorization", "")
        if api_key is None or hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return None
        return error_response(APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                       code="invalid_api_key"))

    async def health(request: Request):
        return JSONResponse({"status": "ok", **worker.status()})

    async def models(request: Request):
        return unauthorised(request) or JSONResponse({"object": "list", "data": [model]})

    async def one_model(request: Request):
        if refused := unauthorised(request):
            return refused
        if request.path_params["id"] != model_name:
            return error_response(APIError(404, f"the model {request.path_params['id']!r} does not exist; this "
                                                f"server serves {model_name!r}", param="model", code="model_not_found"))
        return JSONResponse(model)

    async def completions(request: Request):
        if refused := unauthorised(request):
            return refused
        try:
            raw = await _read_body(request)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
            settings = protocol.validate(body, model_name)
            job = worker.submit(settings)
        except APIError as error:
            return error_response(error)
        except QueueFull:
            return error_response(APIError(429, "the server's queue is full: retry later", type_="rate_limit_error",
                                           code="rate_limit_exceeded"), {"Retry-After": str(RETRY_AFTER_S)})
        if settings["stream"]:
            # The background task runs when the response ends, a disconnect included: the job stops there.
            return StreamingResponse(_events(job, settings), media_type="text/event-stream",
                                     background=BackgroundTask(job.gone.set))
        event = await _outcome(job, request)
        if event is None:   # the client went away; nobody reads this
            return Response(status_code=499)
        if event[0] == "error":
            log.error("decoding failed", exc_info=event[1])
            return error_response(INTERNAL_ERROR)
        _, message, finish_reason, usage = event
        return JSONResponse(protocol.completion(settings, message, finish_reason, usage))

    async def not_found(request, exc):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def method_not_allowed(request, exc):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    async def server_error(request, exc):
        log.error("unhandled error", exc_info=exc)
        return error_response(APIError(500, "internal server error", type_="server_error", code="internal_error"))

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/models/{id:path}", one_model, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})


async def _outcome(job, request: Request):
    """The job's end or error event; None when the client disconnects first (the job is then marked gone)."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.gone.set()
                return None
            continue
        if event[0] != "delta":
            return event


async def _events(job, settings: dict):
    """The server-sent events of a streamed answer."""
    head = protocol.chunk_head(settings)
    yield protocol.sse(protocol.chunk(head, {"role": "assistant"}))
    while True:
        event = await job.events.get()
        if event[0] == "delta":
            yield protocol.sse(protocol.chunk(head, event[1]))
        elif event[0] == "end":
            _, _, finish_reason, usage = event
            yield protocol.sse(protocol.chunk(head, {}, finish_reason))
            if settings["include_usage"]:
                yield protocol.sse(protocol.usage_chunk(head, usage))
            break
        else:
            log.error("decoding failed", exc_info=event[1])
            yield protocol.sse(INTERNAL_ERROR.body())
            break
    yield b"data: [DONE]\n\n"


async def _read_body(request: Request) -> bytes:
    """The body, or a 413 once it passes MAX_BODY_BYTES; the rest is read and dropped (not kept), so the
    client gets the 413 instead of a connection reset while it is still sending."""
    body, over = bytearray(), False
    async for part in request.stream():
        over = over or len(body) + len(part) > MAX_BODY_BYTES
        if not over:
            body += part
    if over:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    return bytes(body)
