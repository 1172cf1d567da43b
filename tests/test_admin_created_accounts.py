"""Accounts an admin creates (issue 4): set-password links, temporary passwords, generated
usernames and passwords, and a forced change that no API route lets anyone skip."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gatepass.auth.models import OneTimeToken
from gatepass.cli import app as cli_app
from gatepass.core import Core
from gatepass.db import Base, utcnow
from gatepass.logs import JsonFormatter
from gatepass.outbox.models import OutboxMessage
from gatepass.passwords import policy
from gatepass.users.models import User

from conftest import set_site

USERS = "/admin/api/v1/users"
LINK = re.compile(r"/password/set\?token=([\w-]+)")


def create(admin: TestClient, **body: Any) -> dict[str, Any]:
    response = admin.post(USERS, json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def mails(core: Core, template: str, to: str) -> list[dict[str, Any]]:
    with core.db.read() as session:
        rows = session.scalars(sa.select(OutboxMessage).where(OutboxMessage.kind == "mail")
                               .order_by(OutboxMessage.created_at)).all()
        return [row.payload for row in rows
                if row.payload["template"] == template and row.payload["to"] == to]


def set_link_token(core: Core, to: str) -> str:
    """The token of the newest set-password link mailed to `to` (read from the outbox)."""
    found = LINK.search(mails(core, "account_set_password", to)[-1]["text"])
    assert found is not None
    return found.group(1)


def set_password(client: TestClient, token: str, new_password: str) -> Any:
    return client.post("/api/v1/auth/password/set",
                       json={"token": token, "new_password": new_password})


def signin(client: TestClient, login: str, password: str) -> Any:
    client.cookies.clear()
    return client.post("/api/v1/auth/signin", json={"login": login, "password": password})


# -- set-password links -------------------------------------------------------------------------

def test_set_password_link_works_once_and_does_not_sign_in(admin: TestClient,
                                                           core: Core) -> None:
    """A user created with no password gets a link; it sets the password once and only once."""
    user = create(admin, email="grace@example.com", send_password=True)["user"]
    token = set_link_token(core, "grace@example.com")

    first = set_password(admin, token, "compiler of the a-0 system")
    second = set_password(admin, token, "another long passphrase")

    assert user["password_set"] is False and user["password_expired"] is False
    assert first.status_code == 200
    assert "session_token" not in first.json() and "gatepass_session" not in first.cookies
    assert first.json()["user"]["password_set"] is True
    assert first.json()["user"]["email_verified"] is True  # the link proved the mailbox
    assert second.status_code == 400
    assert second.json()["error"]["code"] == "invalid_token"
    ok = signin(admin, "grace", "compiler of the a-0 system")
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert signin(admin, "grace", "another long passphrase").status_code == 401
    assert mails(core, "password_changed", "grace@example.com")


def test_set_password_link_expires(admin: TestClient, core: Core) -> None:
    """The link stops working after tokens.set_password_lifetime_hours."""
    set_site(core, tokens__set_password_lifetime_hours=1)
    create(admin, email="lin@example.com", send_password=True)
    token = set_link_token(core, "lin@example.com")
    with core.db.read() as session:
        expires_at = session.scalars(sa.select(OneTimeToken.expires_at)).one()
    assert timedelta(minutes=59) < expires_at - utcnow() <= timedelta(hours=1)
    with core.db.write() as session:
        session.execute(sa.update(OneTimeToken).values(expires_at=utcnow() - timedelta(seconds=1)))

    response = set_password(admin, token, "too late for this link")
    page = admin.get(f"/password/set?token={token}")

    assert response.status_code == 400
    assert response.json()["error"] == {"code": "invalid_token", "field": "token",
                                        "message": "This link is invalid or has expired."}
    assert page.status_code == 400 and "invalid or has expired" in page.text
    assert 'name="new_password"' not in page.text


def test_set_password_link_dies_when_an_admin_resets_the_password(admin: TestClient,
                                                                   core: Core) -> None:
    """An admin reset rotates the security stamp: an older link no longer works."""
    user = create(admin, email="ken@example.com", send_password=True)["user"]
    old = set_link_token(core, "ken@example.com")

    admin.post(f"{USERS}/{user['id']}/reset-password", json={"send_password": True})
    new = set_link_token(core, "ken@example.com")

    assert old != new
    assert set_password(admin, old, "unix and the c language").status_code == 400
    assert set_password(admin, new, "unix and the c language").status_code == 200


def test_unknown_and_garbage_tokens_get_the_same_answer(admin: TestClient) -> None:
    """Nothing tells an unknown link from a used or expired one."""
    answers = [set_password(admin, token, "whatever passphrase here").json()
               for token in ("nope", "x" * 43, "")]

    assert all(answer == answers[0] for answer in answers)
    assert answers[0]["error"]["code"] == "invalid_token"


def test_a_weak_password_is_refused_and_the_link_still_works(admin: TestClient,
                                                             core: Core) -> None:
    """Bad input writes nothing: the link is not used up by a refused password."""
    create(admin, email="weak@example.com", send_password=True)
    token = set_link_token(core, "weak@example.com")

    weak = set_password(admin, token, "password")
    good = set_password(admin, token, "a long and uncommon phrase")

    assert weak.status_code == 422
    assert weak.json()["error"]["code"] == "weak_password"
    assert weak.json()["error"]["field"] == "new_password"
    assert good.status_code == 200


def test_setting_the_password_clears_a_lockout(admin: TestClient, core: Core) -> None:
    """A locked-out user who sets their password through a link can sign in at once."""
    set_site(core, lockout__max_failed_attempts=2)
    create(admin, email="lock@example.com", send_password=True)
    token = set_link_token(core, "lock@example.com")
    for _ in range(2):
        signin(admin, "lock", "wrong password guess")
    assert signin(admin, "lock", "wrong password guess").status_code == 423

    set_password(admin, token, "unlocked by the link now")

    assert signin(admin, "lock", "unlocked by the link now").json()["status"] == "ok"


def test_set_password_page_shows_who_the_link_is_for(admin: TestClient, core: Core) -> None:
    """The page names the username and asks for a new password twice, for password managers."""
    create(admin, email="margaret@example.com", send_password=True)
    token = set_link_token(core, "margaret@example.com")

    page = admin.get(f"/password/set?token={token}")

    assert page.status_code == 200
    assert ">margaret<" in page.text
    assert page.text.count('autocomplete="new-password"') == 2
    assert 'autocomplete="username"' in page.text and 'name="csrf_token"' in page.text
    assert page.headers["cache-control"] == "no-store"


# -- temporary passwords ------------------------------------------------------------------------

def test_unused_temporary_password_dies_and_an_admin_reset_revives_access(
        admin: TestClient, core: Core) -> None:
    """Past password.temporary_lifetime_hours an unused password answers like a wrong one."""
    created = create(admin, email="tim@example.com", generate_password=True)
    with core.db.write() as session:
        session.execute(sa.update(User).values(
            password_changed_at=utcnow() - timedelta(hours=72, minutes=1)))

    dead = signin(admin, "tim", created["password"])
    wrong = signin(admin, "tim", "not the password at all")
    reset = admin.post(f"{USERS}/{created['user']['id']}/reset-password",
                       json={"generate_password": True})
    fresh = signin(admin, "tim", reset.json()["password"])

    assert dead.status_code == 401 and dead.json() == wrong.json()
    assert reset.status_code == 200
    assert fresh.status_code == 200 and fresh.json()["status"] == "password_change_required"


def test_a_used_temporary_password_does_not_die_of_age(admin: TestClient, core: Core) -> None:
    """Once signed in with, the temporary password lives until it is changed."""
    created = create(admin, email="used@example.com", generate_password=True)
    assert signin(admin, "used", created["password"]).status_code == 200
    with core.db.write() as session:
        session.execute(sa.update(User).values(
            password_changed_at=utcnow() - timedelta(hours=100)))

    assert signin(admin, "used", created["password"]).status_code == 200


# -- usernames and generated passwords ----------------------------------------------------------

def test_usernames_are_derived_from_the_email_and_made_unique(admin: TestClient) -> None:
    """ada@… → ada, then Ada2, ada3: uniqueness ignores case; a taken username is a 409."""
    names = [create(admin, email=email)["user"]["username"]
             for email in ("ada@example.com", "Ada@example.org", "ada@example.net",
                           "adam@example.com", "a.da+x@example.com")]
    taken = admin.post(USERS, json={"email": "other@example.com", "username": "ADA"})

    assert names == ["ada", "Ada2", "ada3", "adam", "a.da+x"]
    assert taken.status_code == 409 and taken.json()["error"]["field"] == "username"


def test_generated_passwords_are_long_unambiguous_strong_and_unique(admin: TestClient,
                                                                    core: Core) -> None:
    """Length password.generated_length, no look-alike characters, passing the policy."""
    set_site(core, password__generated_length=20)

    passwords = [create(admin, email=f"gen{n}@example.com", generate_password=True)["password"]
                 for n in range(5)]

    assert len(set(passwords)) == 5
    for password in passwords:
        assert len(password) == 20
        assert set(password) <= set(policy.GENERATOR_ALPHABET)
        assert not set(password) & set("0Oo1lI5S2Z")
        policy.check(password, min_length=8, check_common=True)
    assert signin(admin, "gen0", passwords[0]).json()["status"] == "password_change_required"


def _dump(core: Core, skip: tuple[str, ...] = ()) -> str:
    """Every row of every table, as text."""
    lines = []
    with core.db.read() as session:
        for table in Base.metadata.sorted_tables:
            if table.name in skip:
                continue
            for row in session.execute(sa.select(table)).all():
                lines.append(table.name + " " + json.dumps(list(row), default=str))
    return "\n".join(lines)


def test_plaintext_passwords_and_links_are_stored_and_logged_nowhere(
        admin: TestClient, core: Core, caplog: pytest.LogCaptureFixture) -> None:
    """Only the outbox holds a mailed secret, marked sensitive (scrubbed once delivered)."""
    caplog.set_level(logging.DEBUG)
    created = create(admin, email="secret@example.com", generate_password=True,
                     send_password=True)
    password = created["password"]
    reset = admin.post(f"{USERS}/{created['user']['id']}/reset-password",
                       json={"generate_password": True, "send_password": True}).json()["password"]
    other = create(admin, email="linked@example.com", send_password=True)
    token = set_link_token(core, "linked@example.com")
    signin(admin, "secret", reset)

    everything_else = _dump(core, skip=("outbox",))
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    with core.db.read() as session:
        holders = [row for row in session.scalars(sa.select(OutboxMessage))
                   if any(s in json.dumps(row.payload) for s in (password, reset, token))]
        events = "\n".join(json.dumps(list(row), default=str) for row in session.execute(
            sa.text("SELECT type, payload, context FROM events")).all())

    for secret in (password, reset, token):
        assert secret not in everything_else
        assert secret not in logged
        assert secret not in events
    assert "user.created" in events and "user.password_reset" in events
    assert len(holders) == 3 and all(row.sensitive for row in holders)
    assert other["user"]["password_set"] is False
    assert "password" not in other


# -- the forced change --------------------------------------------------------------------------

ALLOWED_WHILE_FORCED = {("POST", "/auth/password/change"), ("POST", "/auth/signout")}


def test_no_api_route_can_be_used_before_a_forced_change(admin: TestClient) -> None:
    """Every public API route that wants a session answers 403 password_change_required,
    except changing the password and signing out (the rancher#11186 bug class)."""
    create(admin, email="forced@example.com", password="the admin chose this one")
    token = signin(admin, "forced", "the admin chose this one").json()["session_token"]
    admin.cookies.clear()
    paths = admin.get("/api/v1/openapi.json").json()["paths"]
    checked = []

    for template, operations in paths.items():
        path = "/api/v1" + re.sub(r"\{[^}]+\}", "x", template)
        for method in (m.upper() for m in operations if m in ("get", "post", "patch", "put",
                                                              "delete")):
            anonymous = admin.request(method, path, json={})
            if anonymous.status_code != 401 or (method, template) in ALLOWED_WHILE_FORCED:
                continue  # a route for signed-out callers, or one allowed while forced
            response = admin.request(method, path, json={},
                                     headers={"Authorization": f"Bearer {token}"})
            checked.append((method, template))
            assert response.status_code == 403, (method, template, response.text)
            assert response.json()["error"]["code"] == "password_change_required"

    assert ("GET", "/me") in checked and ("PATCH", "/me") in checked
    me = admin.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 403
    changed = admin.post("/api/v1/auth/password/change",
                         headers={"Authorization": f"Bearer {token}"},
                         json={"current_password": "the admin chose this one",
                               "new_password": "my very own passphrase"})
    assert changed.status_code == 200
    assert admin.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}
                     ).status_code == 200


# -- the command line ---------------------------------------------------------------------------

def test_cli_resets_a_password_by_username(admin: TestClient, core: Core,
                                           tmp_path: Path) -> None:
    """`gatepass users reset-password USER --generate-password` prints the password last."""
    create(admin, email="cli@example.com", password="first password of cli")
    env = {"GATEPASS_DATABASE_URL": core.settings.database_url,
           "GATEPASS_VAR_DIR": str(tmp_path / "var"), "GATEPASS_SECRET_KEY": "k" * 40,
           "GATEPASS_ARGON2_MEMORY_KIB": "64", "GATEPASS_ARGON2_TIME_COST": "1"}

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(cli_app, ["users", "reset-password", "CLI",
                                              "--generate-password"], env=env)
        missing = CliRunner().invoke(cli_app, ["users", "reset-password", "nobody"], env=env)
    finally:  # the CLI configures logging for its process; give pytest its own back
        root.handlers[:], root.level = handlers, level

    assert result.exit_code == 0, result.output
    password = result.stdout.strip().splitlines()[-1]
    assert len(password) == 16
    assert signin(admin, "cli", "first password of cli").status_code == 401
    assert signin(admin, "cli", password).json()["status"] == "password_change_required"
    assert missing.exit_code == 1
    assert "no user with the id or username 'nobody'" in missing.stderr
