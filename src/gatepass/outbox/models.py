from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gatepass.db import Base, new_id, utcnow


class OutboxMessage(Base):
    """Something promised to the outside world (a mail, a webhook delivery).

    Written in the same transaction as the change that caused it; delivered later by a worker.
    """

    __tablename__ = "outbox"
    # Both lead with (status, target), so no index offers `target` order across every status:
    # the worker walks pending targets with them (migration 0002_outbox_queue).
    __table_args__ = (
        # Rows without a target (mail), longest-due first.
        Index("ix_outbox_due", "status", "target", "next_attempt_at"),
        # Each target's queue in delivery order: its head, and the run after it.
        Index("ix_outbox_queue", "status", "target", "seq", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))  # "mail" | "webhook"
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|sent|dead
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    # A body that holds a password or a one-time link is scrubbed once delivered or dead.
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    # Webhook deliveries: the endpoint, and the event's seq to keep per-endpoint order.
    target: Mapped[str | None] = mapped_column(String(36))
    seq: Mapped[int | None] = mapped_column(Integer)


class OutboxAttempt(Base):
    __tablename__ = "outbox_attempts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("outbox.id", ondelete="CASCADE"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))  # sent | retry | dead
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    status_code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)  # server reply or response excerpt
