"""The gateway's routes: a Starlette app over the coordinator's gRPC API.

    GET  /                 the live page (static/index.html)
    GET  /healthz          200 when the coordinator is SERVING, else 503
    GET  /openapi.json     the OpenAPI 3.1 document of this API
    GET  /v1/model         the model, classes, samplers and defaults   (token)
    POST /v1/generate      JSON reply, or Server-Sent Events with      (token)
                           `Accept: text/event-stream`

A request is one gRPC call. Whatever the reply mode, a closed HTTP connection cancels the
call (and so frees the coordinator's slot at the next step): the handler watches the ASGI
`http.disconnect` message itself rather than waiting for the next write to fail, so a
request still queued is cancelled as promptly as one that streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ditserve_client import Event, ModelInfo, Result
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from ..common.logs import log_event
from .auth import TokenCheck, bearer_token
from .config import GatewayConfig
from .messages import ApiError, GenerateBody, event_json
from .openapi import openapi_document
from .upstream import Upstream

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
T = TypeVar("T")


MAX_BODY_BYTES = 64 * 1024
"""Largest request body: a GenerateRequest is tiny (a list of labels and a few options)."""


class ClientGone(Exception):
    """The HTTP client closed the connection before the reply."""


class BodyTooLarge(Exception):
    """The request body exceeds MAX_BODY_BYTES (HTTP 413)."""


async def read_body(request: Request) -> bytes:
    """The body, refused once it grows past MAX_BODY_BYTES (never buffered whole)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.to_json(), error.status, headers=error.headers())


def unauthorized() -> JSONResponse:
    error = ApiError(401, "UNAUTHENTICATED", "a valid 'Authorization: Bearer TOKEN' header is "
                                             "needed")
    return JSONResponse(error.to_json(), 401, headers={"WWW-Authenticate": "Bearer"})


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event (JSON has no raw newlines, so `data` is one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def until_disconnected(receive: Receive) -> None:
    """Returns when the client has closed the connection (the request body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def finish(*tasks: asyncio.Future) -> None:
    """Cancels the tasks still running and waits until each has cleaned up."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """`await work`, cancelled (ClientGone) if the client hangs up first."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await finish(watch, *([] if task.done() else [task]))
    if task.cancelled():
        raise ClientGone
    return task.result()


class EventStream(Response):
    """`text/event-stream` of a Generate call whose first event has arrived; an `error`
    event ends it if the call fails later; a comment line every `heartbeat` seconds of
    silence keeps proxies from closing a queued request."""

    media_type = "text/event-stream"

    def __init__(self, first: Event, events: AsyncIterator[Event], heartbeat: float,
                 on_end: Callable[[str], None]):
        # Like StreamingResponse: no `body`, so no Content-Length header.
        self.status_code, self.background = 200, None
        self.init_headers(SSE_HEADERS)
        self.first, self.events, self.heartbeat, self.on_end = first, events, heartbeat, on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone = not pump.done()
            await finish(pump, watch)
            self.on_end("client_gone" if gone else "done")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, send: Send) -> None:
        async def write(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        await write(sse(*event_json(self.first)))
        pending = asyncio.ensure_future(anext(self.events))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self.heartbeat)
                if not done:
                    await write(b": waiting\n\n")
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                except Exception as failure:  # the call failed after it had started
                    await write(sse("error", ApiError.from_exception(failure).to_json()))
                    return
                await write(sse(*event_json(event)))
                pending = asyncio.ensure_future(anext(self.events))
        finally:
            # Cancelling the pending step runs the SDK's cleanup, which cancels the call.
            await finish(pending)


class Gateway:
    """Handlers of the routes; the state they share: settings, token check, upstream."""

    def __init__(self, config: GatewayConfig, tokens: TokenCheck):
        self.config, self.tokens = config, tokens
        self.upstream = Upstream(config)

    def token(self, request: Request) -> tuple[bool, str | None]:
        """(allowed, token to forward) of the request's Authorization header. Without a
        tokens file nothing is forwarded: one client per distinct caller-made string would
        let anyone open channels without bound."""
        token = bearer_token(request.headers.get("authorization"))
        return self.tokens.accepts(token), token if self.tokens.enabled else None

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def healthz(self, request: Request) -> Response:
        status = await self.upstream.health()
        return JSONResponse({"status": status, "coordinator": self.config.target},
                            200 if status == "SERVING" else 503)

    async def model(self, request: Request) -> Response:
        allowed, token = self.token(request)
        if not allowed:
            return unauthorized()
        try:
            info = await self.upstream.client(token).model_info(refresh=True)
        except Exception as error:
            return error_response(ApiError.from_exception(error))
        return JSONResponse(model_json(info))

    async def generate(self, request: Request) -> Response:
        allowed, token = self.token(request)
        if not allowed:
            return unauthorized()
        try:
            body = GenerateBody.from_json(json.loads(await read_body(request) or b"null"))
        except BodyTooLarge:
            return error_response(ApiError(413, "INVALID_ARGUMENT", f"the body exceeds "
                                                                    f"{MAX_BODY_BYTES} bytes"))
        except ValueError as error:  # json.JSONDecodeError is a ValueError too
            return error_response(ApiError(400, "INVALID_ARGUMENT", f"bad request body: {error}"))
        client = self.upstream.client(token)
        events = client.generate(list(body.class_labels), **body.options())
        stream = "text/event-stream" in request.headers.get("accept", "")
        try:
            if stream:
                first = await unless_disconnected(request.receive, anext(events))
                return EventStream(first, events, self.config.heartbeat, self._log_end(body))
            result = await unless_disconnected(request.receive, _last(events))
        except ClientGone:
            log_event("request_cancelled", request_id=body.request_id,
                      reason="the HTTP client closed the connection")
            return Response(status_code=499)  # never sent: nobody is listening
        except StopAsyncIteration:
            return error_response(ApiError(500, "INTERNAL", "the Generate stream was empty"))
        except Exception as error:
            await events.aclose()
            return error_response(ApiError.from_exception(error))
        return JSONResponse(event_json(result)[1])

    def _log_end(self, body: GenerateBody) -> Callable[[str], None]:
        return lambda outcome: log_event("event_stream_ended", request_id=body.request_id,
                                        outcome=outcome)


async def _last(events: AsyncIterator[Event]) -> Result:
    """Runs the stream to its end: the Result."""
    last = None
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            last = event
    if not isinstance(last, Result):
        raise RuntimeError("the Generate stream ended without a result")
    return last


def model_json(info: ModelInfo) -> dict[str, Any]:
    """GetModelInfo as JSON: what the page needs to build its form."""
    classes = info.classes
    count = classes.num_classes or len(classes.names)
    return {"model": info.model_name, "image_size": info.image_size,
            "latent_size": info.latent_size, "latent_channels": info.latent_channels,
            "num_classes": count,
            "classes": [{"id": i, "name": classes.name(i)} for i in range(count)],
            "samplers": [{"name": name, "default_steps": steps}
                         for name, steps in info.samplers.items()],
            "default_guidance_scale": info.default_guidance_scale,
            "preview_modes": ["approximate", "decoded"] if info.has_decoder
            else ["approximate"],
            "image_formats": ["png", "jpeg", "webp"], "has_decoder": info.has_decoder,
            "stages": [{"index": s.index, "blocks": [s.block_start, s.block_end],
                        "address": s.address, "device": s.device, "serving": s.serving}
                       for s in info.stages]}


def build_app(config: GatewayConfig, tokens: TokenCheck,
              on_startup: Callable[[], Awaitable[None]] | None = None) -> Starlette:
    """The ASGI app; CORS only for the configured origins."""
    gateway = Gateway(config, tokens)
    routes = [
        Route("/", gateway.index, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
        Route("/v1/model", gateway.model, methods=["GET"]),
        Route("/v1/generate", gateway.generate, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                             allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type", "Accept"],
                             expose_headers=["Retry-After"], max_age=600)]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            await gateway.upstream.close()

    return Starlette(routes=routes, middleware=middleware if config.cors_origins else [],
                     lifespan=lifespan)
