"""The audit log: every change writes its event, with who triggered it, in the change's own
transaction; events never hold a secret; GET /events pages through them; the blocking
user.pre_create hook can refuse or enrich a new user."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner
from webhook_receivers import Answer, receiver

from conftest import set_site
from gatepass.auth import service as auth
from gatepass.auth.models import UserSession
from gatepass.context import Context
from gatepass.core import Core
from gatepass.events import service as events
from gatepass.events.models import Event
from gatepass.outbox.models import OutboxMessage
from gatepass.settings import Settings
from gatepass.users import service as users
from gatepass.users.models import User
from gatepass.users.schemas import UserCreate

PASSWORD = "violet-Harbour-42-kettle"
FORBIDDEN_KEYS = {"password", "password_hash", "token", "token_hash", "session_token", "code",
                  "code_hash", "secret", "security_stamp", "api_key"}


def all_events(admin: TestClient, **filters: Any) -> list[dict[str, Any]]:
    response = admin.get("/admin/api/v1/events", params={"limit": 1000, **filters})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def of_type(items: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [item for item in items if item["type"] == type_]


def keys_in(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from keys_in(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from keys_in(inner)


def assert_no_secrets(items: list[dict[str, Any]], secrets: list[str]) -> None:
    text = json.dumps(items)
    for secret in secrets:
        assert secret not in text
    assert not FORBIDDEN_KEYS & set(keys_in(items))
    assert "$argon2" not in text


def signin(client: TestClient, login: str, password: str) -> Any:
    return client.post("/api/v1/auth/signin", json={"login": login, "password": password})


# -- who created the user -----------------------------------------------------------------------

def test_each_way_of_creating_a_user_says_who_did(admin: TestClient, core: Core,
                                                  settings: Settings) -> None:
    """user.created carries triggered_by admin_api, cli, portal (registration) or invitation,
    and the public user object."""
    by_admin = admin.post("/admin/api/v1/users", json={"email": "ada@example.com"}).json()
    env = {"GATEPASS_DATABASE_URL": settings.database_url,
           "GATEPASS_SECRET_KEY": settings.secret_key or "", "GATEPASS_VAR_DIR":
           str(settings.var_dir), "GATEPASS_ARGON2_MEMORY_KIB": "64",
           "GATEPASS_ARGON2_TIME_COST": "1", "GATEPASS_WORKER": "external"}
    from gatepass.cli import app as cli

    result = CliRunner().invoke(cli, ["users", "create", "--email", "cli@example.com"], env=env)
    assert result.exit_code == 0, result.output
    registered = admin.post("/api/v1/auth/register",
                            json={"email": "self@example.com", "password": PASSWORD})
    assert registered.status_code == 201, registered.text
    invited = admin.post("/admin/api/v1/invitations",
                         json={"type": "single", "emails": ["inv@example.com"],
                               "send_email": False})
    assert invited.status_code == 201, invited.text
    code = invited.json()["invitations"][0]["code"]
    redeemed = admin.post("/api/v1/auth/register", json={
        "email": "inv@example.com", "password": PASSWORD, "invitation_code": code})
    assert redeemed.status_code == 201, redeemed.text

    created = of_type(all_events(admin), "user.created")

    by_email = {item["payload"]["user"]["email"]: item for item in created}
    assert {email: item["context"]["triggered_by"] for email, item in by_email.items()} == {
        "ada@example.com": "admin_api", "cli@example.com": "cli",
        "self@example.com": "portal", "inv@example.com": "invitation"}
    ada = by_email["ada@example.com"]
    assert ada["payload"]["user"] == by_admin["user"]
    assert ada["context"]["actor"]["type"] == "api_key"
    assert ada["context"]["user_agent"] == "testclient"
    assert by_email["cli@example.com"]["context"]["actor"] == {"type": "cli", "id": "cli"}
    assert of_type(all_events(admin), "invitation.created")
    assert of_type(all_events(admin), "invitation.redeemed")


def test_sign_in_lockout_and_password_events(admin: TestClient, core: Core) -> None:
    """Sign-in, failed sign-in, lock (by failures and by an admin), unlock, password change,
    forgot/reset and admin reset each write their event; none holds a secret."""
    set_site(core, lockout__max_failed_attempts=3)
    user = admin.post("/admin/api/v1/users", json={
        "email": "ada@example.com", "username": "ada", "password": PASSWORD,
        "password_expired": False}).json()["user"]
    user_id = user["id"]
    client = admin  # the same app; the public API ignores the admin key
    ok = signin(client, "ada", PASSWORD)
    assert ok.status_code == 200
    token = ok.json()["session_token"]
    for _ in range(3):
        assert signin(client, "ada", "wrong-password-1").status_code in (401, 423)
    assert admin.post(f"/admin/api/v1/users/{user_id}/unlock").status_code == 200
    token = signin(client, "ada", PASSWORD).json()["session_token"]
    new_password = "quiet-Meadow-77-lantern"
    changed = client.post("/api/v1/auth/password/change", headers={
        "Authorization": f"Bearer {token}"}, json={"current_password": PASSWORD,
                                                    "new_password": new_password})
    assert changed.status_code == 200, changed.text
    assert client.post("/api/v1/auth/password/forgot", json={"login": "ada"}).status_code == 202
    with core.db.read() as session:
        mail = session.scalars(select(OutboxMessage).where(OutboxMessage.kind == "mail")
                               .order_by(OutboxMessage.created_at.desc())).first()
    assert mail is not None
    reset_token = re.search(r"token=([\w-]+)", mail.payload["text"]).group(1)  # type: ignore
    reset_password = "amber-Valley-31-compass"
    reset = client.post("/api/v1/auth/password/reset",
                        json={"token": reset_token, "new_password": reset_password})
    assert reset.status_code == 200, reset.text
    by_admin = admin.post(f"/admin/api/v1/users/{user_id}/reset-password",
                          json={"generate_password": True}).json()
    assert admin.post(f"/admin/api/v1/users/{user_id}/lock").status_code == 200

    items = all_events(admin, user_id=user_id)

    seen = [(item["type"], item["context"]["triggered_by"]) for item in items]
    assert seen == [
        ("user.created", "admin_api"), ("user.signed_in", "portal"),
        ("user.sign_in_failed", "portal"), ("user.sign_in_failed", "portal"),
        ("user.sign_in_failed", "portal"), ("user.locked", "portal"),
        ("user.unlocked", "admin_api"), ("user.signed_in", "portal"),
        ("user.password_changed", "portal"), ("user.password_reset_requested", "portal"),
        ("user.password_reset", "portal"), ("user.password_reset", "admin_api"),
        ("user.locked", "admin_api")]
    assert [item["payload"]["reason"] for item in of_type(items, "user.locked")] == [
        "failed_sign_ins", "admin"]
    assert all(item["payload"]["user"]["id"] == user_id for item in items)
    seqs = [item["seq"] for item in items]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert_no_secrets(items, [PASSWORD, new_password, reset_password, reset_token, token,
                              by_admin["password"], "wrong-password-1"])


def test_a_rolled_back_change_emits_nothing(core: Core) -> None:
    """When a use case fails after writing its event, the event, its webhook deliveries and
    the change itself all roll back together."""
    from gatepass.webhooks import service as webhooks

    set_site(core, webhooks__allow_insecure_urls=True)
    webhooks.create_webhook(core, Context("admin_api"), "http://127.0.0.1:9/", ["*"])

    def crash(_tx: events.Tx, event: events.Recorded) -> None:
        raise RuntimeError(f"crash after {event.type}")

    events.subscribe(crash)
    try:
        with pytest.raises(RuntimeError):
            users.create_user(core, Context("admin_api"), UserCreate(email="ada@example.com"))
    finally:
        events._subscribers.remove(crash)

    with core.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 0
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
        assert session.scalar(select(func.count()).select_from(User)) == 0


def test_a_sign_in_that_fails_after_its_event_leaves_no_session(core: Core,
                                                                client: TestClient) -> None:
    """Sign-in runs on plain statements: when its transaction fails after the event is
    written, the session, the event and the sign-in's changes to the user all roll back, and
    the caller gets the API's 500 answer."""
    created = users.create_user(core, Context("admin_api"), UserCreate(
        username="ada", password=PASSWORD, password_expired=False))
    client.post("/api/v1/auth/signin", json={"login": "ada", "password": "wrong"})

    def crash(_tx: events.Tx, event: events.Recorded) -> None:
        raise RuntimeError(f"crash after {event.type}")

    events.subscribe(crash)
    try:
        response = client.post("/api/v1/auth/signin", json={"login": "ada", "password": PASSWORD})
    finally:
        events._subscribers.remove(crash)

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    assert "set-cookie" not in response.headers
    with core.db.read() as session:
        user = session.get(User, created.user.id)
        assert user is not None and user.last_sign_in_at is None
        assert user.failed_count == 2  # the first failure, and this attempt's reservation
        assert [e.type for e in session.scalars(select(Event).order_by(Event.seq))] == [
            "user.created", "user.sign_in_failed"]
        assert session.scalar(select(func.count()).select_from(UserSession)) == 0


# -- the audit-log API --------------------------------------------------------------------------

def test_events_api_filters_and_pages(admin: TestClient, core: Core) -> None:
    """Oldest first; filter by type (exact or prefix) and user; page with after/next_after."""
    ids = [admin.post("/admin/api/v1/users", json={"email": f"u{n}@example.com"}).json()
           ["user"]["id"] for n in range(3)]
    admin.patch(f"/admin/api/v1/users/{ids[1]}", json={"first_name": "Bea"})

    first = admin.get("/admin/api/v1/events", params={"limit": 2}).json()
    rest = admin.get("/admin/api/v1/events", params={"after": first["next_after"]}).json()

    assert [i["type"] for i in first["items"] + rest["items"]] == [
        "user.created", "user.created", "user.created", "user.updated"]
    assert first["has_more"] is True and rest["has_more"] is False
    assert rest["next_after"] == rest["items"][-1]["seq"]
    assert len(all_events(admin, type="user.created")) == 3
    assert len(all_events(admin, type="user.*")) == 4
    assert [i["type"] for i in all_events(admin, user_id=ids[1])] == ["user.created",
                                                                      "user.updated"]
    assert admin.get("/admin/api/v1/events", params={"after": 10**6}).json()["items"] == []
    bad = admin.get("/admin/api/v1/events", params={"type": "user.nope"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "type"


def test_events_api_scopes(client: TestClient, core: Core) -> None:
    """A `read` or `webhooks` key reads the audit log; a `users` key may not."""
    keys = {scope: auth.create_api_key(core, scope, [scope])[1]
            for scope in ("read", "webhooks", "users")}

    answers = {scope: client.get("/admin/api/v1/events",
                                 headers={"Authorization": f"Bearer {key}"}).status_code
               for scope, key in keys.items()}

    assert answers == {"read": 200, "webhooks": 200, "users": 403}


# -- the blocking hook --------------------------------------------------------------------------

def refuse(_n: int) -> Answer:
    return 200, {"content-type": "application/json"}, json.dumps(
        {"is_allowed": False, "reason": "Sign-ups only from the corporate network."}).encode()


def test_pre_create_refusal_stops_registration(admin: TestClient, core: Core) -> None:
    """The hook's reason is the answer's message; no user and no event are written."""
    with receiver(refuse) as hook:
        set_site(core, hooks__pre_create_url=hook.url, webhooks__allow_insecure_urls=True)

        response = admin.post("/api/v1/auth/register",
                              json={"email": "eve@example.com", "password": PASSWORD})

        [asked] = hook.wait_for(1)
    assert response.status_code == 403
    assert response.json()["error"] == {"code": "user_rejected",
                                        "message": "Sign-ups only from the corporate network."}
    sent = json.loads(asked.body)
    assert sent["type"] == "user.pre_create"
    assert sent["payload"]["user"]["email"] == "eve@example.com"
    assert sent["context"]["triggered_by"] == "portal"
    assert PASSWORD not in asked.body.decode()
    assert all_events(admin) == []
    assert admin.get("/admin/api/v1/users").json()["items"] == []


def test_pre_create_refusal_is_shown_on_the_register_page(client: TestClient,
                                                          core: Core) -> None:
    """The /register page shows the hook's reason to the person registering."""
    with receiver(refuse) as hook:
        set_site(core, hooks__pre_create_url=hook.url, webhooks__allow_insecure_urls=True)
        page = client.get("/register")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None, page.text

        answer = client.post("/register", data={
            "csrf_token": csrf.group(1), "email": "eve@example.com", "password": PASSWORD,
            "password_confirm": PASSWORD, "confirm_password": PASSWORD})

    assert "Sign-ups only from the corporate network." in answer.text


def test_pre_create_attributes_and_failure_modes(admin: TestClient, core: Core) -> None:
    """Attributes the hook returns are set; an unreachable hook refuses (fail closed) unless
    hooks.pre_create_fail_open is on. Admin-created users pass through the hook too."""
    def enrich(_n: int) -> Answer:
        return 200, {}, json.dumps({"is_allowed": True,
                                    "attributes": {"region": "emea"}}).encode()

    with receiver(enrich) as hook:
        set_site(core, hooks__pre_create_url=hook.url, webhooks__allow_insecure_urls=True)
        made = admin.post("/admin/api/v1/users",
                          json={"email": "a@example.com", "attributes": {"team": "x"}})
    assert made.status_code == 201
    assert made.json()["user"]["attributes"] == {"team": "x", "region": "emea"}

    set_site(core, hooks__pre_create_url="http://127.0.0.1:9/closed")  # nothing listens
    closed = admin.post("/admin/api/v1/users", json={"email": "b@example.com"})
    assert closed.status_code == 403 and closed.json()["error"]["code"] == "user_rejected"

    set_site(core, hooks__pre_create_fail_open=True)
    assert admin.post("/admin/api/v1/users",
                      json={"email": "c@example.com"}).status_code == 201
    set_site(core, hooks__pre_create_url="")
    assert admin.post("/admin/api/v1/users",
                      json={"email": "d@example.com"}).status_code == 201


def test_seq_order_is_commit_order_so_pollers_miss_nothing(core: Core, backend: str) -> None:
    """An event recorded first in a transaction that commits last must not get the lower
    seq: a poller that read up to the other event would then skip it for good."""
    if backend != "postgres":
        pytest.skip("SQLite's writers take turns: two write transactions cannot overlap")
    import threading

    ctx = Context(triggered_by="system")
    with core.db.write() as slow:
        first = events.record(slow, ctx, "user.updated", {"user": {"id": "slow"}})
        slow.flush()

        def quick() -> None:  # starts and commits while `slow` is still open
            with core.db.write() as session:
                events.record(session, ctx, "user.updated", {"user": {"id": "quick"}})

        thread = threading.Thread(target=quick)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive()
        with core.db.read() as reader:  # what a poller sees at this moment
            seen = [e.seq for e in reader.scalars(select(Event).order_by(Event.seq))]

    with core.db.read() as reader:
        later = [e.seq for e in reader.scalars(select(Event).where(Event.seq > max(seen)))]
    assert later == [first.seq]  # polling after the last seq seen finds the slow one
