"""One shape for every HTTP error the relay answers: ``{"error": MESSAGE, "code": CODE}``.

A dashboard or a script reads every failure the same way, whichever layer produced it:

- the relay's own handlers (401, 403, 400, 413 of the price API) build it with :func:`json_error`;
- aiohttp's router and helpers raise plain-text exceptions (404, 405, the CORS preflight's 403):
  :func:`json_errors` (a middleware) answers them in the same shape, keeping their headers
  (``Allow``, ``WWW-Authenticate``);
- aiohttp's HTTP parser refuses a malformed request (a request line over 8 KiB, a bad header)
  before any middleware runs, and a handler that raises answers 500 from the same place. That
  place is the connection's ``RequestHandler.handle_error``; aiohttp has no public hook for it
  (aio-libs/aiohttp#3287, open since 2018), so :class:`JsonErrorAppRunner` serves the app with a
  ``RequestHandler`` subclass that answers in JSON and logs a bad request as one line (a client's
  mistake is not the relay's traceback). A 500 is a bug: it keeps its traceback in the log.

``code`` is the status's phrase in snake case (``not_found``, ``method_not_allowed``), the same for
a given status wherever it comes from; ``error`` is the message for a person, and some errors add
fields (``symbol`` for an invalid symbol).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import cast

from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from foliosync.server.websocket import FrontProtocol, WebSocketFront

__all__ = [
    "DirectGetKey",
    "JsonErrorAppRunner",
    "WebSocketFrontKey",
    "error_body",
    "error_code",
    "http_error",
    "json_error",
    "json_errors",
]

log = logging.getLogger("foliosync.relay.http")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What a converted exception keeps of its headers: the rest describe the plain-text body.
_DROPPED_HEADERS = frozenset({hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.CONTENT_ENCODING})


def error_code(status: int) -> str:
    """``404`` → ``"not_found"``: the status's phrase in snake case."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return f"http_{status}"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def error_body(status: int, message: str, **extra: object) -> str:
    return json.dumps({"error": message, "code": error_code(status), **extra})


def json_error(
    status: int, message: str, *, headers: Mapping[str, str] | None = None, **extra: object
) -> web.Response:
    """The error response: ``{"error": message, "code": ..., **extra}`` with ``status``."""
    return web.Response(
        status=status,
        text=error_body(status, message, **extra),
        content_type="application/json",
        headers=headers,
    )


def http_error(
    cls: type[web.HTTPException],
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> web.HTTPException:
    """The same body as an exception to raise from a handler (``raise http_error(...)``)."""
    return cls(
        text=error_body(cls.status_code, message, **extra),
        content_type="application/json",
        headers=headers,
    )


def _message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    if isinstance(exc, web.HTTPNotFound) and exc.text == "404: Not Found":
        return f"no such resource: {request.path}"
    text = (exc.text or "").strip()
    return text or exc.reason


@web.middleware
async def json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer aiohttp's plain-text HTTP errors (404, 405, ...) in the relay's JSON shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k not in _DROPPED_HEADERS}
        return json_error(exc.status, _message(request, exc), headers=headers)


def _bad_request_message(exc: BaseException | None, fallback: str | None) -> str:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the allowed"
        return f"the request line or a header field is longer than {limit} bytes"
    if isinstance(exc, HttpProcessingError) and exc.message:
        return f"malformed HTTP request: {exc.message}"
    return f"malformed HTTP request: {fallback or 'bad request'}"


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection protocol, answering the errors it produces itself in JSON."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = "the relay failed to answer this request; it has been logged"
        else:
            text = _bad_request_message(exc, message)
            # Not HTTP at all (TLS on the plain port, a scanner) is noise on a public address.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
            log.log(level, "refused a malformed request from %s: %s", request.remote, text)
        if request.writer.output_size > 0:
            # aiohttp's own rule: once a response has begun, the connection can only be cut.
            raise ConnectionError("the response had begun; cannot send an error after it")
        response = json_error(status, text)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    """aiohttp's low-level server, making :class:`_JsonErrorRequestHandler` connections."""

    front: WebSocketFront | None = None  # set by the runner from the app's WebSocketFrontKey

    # aiohttp's factory for the listening socket: any protocol will do, and an upgrade the relay
    # serves itself starts on its own (FrontProtocol), not on a RequestHandler.
    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        front = self.front
        if front is None:
            return self.http_protocol()
        return FrontProtocol(self.http_protocol, front)

    def http_protocol(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer malformed requests and 500s in JSON.

    Use it where ``web.AppRunner`` would be used; ``web.run_app`` cannot take it (it builds its
    own runner), so the relay's command serves through it (see :mod:`foliosync.server.serve`).
    It also serves the paths of :data:`DirectGetKey` straight to their handlers.
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the app has started: its keys are set
        # The same server object and state (the app's handler, its request factory, the
        # runner's options): only the class of the connections it makes changes.
        server.__class__ = _JsonErrorServer
        direct = self.app.get(DirectGetKey)
        if direct:
            server.request_handler = _direct_gets(server.request_handler, dict(direct))
        cast(_JsonErrorServer, server).front = self.app.get(WebSocketFrontKey)
        return server


_DirectHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

WebSocketFrontKey = web.AppKey("websocket_front", WebSocketFront)
"""Upgrades that :class:`JsonErrorAppRunner` serves with the relay's own WebSocket connections
(:mod:`foliosync.server.websocket`) instead of aiohttp's, set by the app's start-up."""

DirectGetKey = web.AppKey("direct_get", dict[str, _DirectHandler])
"""GET paths that :class:`JsonErrorAppRunner` hands straight to their handler, around the
application's router and middlewares (set by the app's start-up; the route itself stays, for
other runners and other methods). For a WebSocket endpoint: its handler's coroutine stays on the
stack for as long as the socket is open, and every layer above it (the application's handler,
each middleware, a route function) kept a frame of 250 to 320 bytes per open connection, 1.5 KiB
in all for the relay's ``/ws``. Such a handler gets no ``request.app`` or ``match_info``, and no
middleware runs for it: what it raises is answered as it is."""


def _direct_gets(
    app_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    direct: dict[str, _DirectHandler],
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Not a coroutine function: what it returns is awaited by aiohttp's connection itself,
        # so the direct handler's frame is the first above it.
        if request.method == hdrs.METH_GET:
            handler = direct.get(request.path)
            if handler is not None and isinstance(request, web.Request):
                return handler(request)
        return app_handler(request)

    return dispatch
