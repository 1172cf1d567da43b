"""The audit log: one row per change, written in the change's own transaction."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Table, insert, text
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

# Called with (session, event) inside the transaction; the webhooks feature fans out here.
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


def record(session: Session, ctx: Context, type_: str, payload: dict[str, Any], *,
           user_id: str | None = None) -> Event:
    """Record one event in `session`'s transaction. It is written, and gets its seq, when the
    transaction commits (`write_pending`, called by `Database.write`); the returned Event is
    not in the session."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    event = Event(id=new_id(), type=type_, occurred_at=utcnow(), user_id=user_id,
                  context=ctx.as_event_context(), payload=payload)
    session.info.setdefault("pending_events", []).append(event)
    return event


def record_many(session: Session, ctx: Context, type_: str,
                items: list[tuple[dict[str, Any], str | None]]) -> list[Event]:
    """`record` for a batch of (payload, user_id), written together at commit."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    context = ctx.as_event_context()
    rows = [Event(id=new_id(), type=type_, occurred_at=utcnow(), user_id=user_id,
                  context=context, payload=payload) for payload, user_id in items]
    session.info.setdefault("pending_events", []).extend(rows)
    return rows


def write_pending(session: Session) -> None:
    """Write the transaction's events last, in the order recorded, and queue their webhook
    deliveries. On PostgreSQL under SEQ_LOCK: nothing else is locked after it, so it cannot
    deadlock, and it is held only for these inserts and the commit."""
    pending: list[Event] = session.info.pop("pending_events", [])
    if not pending:
        return
    session.flush()  # the change itself first
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SEQ_LOCK})
    if len(pending) == 1:  # every sign-in: a compiled statement, not an ORM flush
        event = pending[0]
        event.seq = prepared(dialect, RECORD, RECORD_COLUMNS).fetch(
            Database.dbapi(session), **{key: getattr(event, key) for key in RECORD_COLUMNS})[0].seq
    else:
        session.add_all(pending)
        session.flush()  # one batched INSERT; seq assigned in order
    for event in pending:
        for callback in _subscribers:
            callback(session, event)
        session.info.setdefault("events", []).append((event.type, event.seq, event.user_id))


def log_committed(session: Session) -> None:
    for type_, seq, user_id in session.info.pop("events", []):
        log.info("event", extra={"event_type": type_, "seq": seq, "user_id": user_id})


def as_body(event: Event) -> dict[str, Any]:
    """The event as CONTRACT §7 shows it, for the API and webhook bodies."""
    return {"id": event.id, "type": event.type, "seq": event.seq,
            "occurred_at": event.occurred_at.isoformat(), "context": event.context,
            "payload": event.payload}
