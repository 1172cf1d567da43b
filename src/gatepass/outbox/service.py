"""Operator use cases on the outbox: list the latest messages, re-queue a dead one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from gatepass.db import utcnow
from gatepass.errors import Conflict, NotFound
from gatepass.outbox.models import OutboxMessage

if TYPE_CHECKING:
    from gatepass.core import Core

log = logging.getLogger("gatepass.outbox")


def latest(core: Core, *, kind: str = "mail", status: str | None = None,
           limit: int = 20) -> list[OutboxMessage]:
    """The newest messages first."""
    query = select(OutboxMessage).where(OutboxMessage.kind == kind)
    if status:
        query = query.where(OutboxMessage.status == status)
    query = query.order_by(OutboxMessage.created_at.desc(), OutboxMessage.id).limit(limit)
    with core.db.read() as session:
        return list(session.execute(query).scalars())


def retry(core: Core, message_id: str) -> OutboxMessage:
    """Queue a dead message again, due now, with a fresh round of attempts."""
    with core.db.write() as session:
        message = session.get(OutboxMessage, message_id)
        if message is None:
            raise NotFound(f"There is no message with id {message_id}.")
        if message.status == "sent":
            raise Conflict(f"Message {message_id} was already sent.")
        if message.status == "pending":
            raise Conflict(f"Message {message_id} is still queued; the worker will deliver it.")
        if message.payload.get("scrubbed"):
            raise Conflict(f"Message {message_id} cannot be re-sent: it carried a password or a "
                           "one-time link, and its body was deleted when it died.")
        message.status = "pending"
        message.attempts = 0
        message.next_attempt_at = utcnow()
        message.lease_owner = None
        message.lease_until = None
    log.info("outbox.requeued", extra={"message_id": message_id, "kind": message.kind})
    return message
