"""The Starlette application: POST /v1/chat/completions and GET /v1/models, OpenAI's errors throughout."""

import hmac
import json
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import protocol
from .protocol import APIError
from .worker import QueueFull, Worker

MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
log = logging.getLogger("slm.serve")


def error_response(error: APIError, headers=None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def make_app(worker: Worker, model_name: str, api_key: str | None = None) -> Starlette:
    def authorised(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    def unauthorised() -> JSONResponse:
        return error_response(APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                       param=None, code="invalid_api_key"))

    async def models(request: Request):
        if not authorised(request):
            return unauthorised()
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "slm"}]})

    async def completions(request: Request):
        if not authorised(request):
            return unauthorised()
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
            return StreamingResponse(_stream(job, settings, request), media_type="text/event-stream")
        try:
            message, finish, usage = await _wait(job, request)
        except _Gone:
            return JSONResponse({}, status_code=499)
        except Exception:
            log.exception("decoding failed")
            return error_response(APIError(500, "the server failed to decode this request", type_="server_error",
                                           code="internal_error"))
        return JSONResponse(protocol.completion(settings, message, finish, usage))

    async def _stream(job, settings, request):
        try:
            message, finish, usage = await _wait(job, request)
        except _Gone:
            return
        except Exception:
            log.exception("decoding failed")
            yield protocol.sse(APIError(500, "the server failed to decode this request", type_="server_error",
                                        code="internal_error").body())
            yield b"data: [DONE]\n\n"
            return
        answer = protocol.completion(settings, message, finish, usage)
        answer["_include_usage"] = settings["include_usage"]
        for chunk in protocol.chunks(answer):
            yield protocol.sse(chunk)
        yield b"data: [DONE]\n\n"

    async def not_found(request, exc):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def method_not_allowed(request, exc):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    async def server_error(request, exc):
        log.exception("unhandled error", exc_info=exc)
        return error_response(APIError(500, "internal server error", type_="server_error", code="internal_error"))

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])],
                     exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})


class _Gone(Exception):
    """The client disconnected while its request waited or decoded."""


async def _wait(job, request: Request):
    import asyncio
    while True:
        done, _ = await asyncio.wait({job.future}, timeout=0.1)
        if done:
            return job.future.result()
        if await request.is_disconnected():
            job.disconnected.set()
            raise _Gone


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
