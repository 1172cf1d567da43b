"""The audit log: one row per change, written in the change's own transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Dialect, Table, insert
from sqlalchemy.orm import Session

from gatepass.context import Context
from gatepass.db import Database, new_id, prepared, utcnow
from gatepass.events.models import Event

log = logging.getLogger("gatepass.events")

EVENT_TYPES = (
    "user.created", "user.updated", "user.deleted", "user.signed_in", "user.sign_in_failed",
    "user.locked", "user.unlocked", "user.password_changed", "user.password_reset_requested",
    "user.password_reset", "user.email_verified", "invitation.created", "invitation.redeemed",
    "invitation.revoked", "users.imported",
)

# Called with (Tx, Recorded) inside the transaction; the webhooks feature fans out here.
_subscribers: list[Any] = []


def subscribe(callback: Any) -> None:
    if callback not in _subscribers:
        _subscribers.append(callback)


EVENTS: Table = Event.__table__  # type: ignore[assignment]
RECORD = insert(EVENTS).returning(EVENTS.c.seq)
RECORD_COLUMNS = ("id", "type", "occurred_at", "user_id", "context", "payload")
# Taken by every transaction just before it writes its events, and held to its commit, so on
# PostgreSQL seq order is commit order: a poller reading `after=N` can never miss an event
# that commits later with a lower seq. (SQLite's writers take turns already.)
SEQ_LOCK = 0x67617465  # "gate"


@dataclass
class Recorded:
    """An event as recorded: an audit-log row's fields, `seq` once it is written."""
    id: str
    type: str
    occurred_at: datetime
    user_id: str | None
    context: dict[str, Any]
    payload: dict[str, Any]
    seq: int | None = None


@dataclass
class Tx:
    """What a subscriber gets with each event: the writing transaction's DBAPI connection, its
    dialect, and a dict that lives as long as the transaction (for per-transaction caches)."""
    dialect: Dialect
    connection: Any
    info: dict[str, Any]


def _new(ctx: Context | dict[str, Any], type_: str, payload: dict[str, Any],
         user_id: str | None) -> Recorded:
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    context = ctx.as_event_context() if isinstance(ctx, Context) else ctx
    return Recorded(id=new_id(), type=type_, occurred_at=utcnow(), user_id=user_id,
                    context=context, payload=payload)


def record(session: Session, ctx: Context, type_: str, payload: dict[str, Any], *,
           user_id: str | None = None) -> Recorded:
    """Record one event in `session`'s transaction. It is written, and gets its seq, when the
    transaction commits (`write_pending`, called by `Database.write`)."""
    event = _new(ctx, type_, payload, user_id)
    session.info.setdefault("pending_events", []).append(event)
    return event


def record_many(session: Session, ctx: Context, type_: str,
                items: list[tuple[dict[str, Any], str | None]]) -> list[Recorded]:
    """`record` for a batch of (payload, user_id), written together at commit."""
    context = ctx.as_event_context()
    rows = [_new(context, type_, payload, user_id) for payload, user_id in items]
    session.info.setdefault("pending_events", []).extend(rows)
    return rows


def write_pending(session: Session) -> None:
    """Write the transaction's events last, in the order recorded, and queue their webhook
    deliveries. On PostgreSQL under SEQ_LOCK: nothing else is locked after it, so it cannot
    deadlock, and it is held only for these inserts and the commit."""
    pending: list[Recorded] = session.info.pop("pending_events", [])
    if not pending:
        return
    session.flush()  # the change itself first
    tx = Tx(session.get_bind().dialect, Database.dbapi(session), session.info)
    if len(pending) == 1:  # every sign-in: a compiled statement
        _insert_one(tx, pending[0])
    else:
        _take_seq_lock(tx)
        # One batched INSERT; seqs come back in the order given.
        seqs = session.execute(
            insert(EVENTS).returning(EVENTS.c.seq, sort_by_parameter_order=True),
            [{key: getattr(event, key) for key in RECORD_COLUMNS} for event in pending]).scalars()
        for event, seq in zip(pending, seqs):
            event.seq = seq
    _written(tx, pending)
    session.info.setdefault("events", []).extend(pending)


def write_now(connection: Any, dialect: Dialect, ctx: Context,
              *happened: tuple[str, dict[str, Any], str | None]) -> list[Recorded]:
    """Write events, each (type, payload, user_id), now, in the transaction open on the DBAPI
    `connection`: for use cases made of `Prepared` statements (sign-in). They must be the
    transaction's last writes before its commit, as `write_pending` makes them for sessions;
    `log_committed` them after the commit."""
    context = ctx.as_event_context()
    written = [_new(context, type_, payload, user_id) for type_, payload, user_id in happened]
    tx = Tx(dialect, connection, {})
    for event in written:
        _insert_one(tx, event)
    _written(tx, written)
    return written


def _take_seq_lock(tx: Tx) -> None:
    if tx.dialect.name == "postgresql":
        cursor = tx.connection.cursor()
        try:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SEQ_LOCK,))
        finally:
            cursor.close()


def _insert_one(tx: Tx, event: Recorded) -> None:
    _take_seq_lock(tx)
    event.seq = prepared(tx.dialect, RECORD, RECORD_COLUMNS).fetch(
        tx.connection, **{key: getattr(event, key) for key in RECORD_COLUMNS})[0].seq


def _written(tx: Tx, written: list[Recorded]) -> None:
    for event in written:
        for callback in _subscribers:
            callback(tx, event)


def log_committed(session_or_events: Session | list[Recorded]) -> None:
    """Log the events of a committed transaction (a session's, or those `write_now` wrote)."""
    written = session_or_events.info.pop("events", []) \
        if isinstance(session_or_events, Session) else session_or_events
    for event in written:
        log.info("event", extra={"event_type": event.type, "seq": event.seq,
                                 "user_id": event.user_id})


def as_body(event: Event | Recorded) -> dict[str, Any]:
    """The event as CONTRACT §7 shows it, for the API and webhook bodies."""
    return {"id": event.id, "type": event.type, "seq": event.seq,
            "occurred_at": event.occurred_at.isoformat(), "context": event.context,
            "payload": event.payload}
