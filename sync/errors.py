"""The one exception tree of foliosync.

Everything foliosync raises on purpose derives from :class:`FolioSyncError`, so an app can catch
the engine's failures in one place. Foreign exceptions (sqlite3, aiohttp, msgpack, pycrdt) are
translated where they enter, raised ``from`` the original, and never reach the app bare::

    FolioSyncError
    ├── ValidationError            bad input from the app or the user; nothing was changed
    │   ├── InvalidSymbol
    │   ├── InvalidNumber
    │   ├── InvalidName
    │   ├── TickRejected           one price tick of a batch was refused
    │   └── BadUpdate              a CRDT update refused before it was stored; ``code`` says why
    │       ├── UpdateV2           a Yjs V2 update where V1 is due
    │       ├── MissingDependencies  it refers to items the receiver has never seen
    │       └── SchemaViolation    the document it would produce breaks its kind's layout
    ├── DocumentNotFound           no such watchlist, portfolio or trade
    ├── DocumentExists             create() of a name that is already there
    ├── ReplicaError               the local SQLite replica cannot be used as asked
    │   ├── ReplicaCorrupt         not a foliosync replica, or damaged; never overwritten
    │   ├── ReplicaLocked          another process holds the file longer than we may wait
    │   ├── SchemaTooNew           written by a newer foliosync; never overwritten
    │   ├── StorageFull            the disk is full; the edit was not applied
    │   └── SyncLeaseUnavailable   the replica's sync lease cannot be locked; not syncing
    ├── ProtocolError              the wire protocol was broken
    │   ├── LocalProtocolError     by us (misuse of the API)
    │   └── RemoteProtocolError    by the peer; carries the error code to send back
    ├── AuthError                  a token is missing, forged, expired or lacks a scope
    ├── AccessDenied               the user may not reach that document
    ├── UpdateRefused              a relay extension refused an update (``code``, ``reason``)
    ├── ExtensionFailed            a relay extension raised or timed out; the action was refused
    ├── RelayStoreError            the relay's storage failed; nothing was acknowledged
    │   └── StorageFullError       the relay's disk is full (also a StorageFull)
    ├── ConnectionLost             the relay could not be reached or went away
    ├── ConfigError                a setting or flag is wrong
    │   └── DataDirLocked          another process holds the relay's data directory
    ├── ClientClosed               a BackgroundClient was used after (or while) closing
    ├── CallTimeout                a BackgroundClient's blocking call ran out of time
    └── WrongThread                a blocking call made on the client's own loop thread

``ValidationError`` also derives from ``ValueError`` and ``DocumentNotFound`` from ``KeyError``, so
that code written against the standard exceptions keeps working.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AuthError",
    "BadUpdate",
    "CallTimeout",
    "ClientClosed",
    "ConfigError",
    "ConnectionLost",
    "DataDirLocked",
    "DocumentExists",
    "DocumentNotFound",
    "ExtensionFailed",
    "FolioSyncError",
    "InvalidName",
    "InvalidNumber",
    "InvalidSymbol",
    "LocalProtocolError",
    "MissingDependencies",
    "ProtocolError",
    "RelayStoreError",
    "RemoteProtocolError",
    "ReplicaCorrupt",
    "ReplicaError",
    "ReplicaLocked",
    "SchemaTooNew",
    "SchemaViolation",
    "StorageFull",
    "StorageFullError",
    "SyncLeaseUnavailable",
    "TickRejected",
    "UpdateRefused",
    "UpdateV2",
    "ValidationError",
    "WrongThread",
]


class FolioSyncError(Exception):
    """Base of every error foliosync raises on purpose."""


class ValidationError(FolioSyncError, ValueError):
    """Input was rejected before anything changed."""


class InvalidSymbol(ValidationError):
    """A ticker symbol that is empty, too long or has characters a symbol cannot have."""


class InvalidNumber(ValidationError):
    """A quantity or price that is not a finite decimal number (or is out of range)."""


class InvalidName(ValidationError):
    """A watchlist or portfolio name that is empty or too long."""


class TickRejected(ValidationError):
    """One tick of a batch was refused; ``reason`` says why (the others may pass)."""


class BadUpdate(ValidationError):
    """A CRDT update (or state vector) that is refused before anything of it is stored.

    ``code`` is the protocol's error code for it (``bad_update`` unless a subclass says more), so
    that the relay's Error frame and the client's rollback agree on why.
    """

    code: str = "bad_update"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UpdateV2(BadUpdate):
    """A Yjs V2 update (``encodeStateAsUpdateV2``) where the protocol carries V1: pycrdt would
    apply it as a silent no-op, so it is refused rather than acknowledged and lost."""

    code = "update_v2"


class MissingDependencies(BadUpdate):
    """The update refers to items (or clocks) the receiver has never seen: stored as it is, it
    would stay invisible. The sender resyncs the document, which sends what was missing."""

    code = "missing_dependencies"


class SchemaViolation(BadUpdate):
    """The document the update would produce breaks its kind's layout (``PROTOCOL.md``,
    section 6): a wrong root type or key, a symbol, decimal, stamp or order key that is not in
    its form, or a size limit passed."""

    code = "invalid_document"


class DocumentNotFound(FolioSyncError, KeyError):
    """No document (or trade) of that name or id."""

    def __str__(self) -> str:  # KeyError quotes its argument; a message reads better.
        return str(self.args[0]) if self.args else "not found"


class DocumentExists(FolioSyncError):
    """A document of that name exists already."""


class ReplicaError(FolioSyncError):
    """The local replica file cannot be used."""


class ReplicaCorrupt(ReplicaError):
    """The file is not a foliosync replica or is damaged. It is left as it is."""


class ReplicaLocked(ReplicaError):
    """Another process holds the replica longer than we may wait: its write outlasted the busy
    timeout, a schema upgrade needs the file alone, or on a full disk another process holds it
    alone (reads there cannot share the file). Processes otherwise share a replica freely."""


class SchemaTooNew(ReplicaError):
    """The replica was written by a newer foliosync. It is left as it is."""


class StorageFull(ReplicaError):
    """The disk is full. The edit was not applied; the replica is as it was before."""


class SyncLeaseUnavailable(ReplicaError):
    """The lock file ``<replica>-sync`` can be neither opened nor locked (a missing or read-only
    folder, a file system without locks). Syncing without the lease could let two processes sync
    one replica and settle each other's unsent rows, so the client refuses to sync instead."""


class ProtocolError(FolioSyncError):
    """The wire protocol was broken.

    ``code`` is the error code sent to the peer in an error frame.
    """

    def __init__(self, message: str, code: str = "protocol_error") -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class AuthError(FolioSyncError):
    """A token is missing, malformed, forged, expired, or lacks the needed scope."""


class AccessDenied(FolioSyncError):
    """The authenticated user may not reach this document.

    ``code`` is the protocol's error code sent for it (``forbidden`` unless an extension says
    more, e.g. ``read_only``)."""

    def __init__(self, message: str, code: str = "forbidden") -> None:
        super().__init__(message)
        self.code = code


class UpdateRefused(FolioSyncError):
    """A relay extension refused an update: it is neither stored nor fanned out, and the device
    rolls it back. ``code`` is the Error frame's code (``refused`` unless the extension gives
    its own)."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class ExtensionFailed(FolioSyncError):
    """A relay extension raised (other than a refusal) or did not answer in time. The action it
    was asked about is refused with ``extension_failed``; nothing is stored, the relay goes on,
    and the device keeps the change to send again later (the extension, not the change, failed)."""


class RelayStoreError(FolioSyncError):
    """The relay's storage failed; the update was not stored and must not be acknowledged."""


class StorageFullError(RelayStoreError, StorageFull):
    """The relay's disk is full."""


class ConnectionLost(FolioSyncError):
    """The relay is unreachable or the connection dropped."""


class ConfigError(FolioSyncError):
    """A configuration value or command-line flag is invalid."""


class DataDirLocked(ConfigError):
    """Another process (a running relay, a restore) holds the data directory."""


class ClientClosed(FolioSyncError):
    """The background client is closed (or closing): the call was not carried out."""


class CallTimeout(FolioSyncError, TimeoutError):
    """A blocking call did not get its answer in time.

    The work goes on in the client's loop: an edit that timed out may still be applied (and is
    then durable like any other); only the caller stopped waiting.
    """


class WrongThread(FolioSyncError, RuntimeError):
    """A blocking call was made on the client's own event-loop thread, where waiting for the
    loop would wait for itself forever. Use ``submit`` there (or a dispatcher's thread)."""
