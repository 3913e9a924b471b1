"""Extensions: how an app decides who connects, who reaches which document and what may be stored.

The relay asks its extensions at six points (the hooks of :class:`Extension`) and does what they
answer. Its own rules are extensions too, the defaults of :func:`default_extensions`:

- :class:`TokenAuthentication`: a Hello's token (or an HTTP bearer token) is a JWT signed with
  the relay's secret (:mod:`foliosync.server.auth`);
- :class:`SharingAuthorization`: with the ``sync`` scope, a user reaches their own documents and
  those shared with them (``OWNER/id``, read-only or read-write: :mod:`foliosync.server.sharing`);
  :class:`OwnerAuthorization`, its predecessor, knows no shares;
- :class:`SchemaValidation`: the document an update would produce keeps its kind's layout.

An app's list *replaces* the defaults, so that it can also drop one of them (a static API key
instead of tokens). To add a rule, build on them::

    class WatchlistCap(Extension):
        async def before_apply(self, change: ProposedUpdate) -> None:
            if change.kind is DocumentKind.WATCHLIST and len(change.candidate.model()) > 500:
                raise UpdateRefused("no more than 500 symbols in a watchlist", "too_many_symbols")

    app = create_app(config, extensions=[*default_extensions(secret), WatchlistCap()])

``foliosync relay --extension module:factory`` does the same from the command line: ``factory``
is called as ``factory(config, secret)`` and returns an Extension or a list of them, appended to
the defaults.

The order of the list is the order of the calls. ``authenticate``: the first Identity wins, an
:class:`AuthError` refuses at once; ``authorize`` and ``before_apply``: every extension must
pass. Every call is bounded by ``RelayConfig.hook_timeout``. An extension that raises anything
but a refusal, or does not answer in time, refuses that one action (``extension_failed``, or a
fatal ``auth_failed`` for authentication) and is logged with its name and traceback; the relay
and its other connections go on. An empty authentication chain is a ConfigError at start-up:
a relay that nobody could authenticate to is a mistake, and one that anybody could, worse.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NoReturn, TypeVar

from foliosync.server.auth import Identity, verify_token
from foliosync.server.sharing import ShareStore, sharing_access
from foliosync.server.storage import Watermark
from foliosync.sync.errors import (
    AccessDenied,
    AuthError,
    BadUpdate,
    ConfigError,
    ExtensionFailed,
    UpdateRefused,
)
from foliosync.sync.model import DocumentKind
from foliosync.sync.model.schema import DEFAULT_LIMITS, Candidate, SchemaLimits

__all__ = [
    "DEFAULT_HOOK_TIMEOUT",
    "SERVER_SCOPE",
    "Access",
    "ConnectionInfo",
    "ConnectionRequest",
    "Extension",
    "HookRunner",
    "OwnerAuthorization",
    "ProposedUpdate",
    "SchemaValidation",
    "SharingAuthorization",
    "StoredChange",
    "TokenAuthentication",
    "default_extensions",
    "server_identity",
]

log = logging.getLogger("foliosync.relay.extensions")

DEFAULT_HOOK_TIMEOUT = 5.0
SERVER_SCOPE = "server"
"""The scope of the identity the relay's own edits (:meth:`Relay.edit_document`) run under. No
token can carry it (:func:`verify_token` keeps only the token scopes), so an extension that sees
it knows the change came from server code."""

Access = Literal["read", "write"]


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    """What the relay knows of a caller before it is authenticated."""

    remote: str | None
    """The peer's address, as aiohttp saw it (behind a proxy: the proxy's)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """The HTTP request's headers (the WebSocket upgrade's, for a connection)."""
    client_name: str = ""
    """The Hello's ``client`` field; empty for an HTTP route."""
    path: str = "/ws"


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """One WebSocket connection, as ``on_connect`` and ``on_disconnect`` see it."""

    connection_id: str
    device: str
    request: ConnectionRequest


@dataclass(frozen=True, slots=True)
class ProposedUpdate:
    """An update that passed the wire checks, before it is applied or stored."""

    identity: Identity
    owner: str
    doc_id: str
    kind: DocumentKind
    seq: int
    """The client's seq of it (0 for the relay's own edits)."""
    update: bytes
    candidate: Candidate
    """The document as it would be (``foliosync.sync.model.schema.Candidate``): ``.doc``,
    ``.changed``, ``.model()`` (a Watchlist, Portfolio or UserIndex over it), ``.check(limits)``.
    Read it, never change it: it is the relay's scratch replica of the document (kept to spare
    a copy per update), in which the next update's candidate is built."""
    device: str
    origin: str
    """The sending connection's id, or ``server:...`` for :meth:`Relay.edit_document`."""


@dataclass(frozen=True, slots=True)
class StoredChange:
    """An update the relay stored and acknowledged."""

    owner: str
    doc_id: str
    update: bytes
    watermark: Watermark
    device: str
    origin: str


class Extension:
    """The relay's hooks; every one does nothing here, so an app overrides only what it needs.

    Hooks are coroutines, each bounded by ``RelayConfig.hook_timeout``: an extension that must
    reach a slow service does so there, and one that would take longer is refused.
    """

    @property
    def name(self) -> str:
        """How logs name the extension."""
        return type(self).__name__

    async def authenticate(self, token: object, request: ConnectionRequest) -> Identity | None:
        """Who presents ``token`` (a Hello's token, or an HTTP bearer token): an Identity to
        accept, None to leave it to the next extension, :class:`AuthError` to refuse. A
        connection is refused when no extension returns an Identity."""
        return None

    async def authorize(self, identity: Identity, doc_id: str, access: Access) -> None:
        """Whether ``identity`` may ``read`` (SyncRequest) or ``write`` (Update) ``doc_id`` of
        ``identity.user``: return None to allow, raise :class:`AccessDenied` (its ``code`` is
        the Error's, ``forbidden`` by default) to refuse that document only."""

    async def before_apply(self, change: ProposedUpdate) -> None:
        """Whether the update may be stored: raise :class:`UpdateRefused` (code ``refused``
        or the extension's own), :class:`AccessDenied` or a BadUpdate to refuse it. Nothing of
        it is applied, stored or fanned out then; the device rolls it back."""

    async def after_store(self, change: StoredChange) -> None:
        """Told once the update is stored and acknowledged (a webhook, an audit log). It cannot
        refuse: a failure is logged. The connection's next frame waits for it, so hand slow
        work to a task of your own."""

    async def on_connect(self, identity: Identity, info: ConnectionInfo) -> None:
        """An authenticated connection, before its Welcome: raise :class:`AuthError` or
        :class:`AccessDenied` to refuse it (a fatal Error, then the socket closes)."""

    async def on_disconnect(self, identity: Identity, info: ConnectionInfo) -> None:
        """A connection that ``on_connect`` accepted has ended; a failure is logged."""


class TokenAuthentication(Extension):
    """HS256 tokens signed with the relay's secret (:func:`foliosync.server.auth.verify_token`),
    unless revoked (their device, or the token by its ``jti``) in ``revocations``: by default the
    relay's own share store, bound when the relay starts."""

    def __init__(self, secret: bytes, revocations: ShareStore | None = None) -> None:
        self._secret = secret
        self.revocations = revocations
        # Bound by each relay that runs it (see Relay), so that a list reused by a restarted
        # relay reads that relay's store, never the closed one of the previous.
        self.bound_by_relay = revocations is None

    async def authenticate(self, token: object, request: ConnectionRequest) -> Identity | None:
        identity = verify_token(self._secret, token)
        store = self.revocations
        if store is not None and await store.token_revoked(
            identity.user, identity.device, identity.token_id, identity.issued_at
        ):
            raise AuthError("token revoked")
        return identity


class SharingAuthorization(Extension):
    """With the ``sync`` scope: a user's own documents, read and write; another user's
    ``OWNER/id`` as that owner shares it (read-only: ``read_only`` for an Update); anything
    else ``forbidden``. ``shares`` is by default the relay's own store, bound when it starts."""

    def __init__(self, shares: ShareStore | None = None) -> None:
        self.shares = shares
        self.bound_by_relay = shares is None  # as TokenAuthentication's

    async def authorize(self, identity: Identity, doc_id: str, access: Access) -> None:
        if "sync" not in identity.scopes:
            raise AccessDenied("this token may not sync documents", "auth_failed")
        if "/" not in doc_id:
            return
        if self.shares is None:
            owner = doc_id.partition("/")[0]
            if owner != identity.user:
                raise AccessDenied(f"{doc_id} belongs to another user")
            return
        await sharing_access(self.shares, identity.user, doc_id, access)


class OwnerAuthorization(Extension):
    """A user reaches their own documents only, and only with the ``sync`` scope."""

    async def authorize(self, identity: Identity, doc_id: str, access: Access) -> None:
        if "sync" not in identity.scopes:
            raise AccessDenied("this token may not sync documents", "auth_failed")
        owner, slash, _ = doc_id.partition("/")
        if slash and owner != identity.user:
            raise AccessDenied(f"{doc_id} belongs to another user")


class SchemaValidation(Extension):
    """The document an update would produce keeps its kind's layout and stays within
    ``limits`` (``foliosync.sync.model.schema``); otherwise ``invalid_document``."""

    def __init__(self, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits

    async def before_apply(self, change: ProposedUpdate) -> None:
        change.candidate.check(self.limits)


def default_extensions(
    secret: bytes, limits: SchemaLimits = DEFAULT_LIMITS, shares: ShareStore | None = None
) -> list[Extension]:
    """What the relay runs when it is given no extensions: tokens (unless revoked), owners and
    their shares, layouts. Without ``shares`` the relay binds its own share store to them."""
    return [
        TokenAuthentication(secret, shares),
        SharingAuthorization(shares),
        SchemaValidation(limits),
    ]


def server_identity(owner: str, device: str = "server") -> Identity:
    """The identity of an edit made by server code on ``owner``'s documents."""
    return Identity(user=owner, device=device, scopes=frozenset({"sync", SERVER_SCOPE}))


_T = TypeVar("_T")

_REFUSALS: tuple[type[Exception], ...] = (AuthError, AccessDenied, UpdateRefused, BadUpdate)


def _overrides(extension: Extension, hook: str) -> bool:
    return getattr(type(extension), hook) is not getattr(Extension, hook)


class HookRunner:
    """Runs the extensions' hooks in order, each bounded by ``timeout``.

    Only extensions that override a hook are asked for it, so a hook nobody uses costs nothing
    per update. A refusal (AuthError, AccessDenied, UpdateRefused, BadUpdate) passes through as
    it is; anything else an extension raises, or a timeout, becomes :class:`ExtensionFailed`,
    logged with the extension's name and traceback.
    """

    def __init__(self, extensions: Sequence[Extension], timeout: float = DEFAULT_HOOK_TIMEOUT):
        for extension in extensions:
            if not isinstance(extension, Extension):
                raise ConfigError(f"not a relay Extension: {extension!r}")
        if not any(_overrides(e, "authenticate") for e in extensions):
            raise ConfigError(
                "no extension authenticates: nobody could connect (keep TokenAuthentication, "
                "or give an extension with authenticate())"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ConfigError(f"invalid hook_timeout {timeout!r}: a number of seconds")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(f"invalid hook_timeout {timeout!r}: more than 0 seconds")
        self.extensions = tuple(extensions)
        self.timeout = float(timeout)
        self._by_hook = {
            hook: tuple(e for e in self.extensions if _overrides(e, hook))
            for hook in (
                "authenticate",
                "authorize",
                "before_apply",
                "after_store",
                "on_connect",
                "on_disconnect",
            )
        }
        self.failures = 0  # extension calls that raised or timed out

    def uses(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    async def _call(self, extension: Extension, hook: str, call: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except _REFUSALS:
            raise
        except TimeoutError:
            self.failures += 1
            log.error(
                "extension %s: %s did not answer within %g s", extension.name, hook, self.timeout
            )
            raise ExtensionFailed(
                f"the relay's {extension.name} extension did not answer in time ({hook})"
            ) from None
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, KeyboardInterrupt) or (task is not None and task.cancelling()):
                raise  # the relay itself is stopping (or this action was cancelled): not the hook
            return self._failed(extension, hook, exc)
        except BaseException as exc:  # SystemExit, GeneratorExit, a BaseException of its own
            return self._failed(extension, hook, exc)

    def _failed(self, extension: Extension, hook: str, exc: BaseException) -> NoReturn:
        """An extension that raised anything but a refusal, whatever it derives from, refuses
        that one action: an extension's SystemExit must not end the relay."""
        self.failures += 1
        log.error("extension %s failed in %s", extension.name, hook, exc_info=exc)
        message = f"the relay's {extension.name} extension failed ({hook})"
        raise ExtensionFailed(message) from exc

    async def authenticate(self, token: object, request: ConnectionRequest) -> Identity:
        """The first Identity an extension returns; AuthError if one refuses or none accepts."""
        for extension in self._by_hook["authenticate"]:
            identity = await self._call(
                extension, "authenticate", extension.authenticate(token, request)
            )
            if identity is not None:
                if not isinstance(identity, Identity):
                    self.failures += 1
                    log.error("extension %s: authenticate returned %r", extension.name, identity)
                    raise ExtensionFailed(f"the relay's {extension.name} extension failed")
                return identity
        raise AuthError("the token was not accepted")

    async def authorize(self, identity: Identity, doc_id: str, access: Access) -> None:
        for extension in self._by_hook["authorize"]:
            await self._call(extension, "authorize", extension.authorize(identity, doc_id, access))

    async def before_apply(self, change: ProposedUpdate) -> None:
        for extension in self._by_hook["before_apply"]:
            await self._call(extension, "before_apply", extension.before_apply(change))

    async def on_connect(self, identity: Identity, info: ConnectionInfo) -> None:
        for extension in self._by_hook["on_connect"]:
            await self._call(extension, "on_connect", extension.on_connect(identity, info))

    async def after_store(self, change: StoredChange) -> None:
        await self._tell("after_store", lambda e: e.after_store(change))

    async def on_disconnect(self, identity: Identity, info: ConnectionInfo) -> None:
        await self._tell("on_disconnect", lambda e: e.on_disconnect(identity, info))

    async def _tell(self, hook: str, call: Callable[[Extension], Awaitable[None]]) -> None:
        """A hook that cannot refuse: every extension is told, whatever the others did."""
        for extension in self._by_hook[hook]:
            try:
                await self._call(extension, hook, call(extension))
            except ExtensionFailed:
                pass  # logged by _call
            except _REFUSALS as exc:
                log.warning("extension %s: %s cannot refuse (%s)", extension.name, hook, exc)
