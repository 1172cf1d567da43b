"""Webhooks: endpoints, URL safety, fan-out, Standard Webhooks signing and delivery outcomes,
driven through the admin API and the real outbox worker against real HTTP receivers."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from standardwebhooks import Webhook as Verifier
from webhook_receivers import Answer, Receiver, receiver

from conftest import set_site
from gatepass.core import Core
from gatepass.outbox.models import OutboxMessage
from gatepass.outbox.worker import Worker, deliver_pending
from gatepass.webhooks.models import Webhook


def add_webhook(admin: TestClient, url: str, events: list[str] | None = None) -> dict[str, Any]:
    response = admin.post("/admin/api/v1/webhooks",
                          json={"url": url, "events": events or ["*"], "description": "tests"})
    assert response.status_code == 201, response.text
    return dict(response.json())


def new_user(admin: TestClient, email: str = "ada@example.com") -> dict[str, Any]:
    response = admin.post("/admin/api/v1/users", json={"email": email})
    assert response.status_code == 201, response.text
    return dict(response.json()["user"])


@pytest.fixture
def insecure(core: Core) -> Core:
    """Local receivers are http:// on loopback: allowed only with this setting."""
    set_site(core, webhooks__allow_insecure_urls=True)
    return core


def outbox(core: Core) -> list[OutboxMessage]:
    with core.db.read() as session:
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.kind == "webhook")
                                    .order_by(OutboxMessage.seq)))


# -- endpoints ----------------------------------------------------------------------------------

def test_secret_is_shown_once_and_stored_sealed(admin: TestClient, insecure: Core) -> None:
    """POST answers a whsec_ secret of 24+ random bytes; no listing and no column holds it."""
    created = add_webhook(admin, "http://127.0.0.1:9/hook", ["user.created"])

    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    listed = admin.get("/admin/api/v1/webhooks").json()["items"]
    assert [w["id"] for w in listed] == [created["id"]]
    assert "secret" not in listed[0] and secret not in json.dumps(listed)
    with insecure.db.read() as session:
        stored = session.get(Webhook, created["id"])
        assert stored is not None and secret not in stored.secret
        assert secret.removeprefix("whsec_") not in stored.secret


def test_unknown_event_types_are_refused(admin: TestClient, insecure: Core) -> None:
    """A subscription must name a type, a prefix of types or '*': anything else is 422."""
    for events in (["user.creatd"], ["nothing.*"], [], [""]):
        response = admin.post("/admin/api/v1/webhooks",
                              json={"url": "http://127.0.0.1:9/", "events": events})
        assert response.status_code == 422, events
        assert response.json()["error"]["field"] == "events"

    assert admin.get("/admin/api/v1/webhooks").json()["items"] == []


def test_only_public_https_urls_by_default(admin: TestClient, core: Core) -> None:
    """http://, loopback, private and link-local (metadata) addresses are refused unless
    webhooks.allow_insecure_urls is on."""
    for url in ("http://example.com/hook", "https://127.0.0.1/hook", "https://10.1.2.3/hook",
                "https://169.254.169.254/latest", "https://[::1]/hook", "https://localhost/x",
                "ftp://example.com/", "not a url"):
        response = admin.post("/admin/api/v1/webhooks", json={"url": url, "events": ["*"]})
        assert response.status_code == 422, url
        assert response.json()["error"]["field"] == "url"
        assert response.json()["error"]["message"].endswith(".")

    set_site(core, webhooks__allow_insecure_urls=True)
    assert admin.post("/admin/api/v1/webhooks",
                      json={"url": "http://127.0.0.1:9/hook", "events": ["*"]}).status_code == 201


def test_webhooks_need_the_webhooks_scope(client: TestClient, core: Core) -> None:
    """A `users` key may not manage webhooks; a `read` key may list them but not add one."""
    from gatepass.auth import service as auth

    _, users_key = auth.create_api_key(core, "u", ["users"])
    _, read_key = auth.create_api_key(core, "r", ["read"])

    as_users = {"Authorization": f"Bearer {users_key}"}
    as_read = {"Authorization": f"Bearer {read_key}"}
    assert client.get("/admin/api/v1/webhooks", headers=as_users).status_code == 403
    assert client.get("/admin/api/v1/webhooks", headers=as_read).status_code == 200
    assert client.post("/admin/api/v1/webhooks", headers=as_read,
                       json={"url": "https://example.com/", "events": ["*"]}).status_code == 403
    assert client.get("/admin/api/v1/webhooks").status_code == 401


def test_fan_out_follows_subscriptions(admin: TestClient, insecure: Core) -> None:
    """An event is queued for exact, prefix and '*' subscribers only, in the same
    transaction as the change."""
    exact = add_webhook(admin, "http://127.0.0.1:9/a", ["user.created"])
    prefix = add_webhook(admin, "http://127.0.0.1:9/b", ["user.*"])
    other = add_webhook(admin, "http://127.0.0.1:9/c", ["invitation.*", "user.deleted"])
    star = add_webhook(admin, "http://127.0.0.1:9/d", ["*"])

    user = new_user(admin)

    rows = outbox(insecure)
    assert sorted(row.target for row in rows) == sorted([exact["id"], prefix["id"], star["id"]])
    assert other["id"] not in {row.target for row in rows}
    body = rows[0].payload["body"]
    assert body["type"] == "user.created" and body["payload"]["user"]["id"] == user["id"]
    assert {row.seq for row in rows} == {body["seq"]}


def test_deleting_a_webhook_stops_its_deliveries(admin: TestClient, insecure: Core) -> None:
    """DELETE removes the endpoint (404 afterwards) and its queued deliveries die."""
    created = add_webhook(admin, "http://127.0.0.1:9/gone")
    new_user(admin)

    assert admin.delete(f"/admin/api/v1/webhooks/{created['id']}").status_code == 204

    assert admin.delete(f"/admin/api/v1/webhooks/{created['id']}").status_code == 404
    assert admin.get(f"/admin/api/v1/webhooks/{created['id']}/deliveries").status_code == 404
    assert [row.status for row in outbox(insecure)] == ["dead"]


# -- delivery -----------------------------------------------------------------------------------

def test_delivery_is_signed_per_standard_webhooks(admin: TestClient, insecure: Core) -> None:
    """The receiver verifies the body with the standardwebhooks package; the body is the
    CONTRACT §7 event with triggered_by; the attempt shows in /deliveries."""
    with receiver() as rec:
        created = add_webhook(admin, rec.url, ["user.created"])
        user = new_user(admin)

        deliver_pending(insecure, timeout=10)

        [got] = rec.wait_for(1)
    event = Verifier(created["secret"]).verify(got.body, got.headers)
    assert event["type"] == "user.created"
    assert event["payload"]["user"]["id"] == user["id"]
    assert event["context"]["triggered_by"] == "admin_api"
    assert set(event) == {"id", "type", "seq", "occurred_at", "context", "payload"}
    assert got.headers["webhook-id"] == event["id"]
    assert got.headers["webhook-signature"].startswith("v1,")
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    with pytest.raises(Exception):
        Verifier("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(got.body, got.headers)

    [attempt] = admin.get(f"/admin/api/v1/webhooks/{created['id']}/deliveries").json()["items"]
    assert attempt["outcome"] == "sent" and attempt["status_code"] == 200
    assert attempt["response"] == "thanks" and attempt["event_id"] == event["id"]
    assert attempt["duration_ms"] >= 0 and attempt["attempted_at"]


def test_retries_keep_the_webhook_id(admin: TestClient, insecure: Core) -> None:
    """A receiver failing 3 times (503, Retry-After: 0) gets the event a 4th time with the
    same webhook-id; every attempt is listed with its status."""
    def flaky(n: int) -> Answer:
        return (503, {"Retry-After": "0"}, b"busy") if n <= 3 else (204, {}, b"")

    with receiver(flaky) as rec:
        created = add_webhook(admin, rec.url)
        new_user(admin)

        deliver_pending(insecure, timeout=15)

        got = rec.wait_for(4)
    assert len(got) == 4
    assert len({r.headers["webhook-id"] for r in got}) == 1
    for request in got:
        Verifier(created["secret"]).verify(request.body, request.headers)
    attempts = admin.get(f"/admin/api/v1/webhooks/{created['id']}/deliveries").json()["items"]
    assert sorted(a["status_code"] for a in attempts) == [204, 503, 503, 503]
    assert [r.status for r in outbox(insecure)] == ["sent"]


def test_410_gone_disables_the_endpoint(admin: TestClient, insecure: Core) -> None:
    """A 410 answer kills the delivery and disables the endpoint: later events skip it."""
    with receiver(lambda _n: (410, {}, b"no such hook")) as rec:
        created = add_webhook(admin, rec.url)
        new_user(admin)

        deliver_pending(insecure, timeout=10)
        new_user(admin, "bob@example.com")
        deliver_pending(insecure, timeout=10)

        assert len(rec.requests) == 1
    [listed] = admin.get("/admin/api/v1/webhooks").json()["items"]
    assert listed["status"] == "disabled" and "410" in listed["disabled_reason"]
    assert [r.status for r in outbox(insecure)] == ["dead"]
    [attempt] = admin.get(f"/admin/api/v1/webhooks/{created['id']}/deliveries").json()["items"]
    assert attempt["outcome"] == "dead" and attempt["status_code"] == 410


def test_redirects_are_failures_and_not_followed(admin: TestClient, insecure: Core) -> None:
    """A 3xx answer is retried later; the Location is never fetched."""
    with receiver() as elsewhere:
        with receiver(lambda _n: (302, {"Location": elsewhere.url}, b"")) as rec:
            created = add_webhook(admin, rec.url)
            new_user(admin)

            deliver_pending(insecure, timeout=5)

            assert len(rec.requests) == 1
        assert elsewhere.requests == []
    [row] = outbox(insecure)
    assert row.status == "pending" and "not followed" in (row.last_error or "")
    [attempt] = admin.get(f"/admin/api/v1/webhooks/{created['id']}/deliveries").json()["items"]
    assert attempt["outcome"] == "retry" and attempt["status_code"] == 302


def test_addresses_are_checked_again_at_delivery(admin: TestClient, insecure: Core) -> None:
    """Turning allow_insecure_urls off stops deliveries to loopback endpoints made before."""
    with receiver() as rec:
        add_webhook(admin, rec.url)
        new_user(admin)
        set_site(insecure, webhooks__allow_insecure_urls=False)

        deliver_pending(insecure, timeout=5)

        assert rec.requests == []
    [row] = outbox(insecure)
    assert row.status == "pending" and "https://" in (row.last_error or "")


@pytest.fixture
def running_worker(insecure: Core) -> Iterator[None]:
    """The real outbox worker in a thread of its own, as `gatepass worker` runs it."""
    stop = threading.Event()
    started = threading.Event()

    async def main() -> None:
        worker = Worker(insecure)
        await worker.start()
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await worker.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started.wait(5)
    yield
    stop.set()
    thread.join(timeout=40)


def test_a_slow_receiver_does_not_delay_others(admin: TestClient, insecure: Core,
                                               running_worker: None) -> None:
    """While one receiver sleeps 20 s on its first event, another gets two events at once."""
    holder: dict[str, Receiver] = {}

    def sleepy(_n: int) -> Answer:
        holder["slow"].release.wait(20)
        return 200, {}, b""

    with receiver(sleepy) as slow, receiver() as fast:
        holder["slow"] = slow
        add_webhook(admin, slow.url)
        add_webhook(admin, fast.url)
        began = time.monotonic()

        new_user(admin)
        new_user(admin, "bob@example.com")

        fast.wait_for(2, timeout=5)
        assert time.monotonic() - began < 5
        assert len(slow.requests) == 1  # still answering the first; the second waits in order
        slow.release.set()
        slow.wait_for(2, timeout=10)
    seqs = [json.loads(r.body)["seq"] for r in slow.requests]
    assert seqs == sorted(seqs)
