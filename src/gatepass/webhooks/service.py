"""Webhook endpoints, the fan-out of events into the outbox, the audit-log query and the
blocking `user.pre_create` hook. No HTTP framework here: routers translate the errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session

from gatepass.context import Context
from gatepass.db import new_id, prepared, utcnow
from gatepass.errors import InvalidInput, NotFound, UserRejected
from gatepass.events import service as events
from gatepass.events.models import Event
from gatepass.outbox.models import OutboxAttempt, OutboxMessage
from gatepass.webhooks import sealing, urls
from gatepass.webhooks.models import Webhook

if TYPE_CHECKING:
    from gatepass.core import Core

log = logging.getLogger("gatepass.webhooks")

MAX_SUBSCRIPTIONS = 50
MAX_DESCRIPTION = 2000
PRE_CREATE_TIMEOUT = 5.0  # seconds, the whole call
EXCERPT = 500  # characters of a receiver's answer kept per attempt
STATUSES = ("pending", "sent", "dead")  # of an outbox row


# -- subscriptions ------------------------------------------------------------------------------

def check_subscriptions(names: list[str]) -> list[str]:
    """Exact types, `prefix.*` or `*`; anything matching no known type is refused."""
    if not isinstance(names, list) or not names:
        raise InvalidInput("Subscribe to at least one event type, a prefix such as 'user.*', "
                           "or '*'.", field="events")
    if len(names) > MAX_SUBSCRIPTIONS:
        raise InvalidInput(f"Subscribe to at most {MAX_SUBSCRIPTIONS} event types.",
                           field="events")
    checked: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput("Each event type must be a non-empty string.", field="events")
        name = name.strip()
        if name != "*" and not any(matches(name, known) for known in events.EVENT_TYPES):
            raise InvalidInput(f"There is no event type called '{name}'.", field="events")
        if name not in checked:
            checked.append(name)
    return checked


def matches(pattern: str, type_: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return type_.startswith(pattern[:-1])
    return pattern == type_


# -- endpoints ----------------------------------------------------------------------------------

@dataclass
class CreatedWebhook:
    webhook: Webhook
    secret: str  # whsec_…, shown once


def webhook_public(webhook: Webhook) -> dict[str, Any]:
    """An endpoint as the API shows it: never its secret."""
    return {"id": webhook.id, "url": webhook.url, "events": list(webhook.events),
            "description": webhook.description, "status": webhook.status,
            "disabled_reason": webhook.disabled_reason,
            "created_at": webhook.created_at.isoformat()}


def create_webhook(core: Core, ctx: Context, url: str, subscribed: list[str],
                   description: str | None = None) -> CreatedWebhook:
    subscribed = check_subscriptions(subscribed)
    url = urls.check_url(url, allow_insecure=core.site["webhooks.allow_insecure_urls"])
    if description is not None and len(description) > MAX_DESCRIPTION:
        raise InvalidInput(f"The description may hold at most {MAX_DESCRIPTION} characters.",
                           field="description")
    secret = sealing.new_secret()
    with core.db.write() as session:
        webhook = Webhook(id=new_id(), url=url, events=subscribed,
                          description=(description or "").strip() or None,
                          secret=sealing.seal(core.secret_key, secret), status="active",
                          created_at=utcnow())
        session.add(webhook)
        session.flush()
    log.info("webhook created", extra={"webhook_id": webhook.id,
                                       "triggered_by": ctx.triggered_by})
    return CreatedWebhook(webhook=webhook, secret=secret)


def list_webhooks(core: Core) -> list[Webhook]:
    with core.db.read() as session:
        return list(session.scalars(select(Webhook).order_by(Webhook.created_at, Webhook.id)))


def get_webhook(session: Session, webhook_id: str) -> Webhook:
    webhook = session.get(Webhook, webhook_id)
    if webhook is None:
        raise NotFound("There is no webhook with that id.")
    return webhook


def delete_webhook(core: Core, ctx: Context, webhook_id: str) -> None:
    """Remove the endpoint; its undelivered messages die with it (attempts stay on record)."""
    with core.db.write() as session:
        webhook = get_webhook(session, webhook_id)
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.kind == "webhook", OutboxMessage.target == webhook.id,
                   OutboxMessage.status == "pending")
            .values(status="dead", last_error="the webhook was deleted"))
        session.delete(webhook)
    log.info("webhook deleted", extra={"webhook_id": webhook_id,
                                       "triggered_by": ctx.triggered_by})


def disable_webhook(core: Core, webhook_id: str, reason: str, *,
                    except_message: str | None = None) -> None:
    """Stop delivering to an endpoint (it answered 410 Gone); its pending messages die
    (but `except_message`, the one in hand, whose outcome the worker records)."""
    with core.db.write() as session:
        session.execute(update(Webhook).where(Webhook.id == webhook_id)
                        .values(status="disabled", disabled_reason=reason))
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.kind == "webhook", OutboxMessage.target == webhook_id,
                   OutboxMessage.status == "pending",
                   OutboxMessage.id != (except_message or ""))
            .values(status="dead", last_error=f"the webhook was disabled: {reason}"))


def list_deliveries(core: Core, webhook_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
    """Every attempt to deliver to this endpoint, newest first."""
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000.", field="limit")
    with core.db.read() as session:
        get_webhook(session, webhook_id)
        rows = session.execute(
            select(OutboxAttempt, OutboxMessage)
            .join(OutboxMessage, OutboxMessage.id == OutboxAttempt.message_id)
            .where(OutboxMessage.kind == "webhook", OutboxMessage.target == webhook_id,
                   OutboxMessage.status.in_(STATUSES))  # every status: ix_outbox_queue serves it
            .order_by(OutboxAttempt.attempted_at.desc(), OutboxAttempt.id.desc())
            .limit(limit)).all()
    items = []
    for attempt, message in rows:
        body = message.payload.get("body", {})
        items.append({
            "id": attempt.id, "message_id": message.id, "event_id": body.get("id"),
            "event_type": body.get("type"), "seq": message.seq,
            "attempted_at": attempt.attempted_at.isoformat(), "outcome": attempt.outcome,
            "status_code": attempt.status_code, "duration_ms": attempt.duration_ms,
            "response": (attempt.detail or "")[:EXCERPT] or None,
            "message_status": message.status})
    return items


# -- fan-out: called by events.record inside the change's own transaction -----------------------

# Every event asks this (sign-ins included), so it is a compiled statement: see db.Prepared.
ACTIVE = select(Webhook.__table__.c.id, Webhook.__table__.c.events) \
    .where(Webhook.__table__.c.status == "active")


OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]
QUEUE = insert(OUTBOX)
QUEUE_COLUMNS = ("id", "kind", "status", "payload", "sensitive", "target", "seq", "attempts",
                 "created_at", "next_attempt_at")


def fan_out(tx: events.Tx, event: events.Recorded) -> None:
    """Queue one delivery per active endpoint subscribed to the event's type."""
    cache = tx.info.get("webhooks")
    if cache is None:  # one query per transaction, however many events it writes
        active = prepared(tx.dialect, ACTIVE).fetch(tx.connection)
        cache = [(row.id, list(row.events)) for row in active]
        tx.info["webhooks"] = cache
    targets = [webhook_id for webhook_id, subscribed in cache
               if any(matches(pattern, event.type) for pattern in subscribed)]
    if not targets:
        return
    body = events.as_body(event)
    # Compiled once, without the ORM's unit of work: every use case pays for this.
    prepared(tx.dialect, QUEUE, QUEUE_COLUMNS).execute_many(tx.connection, [
        {"id": new_id(), "kind": "webhook", "status": "pending", "payload": {"body": body},
         "sensitive": False, "target": target, "seq": event.seq, "attempts": 0,
         "created_at": event.occurred_at, "next_attempt_at": event.occurred_at}
        for target in targets])


events.subscribe(fan_out)


# -- the audit log ------------------------------------------------------------------------------

def list_events(core: Core, *, type_: str | None = None, user_id: str | None = None,
                after: int | None = None, limit: int = 100) -> tuple[list[Event], bool]:
    """Events oldest first from `after` (a seq); (page, whether more follow)."""
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000.", field="limit")
    if after is not None and after < 0:
        raise InvalidInput("after must be a seq of 0 or more.", field="after")
    query = select(Event).order_by(Event.seq).limit(limit + 1)
    if type_:
        if type_ != "*" and not any(matches(type_, known) for known in events.EVENT_TYPES):
            raise InvalidInput(f"There is no event type called '{type_}'.", field="type")
        if type_.endswith(".*"):
            query = query.where(Event.type.startswith(type_[:-1]))
        elif type_ != "*":
            query = query.where(Event.type == type_)
    if user_id:
        query = query.where(Event.user_id == user_id)
    if after is not None:
        query = query.where(Event.seq > after)
    with core.db.read() as session:
        rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


# -- the blocking hook: user.pre_create ---------------------------------------------------------

def pre_create_check(core: Core, user_fields: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Ask the site's `hooks.pre_create_url` whether this user may be created.

    Returns the attributes the receiver wants set (possibly none). Raises UserRejected with
    the receiver's reason when it answers `{"is_allowed": false, "reason": …}`. When the hook
    cannot be reached, times out or answers nonsense, `hooks.pre_create_fail_open` decides:
    off (the default) refuses the user, on lets them through.
    """
    url = core.site["hooks.pre_create_url"]
    if not url:
        return {}
    body = {"id": new_id(), "type": "user.pre_create", "occurred_at": utcnow().isoformat(),
            "context": ctx.as_event_context(), "payload": {"user": user_fields}}
    try:
        urls.check_url(url, allow_insecure=core.site["webhooks.allow_insecure_urls"],
                       field="hooks.pre_create_url")
        with httpx.Client(timeout=httpx.Timeout(PRE_CREATE_TIMEOUT),
                          follow_redirects=False) as client:
            response = client.post(url, json=body,
                                   headers={"user-agent": "Gatepass-Hooks/1"})
        if not 200 <= response.status_code < 300:
            raise ValueError(f"answered HTTP {response.status_code}")
        answer = response.json()
        if not isinstance(answer, dict) or not isinstance(answer.get("is_allowed", True), bool):
            raise ValueError("answered something other than {\"is_allowed\": true|false}")
        attributes = answer.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ValueError("answered attributes that are not an object")
    except (httpx.HTTPError, ValueError, InvalidInput) as exc:
        reason = str(exc) or type(exc).__name__
        log.warning("user.pre_create hook failed",
                    extra={"error": reason[:300], "fail_open": core.site[
                        "hooks.pre_create_fail_open"]})
        if core.site["hooks.pre_create_fail_open"]:
            return {}
        raise UserRejected("New accounts cannot be created right now; "
                           "please try again later.") from None
    if answer.get("is_allowed", True) is False:
        reason = answer.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            reason = UserRejected.message
        raise UserRejected(reason.strip()[:500])
    return attributes


from gatepass.webhooks import delivery as _delivery  # noqa: E402,F401  registers "webhook"
