"""CORS for the HTTP API: a dashboard on another origin may call it only if the relay lists it.

By default no origin is listed: a browser page on another origin gets no ``Access-Control-*``
header, so it can neither read a price nor publish one, and a preflight (``OPTIONS``) is answered
405 like any method the route lacks. ``foliosync relay --cors-origin https://dash.example.com``
(repeatable; :attr:`RelayConfig.cors_origins <foliosync.server.relay.RelayConfig.cors_origins>`)
opens the price API and ``/healthz`` to exactly those origins, through aiohttp-cors:

- preflights are answered for the routes' own methods, with ``Authorization`` (the token),
  ``Content-Type`` (a JSON body) and ``Last-Event-ID`` (an ``EventSource`` resuming) allowed and
  cached by the browser for :data:`PREFLIGHT_MAX_AGE` seconds;
- no credentials (cookies): the token is a header or, for ``EventSource``, ``?token=``;
- the answers on those routes say ``Vary: Origin``, since their CORS headers depend on it.

``/ws`` needs no CORS (browsers do not apply it to WebSockets; a token in the Hello is what
authorizes a socket, not a cookie).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import aiohttp_cors
from aiohttp import hdrs, web

from foliosync.sync.errors import ConfigError

__all__ = [
    "ALLOWED_HEADERS",
    "CORS_PATHS",
    "PREFLIGHT_MAX_AGE",
    "add_cors",
    "normalize_origin",
    "normalize_origins",
]

CORS_PATHS = frozenset({"/v1/ticks", "/v1/prices", "/v1/prices/stream", "/healthz"})
"""The routes a listed origin may call from a browser."""
ALLOWED_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")
PREFLIGHT_MAX_AGE = 600
"""Seconds a browser may reuse a preflight's answer."""
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(text: str) -> str:
    """An origin as browsers send it in ``Origin``: ``scheme://host[:port]``, lower case, no
    default port. Raises :class:`ConfigError` for anything else (a path, ``*``, ``null``), so that
    a listed origin that can never match is an error at start-up, not a silent CORS failure.
    """
    raw = text.strip() if isinstance(text, str) else ""
    hint = "an origin is scheme://host[:port], like https://dash.example.com"
    if raw in ("*", "null"):
        raise ConfigError(f"CORS origin {raw!r} is not allowed: list each origin ({hint})")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid CORS origin {text!r}: {hint}") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        raise ConfigError(f"invalid CORS origin {text!r}: {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"CORS origin {text!r} is a URL, not an origin: {hint}")
    try:
        host = host.encode("idna").decode("ascii")  # browsers send a Unicode host in punycode
    except UnicodeError:
        raise ConfigError(f"invalid host in CORS origin {text!r}") from None
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def normalize_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """Each origin normalized, duplicates dropped, in the order given."""
    if isinstance(origins, str):
        raise ConfigError("CORS origins are a list of origins, not one string")
    return tuple(dict.fromkeys(normalize_origin(origin) for origin in origins))


async def _vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    if request.path in CORS_PATHS:
        vary = response.headers.get(hdrs.VARY)
        if vary is None:
            response.headers[hdrs.VARY] = "Origin"
        elif "origin" not in vary.lower():
            response.headers[hdrs.VARY] = f"{vary}, Origin"


def add_cors(app: web.Application, origins: Iterable[str]) -> None:
    """Open :data:`CORS_PATHS` of ``app`` (routes already added) to ``origins``; none: no CORS."""
    listed = normalize_origins(origins)
    if not listed:
        return
    cors = aiohttp_cors.setup(app)
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False, allow_headers=ALLOWED_HEADERS, max_age=PREFLIGHT_MAX_AGE
    )
    config = dict.fromkeys(listed, options)
    for route in list(app.router.routes()):
        resource = route.resource
        # HEAD comes with each GET route; a browser's HEAD is a simple request, CORS-checked by
        # the resource's GET configuration, and needs no preflight of its own.
        if resource is not None and resource.canonical in CORS_PATHS and route.method != "HEAD":
            cors.add(route, config)
    app.on_response_prepare.append(_vary_on_origin)
