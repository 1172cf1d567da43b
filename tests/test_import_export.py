"""Import and export of users (CONTRACT §2, §3), and migration from Power Pages.

Every hash is made here, independently of Gatepass (hashlib, bcrypt, argon2-cffi; ASP.NET
Identity v2/v3 blobs built by hand from the format), and each user then signs in through
the public API. Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from gatepass.auth import service as auth
from gatepass.cli import app as cli_app
from gatepass.context import CLI
from gatepass.core import Core
from gatepass.events.models import Event
from gatepass.importer.service import Importer
from gatepass.users.models import Account, ExternalIdentity, Role, User, user_roles

from conftest import set_site

SALT = bytes(range(16))


# -- hashes, made the way each system makes them ------------------------------------------------

def aspnet_v2(password: str, salt: bytes = SALT) -> str:
    subkey = hashlib.pbkdf2_hmac("sha1", password.encode(), salt, 1000, 32)
    return base64.b64encode(b"\x00" + salt + subkey).decode()


def aspnet_v3(password: str, prf: int = 1, iterations: int = 10000, salt: bytes = SALT) -> str:
    name = {0: "sha1", 1: "sha256", 2: "sha512"}[prf]
    subkey = hashlib.pbkdf2_hmac(name, password.encode(), salt, iterations, 32)
    header = b"\x01" + prf.to_bytes(4, "big") + iterations.to_bytes(4, "big") \
        + len(salt).to_bytes(4, "big")
    return base64.b64encode(header + salt + subkey).decode()


def django_pbkdf2(password: str, salt: str = "seasalt", iterations: int = 1000) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def bcrypt_hash(password: str, prefix: str = "$2b$") -> str:
    made = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return prefix + made[4:]


def argon2_hash(password: str) -> str:
    return argon2.PasswordHasher(time_cost=1, memory_cost=64, type=argon2.Type.ID).hash(password)


# -- helpers ------------------------------------------------------------------------------------

def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line)
                     for line in lines).encode() + b"\n"


def post_import(admin: TestClient, body: bytes, **params: str) -> dict[str, Any]:
    response = admin.post("/admin/api/v1/users/import", content=body, params=params,
                          headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def signin(client: TestClient, login: str, password: str) -> Any:
    client.cookies.clear()
    return client.post("/api/v1/auth/signin", json={"login": login, "password": password})


def stored(core: Core, username: str) -> User:
    with core.db.read() as session:
        user = session.scalar(select(User).where(User.username_key == username.casefold()))
        assert user is not None, username
        return user


def event_types(core: Core) -> list[str]:
    with core.db.read() as session:
        return list(session.scalars(select(Event.type).order_by(Event.seq)))


@pytest.fixture(autouse=True)
def _no_rate_limits(core: Core) -> None:
    set_site(core, ratelimit__enabled=False)


# -- every format signs in -----------------------------------------------------------------------

FORMATS = {
    "argon": ("argon2 pass 1", argon2_hash, None),
    "bcrypt2b": ("bcrypt pass 2", bcrypt_hash, None),
    "bcrypt2y": ("bcrypt pass 3", lambda p: bcrypt_hash(p, "$2y$"), "bcrypt"),
    "bcrypt2a": ("bcrypt pass 4", lambda p: bcrypt_hash(p, "$2a$"), None),
    "django": ("django pass 5", django_pbkdf2, None),
    "aspv2": ("aspnet v2 pass 6", aspnet_v2, "aspnet_identity"),
    "aspv3sha256": ("aspnet v3 pass 7", aspnet_v3, "aspnet_identity"),
    "aspv3sha512": ("aspnet v3 pass 8", lambda p: aspnet_v3(p, prf=2, iterations=2000),
                    "aspnet_identity"),
    "aspv3sha1": ("aspnet v3 pass 9", lambda p: aspnet_v3(p, prf=0, iterations=1000),
                  "aspnet_identity"),
}


def test_every_hash_format_signs_in_and_is_rehashed_to_argon2id(
        core: Core, admin: TestClient) -> None:
    """Users keep their old passwords in every format; the first sign-in stores argon2id."""
    lines = []
    for username, (password, make, fmt) in FORMATS.items():
        line = {"username": username, "email": f"{username}@example.com",
                "password_hash": make(password)}
        if fmt:
            line["password_hash_format"] = fmt
        lines.append(line)

    result = post_import(admin, jsonl(*lines))

    assert result == {"created": len(FORMATS), "updated": 0, "failed": []}
    for username, (password, _, _) in FORMATS.items():
        response = signin(admin, username, password)
        assert response.status_code == 200, (username, response.text)
        assert response.json()["status"] == "ok"
        assert stored(core, username).password_hash.startswith("$argon2id$")
        assert signin(admin, username, password).status_code == 200  # and again, on argon2id


def test_a_wrong_password_fails_and_counts_toward_lockout(core: Core, admin: TestClient) -> None:
    """An imported user with 3 failures already locks after 2 more, at lockout.max = 5."""
    post_import(admin, jsonl({"username": "mira", "password_hash": aspnet_v2("right one"),
                              "password_hash_format": "aspnet_identity", "failed_count": 3}))

    first = signin(admin, "mira", "wrong one")
    second = signin(admin, "mira", "wrong one")
    locked = signin(admin, "mira", "right one")

    assert first.status_code == 401 and first.json()["error"]["code"] == "invalid_credentials"
    assert stored(core, "mira").failed_count == 5
    assert second.status_code == 401
    assert locked.status_code == 423
    assert stored(core, "mira").password_hash.startswith("aspnet:")  # never verified: kept


def test_imported_lockout_state_is_honoured(core: Core, admin: TestClient) -> None:
    """locked_until in the future answers 423 even with the right password; a past one is over."""
    until = (datetime.now(timezone.utc) + timedelta(hours=1)).replace(microsecond=0)
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    post_import(admin, jsonl(
        {"username": "locked", "password_hash": bcrypt_hash("pass word 1"),
         "locked_until": until.isoformat(), "failed_count": 5},
        {"username": "was_locked", "password_hash": bcrypt_hash("pass word 2"),
         "locked_until": past.isoformat(), "failed_count": 5},
        {"username": "disabled", "password_hash": bcrypt_hash("pass word 3"),
         "login_enabled": False}))

    locked = signin(admin, "locked", "pass word 1")
    free = signin(admin, "was_locked", "pass word 2")
    disabled = signin(admin, "disabled", "pass word 3")

    assert locked.status_code == 423
    assert datetime.fromisoformat(locked.json()["error"]["locked_until"]) == until
    assert free.status_code == 200
    assert disabled.status_code == 403 and disabled.json()["error"]["code"] == "login_disabled"


# -- bad lines ----------------------------------------------------------------------------------

def test_each_bad_line_is_reported_and_changes_nothing(core: Core, admin: TestClient) -> None:
    """Good lines import; each bad one is named by line number, with one sentence, and writes
    nothing (not even its account or roles)."""
    admin.post("/admin/api/v1/users", json={"username": "taken", "email": "taken@example.com"})
    body = jsonl(
        {"username": "ok1", "email": "ok1@example.com", "roles": ["Partner"], "account": "Acme"},
        "{not json",
        {"username": "bademail", "email": "nope"},
        {"username": "dup", "email": "dup1@example.com"},
        {"username": "DUP", "email": "dup2@example.com", "account": "Ghost Co"},
        {"username": "taken", "email": "new@example.com"},
        {"username": "other", "email": "TAKEN@example.com", "roles": ["Ghost role"]},
        {"username": "nohashformat", "password_hash": aspnet_v2("x" * 10)},
        {"username": "badbcrypt", "password_hash": "$2b$12$short"},
        {"username": "noaccount", "account_id": "0f0f0f0f-0000-0000-0000-000000000000"},
        {"username": "extra", "colour": "blue"},
        {"username": "ok2", "email": "ok2@example.com", "roles": ["Partner", "Customer"]},
    )

    result = post_import(admin, body)

    assert result["created"] == 3  # ok1, dup, ok2
    assert result["updated"] == 0
    failed = {item["line"]: item["error"] for item in result["failed"]}
    assert sorted(failed) == [2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert failed[2] == "The line is not valid JSON."
    assert "not a valid email" in failed[3]
    assert failed[5] == "The same username is on line 4."
    assert failed[6] == "That username is taken."
    assert failed[7] == "A user with that email already exists."
    assert "password_hash_format" in failed[8]
    assert "bcrypt" in failed[9]
    assert "no account with that id" in failed[10]
    assert "'colour'" in failed[11]
    users = admin.get("/admin/api/v1/users", params={"limit": 100}).json()["items"]
    assert sorted(u["username"] for u in users) == ["dup", "ok1", "ok2", "taken"]
    assert sorted(r["name"] for r in admin.get("/admin/api/v1/roles").json()["items"]) == \
        ["Customer", "Partner"]
    assert [a["name"] for a in admin.get("/admin/api/v1/accounts").json()["items"]] == ["Acme"]


def test_upsert_by_email_changes_only_the_given_fields(core: Core, admin: TestClient) -> None:
    """With ?upsert=email a matching user is updated, fields the line leaves out are kept,
    and without upsert the same line is a conflict."""
    post_import(admin, jsonl({"username": "ilse", "email": "ilse@example.com",
                              "first_name": "Ilse", "phone": "+358 40 1", "roles": ["A"]}))

    plain = post_import(admin, jsonl({"email": "ILSE@example.com", "last_name": "Koch"}))
    upserted = post_import(admin, jsonl({"email": "ILSE@example.com", "last_name": "Koch",
                                         "roles": ["B"], "email_verified": True},
                                        {"email": "new@example.com"}), upsert="email")

    assert plain["created"] == 0 and plain["failed"][0]["line"] == 1
    assert upserted == {"created": 1, "updated": 1, "failed": []}
    user = admin.get("/admin/api/v1/users", params={"q": "ilse"}).json()["items"][0]
    assert (user["first_name"], user["last_name"], user["phone"]) == ("Ilse", "Koch", "+358 40 1")
    assert user["roles"] == ["B"] and user["email_verified"] is True
    assert admin.post("/admin/api/v1/users/import?upsert=id", content=b"").status_code == 422


# -- batches, events, scopes -------------------------------------------------------------------

def test_a_large_body_imports_in_batches_with_one_event_each(core: Core,
                                                             admin: TestClient) -> None:
    """5,000 lines in one request: 3 batches, three users.imported events and no user.created;
    each event says what its batch did."""
    shared = bcrypt_hash("shared password")
    body = b"".join(json.dumps({"username": f"u{n}", "email": f"u{n}@example.com",
                                "password_hash": shared}).encode() + b"\n"
                    for n in range(5000))

    result = post_import(admin, body)

    assert result == {"created": 5000, "updated": 0, "failed": []}
    assert "user.created" not in event_types(core)
    events = admin.get("/admin/api/v1/events", params={"type": "users.imported"}).json()["items"]
    assert [e["payload"]["created"] for e in events] == [2000, 2000, 1000]
    assert events[0]["context"]["triggered_by"] == "import"
    assert len(events[2]["payload"]["user_ids"]) == 1000
    assert signin(admin, "u4999@example.com", "shared password").status_code == 200


def test_an_upsert_batch_updates_and_creates_and_everyone_signs_in(core: Core,
                                                                   admin: TestClient) -> None:
    """Existing users matched by username are updated (roles replaced, an external identity
    added) in the same batch that creates new ones; all of them sign in with their hashes."""
    post_import(admin, jsonl(*({"username": f"old{n}", "email": f"old{n}@example.com",
                                "roles": ["Old"], "password_hash": bcrypt_hash(f"old pw {n}")}
                               for n in range(3))))

    result = post_import(admin, jsonl(
        {"username": "old0", "first_name": "Updated", "roles": ["New"],
         "password_hash": bcrypt_hash("new pw 0"),
         "external_identities": [{"provider": "entra", "issuer": "https://login.example/t",
                                  "subject": "sub-old0"}]},
        {"username": "old1", "last_name": "Kept-hash"},
        {"username": "fresh", "email": "fresh@example.com", "roles": ["New"],
         "account": "Fresh Co", "password_hash": bcrypt_hash("fresh pw 1")}), upsert="username")

    assert result == {"created": 1, "updated": 2, "failed": []}
    users = {u["username"]: u for u in
             admin.get("/admin/api/v1/users", params={"limit": 100}).json()["items"]}
    assert sorted(users) == ["fresh", "old0", "old1", "old2"]
    assert users["old0"]["first_name"] == "Updated" and users["old0"]["roles"] == ["New"]
    assert users["old0"]["external_identities"] == [{"provider": "entra",
                                                     "subject": "sub-old0"}]
    assert users["old1"]["last_name"] == "Kept-hash" and users["old1"]["roles"] == ["Old"]
    assert users["fresh"]["roles"] == ["New"] and users["fresh"]["account_id"] is not None
    assert uuid.UUID(users["fresh"]["id"]).version == 4
    assert signin(admin, "old0", "new pw 0").status_code == 200
    assert signin(admin, "old0", "old pw 0").status_code == 401
    assert signin(admin, "old1", "old pw 1").status_code == 200
    assert signin(admin, "fresh@example.com", "fresh pw 1").status_code == 200
    events = admin.get("/admin/api/v1/events", params={"type": "users.imported"}).json()["items"]
    assert {(e["payload"]["created"], e["payload"]["updated"]) for e in events} == \
        {(3, 0), (1, 2)}


def test_a_clash_only_the_database_sees_fails_that_line_alone(core: Core,
                                                              admin: TestClient) -> None:
    """Two lines naming one external identity under two provider names pass the checks made
    before writing; the database's unique index refuses the batch, and it is retried line by
    line: the second line fails, the others import with their roles and identities."""
    identity = {"issuer": "https://login.example/t", "subject": "shared-sub"}
    body = jsonl({"username": "first", "roles": ["R"],
                  "external_identities": [{"provider": "entra", **identity}]},
                 {"username": "second", "roles": ["R"],
                  "external_identities": [{"provider": "azure", **identity}]},
                 {"username": "third", "roles": ["R"], "password_hash": bcrypt_hash("third pw")})

    result = post_import(admin, body)

    assert result["created"] == 2
    assert [item["line"] for item in result["failed"]] == [2]
    assert "conflicts with an existing user" in result["failed"][0]["error"]
    users = {u["username"]: u for u in
             admin.get("/admin/api/v1/users", params={"limit": 100}).json()["items"]}
    assert sorted(users) == ["first", "third"]
    assert users["first"]["roles"] == users["third"]["roles"] == ["R"]
    assert users["first"]["external_identities"] == [{"provider": "entra",
                                                      "subject": "shared-sub"}]
    assert signin(admin, "third", "third pw").status_code == 200


@pytest.fixture
def refusing_trigger(core: Core, backend: str) -> Iterator[None]:
    """A PostgreSQL trigger that fails any insert of the external identity 'refused'."""
    if backend != "postgres":
        pytest.skip("a trigger raising a plain error is PostgreSQL's (SQLite's is a conflict)")
    with core.db.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_subject() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.subject = 'refused' THEN RAISE EXCEPTION 'refused by the test'; END IF; "
            "RETURN NEW; END $$")
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_subject BEFORE INSERT ON external_identities "
            "FOR EACH ROW EXECUTE FUNCTION refuse_subject()")
    yield
    with core.db.engine.begin() as connection:
        connection.exec_driver_sql("DROP TRIGGER refuse_subject ON external_identities")
        connection.exec_driver_sql("DROP FUNCTION refuse_subject()")


def test_a_batch_that_fails_midway_writes_nothing(core: Core, refusing_trigger: None) -> None:
    """The database fails the second batch after its users and role links are copied in: that
    batch leaves no user, account, role or event behind; the first batch stays."""
    importer = Importer(core, CLI.but(triggered_by="import"), batch_size=2)
    lines = [{"username": "kept1", "roles": ["Kept"]}, {"username": "kept2"},
             {"username": "lost1", "roles": ["Lost"], "account": "Lost Co"},
             {"username": "lost2", "roles": ["Lost"], "external_identities": [
                 {"provider": "entra", "issuer": "https://login.example/t", "subject": "refused"}]}]

    with pytest.raises(DBAPIError, match="refused by the test"):
        importer.add_json_lines(json.dumps(line) for line in lines)

    with core.db.read() as session:
        assert sorted(session.scalars(select(User.username))) == ["kept1", "kept2"]
        assert list(session.scalars(select(Role.name))) == ["Kept"]
        assert list(session.scalars(select(Account.name))) == []
        assert session.scalar(select(func.count()).select_from(user_roles)) == 1
    assert event_types(core) == ["users.imported"]


def test_a_nul_character_fails_its_line_only(core: Core, admin: TestClient) -> None:
    """PostgreSQL cannot store U+0000 in text: the line is refused before the batch is written,
    on both databases, and the rest of the batch imports."""
    result = post_import(admin, jsonl(
        {"username": "nul1", "first_name": "A\u0000B"},
        {"username": "nul2", "external_identities": [{"provider": "p", "subject": "s\u0000"}]},
        {"username": "clean", "attributes": {"note": "kept as JSON: \u0000"}}))

    assert result["created"] == 1
    assert {item["line"]: item["error"] for item in result["failed"]} == {
        1: "'first_name' holds a NUL character.",
        2: "'external_identities' holds a NUL character."}
    user = admin.get("/admin/api/v1/users", params={"q": "clean"}).json()["items"][0]
    assert user["attributes"] == {"note": "kept as JSON: \u0000"}


def test_export_with_hashes_needs_the_admin_scope(core: Core, client: TestClient) -> None:
    """A `users` key exports users but not their hashes; an `admin` key exports both."""
    _, users_key = auth.create_api_key(core, "users only", ["users"])
    _, admin_key = auth.create_api_key(core, "admin", ["admin"])
    client.headers["Authorization"] = f"Bearer {admin_key}"
    post_import(client, jsonl({"username": "h", "password_hash": bcrypt_hash("x y z w v")}))

    client.headers["Authorization"] = f"Bearer {users_key}"
    plain = client.get("/admin/api/v1/users/export")
    refused = client.get("/admin/api/v1/users/export?include_password_hashes=true")
    client.headers["Authorization"] = f"Bearer {admin_key}"
    full = client.get("/admin/api/v1/users/export?include_password_hashes=true")

    assert plain.status_code == 200
    assert "password_hash" not in plain.text and json.loads(plain.text)["username"] == "h"
    assert refused.status_code == 403
    assert json.loads(full.text)["password_hash_format"] == "bcrypt"


# -- round trip ---------------------------------------------------------------------------------

def test_export_then_import_into_an_empty_database_round_trips_every_user(
        core: Core, admin: TestClient) -> None:
    """Every user comes back the same (only updated_at moves), and still signs in."""
    until = datetime.now(timezone.utc) + timedelta(hours=2)
    post_import(admin, jsonl(
        {"username": "ann", "email": "ann@example.com", "first_name": "Ann", "last_name": "Lee",
         "phone": "+1 555", "account": "Contoso", "roles": ["Partner", "Admin"],
         "attributes": {"tier": "gold", "n": 3}, "email_verified": True,
         "password_hash": aspnet_v3("ann's password"), "password_hash_format": "aspnet_identity",
         "external_identities": [{"provider": "entra", "issuer": "https://login.example/t/v2.0",
                                  "subject": "sub-ann"}]},
        {"username": "bo", "email": "bo@example.com", "password_hash": django_pbkdf2("bo pass 1"),
         "locked_until": until.isoformat(), "lockout_enabled": True, "failed_count": 5},
        {"username": "cy", "login_enabled": False, "password_expired": True,
         "password_hash": bcrypt_hash("cy pass 12")},
        {"email": "dee@example.com"}))
    assert signin(admin, "cy", "cy pass 12").status_code == 403  # argon2id by now
    before = admin.get("/admin/api/v1/users", params={"limit": 100}).json()["items"]
    exported = admin.get("/admin/api/v1/users/export?include_password_hashes=true").content
    with core.db.write() as session:
        for table in (ExternalIdentity.__table__, user_roles, User.__table__, Account.__table__,
                      Role.__table__):
            session.execute(delete(table))

    result = post_import(admin, exported)

    after = admin.get("/admin/api/v1/users", params={"limit": 100}).json()["items"]
    assert result == {"created": 4, "updated": 0, "failed": []}
    strip = lambda users: sorted(({k: v for k, v in u.items() if k != "updated_at"}  # noqa: E731
                                  for u in users), key=lambda u: u["id"])
    assert strip(after) == strip(before)
    assert signin(admin, "ann", "ann's password").status_code == 200
    assert signin(admin, "bo", "bo pass 1").status_code == 423
    assert signin(admin, "cy", "cy pass 12").status_code == 403


# -- Power Pages, through the command line -----------------------------------------------------

CONTACT_HEADER = ("contactid,adx_identity_username,emailaddress1,firstname,lastname,mobilephone,"
                  "parentcustomerid,adx_identity_passwordhash,adx_identity_securitystamp,"
                  "adx_identity_lockoutenabled,adx_identity_accessfailedcount,"
                  "adx_identity_lockoutenddate,adx_identity_emailaddress1confirmed,"
                  "adx_identity_logonenabled,statecode")
ISSUER = "https://login.microsoftonline.com/7c3b/v2.0"


def run_cli(core: Core, *args: str) -> Any:
    env = {"GATEPASS_DATABASE_URL": core.settings.database_url,
           "GATEPASS_VAR_DIR": str(core.settings.var_dir),
           "GATEPASS_SECRET_KEY": core.settings.secret_key or "",
           "GATEPASS_ARGON2_MEMORY_KIB": "64", "GATEPASS_ARGON2_TIME_COST": "1"}
    return CliRunner().invoke(cli_app, list(args), env=env, catch_exceptions=False)


def test_power_pages_contacts_and_external_logins_carry_over(core: Core, admin: TestClient,
                                                             tmp_path: Path) -> None:
    """A Dataverse contact export: v2 and v3 hashes sign in, a locked contact stays locked,
    an external login is linked by issuer and subject, a malformed row is reported by line."""
    future = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%m/%d/%Y %I:%M:%S %p")
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("\n".join([
        CONTACT_HEADER,
        f"{{A1B2C3D4-0000-0000-0000-000000000001}},veera,veera@example.com,Veera,Ahonen,"
        f"+358401234,Contoso Oy,{aspnet_v2('Veera old pass')},STAMP1,True,0,,Yes,Yes,0",
        f"a1b2c3d4-0000-0000-0000-000000000002,olli,olli@example.com,Olli,,,Contoso Oy,"
        f"{aspnet_v3('Olli old pass')},STAMP2,True,1,,No,Yes,0",
        f"a1b2c3d4-0000-0000-0000-000000000003,lukittu,lukittu@example.com,,,,,"
        f"{aspnet_v2('Locked pass')},STAMP3,True,5,{future},Yes,Yes,0",
        "a1b2c3d4-0000-0000-0000-000000000004,broken,not-an-email,,,,,,,True,0,,No,Yes,0",
        "a1b2c3d4-0000-0000-0000-000000000005,,ext@example.com,Ext,User,,,,,True,0,,Yes,Yes,0",
    ]) + "\n", encoding="utf-8")
    identities = tmp_path / "adx_externalidentity.csv"
    identities.write_text("adx_externalidentityid,adx_username,adx_identityprovidername,"
                          "adx_contactid\n"
                          f"e1,9f8e7d-sub,{ISSUER},{{A1B2C3D4-0000-0000-0000-000000000005}}\n",
                          encoding="utf-8")

    outcome = run_cli(core, "users", "import", "--from", "power-pages", str(contacts),
                      "--external-identities", str(identities))

    assert outcome.exit_code == 0, outcome.output
    assert "4 created, 0 updated, 1 failed" in outcome.stdout
    assert "line 5: 'emailaddress1': 'not-an-email' is not a valid email address." \
        in outcome.stderr
    assert signin(admin, "veera", "Veera old pass").json()["status"] == "ok"
    assert signin(admin, "olli@example.com", "Olli old pass").status_code == 200
    assert stored(core, "olli").password_hash.startswith("$argon2id$")
    assert signin(admin, "lukittu", "Locked pass").status_code == 423
    users = {u["username"]: u for u in
             admin.get("/admin/api/v1/users", params={"limit": 100}).json()["items"]}
    assert sorted(users) == ["ext", "lukittu", "olli", "veera"]
    veera = users["veera"]
    assert (veera["first_name"], veera["phone"], veera["email_verified"]) == \
        ("Veera", "+358401234", True)
    assert veera["attributes"] == {"powerpages_contactid": "a1b2c3d4-0000-0000-0000-000000000001"}
    accounts = admin.get("/admin/api/v1/accounts").json()["items"]
    assert [a["name"] for a in accounts] == ["Contoso Oy"]
    assert veera["account_id"] == users["olli"]["account_id"] == accounts[0]["id"]
    assert users["olli"]["email_verified"] is False
    assert users["ext"]["external_identities"] == [{"provider": ISSUER, "subject": "9f8e7d-sub"}]
    with core.db.read() as session:
        issuer = session.scalar(select(ExternalIdentity.issuer))
    assert issuer == ISSUER
    assert event_types(core).count("users.imported") == 1


def test_cli_export_and_reimport_with_upsert(core: Core, admin: TestClient,
                                             tmp_path: Path) -> None:
    """`users export FILE.csv` writes what `users import FILE.csv --upsert username` reads back."""
    post_import(admin, jsonl({"username": "eve", "email": "eve@example.com", "roles": ["R1", "R2"],
                              "attributes": {"k": "v"}, "password_hash": bcrypt_hash("eve pw 12")}))
    target = tmp_path / "users.csv"

    exported = run_cli(core, "users", "export", str(target), "--include-password-hashes")
    reimported = run_cli(core, "users", "import", str(target), "--upsert", "username")
    jsonl_out = run_cli(core, "users", "export")

    assert exported.exit_code == 0 and reimported.exit_code == 0, reimported.output
    assert "0 created, 1 updated, 0 failed" in reimported.stdout
    line = json.loads(jsonl_out.stdout.strip())
    assert line["roles"] == ["R1", "R2"] and line["attributes"] == {"k": "v"}
    assert signin(admin, "eve", "eve pw 12").status_code == 200
    with core.db.read() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 1
    assert os.path.getsize(target) > 0
