"""The device's sync machines alone (every transition, what they refuse), then a model device built
on them against a model relay that refuses some updates by rule, under random interleavings,
drops and reconnects (hypothesis over the in-memory pair)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from foliosync.sync.errors import (
    AccessDenied,
    AuthError,
    LocalProtocolError,
    RemoteProtocolError,
)
from foliosync.sync.protocol import (
    INDEX_DOCUMENT,
    Ack,
    Acked,
    ApplyRemote,
    CheckSettled,
    ClientSession,
    Decision,
    DeviceSync,
    DocumentPhase,
    EnsureDocuments,
    Error,
    ErrorCode,
    ErrorReceived,
    Fail,
    MarkSynced,
    MemoryConnection,
    ReadOutgoing,
    ReadUnsent,
    RefusalAction,
    Report,
    RequestNew,
    RequestState,
    Rollback,
    Send,
    ServerSession,
    Settle,
    SyncReplied,
    SyncReply,
    SyncRequest,
    SyncRequested,
    Update,
    UpdateReceived,
    connected_pair,
    decode_frame,
    encode_frame,
    refusal_action,
)
from foliosync.sync.protocol.document_sync import RetryAfter

DOC = "wl-0123456789abcdef01234567"
SV = b"\x00"


def error_event(
    code: str, message: str, doc: str | None, seq: int | None, fatal: bool = False
) -> ErrorReceived:
    return ErrorReceived(code, message, doc, seq, fatal)


def frames(decisions: list[Decision]) -> list[object]:
    """The frames of the Send decisions, decoded."""
    return [decode_frame(d.data) for d in decisions if isinstance(d, Send)]


def welcomed_machine(*, one_shot: bool = False) -> DeviceSync:
    session = ClientSession()
    session.hello("token")
    session.receive_data(_welcome())
    return DeviceSync(session, one_shot=one_shot)


def _welcome() -> bytes:
    server = ServerSession()
    server.receive_data(ClientSession().hello("token"))
    return server.accept("user", "device", [], 0)


def live(machine: DeviceSync, doc: str = DOC, rows: list[tuple[int, bytes]] | None = None) -> None:
    """Take ``doc`` through its SyncRequest and SyncReply to LIVE."""
    (request,) = machine.documents_known([doc])
    assert isinstance(request, RequestState)
    machine.state_vector_read(request, SV)
    _apply, read = machine.receive(SyncReplied(doc, b"\x00\x00", SV, None, None))
    assert isinstance(read, ReadOutgoing)
    updates = [(seq, update, (seq,)) for seq, update in rows or []]
    machine.outgoing_read(read, updates, pending=len(updates), now_ms=1)


# --- The session consults the machine's record ---------------------------------------------


def test_the_session_keeps_its_rules_on_the_machines_record() -> None:
    machine = welcomed_machine()
    session = machine.session
    with pytest.raises(LocalProtocolError) as not_synced:
        session.update(DOC, 1, b"u")
    assert not_synced.value.code == ErrorCode.NOT_SYNCED
    assert DOC not in session.documents  # a refused send leaves no record behind
    session.sync_request(DOC, SV)
    assert session.document(DOC).requested and machine.document(DOC) is session.document(DOC)
    session.update(DOC, 5, b"u")
    assert machine.document(DOC).sent_upto == 5 and machine.document(DOC).in_flight == (5,)
    with pytest.raises(LocalProtocolError) as bad_seq:
        session.update(DOC, 5, b"u")
    assert bad_seq.value.code == ErrorCode.BAD_SEQ
    assert machine.document(DOC).sent_upto == 5  # unchanged by the refused send
    with pytest.raises(RemoteProtocolError):  # an Ack of a seq never sent is the relay's fault
        session.receive_data(encode_frame(Ack(DOC, 6)))


# --- One document through its life ---------------------------------------------------------


def test_welcome_requests_every_document_once() -> None:
    session = ClientSession()
    session.hello("token")
    machine = DeviceSync(session)
    (event,) = session.receive_data(_welcome())
    assert machine.receive(event) == [EnsureDocuments(()), RequestNew()]
    assert machine.welcomed and not machine.quiet  # nothing known yet
    first = machine.documents_known([DOC, INDEX_DOCUMENT])
    assert first == [RequestState(DOC), RequestState(INDEX_DOCUMENT)]
    assert machine.documents_known([DOC, INDEX_DOCUMENT]) == []  # asked already
    assert machine.document(DOC).phase is DocumentPhase.REQUESTING
    (send,) = machine.state_vector_read(first[0], SV)
    assert isinstance(send, Send) and frames([send]) == [SyncRequest(DOC, SV)]
    assert machine.document(DOC).phase is DocumentPhase.REQUESTED


def test_a_reply_applies_reads_outgoing_and_goes_live_with_the_rows_in_order() -> None:
    machine = welcomed_machine()
    (request,) = machine.documents_known([DOC])
    machine.state_vector_read(request, SV)
    assert machine.local_change(DOC, "local", 3, b"u3", 1) == []  # not live: the read has it
    decisions = machine.receive(SyncReplied(DOC, b"up", b"sv", 7, "phone"))
    assert decisions == [
        ApplyRemote(DOC, b"up", 7, "phone"),
        ReadOutgoing(DOC, b"sv", b"up", False),
    ]
    read = decisions[1]
    assert isinstance(read, ReadOutgoing)
    sent = machine.outgoing_read(read, [(2, b"u2", (2,)), (3, b"u3", (3,))], pending=2, now_ms=1)
    assert frames(sent) == [Update(DOC, 2, b"u2"), Update(DOC, 3, b"u3")]
    d = machine.document(DOC)
    assert d.phase is DocumentPhase.LIVE and d.in_flight == (2, 3) and not d.in_sync
    assert machine.receive(Acked(DOC, 2)) == [Settle(DOC, 2, frozenset())]
    assert machine.acknowledged(Settle(DOC, 2, frozenset()), pending=1) == []  # 3 in flight
    (settle,) = machine.receive(Acked(DOC, 3))
    assert isinstance(settle, Settle)
    assert machine.acknowledged(settle, pending=0) == [MarkSynced(DOC)]
    assert d.in_sync and d.quiet and machine.quiet and d.acked_upto == 3


def test_nothing_to_send_settles_at_once_unless_something_is_pending() -> None:
    machine = welcomed_machine()
    (request,) = machine.documents_known([DOC])
    machine.state_vector_read(request, SV)
    _apply, read = machine.receive(SyncReplied(DOC, b"up", SV, None, None))
    assert isinstance(read, ReadOutgoing)
    assert machine.outgoing_read(read, [], pending=1, now_ms=1) == []
    assert not machine.document(DOC).in_sync and not machine.quiet
    assert machine.pending_is(CheckSettled(DOC), 0) == [MarkSynced(DOC)]
    assert machine.quiet


def test_the_index_reply_asks_for_new_documents() -> None:
    machine = welcomed_machine()
    (request,) = machine.documents_known([INDEX_DOCUMENT])
    machine.state_vector_read(request, SV)
    _apply, read = machine.receive(SyncReplied(INDEX_DOCUMENT, b"up", SV, None, None))
    assert isinstance(read, ReadOutgoing)
    assert machine.outgoing_read(read, [], 0, 1) == [MarkSynced(INDEX_DOCUMENT), RequestNew()]


def test_a_local_edit_is_sent_once_and_takes_the_document_out_of_sync_since_then() -> None:
    machine = welcomed_machine()
    live(machine)
    d = machine.document(DOC)
    assert d.in_sync and d.left_sync_at is None
    assert frames(machine.local_change(DOC, "local", 4, b"u4", 1000)) == [Update(DOC, 4, b"u4")]
    assert not d.in_sync and d.left_sync_at == 1000 and not machine.quiet
    assert machine.local_change(DOC, "local", 4, b"u4", 2000) == []  # sent already
    assert machine.local_change(DOC, "remote", 9, b"u9", 2000) == []  # never sent back
    assert machine.local_change(DOC, "other-process", 0, b"", 2000) == []  # not an edit
    machine.local_change(DOC, "other-process", 6, b"u6", 3000)  # another process's edit: sent
    assert d.left_sync_at == 1000 and d.in_flight == (4, 6)
    (settle,) = machine.receive(Acked(DOC, 6))
    assert isinstance(settle, Settle)
    assert machine.acknowledged(settle, 0) == [MarkSynced(DOC)]
    assert d.in_sync and d.left_sync_at is None


def test_edits_during_a_read_of_unsent_rows_wait_for_another_read() -> None:
    """The invariant of the one sending path: no seq goes out while a lower one is unsent."""
    machine = welcomed_machine()
    live(machine)
    assert machine.local_change(DOC, "local", 0, b"", 1) == [ReadUnsent(DOC)]
    d = machine.document(DOC)
    assert d.reading and not machine.quiet
    assert machine.local_change(DOC, "local", 8, b"u8", 1) == []  # marked dirty, not sent
    assert machine.local_change(DOC, "local", 0, b"", 1) == []
    again = machine.unsent_read(ReadUnsent(DOC), [(5, b"u5"), (6, b"u6")], 2, 1)
    assert frames(again) == [Update(DOC, 5, b"u5"), Update(DOC, 6, b"u6")]
    assert again[-1] == ReadUnsent(DOC) and d.reading
    done = machine.unsent_read(ReadUnsent(DOC), [(5, b"u5"), (6, b"u6"), (8, b"u8")], 3, 1)
    assert frames(done) == [Update(DOC, 8, b"u8")] and not d.reading


def test_a_remote_update_of_an_unknown_document_or_the_index_asks_for_new_documents() -> None:
    machine = welcomed_machine()
    live(machine)
    assert machine.receive(UpdateReceived(DOC, 0, b"u", 5, "phone")) == [
        ApplyRemote(DOC, b"u", 5, "phone"),
        CheckSettled(DOC),
    ]
    other = "wl-ffffffffffffffffffffffff"
    assert RequestNew() in machine.receive(UpdateReceived(other, 0, b"u", 5, "phone"))
    assert other not in machine.documents  # not made up: the replica's list decides
    assert RequestNew() in machine.receive(UpdateReceived(INDEX_DOCUMENT, 0, b"u", 5, "phone"))


# --- Refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (ErrorCode.BAD_UPDATE, RefusalAction.ROLLBACK),
        (ErrorCode.UPDATE_V2, RefusalAction.ROLLBACK),
        (ErrorCode.INVALID_DOCUMENT, RefusalAction.ROLLBACK),
        (ErrorCode.REFUSED, RefusalAction.ROLLBACK),
        (ErrorCode.FORBIDDEN, RefusalAction.ROLLBACK),
        (ErrorCode.NOT_FOUND, RefusalAction.ROLLBACK),
        ("read_only_in_a_newer_relay", RefusalAction.ROLLBACK),
        (ErrorCode.MISSING_DEPENDENCIES, RefusalAction.RESYNC),
        (ErrorCode.EXTENSION_FAILED, RefusalAction.RETRY_LATER),
        (ErrorCode.AUTH_FAILED, RefusalAction.RETRY_LATER),
        (ErrorCode.INTERNAL, RefusalAction.RETRY_LATER),
    ],
)
def test_what_each_code_asks(code: str, action: RefusalAction) -> None:
    assert refusal_action(code) is action


def _sent(machine: DeviceSync, *seqs: int) -> None:
    for seq in seqs:
        machine.local_change(DOC, "local", seq, f"u{seq}".encode(), 1)


def test_a_refused_change_is_rolled_back_and_no_later_ack_settles_it() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2, 3, 4)
    decisions = machine.receive(error_event(ErrorCode.REFUSED, "no", DOC, 3))
    assert decisions == [
        Report(ErrorCode.REFUSED, "no", DOC, 3),
        Rollback(DOC, 3, ErrorCode.REFUSED, "no"),
    ]
    d = machine.document(DOC)
    assert d.in_flight == (2, 4) and d.held == {3: RefusalAction.ROLLBACK}
    # Rolled back before any later Ack (frames in order); an Ack meanwhile would keep it.
    assert machine.receive(Acked(DOC, 4)) == [Settle(DOC, 4, frozenset({3}))]
    assert machine.rolled_back(Rollback(DOC, 3, "refused", "no"), pending=1) == [ReadUnsent(DOC)]
    assert d.held == {}
    # The rebased rows (new, higher seqs) go out in order.
    rebased = machine.unsent_read(ReadUnsent(DOC), [(9, b"u9")], 1, 1)
    assert frames(rebased) == [Update(DOC, 9, b"u9")]


def test_a_document_past_the_limit_is_rolled_back_whole_but_the_index_change_by_change() -> None:
    """too_many_documents of a document: the relay takes none of its changes, so its rollback
    takes them all; of the index it refuses only the entries that one change adds."""
    machine = welcomed_machine()
    live(machine)
    live(machine, INDEX_DOCUMENT)
    _sent(machine, 2, 3)
    machine.local_change(INDEX_DOCUMENT, "local", 4, b"u4", 1)
    assert machine.receive(error_event(ErrorCode.TOO_MANY_DOCUMENTS, "full", DOC, 2))[-1] == (
        Rollback(DOC, 2, ErrorCode.TOO_MANY_DOCUMENTS, "full", whole=True)
    )
    last = machine.receive(error_event(ErrorCode.TOO_MANY_DOCUMENTS, "full", INDEX_DOCUMENT, 4))
    assert last[-1] == Rollback(INDEX_DOCUMENT, 4, ErrorCode.TOO_MANY_DOCUMENTS, "full")
    assert machine.receive(error_event(ErrorCode.REFUSED, "no", DOC, 3))[-1] == (
        Rollback(DOC, 3, ErrorCode.REFUSED, "no")
    )


def test_a_row_the_replica_could_not_roll_back_stays_held_for_the_next_connection() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2)
    machine.receive(error_event(ErrorCode.BAD_UPDATE, "garbage", DOC, 2))
    machine.rolled_back(Rollback(DOC, 2, "bad_update", "garbage"), 1, still_pending=True)
    d = machine.document(DOC)
    assert d.held == {2: RefusalAction.ROLLBACK} and d.deferred
    machine.unsent_read(ReadUnsent(DOC), [(2, b"u2")], 1, 1)  # sent already on this connection
    assert d.quiet and not d.in_sync


def test_retry_later_keeps_the_row_from_every_ack_and_lets_a_one_shot_end() -> None:
    machine = welcomed_machine(one_shot=True)
    live(machine)
    _sent(machine, 2, 3)
    assert machine.receive(error_event(ErrorCode.EXTENSION_FAILED, "down", DOC, 2)) == [
        Report(ErrorCode.EXTENSION_FAILED, "down", DOC, 2),
        CheckSettled(DOC),
    ]
    assert machine.pending_is(CheckSettled(DOC), 2) == []  # 3 in flight
    (settle,) = machine.receive(Acked(DOC, 3))
    assert settle == Settle(DOC, 3, frozenset({2}))
    assert machine.acknowledged(settle, pending=1) == []
    d = machine.document(DOC)
    assert not d.in_sync and d.deferred and machine.quiet  # done what this connection can
    _sent(machine, 5)
    assert machine.receive(Acked(DOC, 5)) == [Settle(DOC, 5, frozenset({2}))]  # still kept


def test_a_change_to_retry_later_goes_again_on_the_same_connection_after_a_growing_wait() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2, 3)
    assert machine.receive(error_event(ErrorCode.EXTENSION_FAILED, "down", DOC, 2))[1:] == [
        CheckSettled(DOC),
        RetryAfter(DOC, 1.0),
    ]
    d = machine.document(DOC)
    assert machine.retry_due(DOC) == [ReadUnsent(DOC)]
    # Above every row read (3 is still in flight), under a new seq.
    sent = machine.unsent_read(ReadUnsent(DOC), [(2, b"u2"), (3, b"u3")], 2, 1)
    assert frames(sent) == [Update(DOC, 4, b"u2")]
    assert machine.receive(Acked(DOC, 3)) == [Settle(DOC, 3, frozenset({2}))]  # not yet stored
    # It failed again: the wait doubles, and the next retry takes another new seq.
    assert machine.receive(error_event(ErrorCode.EXTENSION_FAILED, "down", DOC, 4))[1:] == [
        CheckSettled(DOC),
        RetryAfter(DOC, 2.0),
    ]
    assert d.held == {2: RefusalAction.RETRY_LATER}
    machine.retry_due(DOC)
    assert frames(machine.unsent_read(ReadUnsent(DOC), [(2, b"u2")], 1, 1)) == [
        Update(DOC, 5, b"u2")
    ]
    # The retry's Ack settles the row (its own seq, borrowed, keeps any row of that seq).
    assert machine.receive(Acked(DOC, 5)) == [Settle(DOC, 5, frozenset({5}))]
    assert d.held == {}


def test_a_refused_retry_rolls_back_the_row_it_carried() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2)
    machine.receive(error_event(ErrorCode.INTERNAL, "busy", DOC, 2))
    machine.retry_due(DOC)
    machine.unsent_read(ReadUnsent(DOC), [(2, b"u2")], 1, 1)
    assert machine.receive(error_event(ErrorCode.REFUSED, "no", DOC, 3))[1:] == [
        Rollback(DOC, 2, ErrorCode.REFUSED, "no")
    ]


def test_retries_are_bounded_per_connection_and_none_in_a_one_shot_sync() -> None:
    machine = welcomed_machine()
    live(machine)
    seq = 2
    _sent(machine, seq)
    waits = []
    for _ in range(20):
        decisions = machine.receive(error_event(ErrorCode.EXTENSION_FAILED, "down", DOC, seq))
        retry = [d for d in decisions if isinstance(d, RetryAfter)]
        if not retry:
            break
        waits.append(retry[0].delay)
        machine.retry_due(DOC)
        (update,) = frames(machine.unsent_read(ReadUnsent(DOC), [(2, b"u2")], 1, 1))
        assert isinstance(update, Update)
        seq = update.seq
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert machine.document(DOC).deferred and machine.quiet  # the next connection sends it
    one_shot = welcomed_machine(one_shot=True)
    live(one_shot)
    _sent(one_shot, 2)
    decisions = one_shot.receive(error_event(ErrorCode.EXTENSION_FAILED, "down", DOC, 2))
    assert not any(isinstance(d, RetryAfter) for d in decisions)


def test_a_diff_of_what_the_relay_lacks_goes_first_and_a_refusal_still_names_one_row() -> None:
    """A relay restored from a backup: the confirmed content it lacks goes alone (no row), then
    each pending row; a refusal of one rolls back that one."""
    machine = welcomed_machine()
    (request,) = machine.documents_known([DOC])
    assert isinstance(request, RequestState)
    machine.state_vector_read(request, SV)
    _apply, read = machine.receive(SyncReplied(DOC, b"up", SV, None, None))
    assert isinstance(read, ReadOutgoing)
    updates = [(4, b"lacking", ()), (5, b"u5", (5,)), (6, b"u6", (6,))]
    sent = machine.outgoing_read(read, updates, pending=2, now_ms=1)
    assert frames(sent) == [
        Update(DOC, 4, b"lacking"),
        Update(DOC, 5, b"u5"),
        Update(DOC, 6, b"u6"),
    ]
    assert machine.receive(Acked(DOC, 4)) == [Settle(DOC, 4, frozenset())]
    assert machine.receive(error_event(ErrorCode.REFUSED, "no", DOC, 5))[1:] == [
        Rollback(DOC, 5, ErrorCode.REFUSED, "no")
    ]


def test_a_refused_resync_diff_of_one_row_under_a_borrowed_seq_rolls_back_that_row() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2)
    machine.receive(error_event(ErrorCode.MISSING_DEPENDENCIES, "gap", DOC, 2))
    machine.state_vector_read(RequestState(DOC, merged=True), b"sv")
    _apply, read = machine.receive(SyncReplied(DOC, b"up", b"relay-sv", None, None))
    assert isinstance(read, ReadOutgoing)
    assert frames(machine.outgoing_read(read, [(2, b"d", (2,))], 1, 1)) == [Update(DOC, 3, b"d")]
    assert machine.receive(error_event(ErrorCode.REFUSED, "no", DOC, 3))[1:] == [
        Rollback(DOC, 2, ErrorCode.REFUSED, "no")
    ]


def test_missing_dependencies_resyncs_once_and_sends_one_merged_diff() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2, 3)
    first = machine.receive(error_event(ErrorCode.MISSING_DEPENDENCIES, "gap", DOC, 2))
    assert first[1:] == [RequestState(DOC, merged=True)]
    (request,) = frames(machine.state_vector_read(RequestState(DOC, merged=True), b"sv"))
    assert request == SyncRequest(DOC, b"sv")
    # The second refusal of the same gap waits for the resync under way.
    assert machine.receive(error_event(ErrorCode.MISSING_DEPENDENCIES, "gap", DOC, 3))[1:] == []
    d = machine.document(DOC)
    assert d.held == {2: RefusalAction.RESYNC, 3: RefusalAction.RESYNC} and not machine.quiet
    _apply, read = machine.receive(SyncReplied(DOC, b"up", b"relay-sv", None, None))
    assert read == ReadOutgoing(DOC, b"relay-sv", b"up", True)
    assert isinstance(read, ReadOutgoing)
    # The highest pending seq (3) went out on this connection: the diff borrows the next one.
    sent = machine.outgoing_read(read, [(3, b"merged", (2, 3))], pending=2, now_ms=1)
    assert frames(sent) == [Update(DOC, 4, b"merged")]
    # The diff carries them: its Ack settles them, and no other Ack before it.
    assert d.held == {2: RefusalAction.RESYNC, 3: RefusalAction.RESYNC}
    # Its seq was borrowed, so it goes again later, under a new one.
    assert machine.local_change(DOC, "local", 4, b"u4", 1) == [RetryAfter(DOC, 1.0)]
    assert d.held[4] is RefusalAction.RETRY_LATER
    assert machine.receive(Acked(DOC, 4)) == [Settle(DOC, 4, frozenset({4}))]
    assert d.held == {4: RefusalAction.RETRY_LATER}


def test_rows_awaiting_a_resync_are_kept_from_every_ack_before_the_merged_diffs() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2, 3)
    machine.receive(error_event(ErrorCode.MISSING_DEPENDENCIES, "gap", DOC, 2))
    machine.state_vector_read(RequestState(DOC, merged=True), b"sv")
    _apply, read = machine.receive(SyncReplied(DOC, b"up", b"relay-sv", None, None))
    assert isinstance(read, ReadOutgoing)
    assert frames(machine.outgoing_read(read, [(3, b"m", (2, 3))], 2, 1)) == [Update(DOC, 4, b"m")]
    assert machine.receive(Acked(DOC, 3)) == [Settle(DOC, 3, frozenset({2}))]
    assert machine.receive(Acked(DOC, 4)) == [Settle(DOC, 4, frozenset({4}))]
    assert machine.document(DOC).held == {}


def test_a_refused_merged_diff_rolls_nothing_back_and_waits_for_the_next_connection() -> None:
    """Its seq is only the highest pending one: the change at fault is not known. Every row it
    carried is held (split), for the next connection to send one Update each."""
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2)
    machine.receive(error_event(ErrorCode.MISSING_DEPENDENCIES, "gap", DOC, 2))
    machine.state_vector_read(RequestState(DOC, merged=True), b"sv")
    _apply, read = machine.receive(SyncReplied(DOC, b"up", b"relay-sv", None, None))
    assert isinstance(read, ReadOutgoing)
    machine.outgoing_read(read, [(6, b"m", (2, 4, 6))], 3, 1)
    decisions = machine.receive(error_event(ErrorCode.REFUSED, "no", DOC, 6))
    assert not any(isinstance(d, Rollback) for d in decisions)
    d = machine.document(DOC)
    assert d.held == {2: RefusalAction.SPLIT, 4: RefusalAction.SPLIT, 6: RefusalAction.SPLIT}
    assert machine.receive(Acked(DOC, 7)) == [Settle(DOC, 7, frozenset({2, 4, 6}))]
    machine.pending_is(CheckSettled(DOC), 2)
    assert d.deferred and machine.quiet


def test_a_merged_diff_with_a_fresh_seq_keeps_it() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2)
    machine.receive(error_event(ErrorCode.MISSING_DEPENDENCIES, "gap", DOC, 2))
    machine.state_vector_read(RequestState(DOC, merged=True), b"sv")
    _apply, read = machine.receive(SyncReplied(DOC, b"up", b"relay-sv", None, None))
    assert isinstance(read, ReadOutgoing)
    assert frames(machine.outgoing_read(read, [(7, b"m", (2, 7))], 2, 1)) == [Update(DOC, 7, b"m")]
    assert machine.receive(Acked(DOC, 7)) == [Settle(DOC, 7, frozenset())]


def test_an_error_naming_no_update_of_ours_changes_no_row() -> None:
    machine = welcomed_machine()
    live(machine)
    _sent(machine, 2)
    assert machine.receive(error_event(ErrorCode.REFUSED, "no", DOC, 99)) == [
        Report(ErrorCode.REFUSED, "no", DOC, 99)
    ]
    assert machine.receive(error_event("invalid_symbol", "?", "$$$", None)) == [
        Report("invalid_symbol", "?", "$$$", None)
    ]
    assert machine.document(DOC).in_flight == (2,)


def test_a_forbidden_document_is_not_waited_for_but_ends_a_one_shot_sync() -> None:
    machine = welcomed_machine()
    (request,) = machine.documents_known([DOC])
    machine.state_vector_read(request, SV)
    machine.receive(error_event(ErrorCode.FORBIDDEN, "not yours", DOC, None))
    assert machine.document(DOC).phase is DocumentPhase.CLOSED and machine.quiet
    one_shot = welcomed_machine(one_shot=True)
    (request,) = one_shot.documents_known([DOC])
    one_shot.state_vector_read(request, SV)
    decisions = one_shot.receive(error_event(ErrorCode.FORBIDDEN, "not yours", DOC, None))
    assert isinstance(decisions[-1], Fail) and isinstance(decisions[-1].error, AccessDenied)


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (error_event(ErrorCode.AUTH_FAILED, "expired", None, None, True), AuthError),
        (error_event(ErrorCode.BAD_FRAME, "what", None, None, True), RemoteProtocolError),
        (error_event(ErrorCode.AUTH_FAILED, "no sync scope", DOC, None), AuthError),
    ],
)
def test_errors_that_end_the_connection(event: ErrorReceived, error: type[Exception]) -> None:
    machine = welcomed_machine()
    decisions = machine.receive(event)
    assert isinstance(decisions[-1], Fail) and isinstance(decisions[-1].error, error)


# --- A model relay and model devices built on the machines ---------------------------------

DOCS = ("wl-000000000000000000000001", "wl-000000000000000000000002")


def _keys(update: bytes) -> set[str]:
    scratch = Doc()
    scratch.apply_update(update)
    return set(scratch.get("items", type=Map).keys())


@dataclass
class ModelRelay:
    """A relay of ServerSessions over a dict of pycrdt docs; refuses ``bad`` edits for good,
    fails ``flaky`` ones the first time they come (retry later), and says a ``gap`` one lacks
    its dependencies the first time (resync)."""

    docs: dict[str, Doc] = field(default_factory=lambda: {d: Doc() for d in DOCS})
    links: list[MemoryConnection] = field(default_factory=list)
    subscribed: dict[int, set[str]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # flaky keys that failed once

    def keys(self, doc: str) -> set[str]:
        return set(self.docs[doc].get("items", type=Map).keys())

    def holds(self, doc: str, update: bytes) -> bool:
        """Whether everything of ``update`` is stored here (its state adds nothing)."""
        scratch = Doc()
        scratch.apply_update(self.docs[doc].get_update())
        before = scratch.get_state()
        scratch.apply_update(update)
        return scratch.get_state() == before

    def handle(self, link: MemoryConnection, event: Any) -> None:
        server = link.server
        if isinstance(event, SyncRequested):
            self.subscribed.setdefault(id(link), set()).add(event.doc)
            doc = self.docs[event.doc]
            link.server_sends(
                server.send(
                    SyncReply(
                        event.doc, doc.get_update(event.state_vector), doc.get_state(), None, None
                    )
                )
            )
        elif isinstance(event, UpdateReceived):
            keys = _keys(event.update)
            if any(k.startswith("bad") for k in keys):
                link.server_sends(server.send(Error("refused", "a rule", event.doc, event.seq)))
                return
            for kind, code in (("flaky", "extension_failed"), ("gap", "missing_dependencies")):
                first = {k for k in keys if k.startswith(kind)} - self.failed
                if first:
                    self.failed.update(first)
                    link.server_sends(server.send(Error(code, kind, event.doc, event.seq)))
                    return
            before = self.docs[event.doc].get_state()
            self.docs[event.doc].apply_update(event.update)
            link.server_sends(server.send(Ack(event.doc, event.seq)))
            if self.docs[event.doc].get_state() != before:
                for other in self.links:
                    follows = event.doc in self.subscribed.get(id(other), set())
                    if other is not link and follows and not other.server.closed:
                        other.server_sends(
                            other.server.send(Update(event.doc, 0, event.update, 1, "x"))
                        )


@dataclass
class Row:
    seq: int
    update: bytes
    key: str


class ModelDevice:
    """A replica in memory (one pycrdt client per edit, so that dropping one is clean) and a
    connection shell that runs the machine's decisions: those of a frame at once, those of a
    local change when the test says (they await in the real shell)."""

    def __init__(self, name: str, relay: ModelRelay, counter: list[int]) -> None:
        self.name = name
        self.relay = relay
        self.counter = counter
        self.updates: dict[str, list[tuple[str | None, bytes]]] = {d: [] for d in DOCS}
        self.docs: dict[str, Doc] = {d: Doc() for d in DOCS}
        self.pending: dict[str, dict[int, Row]] = {d: {} for d in DOCS}
        self.refused: set[str] = set()
        self.link: MemoryConnection | None = None
        self.machine: DeviceSync | None = None
        self.aside: list[list[Decision]] = []
        self.during_read: list[tuple[str, str]] = []  # edits committed while rows are read
        self.retries: list[str] = []  # documents whose RetryAfter waits (run aside, later)

    # -- the replica --
    def keys(self, doc: str) -> set[str]:
        return set(self.docs[doc].get("items", type=Map).keys())

    def _next_seq(self) -> int:
        self.counter[0] += 1
        return self.counter[0]

    def edit(self, doc: str, key: str) -> None:
        seq = self._next_seq()
        update = self._write(seq, key)
        self.docs[doc].apply_update(update)
        self.updates[doc].append((key, update))
        self.pending[doc][seq] = Row(seq, update, key)
        if self.machine is not None:
            self._aside(self.machine.local_change(doc, "local", seq, update, seq))

    def refuse(self, doc: str, seq: int) -> bool:
        """Roll row ``seq`` back; the later pending rows are re-made with new seqs (as a
        replica rebases the changes made on top of a refused one)."""
        row = self.pending[doc].pop(seq, None)
        if row is None:
            return False
        self.refused.add(row.key)
        self.updates[doc] = [(k, u) for (k, u) in self.updates[doc] if k != row.key]
        rebuilt = Doc()
        for _key, update in self.updates[doc]:
            rebuilt.apply_update(update)
        self.docs[doc] = rebuilt
        for later in sorted(s for s in self.pending[doc] if s > seq):
            old = self.pending[doc].pop(later)
            new = self._next_seq()
            update = self._write(new, old.key)  # the same change, made again: new bytes
            self.docs[doc].apply_update(update)
            self.updates[doc].append((old.key, update))
            self.pending[doc][new] = Row(new, update, old.key)
        return True

    def _write(self, seq: int, key: str) -> bytes:
        one = Doc(client_id=seq * 10 + (1 if self.name == "a" else 2))
        one.get("items", type=Map)[key] = self.name
        return one.get_update()

    def acknowledge(self, doc: str, seq: int, keep: frozenset[int]) -> None:
        for row_seq in [s for s in self.pending[doc] if s <= seq and s not in keep]:
            row = self.pending[doc].pop(row_seq)
            # Nothing pending is lost: what an Ack settles is on the relay, these very bytes.
            assert self.relay.holds(doc, row.update), f"{row.key} settled but not stored"

    # -- the shell --
    def connect(self) -> None:
        link = connected_pair()
        self.link = link
        self.relay.links.append(link)
        self.machine = DeviceSync(link.client)
        self.aside = []
        self.retries = []
        link.client_sends(link.client.hello("token"))
        link.deliver_to_server()
        link.server_sends(link.server.accept("user", self.name, list(DOCS), 0))

    def drop(self) -> None:
        if self.link is not None:
            self.link.client.close()
            self.link.server.close()
            self.relay.links.remove(self.link)
        self.link = self.machine = None
        self.aside = []
        self.retries = []

    def _aside(self, decisions: list[Decision]) -> None:
        assert self.link is not None
        for index, decision in enumerate(decisions):
            if not isinstance(decision, Send):
                self.aside.append(decisions[index:])
                return
            self.link.client_sends(decision.data)

    def run_aside(self) -> None:
        if self.aside:
            self.run(self.aside.pop(0))
        elif self.retries and self.machine is not None:  # the wait of a RetryAfter is over
            self._aside(self.machine.retry_due(self.retries.pop(0)))

    def deliver_one_to_client(self) -> None:
        link = self.link
        if link is None or not link.in_flight_to_client:
            return
        data = link._to_client.popleft()
        for event in link.client.receive_data(data):
            assert self.machine is not None
            self.run(self.machine.receive(event))

    def deliver_one_to_server(self) -> None:
        link = self.link
        if link is None or not link.in_flight_to_server:
            return
        data = link._to_server.popleft()
        for event in link.server.receive_data(data):
            self.relay.handle(link, event)

    def run(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            if self.machine is None:
                return
            self.run(self._carry_out(decision))

    def _carry_out(self, decision: Decision) -> list[Decision]:
        machine, link = self.machine, self.link
        assert machine is not None and link is not None
        match decision:
            case Send(data):
                link.client_sends(data)
            case EnsureDocuments() | MarkSynced() | Report():
                pass
            case RequestNew():
                return machine.documents_known(DOCS)
            case RequestState(doc):
                return machine.state_vector_read(decision, self.docs[doc].get_state())
            case ApplyRemote(doc, update):
                self.docs[doc].apply_update(update)
                self.updates[doc].append((None, update))
            case ReadOutgoing(doc, state_vector, _relay_update, merged):
                rows = sorted(self.pending[doc].items())
                out: list[tuple[int, bytes, tuple[int, ...]]]
                if merged:
                    seq = rows[-1][0] if rows else 1
                    carried = tuple(s for s, _row in rows)
                    out = [(seq, self.docs[doc].get_update(state_vector), carried)]
                else:
                    out = [(seq, row.update, (seq,)) for seq, row in rows]
                return machine.outgoing_read(decision, out, len(self.pending[doc]), 0)
            case ReadUnsent(doc):
                unsent = [(s, r.update) for s, r in sorted(self.pending[doc].items())]
                while self.during_read:  # committed after the read's snapshot, before its end
                    self.edit(*self.during_read.pop(0))
                return machine.unsent_read(decision, unsent, len(self.pending[doc]), 0)
            case Settle(doc, seq, keep):
                self.acknowledge(doc, seq, keep)
                return machine.acknowledged(decision, len(self.pending[doc]))
            case Rollback(doc, seq):
                self.refuse(doc, seq)
                decisions = machine.rolled_back(decision, len(self.pending[doc]))
                # The replica notifies the rollback as a local change without an update.
                return decisions + machine.local_change(doc, "local", 0, b"", 0)
            case CheckSettled(doc):
                return machine.pending_is(decision, len(self.pending[doc]))
            case RetryAfter(doc):
                self.retries.append(doc)
            case Fail(error):
                raise error
        return []


KINDS = st.sampled_from(["ok", "ok", "bad", "flaky", "gap"])
EDIT = st.tuples(st.just("edit"), st.integers(0, 1), st.integers(0, 1), KINDS)
STEP = st.one_of(
    EDIT,
    EDIT,
    EDIT,
    st.tuples(st.just("edit_during_read"), st.integers(0, 1), st.integers(0, 1), KINDS),
    st.tuples(st.just("to_server"), st.integers(0, 1)),
    st.tuples(st.just("to_client"), st.integers(0, 1)),
    st.tuples(st.just("aside"), st.integers(0, 1)),
    st.tuples(st.just("drop"), st.integers(0, 1)),
    st.tuples(st.just("connect"), st.integers(0, 1)),
)


def _settle(relay: ModelRelay, devices: list[ModelDevice]) -> None:
    """Connected without drops until quiet; a new connection while rows wait to be retried."""
    for _round in range(6):
        for device in devices:
            if device.link is None:
                device.connect()
        for _ in range(2000):
            moved = False
            for device in devices:
                link = device.link
                assert link is not None
                busy = device.aside or device.retries
                if link.in_flight_to_server or link.in_flight_to_client or busy:
                    moved = True
                device.deliver_one_to_server()
                device.deliver_one_to_client()
                device.run_aside()
            if not moved:
                break
        for device in devices:  # nothing moves: each has done all it can on this connection
            assert device.machine is not None and device.machine.quiet, device.machine
        if not any(any(p.values()) for d in devices for p in [d.pending]):
            return
        for device in devices:  # rows held for later: the next connection sends them
            device.drop()
    raise AssertionError("still pending after six connections")


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(STEP, max_size=60))
@example([("edit", 0, 0, "flaky"), ("edit", 0, 0, "ok")])
# A retry's borrowed seq, then a rebased row given that very seq: it goes under a new one.
@example(
    [("edit", 0, 0, "flaky"), ("edit", 0, 0, "ok"), ("edit", 0, 0, "bad"), ("edit", 0, 0, "ok")]
)
@example([("edit", 0, 0, "ok"), ("edit", 0, 0, "bad"), ("edit", 0, 0, "ok")])
@example([("edit", 0, 0, "gap"), ("edit", 0, 0, "bad"), ("edit", 0, 0, "ok")])
@example(
    [
        ("connect", 0),
        ("to_client", 0),
        ("to_server", 0),
        ("to_client", 0),
        ("to_server", 0),
        ("to_client", 0),
        ("edit", 0, 0, "bad"),
        ("edit", 0, 0, "ok"),
        ("edit_during_read", 0, 0, "ok"),
        ("to_server", 0),
        ("to_client", 0),
    ]
)
def test_random_interleavings_converge_with_every_accepted_edit_and_no_refused_one(
    steps: list[tuple[Any, ...]],
) -> None:
    relay = ModelRelay()
    counter = [0]
    devices = [ModelDevice("a", relay, counter), ModelDevice("b", relay, counter)]
    made: dict[str, set[str]] = {d: set() for d in DOCS}
    for number, step in enumerate(steps):
        device = devices[step[1]]
        match step:
            case ("edit", _, doc_index, kind):
                doc = DOCS[doc_index]
                key = f"{kind}-{device.name}-{number}"
                device.edit(doc, key)
                made[doc].add(key)
            case ("edit_during_read", _, doc_index, kind):
                doc = DOCS[doc_index]
                key = f"{kind}-{device.name}-{number}"
                device.during_read.append((doc, key))
                made[doc].add(key)
            case ("to_server", _):
                device.deliver_one_to_server()
            case ("to_client", _):
                device.deliver_one_to_client()
            case ("aside", _):
                if device.link is not None:
                    device.run_aside()
            case ("drop", _):
                device.drop()
            case ("connect", _):
                if device.link is None:
                    device.connect()
    for device in devices:  # edits scheduled during a read that never came are made now
        while device.during_read:
            device.edit(*device.during_read.pop(0))
    _settle(relay, devices)
    for doc in DOCS:
        accepted = {k for k in made[doc] if not k.startswith("bad")}
        assert relay.keys(doc) == accepted
        for device in devices:
            assert device.keys(doc) == accepted, device.name
            assert not device.pending[doc]
    for device in devices:
        for doc in DOCS:
            assert device.machine is not None
            assert device.machine.document(doc).in_sync
