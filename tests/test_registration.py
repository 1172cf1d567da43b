"""Self-service registration and email verification (CONTRACT §4, §5; issue 5)."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from conftest import set_site
from gatepass.context import CLI
from gatepass.core import Core
from gatepass.events.models import Event
from gatepass.outbox.models import OutboxMessage
from gatepass.users import service as users
from gatepass.users.models import User
from gatepass.users.schemas import UserCreate

PASSWORD = "correct horse battery staple"


def mails(core: Core, template: str | None = None) -> list[dict[str, Any]]:
    with core.db.read() as session:
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.kind == "mail")
                               .order_by(OutboxMessage.created_at)).all()
    return [row.payload for row in rows if template is None or row.payload["template"] == template]


def link_in(mail: dict[str, Any]) -> str:
    match = re.search(r"https?://\S+token=[\w-]+", mail["text"])
    assert match, mail["text"]
    return match.group(0)


def user_count(core: Core) -> int:
    with core.db.read() as session:
        return int(session.scalar(select(func.count()).select_from(User)) or 0)


def events_of(core: Core, type_: str) -> list[Event]:
    with core.db.read() as session:
        return list(session.scalars(select(Event).where(Event.type == type_)))


def test_open_registration_creates_a_user_who_can_sign_in(client: TestClient, core: Core) -> None:
    """Registering answers 201 with the user (username from the email) and records
    user.created triggered by the portal; the user then signs in with their password."""
    response = client.post("/api/v1/auth/register", json={
        "email": "Ada@Example.com", "password": PASSWORD, "first_name": "Ada"})

    assert response.status_code == 201
    user = response.json()["user"]
    assert user["username"] == "Ada"
    assert user["email"] == "Ada@example.com"
    assert user["password_expired"] is False
    [event] = events_of(core, "user.created")
    assert event.context["triggered_by"] == "portal"
    signin = client.post("/api/v1/auth/signin", json={"login": "ada", "password": PASSWORD})
    assert signin.status_code == 200
    assert signin.json()["status"] == "ok"


def test_settings_close_registration_with_clear_codes(client: TestClient, core: Core) -> None:
    """registration.enabled off closes every kind (403 registration_closed); open off needs an
    invitation (403 invitation_required); nothing is written either way."""
    body = {"email": "a@example.com", "password": PASSWORD}
    set_site(core, registration__open=False)
    needs_code = client.post("/api/v1/auth/register", json=body)
    set_site(core, registration__enabled=False)
    closed = client.post("/api/v1/auth/register", json=body)
    closed_with_code = client.post("/api/v1/auth/register",
                                   json={**body, "invitation_code": "whatever"})

    assert needs_code.status_code == 403
    assert needs_code.json()["error"]["code"] == "invitation_required"
    assert closed.status_code == 403 and closed_with_code.status_code == 403
    assert closed.json()["error"]["code"] == "registration_closed"
    assert closed_with_code.json()["error"]["code"] == "registration_closed"
    assert user_count(core) == 0


def test_an_unknown_invitation_code_is_refused_and_writes_nothing(client: TestClient,
                                                                 core: Core) -> None:
    """With registration by invitation only, a code that matches nothing answers 400
    invitation_invalid and creates no user."""
    set_site(core, registration__open=False)

    response = client.post("/api/v1/auth/register", json={
        "email": "a@example.com", "password": PASSWORD, "invitation_code": "nope-nope"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invitation_invalid"
    assert user_count(core) == 0


def test_bad_input_is_one_clear_error(client: TestClient, core: Core) -> None:
    """A weak password or a bad email is a 422 naming the field; nothing is created."""
    weak = client.post("/api/v1/auth/register", json={"email": "a@example.com",
                                                       "password": "password"})
    short = client.post("/api/v1/auth/register", json={"email": "a@example.com",
                                                        "password": "abc"})
    bad_email = client.post("/api/v1/auth/register", json={"email": "not-an-email",
                                                            "password": PASSWORD})

    assert weak.status_code == 422 and weak.json()["error"]["field"] == "password"
    assert short.status_code == 422 and short.json()["error"]["code"] == "weak_password"
    assert bad_email.status_code == 422 and bad_email.json()["error"]["field"] == "email"
    assert user_count(core) == 0


def test_verification_link_must_be_used_before_sign_in(client: TestClient, core: Core) -> None:
    """With require_email_verification, the new user gets a one-time link built from the public
    URL; sign-in answers 403 email_not_verified until it is used; it works once."""
    set_site(core, registration__require_email_verification=True)
    client.post("/api/v1/auth/register", json={"email": "ada@example.com", "password": PASSWORD})
    [mail] = mails(core, "email_verify")
    link = link_in(mail)
    token = link.split("token=")[1]

    before = client.post("/api/v1/auth/signin", json={"login": "ada", "password": PASSWORD})
    verified = client.post("/api/v1/auth/email/verify", json={"token": token})
    again = client.post("/api/v1/auth/email/verify", json={"token": token})
    after = client.post("/api/v1/auth/signin", json={"login": "ada", "password": PASSWORD})

    assert mail["to"] == "ada@example.com"
    assert link.startswith("http://portal.example.test/email/verify?token=")
    assert before.status_code == 403
    assert before.json()["error"]["code"] == "email_not_verified"
    assert verified.status_code == 200
    assert verified.json()["user"]["email_verified"] is True
    assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_token"
    assert after.status_code == 200
    assert len(events_of(core, "user.email_verified")) == 1


def test_a_taken_email_is_not_revealed_where_verification_is_on(client: TestClient,
                                                                core: Core) -> None:
    """Registering a taken email answers exactly like a fresh one (201, same shape, same
    fields); no user is created and the owner is told by mail instead."""
    set_site(core, registration__require_email_verification=True)
    client.post("/api/v1/auth/register", json={"email": "owner@example.com", "username": "owner",
                                               "password": PASSWORD})

    taken = client.post("/api/v1/auth/register", json={"email": "owner@example.com",
                                                        "password": PASSWORD})
    fresh = client.post("/api/v1/auth/register", json={"email": "fresh@example.com",
                                                        "password": PASSWORD})

    assert taken.status_code == fresh.status_code == 201
    varying = {"id", "username", "email", "created_at", "updated_at"}
    one, two = taken.json()["user"], fresh.json()["user"]
    assert set(one) == set(two)
    assert {k: v for k, v in one.items() if k not in varying} == \
        {k: v for k, v in two.items() if k not in varying}
    assert user_count(core) == 2
    [notice] = mails(core, "registration_attempt")
    assert notice["to"] == "owner@example.com"
    assert "owner" in notice["text"] and "/password/forgot" in notice["text"]


def test_a_bad_code_with_a_taken_email_is_refused_like_with_a_fresh_one(client: TestClient,
                                                                        core: Core) -> None:
    """Where verification hides taken emails, a bad invitation code must still be refused
    the same way for both: otherwise a 201 here (and 400 for a fresh email) tells them apart."""
    set_site(core, registration__require_email_verification=True, registration__open=False)
    users.create_user(core, CLI, UserCreate(email="owner@example.com", password=PASSWORD))

    answers = [client.post("/api/v1/auth/register", json={
        "email": email, "password": PASSWORD, "invitation_code": "nope-nope"})
        for email in ("owner@example.com", "fresh@example.com")]

    assert [a.status_code for a in answers] == [400, 400]
    assert [a.json()["error"]["code"] for a in answers] == ["invitation_invalid"] * 2
    assert user_count(core) == 1 and mails(core, "registration_attempt") == []


def test_a_taken_email_conflicts_where_verification_is_off(client: TestClient,
                                                          core: Core) -> None:
    """Without verification a taken email is a 409 conflict (documented in docs/security.md)."""
    client.post("/api/v1/auth/register", json={"email": "owner@example.com", "password": PASSWORD})

    again = client.post("/api/v1/auth/register", json={"email": "OWNER@example.com",
                                                        "password": PASSWORD})

    assert again.status_code == 409
    assert again.json()["error"]["field"] == "email"


def test_resend_always_answers_202_and_mails_only_the_unverified(client: TestClient,
                                                                core: Core) -> None:
    """Resend answers 202 {} for anyone; an unverified user gets a fresh working link."""
    set_site(core, registration__require_email_verification=True)
    client.post("/api/v1/auth/register", json={"email": "ada@example.com", "password": PASSWORD})

    known = client.post("/api/v1/auth/email/verify/resend", json={"login": "ada"})
    unknown = client.post("/api/v1/auth/email/verify/resend", json={"login": "nobody"})

    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json() == {}
    first, second = mails(core, "email_verify")
    token = link_in(second).split("token=")[1]
    assert client.post("/api/v1/auth/email/verify", json={"token": token}).status_code == 200


def test_registration_is_rate_limited_per_email(client: TestClient, core: Core) -> None:
    """The 11th registration attempt for one email within an hour answers 429 with
    Retry-After; with ratelimit.enabled off the limit does not apply."""
    body = {"email": "target@example.com", "password": "x"}  # weak: nothing is ever created
    answers = [client.post("/api/v1/auth/register", json=body).status_code for _ in range(11)]
    limited = client.post("/api/v1/auth/register", json=body)
    set_site(core, ratelimit__enabled=False)
    unlimited = client.post("/api/v1/auth/register", json=body)

    assert answers[:10] == [422] * 10
    assert answers[10] == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 3600
    assert unlimited.status_code == 422


def test_register_page_prefills_the_power_pages_invitation_link(client: TestClient) -> None:
    """/register/?returnurl=%2f&invitation=CODE shows the form with the code filled in."""
    response = client.get("/register/?returnurl=%2f&invitation=ABC-123")

    assert response.status_code == 200
    assert 'value="ABC-123"' in response.text
    assert 'name="csrf_token"' in response.text
    assert 'autocomplete="new-password"' in response.text
