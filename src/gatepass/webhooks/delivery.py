"""Delivering one webhook message: signed per Standard Webhooks, POSTed over a kept-alive
connection (`webhooks.client`; the worker sends an endpoint's run of messages back to back).

Outcomes (the outbox worker schedules retries with backoff and jitter):

- 2xx: sent.
- 410 Gone: dead, and the endpoint is disabled (the receiver said it is gone for good).
- Every other answer, 3xx included (redirects are never followed), timeouts and connection
  errors: retry, honouring Retry-After. Other 4xx answers are retried too: they are most
  often a receiver's misconfiguration (a broken deploy answering 401 or 404) that its owner
  fixes within the retry window, and a dropped audit event cannot be recovered later.
- An endpoint deleted or disabled meanwhile, an unsafe address, or a secret that cannot be
  unsealed: dead, with the reason as the attempt's detail.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import anyio
from standardwebhooks import Webhook as Signer

from gatepass.errors import InvalidInput
from gatepass.outbox.kinds import Claimed, Outcome, register
from gatepass.webhooks import client, sealing, urls
from gatepass.webhooks.models import Webhook

if TYPE_CHECKING:
    from gatepass.core import Core

CONNECT_TIMEOUT = 5.0  # seconds
TOTAL_TIMEOUT = 15.0  # seconds, the whole attempt
MAX_RETRY_AFTER = 86400.0  # a day, in seconds
ENDPOINT_CACHE_SECONDS = 2.0
USER_AGENT = "Gatepass-Webhooks/1"


def encode(body: dict[str, object]) -> bytes:
    """The bytes that are signed and sent: compact JSON, the same on every attempt."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(secret: str, msg_id: str, body: bytes,
                   now: datetime | None = None) -> dict[str, str]:
    now = now or datetime.now(timezone.utc)
    return {"content-type": "application/json", "user-agent": USER_AGENT,
            "webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Signer(secret).sign(msg_id, now, body)}


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class WebhookDeliverer:
    """One per worker process; `deliver` runs concurrently for different endpoints."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.client = client.Client(connect_timeout=CONNECT_TIMEOUT)
        self._endpoints: dict[str, tuple[float, tuple[str, str, str] | None]] = {}
        self._secrets: dict[str, str] = {}  # sealed → plaintext: unsealed once, not per message

    async def close(self) -> None:
        await self.client.close()

    def _load(self, webhook_id: str) -> tuple[str, str, str] | None:
        with self.core.db.read() as session:
            webhook = session.get(Webhook, webhook_id)
            if webhook is None:
                return None
            return webhook.url, webhook.secret, webhook.status

    async def endpoint(self, webhook_id: str) -> tuple[str, str, str] | None:
        """(url, sealed secret, status), cached briefly: bursts need no query per message."""
        now = time.monotonic()
        cached = self._endpoints.get(webhook_id)
        if cached is not None and now - cached[0] < ENDPOINT_CACHE_SECONDS:
            return cached[1]
        found = await anyio.to_thread.run_sync(self._load, webhook_id)
        self._endpoints[webhook_id] = (now, found)
        return found

    async def _check_address(self, url: str) -> None:
        allow = self.core.site["webhooks.allow_insecure_urls"]
        host, port = urls.check_syntax(url, allow_insecure=allow)
        if allow:
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=0, proto=6)
        except OSError:
            raise InvalidInput(f"The URL's host {host} cannot be resolved.") from None
        urls.check_addresses(host, sorted({str(info[4][0]) for info in infos}))

    async def deliver(self, message: Claimed) -> Outcome:
        if message.target is None or "body" not in message.payload:
            return Outcome("dead", detail="not a webhook message")
        endpoint = await self.endpoint(message.target)
        if endpoint is None:
            return Outcome("dead", detail="the webhook was deleted")
        url, sealed, status = endpoint
        if status != "active":
            return Outcome("dead", detail="the webhook is disabled")
        try:
            secret = self._unseal(sealed)
        except ValueError as exc:
            return Outcome("dead", detail=str(exc))
        try:
            await self._check_address(url)
        except InvalidInput as exc:
            # DNS may change: a name that now points inward waits for the admin to act.
            return Outcome("retry", detail=exc.message)

        body = message.payload["body"]
        data = encode(body)
        headers = signed_headers(secret, str(body["id"]), data)
        try:
            async with asyncio.timeout(TOTAL_TIMEOUT):
                answer = await self.client.post(url, data, headers)
        except TimeoutError:
            return Outcome("retry", detail=f"no answer within {TOTAL_TIMEOUT:g} s")
        except (OSError, client.ProtocolError) as exc:
            return Outcome("retry", detail=f"{type(exc).__name__}: {str(exc)[:200]}")

        code = answer.status
        excerpt = answer.excerpt.decode("utf-8", "replace").strip() or None
        if 200 <= code < 300:
            return Outcome("sent", detail=excerpt, status_code=code)
        if code == 410:
            reason = "the receiver answered 410 Gone"
            await anyio.to_thread.run_sync(self._disable, message.target, reason, message.id)
            return Outcome("dead", detail=excerpt or reason, status_code=code,
                           disable_target=True)
        if 300 <= code < 400:
            location = answer.headers.get("location", "")
            excerpt = f"redirect to {location[:200]} not followed" if location else excerpt
        return Outcome("retry", detail=excerpt, status_code=code,
                       retry_after=retry_after(answer.headers.get("retry-after")))

    def _unseal(self, sealed: str) -> str:
        secret = self._secrets.get(sealed)
        if secret is None:
            secret = self._secrets[sealed] = sealing.unseal(self.core.secret_key, sealed)
        return secret

    def _disable(self, webhook_id: str, reason: str, message_id: str) -> None:
        from gatepass.webhooks.service import disable_webhook

        disable_webhook(self.core, webhook_id, reason, except_message=message_id)
        self._endpoints.pop(webhook_id, None)


register("webhook", WebhookDeliverer)
