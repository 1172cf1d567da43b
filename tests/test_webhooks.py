"""Webhooks: endpoints, URL safety, fan-out, Standard Webhooks signing and delivery outcomes,
driven through the admin API and the real outbox worker against real HTTP receivers."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import select
from standardwebhooks import Webhook as Verifier
from test_mail_outbox import GATEPASS, running_workers, wait_until, worker_env
from webhook_receivers import Answer, Receiver, receiver

from conftest import set_site
from gatepass.context import SYSTEM
from gatepass.core import Core, build_core
from gatepass.db import utcnow
from gatepass.events import service as events
from gatepass.outbox.models import OutboxMessage
from gatepass.outbox.worker import Worker, deliver_pending
from gatepass.settings import Settings
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
                                    .order_by(OutboxMessage.seq, OutboxMessage.target)))


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
    for subscribed in (["user.creatd"], ["nothing.*"], [], [""]):
        response = admin.post("/admin/api/v1/webhooks",
                              json={"url": "http://127.0.0.1:9/", "events": subscribed})
        assert response.status_code == 422, subscribed
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


def test_sign_in_events_are_queued_for_their_subscribers(admin: TestClient, client: TestClient,
                                                         insecure: Core) -> None:
    """Sign-in writes its events on plain statements, not through the ORM: a right password,
    a wrong one and the lock it sets each reach the endpoints subscribed to them, with the
    audit log's seq and body."""
    set_site(insecure, lockout__max_failed_attempts=2)
    signins = add_webhook(admin, "http://127.0.0.1:9/in", ["user.signed_in"])
    refusals = add_webhook(admin, "http://127.0.0.1:9/no", ["user.sign_in_failed", "user.locked"])
    created = admin.post("/admin/api/v1/users", json={
        "username": "ada", "password": "violet-Harbour-42-kettle", "password_expired": False})
    assert created.status_code == 201, created.text
    user = created.json()["user"]

    def sign_in(password: str) -> int:
        return client.post("/api/v1/auth/signin",
                           json={"login": "ada", "password": password}).status_code

    assert sign_in("violet-Harbour-42-kettle") == 200
    assert sign_in("wrong") == 401
    assert sign_in("wrong again") == 401

    logged = {item["seq"]: item for item in
              admin.get("/admin/api/v1/events", params={"limit": 1000}).json()["items"]}
    queued = [(row.target, row.payload["body"]) for row in outbox(insecure)]
    assert [(target, body["type"]) for target, body in queued] == [
        (signins["id"], "user.signed_in"), (refusals["id"], "user.sign_in_failed"),
        (refusals["id"], "user.sign_in_failed"), (refusals["id"], "user.locked")]
    for _, body in queued:
        assert body == logged[body["seq"]]
        assert body["payload"]["user"]["id"] == user["id"]
        assert body["context"]["triggered_by"] == "portal"
    assert queued[0][1]["payload"]["method"] == "password"
    assert [body["payload"].get("failed_count") for _, body in queued[1:3]] == [1, 2]
    assert queued[3][1]["payload"]["user"]["locked_until"] is not None


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


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context whose certificate for 127.0.0.1 no public authority signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(hours=1))
                   .not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def test_https_receivers_must_show_a_trusted_certificate(admin: TestClient, insecure: Core,
                                                         tmp_path: Path) -> None:
    """Deliveries use TLS with certificate verification: a receiver whose certificate no
    public authority signed receives nothing, and the attempt says why."""
    with receiver(tls=self_signed(tmp_path)) as rec:
        add_webhook(admin, rec.url)
        new_user(admin)

        deliver_pending(insecure, timeout=10)

        assert rec.requests == []
    [row] = outbox(insecure)
    assert row.status == "pending" and "CERTIFICATE_VERIFY_FAILED" in (row.last_error or "")


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
        # still answering the first (which may land just after the fast ones); the second
        # waits in order
        assert len(slow.wait_for(1, timeout=5)) == 1
        slow.release.set()
        slow.wait_for(2, timeout=10)
    seqs = [json.loads(r.body)["seq"] for r in slow.requests]
    assert seqs == sorted(seqs)


# -- runs: an endpoint's messages back to back, in order ----------------------------------------

def emit(core: Core, count: int) -> list[int]:
    """`count` events, one transaction each as use cases write them; their seqs."""
    seqs = []
    for n in range(count):
        with core.db.write() as session:
            event = events.record(session, SYSTEM, "user.updated",
                                  {"user": {"id": "u1", "n": n}}, user_id="u1")
        seqs.append(event.seq)  # given as the transaction commits
    return seqs


def arrived(rec: Receiver) -> list[int]:
    return [json.loads(r.body)["seq"] for r in rec.requests]


def claims(caplog: pytest.LogCaptureFixture) -> list[int]:
    """How many messages each claim leased, in order."""
    return [r.count for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "outbox.claimed"]


def test_an_endpoint_gets_its_messages_back_to_back_in_seq_order(
        admin: TestClient, insecure: Core, make_settings: Callable[..., Settings],
        caplog: pytest.LogCaptureFixture) -> None:
    """With GATEPASS_OUTBOX_RUN_SIZE=4, ten events reach the receiver once each, in seq
    order, in three claims (runs of 4, 4 and 2) over one kept-alive connection."""
    worker_core = build_core(make_settings(outbox_run_size=4))
    with receiver() as rec:
        add_webhook(admin, rec.url)
        seqs = emit(insecure, 10)

        with caplog.at_level(logging.DEBUG, logger="gatepass.outbox"):
            assert deliver_pending(worker_core, timeout=20) == 10

    assert arrived(rec) == seqs
    assert claims(caplog) == [4, 4, 2]
    assert len({r.peer for r in rec.requests}) == 1
    assert {(row.status, row.attempts) for row in outbox(insecure)} == {("sent", 1)}
    worker_core.close()


def test_a_failure_mid_run_leaves_the_rest_pending_behind_it(
        admin: TestClient, insecure: Core) -> None:
    """The 3rd of 6 messages is answered 503, Retry-After: 3600. The first two are sent; the
    3rd waits an hour; the 4th to 6th stay queued behind it, unleased, with no attempt
    counted, and nothing overtakes it meanwhile."""
    with receiver(lambda n: (503, {"Retry-After": "3600"}, b"busy") if n == 3
                  else (200, {}, b"")) as rec:
        add_webhook(admin, rec.url)
        seqs = emit(insecure, 6)

        deliver_pending(insecure, timeout=10)
        again = deliver_pending(insecure, timeout=10)

    assert arrived(rec) == seqs[:3]
    assert again == 0
    rows = outbox(insecure)
    assert [row.status for row in rows] == ["sent", "sent"] + ["pending"] * 4
    assert rows[2].attempts == 1 and rows[2].next_attempt_at > utcnow() + timedelta(minutes=50)
    for row in rows[3:]:
        assert (row.attempts, row.lease_owner, row.lease_until) == (0, None, None)


def test_a_run_that_outlasts_half_its_lease_hands_back_the_rest(
        admin: TestClient, insecure: Core, make_settings: Callable[..., Settings],
        caplog: pytest.LogCaptureFixture) -> None:
    """Lease 1 s and a receiver taking 0.2 s a message: a run stops once half its lease is
    spent and later claims deliver the rest, so no lease runs out mid-delivery; every message
    arrives once, in order, with one attempt counted."""
    def slow(_n: int) -> Answer:
        time.sleep(0.2)
        return 200, {}, b""

    worker_core = build_core(make_settings(outbox_lease_seconds=1))
    with receiver(slow) as rec:
        add_webhook(admin, rec.url)
        seqs = emit(insecure, 8)

        with caplog.at_level(logging.DEBUG, logger="gatepass.outbox"):
            deliver_pending(worker_core, timeout=20)

    assert arrived(rec) == seqs
    assert len(claims(caplog)) >= 3 and claims(caplog)[0] == 8
    assert {(row.status, row.attempts) for row in outbox(insecure)} == {("sent", 1)}
    worker_core.close()


def test_a_worker_killed_mid_run_loses_nothing_and_breaks_no_order(
        admin: TestClient, insecure: Core) -> None:
    """SIGKILL a `gatepass worker` in the middle of a run of 40: once its lease (1 s) expires,
    the next worker delivers from the first unrecorded message on, in order. Only messages
    delivered but not yet recorded at the kill arrive twice."""
    with receiver(lambda _n: (time.sleep(0.03), (200, {}, b""))[1]) as rec:
        add_webhook(admin, rec.url)
        seqs = emit(insecure, 40)
        env = worker_env(insecure.settings, GATEPASS_OUTBOX_LEASE_SECONDS="1")

        first = subprocess.Popen([GATEPASS, "worker"], env=env, stderr=subprocess.DEVNULL)
        try:
            rec.wait_for(10, timeout=20)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert len(rec.requests) < 40, "the first worker finished before it could be killed"
        second = subprocess.Popen([GATEPASS, "worker"], env=env, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: set(arrived(rec)) >= set(seqs))
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=20) == 0

    got = arrived(rec)
    # where the second worker went back (nowhere, if the first recorded all it had sent)
    repeat = next((n for n in range(1, len(got)) if got[n] <= got[n - 1]), len(got))
    first, second = got[:repeat], got[repeat:]
    assert first == seqs[:len(first)]  # in order
    assert second == seqs[len(seqs) - len(second):]  # in order, from its head to the end
    assert len(got) - len(seqs) <= 10
    assert {row.status for row in outbox(insecure)} == {"sent"}


def test_two_workers_on_postgresql_keep_each_endpoint_in_order_without_duplicates(
        backend: str, admin: TestClient, insecure: Core) -> None:
    """Two `gatepass worker` processes share the outbox of three endpoints while events keep
    coming: every endpoint gets every event exactly once, in seq order."""
    if backend != "postgres":
        pytest.skip("several worker processes are a PostgreSQL deployment")
    with receiver() as one, receiver() as two, receiver() as three:
        for rec in (one, two, three):
            add_webhook(admin, rec.url)
        env = worker_env(insecure.settings, GATEPASS_OUTBOX_RUN_SIZE="5")
        with running_workers(env, 2):  # both are up and polling before anything is queued
            seqs = emit(insecure, 60)
            for rec in (one, two, three):
                rec.wait_for(60, timeout=30)
            time.sleep(0.5)  # a duplicate would arrive now

    for rec in (one, two, three):
        assert arrived(rec) == seqs
