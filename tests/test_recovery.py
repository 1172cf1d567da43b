"""Forgot and reset password, users who share an email, and rate limits (CONTRACT §4; issue 5)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from conftest import REDIS_URL, set_site
from gatepass.app import create_app
from gatepass.auth import tokens
from gatepass.auth.models import OneTimeToken
from gatepass.context import CLI
from gatepass.core import Core, build_core
from gatepass.db import utcnow
from gatepass.events.models import Event
from gatepass.outbox.models import OutboxMessage
from gatepass.ratelimit.service import REDIS_PREFIX
from gatepass.settings import Settings
from gatepass.users import service as users
from gatepass.users.schemas import UserCreate

OLD = "old password for tests"
NEW = "a brand new passphrase"


def make_user(core: Core, username: str, email: str, password: str = OLD) -> str:
    created = users.create_user(core, CLI, UserCreate(
        username=username, email=email, password=password, password_expired=False))
    return created.user.id


def reset_mails(core: Core) -> list[dict[str, Any]]:
    with core.db.read() as session:
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.kind == "mail")
                               .order_by(OutboxMessage.created_at)).all()
    return [row.payload for row in rows if row.payload["template"] == "password_reset"]


def token_of(mail: dict[str, Any]) -> str:
    match = re.search(r"(https?://[^\s/]+)/password/reset\?token=([\w-]+)", mail["text"])
    assert match, mail["text"]
    return match.group(2)


def signin(client: TestClient, login: str, password: str) -> int:
    return client.post("/api/v1/auth/signin",
                       json={"login": login, "password": password}).status_code


def test_forgot_mails_a_link_and_changes_nothing(client: TestClient, core: Core) -> None:
    """Forgot answers 202 {}; the user gets a link built from GATEPASS_PUBLIC_URL naming their
    username, an event is recorded, and the old password still works until the link is used."""
    make_user(core, "ada", "ada@example.com")

    response = client.post("/api/v1/auth/password/forgot", json={"login": "ada"})

    assert response.status_code == 202
    assert response.json() == {}
    [mail] = reset_mails(core)
    assert mail["to"] == "ada@example.com"
    assert "ada" in mail["subject"]
    assert "http://portal.example.test/password/reset?token=" in mail["text"]
    assert len(token_of(mail)) >= 43  # 256 bits, base64url
    with core.db.read() as session:
        stored = session.scalars(select(OneTimeToken.token_hash)).all()
        events = session.scalars(select(Event.type)).all()
    assert token_of(mail) not in stored  # only a hash is stored
    assert "user.password_reset_requested" in events
    assert signin(client, "ada", OLD) == 200


def test_known_and_unknown_logins_get_the_same_answer(client: TestClient, core: Core) -> None:
    """Known and unknown usernames and emails answer the same status, body and headers."""
    make_user(core, "ada", "ada@example.com")

    answers = [client.post("/api/v1/auth/password/forgot", json={"login": login})
               for login in ("ada", "nobody", "ada@example.com", "nobody@example.com")]

    assert {a.status_code for a in answers} == {202}
    assert {a.text for a in answers} == {"{}"}
    assert len({tuple(sorted((k, v) for k, v in a.headers.items() if k != "date"))
                for a in answers}) == 1
    assert len(reset_mails(core)) == 2


def test_a_shared_email_mails_each_user_their_own_link(client: TestClient, core: Core) -> None:
    """With unique emails off, forgot by username mails only that user; forgot by the shared
    email mails each user a link naming their username; each link resets only its user."""
    set_site(core, users__require_unique_email=False)
    make_user(core, "reeta", "team@example.com")
    make_user(core, "abhishek", "team@example.com")

    client.post("/api/v1/auth/password/forgot", json={"login": "reeta"})
    [only] = reset_mails(core)
    client.post("/api/v1/auth/password/forgot", json={"login": "Team@Example.com"})
    both = reset_mails(core)[1:]

    assert "reeta" in only["text"] and "abhishek" not in only["text"]
    assert len(both) == 2
    by_name = {("reeta" if "reeta" in m["subject"] else "abhishek"): m for m in both}
    assert set(by_name) == {"reeta", "abhishek"}
    assert "abhishek" not in by_name["reeta"]["text"]
    assert "reeta" not in by_name["abhishek"]["text"]
    reset = client.post("/api/v1/auth/password/reset",
                        json={"token": token_of(by_name["abhishek"]), "new_password": NEW})
    assert reset.status_code == 200
    assert reset.json()["user"]["username"] == "abhishek"
    assert signin(client, "abhishek", NEW) == 200
    assert signin(client, "reeta", OLD) == 200
    assert signin(client, "reeta", NEW) == 401


def test_a_reset_revokes_sessions_clears_lockout_and_tells_the_user(client: TestClient,
                                                                   core: Core) -> None:
    """A successful reset does not sign in, signs out every session, lifts a lock, mails
    "your password was changed" and records user.password_reset."""
    make_user(core, "ada", "ada@example.com")
    session_token = client.post("/api/v1/auth/signin",
                                json={"login": "ada", "password": OLD}).json()["session_token"]
    client.cookies.clear()
    for _ in range(5):
        signin(client, "ada", "wrong password!")
    assert signin(client, "ada", OLD) == 423
    client.post("/api/v1/auth/password/forgot", json={"login": "ada"})

    reset = client.post("/api/v1/auth/password/reset",
                        json={"token": token_of(reset_mails(core)[0]), "new_password": NEW})

    assert reset.status_code == 200
    assert "session_token" not in reset.json()
    assert "gatepass_session" not in reset.headers.get("set-cookie", "")
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {session_token}"})
    assert me.status_code == 401
    assert signin(client, "ada", NEW) == 200
    with core.db.read() as session:
        templates = [m.payload["template"] for m in session.scalars(select(OutboxMessage))]
        events = session.scalars(select(Event.type)).all()
    assert "password_changed" in templates
    assert "user.password_reset" in events


def test_a_token_works_once_expires_and_dies_with_an_admin_reset(admin: TestClient,
                                                                core: Core) -> None:
    """Reset tokens are refused (400 invalid_token) when used twice, after expiry, and after
    the password changed by another route."""
    user_id = make_user(core, "ada", "ada@example.com")
    for _ in range(3):
        admin.post("/api/v1/auth/password/forgot", json={"login": "ada"})
    used, expired, stale = (token_of(m) for m in reset_mails(core))
    with core.db.write() as session:
        session.execute(update(OneTimeToken).where(OneTimeToken.token_hash == tokens.digest(expired))
                        .values(expires_at=utcnow() - timedelta(seconds=1)))

    first = admin.post("/api/v1/auth/password/reset", json={"token": used, "new_password": NEW})
    twice = admin.post("/api/v1/auth/password/reset", json={"token": used,
                                                            "new_password": NEW + "!"})
    late = admin.post("/api/v1/auth/password/reset", json={"token": expired,
                                                           "new_password": NEW})
    admin.post(f"/admin/api/v1/users/{user_id}/reset-password",
               json={"password": "admin chose this one"})
    after_admin = admin.post("/api/v1/auth/password/reset", json={"token": stale,
                                                                  "new_password": NEW})

    assert first.status_code == 200
    for answer in (twice, late, after_admin):
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_token"


def test_a_weak_new_password_is_refused_and_keeps_the_link(client: TestClient,
                                                           core: Core) -> None:
    """A new password that fails the policy is a 422 on new_password; the link still works."""
    make_user(core, "ada", "ada@example.com")
    client.post("/api/v1/auth/password/forgot", json={"login": "ada"})
    token = token_of(reset_mails(core)[0])

    weak = client.post("/api/v1/auth/password/reset", json={"token": token,
                                                            "new_password": "password"})
    good = client.post("/api/v1/auth/password/reset", json={"token": token, "new_password": NEW})

    assert weak.status_code == 422
    assert weak.json()["error"]["field"] == "new_password"
    assert good.status_code == 200


def test_a_poisoned_host_header_never_reaches_a_link(client: TestClient, core: Core) -> None:
    """Host, X-Forwarded-Host and Forwarded headers do not change the links in mail."""
    make_user(core, "ada", "ada@example.com")
    evil = {"Host": "evil.example", "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https", "Forwarded": "host=evil.example;proto=https"}

    client.post("/api/v1/auth/password/forgot", json={"login": "ada"}, headers=evil)

    [mail] = reset_mails(core)
    assert "evil" not in mail["text"] and "evil" not in (mail["html"] or "")
    assert "http://portal.example.test/password/reset?token=" in mail["text"]


def test_forgot_is_rate_limited_per_login(client: TestClient, core: Core) -> None:
    """The sixth forgot request for one login within a minute is a 429 with Retry-After, and
    for an unknown login alike."""
    make_user(core, "ada", "ada@example.com")

    known = [client.post("/api/v1/auth/password/forgot", json={"login": "ada"})
             for _ in range(6)]
    unknown = [client.post("/api/v1/auth/password/forgot", json={"login": "ghost"})
               for _ in range(6)]

    assert [a.status_code for a in known] == [202] * 5 + [429]
    assert [a.status_code for a in unknown] == [202] * 5 + [429]
    assert known[5].json() == unknown[5].json()
    assert 1 <= int(known[5].headers["Retry-After"]) <= 60
    assert len(reset_mails(core)) == 5


@pytest.fixture
def redis_clean() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"Redis is not available at {REDIS_URL}")

    def flush() -> None:
        keys = list(client.scan_iter(f"{REDIS_PREFIX}*"))
        if keys:
            client.delete(*keys)

    flush()
    yield client
    flush()
    client.close()


@pytest.mark.redis
def test_rate_limits_hold_across_two_instances_sharing_redis(
        make_settings: Callable[..., Settings], redis_clean: redis.Redis) -> None:
    """Two app processes with one GATEPASS_REDIS_URL share the counts: 3 forgot requests on
    one and 2 on the other use up the 5 allowed; the next on either is a 429."""
    cores = [build_core(make_settings(redis_url=REDIS_URL)) for _ in range(2)]
    try:
        with TestClient(create_app(cores[0].settings, core=cores[0])) as one, \
                TestClient(create_app(cores[1].settings, core=cores[1])) as two:
            answers = [c.post("/api/v1/auth/password/forgot", json={"login": "shared"}).status_code
                       for c in (one, two, one, two, one)]
            next_one = one.post("/api/v1/auth/password/forgot", json={"login": "shared"})
            next_two = two.post("/api/v1/auth/password/forgot", json={"login": "shared"})
    finally:
        for core in cores:
            core.close()

    assert answers == [202] * 5
    assert next_one.status_code == next_two.status_code == 429
    assert list(redis_clean.scan_iter(f"{REDIS_PREFIX}*"))
    assert not any(b"shared" in key for key in redis_clean.scan_iter(f"{REDIS_PREFIX}*"))
