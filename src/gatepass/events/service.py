"""The audit log: one row per change, written in the change's own transaction."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Table, insert
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
# Every sign-in records an event, so it is written by a compiled statement rather than an ORM
# flush; the database assigns seq.
RECORD = insert(EVENTS).returning(EVENTS.c.seq)
RECORD_COLUMNS = ("id", "type", "occurred_at", "user_id", "context", "payload")


def record(session: Session, ctx: Context, type_: str, payload: dict[str, Any], *,
           user_id: str | None = None) -> Event:
    """Write one event in `session`'s transaction; the returned Event is not in the session."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    event = Event(id=new_id(), type=type_, occurred_at=utcnow(), user_id=user_id,
                  context=ctx.as_event_context(), payload=payload)
    statement = prepared(session.get_bind().dialect, RECORD, RECORD_COLUMNS)
    event.seq = statement.fetch(Database.dbapi(session),
                                **{key: getattr(event, key) for key in RECORD_COLUMNS})[0].seq
    for callback in _subscribers:
        callback(session, event)
    session.info.setdefault("events", []).append((event.type, event.seq, user_id))
    return event


def record_many(session: Session, ctx: Context, type_: str,
                items: list[tuple[dict[str, Any], str | None]]) -> list[Event]:
    """`record` for a batch of (payload, user_id): one flush (one batched INSERT) for all."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    context = ctx.as_event_context()
    rows = [Event(id=new_id(), type=type_, occurred_at=utcnow(), user_id=user_id,
                  context=context, payload=payload) for payload, user_id in items]
    session.add_all(rows)
    session.flush()  # assigns seq, in order
    for event in rows:
        for callback in _subscribers:
            callback(session, event)
        session.info.setdefault("events", []).append((event.type, event.seq, event.user_id))
    return rows


def log_committed(session: Session) -> None:
    for type_, seq, user_id in session.info.pop("events", []):
        log.info("event", extra={"event_type": type_, "seq": seq, "user_id": user_id})


def as_body(event: Event) -> dict[str, Any]:
    """The event as CONTRACT §7 shows it, for the API and webhook bodies."""
    return {"id": event.id, "type": event.type, "seq": event.seq,
            "occurred_at": event.occurred_at.isoformat(), "context": event.context,
            "payload": event.payload}
