"""The pure targets: one input in, every invariant checked, an AssertionError if one breaks.

An exception other than the ones the input may cause (a protocol error, a refused update) is a
crash and propagates as it is; a broken invariant (an error reply that is not a fatal Error, a
document left unreadable or changed by an update that was refused) is an AssertionError. Both
are findings: the engine saves the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText

from foliosync.server.documents import diff_against
from foliosync.sync.errors import BadUpdate, LocalProtocolError, RemoteProtocolError
from foliosync.sync.protocol import ClientSession, ServerSession
from foliosync.sync.protocol.frames import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    SyncRequest,
    Update,
    Welcome,
    decode_frame,
    encode_frame,
)
from foliosync.sync.updates import decode_state_vector
from fuzz.corpus import WATCHLIST, crdt_updates

__all__ = [
    "PURE_TARGETS",
    "UpdateTarget",
    "check_frame",
    "describe_update_check",
    "update_checker",
]

_SMALL_LIMIT = 64
"""A session with a tiny frame limit, so that ``too_large`` is reached by ordinary inputs."""
_HELLO = encode_frame(Hello(PROTOCOL_VERSION, "token", "fuzz"))
_SYNC_REQUEST = encode_frame(SyncRequest(WATCHLIST, b"\x00"))
_UPDATE_SEQ_3 = encode_frame(Update(WATCHLIST, 3, b"\x00\x00"))
_WELCOME = encode_frame(Welcome(PROTOCOL_VERSION, "alice", "dev1", 1, ("index", WATCHLIST)))


def _ready_server() -> ServerSession:
    session = ServerSession()
    session.receive_data(_HELLO)
    session.accept("alice", "dev1", ["index", WATCHLIST], 1764547200000)
    session.receive_data(_SYNC_REQUEST)
    session.receive_data(_UPDATE_SEQ_3)
    return session


def _waiting_client() -> ClientSession:
    session = ClientSession()
    session.hello("token", "fuzz")
    return session


def _ready_client() -> ClientSession:
    session = _waiting_client()
    session.receive_data(_WELCOME)
    session.sync_request(WATCHLIST, b"\x00")
    session.update(WATCHLIST, 3, b"\x00\x00")
    return session


_SESSIONS: tuple[Callable[[], ServerSession | ClientSession], ...] = (
    ServerSession,
    lambda: ServerSession(max_frame_size=_SMALL_LIMIT),
    _ready_server,
    _waiting_client,
    _ready_client,
)
"""Both ends in each state a peer's message can find them in."""


def _check_reply(session: ServerSession | ClientSession, exc: RemoteProtocolError) -> None:
    reply = session.error_reply
    assert reply is not None, "a refused frame left no error reply"
    assert session.closed, "a refused frame left the session open"
    frame = decode_frame(reply)
    assert isinstance(frame, Error), f"the error reply is a {type(frame).__name__}"
    assert frame.fatal, "the error reply is not fatal"
    assert frame.code == exc.code, f"the reply says {frame.code}, the exception {exc.code}"
    assert len(frame.message) <= 200, "the reply's message is over 200 characters"


_rotation = [0]


def check_frame(data: bytes) -> None:
    """The decoder and both sessions on one message: only protocol errors come out, and a
    refusal leaves a valid fatal Error to send.

    A message that is no frame fails in the decoder the same way for every session, so it is
    fed to one of them in turn; a frame is fed to all of them, whose states decide its fate.
    """
    try:
        frame = decode_frame(data)
    except RemoteProtocolError as exc:
        assert exc.code in ("bad_frame", "too_large"), f"decode_frame raised code {exc.code}"
        _rotation[0] += 1
        sessions = [_SESSIONS[_rotation[0] % len(_SESSIONS)]()]
    else:
        encoded = encode_frame(frame)
        assert encode_frame(decode_frame(encoded)) == encoded, "the frame does not round-trip"
        sessions = [make() for make in _SESSIONS]
    for session in sessions:
        try:
            events = session.receive_data(data)
        except RemoteProtocolError as exc:
            _check_reply(session, exc)
        except LocalProtocolError:
            pass
        else:
            assert len(events) == 1, f"{len(events)} events from one message"


# -- updates -------------------------------------------------------------------------------------


def _guarded_apply(doc: Doc[Any], update: bytes) -> None:
    """What the relay does before it stores an update (server/documents.py): pycrdt's Rust
    panics derive from BaseException, and every failure of untrusted bytes is a BadUpdate."""
    try:
        doc.apply_update(update)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise
        raise BadUpdate("the update is not a valid CRDT update") from exc


UpdateCheck = Callable[[bytes, dict[int, int]], object]


def _landed(module: str = "sync/updates.py") -> bool:
    """Whether ``module`` is committed: a check still being written is not the relay's yet."""
    root = Path(__file__).resolve().parent.parent
    try:
        log = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", module],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return True  # not a checkout: what is installed is what runs
    return log.returncode != 0 or bool(log.stdout.strip())


def update_checker(mode: str = "auto") -> tuple[UpdateCheck | None, str]:
    """The relay's update check and its name: ``foliosync.sync.updates.check_update`` (against
    the document's state vector) with ``module``, or with ``auto`` once it is committed; else
    None, and the target fuzzes pycrdt's ``apply_update`` guarded as server/documents.py does."""
    if mode not in ("auto", "module", "pycrdt"):
        raise ValueError(f"unknown update check {mode!r}: auto, module or pycrdt")
    fallback = "pycrdt apply_update, guarded as server/documents.py does"
    if mode == "pycrdt" or (mode == "auto" and not _landed()):
        return None, fallback
    try:
        updates = importlib.import_module("foliosync.sync.updates")
        check: UpdateCheck = updates.check_update
    except (ImportError, AttributeError):
        if mode == "module":
            raise
        return None, fallback

    return check, "foliosync.sync.updates.check_update, then pycrdt apply_update"


def describe_update_check(mode: str = "auto") -> str:
    """What the updates target fuzzes, for the report."""
    return update_checker(mode)[1]


def _read_all(doc: Doc[Any]) -> bytes:
    """Everything a reader does with a document: its update, state, a copy, every root."""
    whole = doc.get_update()
    state = decode_state_vector(doc.get_state())
    copy: Doc[Any] = Doc()
    copy.apply_update(whole)
    # Compared decoded: yrs writes a state vector's clients in its hash map's order, so two
    # documents of one state may encode it in two ways.
    assert decode_state_vector(copy.get_state()) == state, (
        "a copy of the document has another state vector"
    )
    for key in list(copy.keys()):
        _read_values(copy.get(key, type=Map))
    return whole


def _read_values(root: Map[Any]) -> None:
    """Every value under ``root``, nested shared types included, as a reader reaches them.

    Not ``to_py()``, which refuses an XML fragment anywhere under a map: pycrdt has no Python
    value for one, yet the document is sound (the relay's schema refuses nested types, and no
    reader of the app converts a whole map). A loop, not recursion: nesting is bounded only by
    the update's size."""
    pending: list[Any] = [root]
    while pending:
        value = pending.pop()
        if isinstance(value, Map):
            pending.extend(value.values())
        elif isinstance(value, Array):
            pending.extend(value)
        elif isinstance(value, Text | XmlFragment | XmlElement | XmlText):
            str(value)


def _first_words(exc: BaseException | None) -> str:
    """An error's message up to its first detail (``Cannot apply update: block parent``), so
    that one kind of refusal counts once whatever the IDs in it."""
    words: list[str] = []
    for word in str(exc).split():
        if any(c.isdigit() or c in "<#" for c in word):
            break
        words.append(word)
    return " ".join(words) or type(exc).__name__


class UpdateTarget:
    """The relay's hot document under hostile updates and state vectors.

    The base is a real watchlist. An update the check passes must apply and leave it readable,
    or be refused by yrs on purpose: yrs alone knows what the document holds, and refuses (for
    one) an item whose parent there is no shared type, which the check, seeing only the
    document's state vector, cannot know. The relay answers those with ``bad_update`` and forgets
    its copy, which yrs may have changed in part (server/documents.py); so does this target,
    counting them in :attr:`yrs_refusals`. A Rust panic is no refusal but yrs failing, on bytes
    the check should have refused: a finding. With the ``pycrdt`` check (none), a refused update
    must leave the document exactly as it was. Each input is also tried as a state vector, as a
    SyncRequest's is.
    """

    def __init__(self, mode: str = "auto") -> None:
        self._updates = crdt_updates()
        self._check, self.description = update_checker(mode)
        self._base = self._fresh()
        self._base_update = self._base.get_update()
        self._base_state = _state_of(self._base)
        self.yrs_refusals: Counter[str] = Counter()
        """What yrs refused of the updates the check passed, by the first words of its error."""

    def _fresh(self) -> Doc[Any]:
        doc: Doc[Any] = Doc()
        doc.apply_update(self._updates[-2])
        return doc

    def _reset(self) -> None:
        self._base = self._fresh()
        self._base_update = self._base.get_update()

    def __call__(self, data: bytes) -> None:
        doc = self._base
        if self._check is not None:
            try:
                self._check(data, dict(self._base_state))
            except BadUpdate:
                self._as_state_vector(data)
                return
        try:
            _guarded_apply(doc, data)
        except BadUpdate as exc:
            if self._check is not None:
                self._reset()  # the relay forgets its copy: yrs may have applied part of it
                cause = exc.__cause__
                if type(cause).__name__ == "PanicException":
                    raise AssertionError(
                        f"yrs panics on an update the check passed: {cause}"
                    ) from exc
                self.yrs_refusals[_first_words(cause)] += 1
            elif _read_all(doc) != self._base_update:
                self._reset()
                raise AssertionError(
                    f"a refused update changed the document ({exc.__cause__!r})"
                ) from None
        else:
            try:
                _read_all(doc)
            finally:
                self._reset()
        self._as_state_vector(data)

    def notes(self) -> list[str]:
        """For the run's report."""
        return [
            f"passed the check, refused by yrs (as the relay refuses them): {n} x {why}"
            for why, n in self.yrs_refusals.most_common()
        ]

    def _as_state_vector(self, data: bytes) -> None:
        """Through the relay's own path (decoded before yrs sees it), so that a hostile count
        yrs would reserve memory for is refused here as it is there, not timed as a hang."""
        doc = self._base
        with contextlib.suppress(BadUpdate):
            diff_against(doc, data)
        assert doc.get_update() == self._base_update, "a state vector changed the document"


def _state_of(doc: Doc[Any]) -> dict[int, int]:
    """A document's state vector as ``{client: clock}``, as the update check takes it."""
    state: dict[int, int] = {}
    data = doc.get_state()
    pos = 0

    def uint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    for _ in range(uint()):
        client = uint()
        state[client] = uint()
    return state


PURE_TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "frames": lambda: check_frame,
    "updates": UpdateTarget,
}
"""Each pure target's factory: it returns the function that checks one input."""
