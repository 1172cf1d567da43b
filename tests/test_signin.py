"""Local sign-in through the public API (CONTRACT §4): sessions, lockout, enumeration, forced change.

Every test runs on SQLite and on PostgreSQL (the `core` fixture).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount

from sqlalchemy import select

from gatepass.app import create_app
from gatepass.context import CLI
from gatepass.core import Core, build_core
from gatepass.events.models import Event
from gatepass.settings import Settings
from gatepass.users import service as users
from gatepass.users.models import User
from gatepass.users.schemas import UserCreate

from conftest import LiveServer, set_site

PASSWORD = "correct horse battery staple"


def make_user(core: Core, username: str = "reeta", email: str | None = "reeta@example.com",
              password: str = PASSWORD, **fields: Any) -> str:
    fields.setdefault("password_expired", False)
    created = users.create_user(core, CLI, UserCreate(username=username, email=email,
                                                      password=password, **fields))
    return created.user.id


def stored(core: Core, user_id: str) -> User:
    with core.db.read() as session:
        user = session.get(User, user_id)
        assert user is not None
        return user


def signin(client: TestClient | httpx.Client, login: str, password: str = PASSWORD) -> Any:
    return client.post("/api/v1/auth/signin", json={"login": login, "password": password})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- signing in ---------------------------------------------------------------------------------

def test_sign_in_by_username_sets_cookie_and_returns_a_bearer_token(core: Core,
                                                                    client: TestClient) -> None:
    """A username and password give a session cookie and a session_token usable as Bearer."""
    make_user(core)

    response = signin(client, "REETA")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["user"]["username"] == "reeta"
    cookie = response.headers["set-cookie"]
    assert "gatepass_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert client.get("/api/v1/me").json()["user"]["username"] == "reeta"
    client.cookies.clear()
    assert client.get("/api/v1/me").status_code == 401
    me = client.get("/api/v1/me", headers=bearer(body["session_token"]))
    assert me.status_code == 200
    assert me.json()["user"]["email"] == "reeta@example.com"


def test_me_shows_the_same_user_object_as_the_admin_api(core: Core, admin: TestClient) -> None:
    """/me reads the session with one lean query; what it shows must be exactly what the admin
    API's full user object shows: roles, account, attributes, external identities, times."""
    for role in ("Partner", "Admin"):
        admin.post("/admin/api/v1/roles", json={"name": role})
    line = {"username": "ann", "email": "ann@example.com", "first_name": "Ann",
            "account": "Contoso", "roles": ["Partner", "Admin"], "attributes": {"tier": "gold"},
            "password_hash": core.hasher.hash_now(PASSWORD),
            "external_identities": [{"provider": "entra", "subject": "sub-ann",
                                     "issuer": "https://login.example/t/v2.0"}]}
    imported = admin.post("/admin/api/v1/users/import", content=json.dumps(line).encode(),
                          headers={"Content-Type": "application/x-ndjson"})
    assert imported.status_code == 200, imported.text
    token = signin(admin, "ann").json()["session_token"]
    plain = make_user(core, "bob", "bob@example.com")

    me = admin.get("/api/v1/me", headers=bearer(token)).json()["user"]
    listed = admin.get("/admin/api/v1/users", params={"q": "ann"}).json()["items"][0]

    assert me == admin.get(f"/admin/api/v1/users/{listed['id']}").json()["user"]
    assert me["roles"] == ["Admin", "Partner"] and me["attributes"] == {"tier": "gold"}
    assert me["external_identities"] == [{"provider": "entra", "subject": "sub-ann"}]
    assert me["account_id"] is not None and me["last_sign_in_at"] is not None
    bob_token = signin(admin, "bob").json()["session_token"]
    bob = admin.get("/api/v1/me", headers=bearer(bob_token)).json()["user"]
    assert bob == admin.get(f"/admin/api/v1/users/{plain}").json()["user"]
    assert bob["roles"] == [] and bob["external_identities"] == []


def test_me_without_a_live_session_is_a_401_with_a_bearer_challenge(core: Core,
                                                                     client: TestClient) -> None:
    """No session, a made-up token, or a signed-out one: the same JSON 401, never a page."""
    make_user(core)
    token = signin(client, "reeta").json()["session_token"]
    client.post("/api/v1/auth/signout", headers=bearer(token))
    client.cookies.clear()

    for headers in ({}, bearer("made-up"), bearer(token)):
        response = client.get("/api/v1/me", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.json()["error"]["code"] == "unauthenticated"


def test_sign_in_by_email_follows_login_by_email(core: Core, client: TestClient) -> None:
    """The email is a login while `login.by_email` is on, and not once it is off."""
    make_user(core)

    allowed = signin(client, "Reeta@Example.com")
    set_site(core, login__by_email=False)
    refused = signin(client, "reeta@example.com")

    assert allowed.status_code == 200
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_credentials"


def test_patch_me_changes_the_profile(core: Core, client: TestClient) -> None:
    """A signed-in user edits their own name and phone, and nothing else."""
    make_user(core)
    signin(client, "reeta")

    changed = client.patch("/api/v1/me", json={"first_name": "Reeta", "phone": "+358 40 1"})
    refused = client.patch("/api/v1/me", json={"username": "boss"})

    assert changed.status_code == 200
    assert changed.json()["user"]["first_name"] == "Reeta"
    assert client.get("/api/v1/me").json()["user"]["phone"] == "+358 40 1"
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "username"


def test_sign_out_ends_the_session(core: Core, client: TestClient) -> None:
    """After sign-out the token no longer works, with the cookie or as Bearer."""
    make_user(core)
    token = signin(client, "reeta").json()["session_token"]

    response = client.post("/api/v1/auth/signout")

    assert response.status_code == 200
    assert client.get("/api/v1/me").status_code == 401
    assert client.get("/api/v1/me", headers=bearer(token)).status_code == 401


def test_password_change_keeps_this_session_and_revokes_the_others(core: Core,
                                                                    client: TestClient) -> None:
    """Changing the password signs out every other session; the old password stops working."""
    make_user(core)
    other = signin(client, "reeta").json()["session_token"]
    client.cookies.clear()
    mine = signin(client, "reeta").json()["session_token"]

    changed = client.post("/api/v1/auth/password/change", headers=bearer(mine), json={
        "current_password": PASSWORD, "new_password": "a brand new passphrase"})

    assert changed.status_code == 200
    assert client.get("/api/v1/me", headers=bearer(mine)).status_code == 200
    assert client.get("/api/v1/me", headers=bearer(other)).status_code == 401
    assert signin(client, "reeta").status_code == 401
    assert signin(client, "reeta", "a brand new passphrase").status_code == 200


def test_password_change_refuses_a_wrong_current_or_weak_new_password(core: Core,
                                                                      client: TestClient) -> None:
    """A wrong current password or a common new one is one clear error, and nothing changes."""
    make_user(core)
    signin(client, "reeta")

    wrong = client.post("/api/v1/auth/password/change", json={
        "current_password": "nope nope nope", "new_password": "a brand new passphrase"})
    weak = client.post("/api/v1/auth/password/change", json={
        "current_password": PASSWORD, "new_password": "password1"})

    assert wrong.status_code == 401
    assert wrong.json()["error"]["field"] == "current_password"
    assert weak.status_code == 422
    assert weak.json()["error"]["field"] == "new_password"
    assert signin(client, "reeta").status_code == 200


# -- enumeration and lockout --------------------------------------------------------------------

def test_unknown_user_and_wrong_password_answer_identically(core: Core,
                                                            client: TestClient) -> None:
    """Nobody learns from the answer whether a login exists."""
    make_user(core)

    unknown = signin(client, "nobody", "wrong password!")
    wrong = signin(client, "reeta", "wrong password!")

    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert unknown.json()["error"]["code"] == "invalid_credentials"
    assert "set-cookie" not in unknown.headers and "set-cookie" not in wrong.headers


def test_unknown_login_locks_after_the_same_number_of_failures(core: Core,
                                                               client: TestClient) -> None:
    """After max failures an unknown login answers 423 exactly like a real one."""
    make_user(core)
    set_site(core, lockout__max_failed_attempts=3)

    real = [signin(client, "reeta", "wrong password!") for _ in range(4)]
    ghost = [signin(client, "nobody", "wrong password!") for _ in range(4)]

    assert [r.status_code for r in real] == [401, 401, 401, 423]
    assert [r.status_code for r in ghost] == [401, 401, 401, 423]
    assert set(real[3].json()["error"]) == set(ghost[3].json()["error"])
    assert real[3].json()["error"]["code"] == ghost[3].json()["error"]["code"] == "locked"
    assert real[3].json()["error"]["locked_until"]
    assert signin(client, "reeta").status_code == 423  # even the right password waits


def test_a_correct_password_resets_the_failure_count(core: Core, client: TestClient) -> None:
    """Failures below the maximum are forgotten after a successful sign-in."""
    user_id = make_user(core)
    set_site(core, lockout__max_failed_attempts=3)

    for _ in range(2):
        signin(client, "reeta", "wrong password!")
    assert stored(core, user_id).failed_count == 2
    assert signin(client, "reeta").status_code == 200

    assert stored(core, user_id).failed_count == 0
    with core.db.read() as session:
        types = list(session.scalars(select(Event.type).order_by(Event.seq)))
    assert types.count("user.sign_in_failed") == 2  # refusals are in the audit log too
    assert types[-1] == "user.signed_in"
    assert [signin(client, "reeta", "wrong password!").status_code for _ in range(3)] == \
        [401, 401, 401]


def test_lockout_disabled_user_is_never_locked(core: Core, client: TestClient) -> None:
    """The per-user lockout_enabled=false flag is honoured."""
    make_user(core, lockout_enabled=False)
    set_site(core, lockout__max_failed_attempts=2)

    answers = [signin(client, "reeta", "wrong password!").status_code for _ in range(5)]

    assert answers == [401] * 5
    assert signin(client, "reeta").status_code == 200


def test_a_lock_expires_after_its_duration(core: Core, client: TestClient) -> None:
    """With lockout.duration_seconds=1, the user signs in again a second later."""
    make_user(core)
    set_site(core, lockout__max_failed_attempts=2, lockout__duration_seconds=1)
    for _ in range(2):
        signin(client, "reeta", "wrong password!")
    assert signin(client, "reeta").status_code == 423

    time.sleep(1.2)

    assert signin(client, "reeta").status_code == 200


def test_admin_lock_unlock_and_revoke_sessions(core: Core, admin: TestClient) -> None:
    """An admin lock ends the sessions and refuses sign-in; unlock and revoke do what they say."""
    user_id = make_user(core)
    token = signin(admin, "reeta").json()["session_token"]
    admin.cookies.clear()

    locked = admin.post(f"/admin/api/v1/users/{user_id}/lock")
    refused = signin(admin, "reeta")
    unlocked = admin.post(f"/admin/api/v1/users/{user_id}/unlock")
    second = signin(admin, "reeta").json()["session_token"]
    admin.cookies.clear()
    revoked = admin.post(f"/admin/api/v1/users/{user_id}/sessions/revoke")

    assert locked.status_code == 200 and locked.json()["user"]["locked_until"]
    assert admin.get("/api/v1/me", headers=bearer(token)).status_code == 401
    assert refused.status_code == 423
    assert unlocked.json()["user"]["locked_until"] is None
    assert revoked.json() == {"revoked": 1}
    assert admin.get("/api/v1/me", headers=bearer(second)).status_code == 401
    assert signin(admin, "reeta").status_code == 200


def test_admin_lock_holds_even_without_automatic_lockout(core: Core, admin: TestClient) -> None:
    """lockout_enabled=false stops automatic locks, not a lock an admin sets on purpose."""
    user_id = make_user(core, lockout_enabled=False)

    admin.post(f"/admin/api/v1/users/{user_id}/lock")

    assert signin(admin, "reeta").status_code == 423


def test_login_disabled_is_told_only_after_a_correct_password(core: Core,
                                                               client: TestClient) -> None:
    """A disabled user with a wrong password sees 401 like anyone; with the right one, 403."""
    make_user(core, login_enabled=False)
    set_site(core, lockout__max_failed_attempts=3)

    wrong = signin(client, "reeta", "wrong password!")
    right = [signin(client, "reeta") for _ in range(4)]

    assert wrong.status_code == 401
    assert [r.status_code for r in right] == [403] * 4  # a correct password is no failure
    assert right[0].json()["error"]["code"] == "login_disabled"
    assert "set-cookie" not in right[0].headers


def _hammer(url: str, login: str, count: int = 50) -> list[int]:
    def attempt(_: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as http:
            return signin(http, login, "wrong password!").status_code

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(attempt, range(count)))


def test_parallel_wrong_passwords_never_exceed_the_maximum(live_server: LiveServer) -> None:
    """50 simultaneous wrong passwords: at most max attempts get 401, the rest 423."""
    core = live_server.core
    user_id = make_user(core)
    maximum = core.site["lockout.max_failed_attempts"]

    statuses = _hammer(live_server.url, "reeta")
    ghost = _hammer(live_server.url, "nobody-at-all")

    assert sorted(set(statuses)) == [401, 423]
    assert statuses.count(401) <= maximum
    assert stored(core, user_id).failed_count <= maximum
    assert sorted(set(ghost)) == [401, 423]  # an unknown login races the same way, no 500
    assert ghost.count(401) <= maximum


# -- forced password change ---------------------------------------------------------------------

def _public_routes(app: Any) -> list[tuple[str, set[str]]]:
    """Every API route of the mounted /api/v1 app, walking included routers."""
    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == "/api/v1")
    found: list[tuple[str, set[str]]] = []
    for route in mount.app.routes:
        if isinstance(route, APIRoute):
            found.append((route.path, set(route.methods)))
        elif hasattr(route, "effective_route_contexts"):  # FastAPI's included routers
            for context in route.effective_route_contexts():
                if isinstance(context.original_route, APIRoute):
                    found.append((context.path, set(context.original_route.methods)))
    return found


def _fill(path: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000000", path)


ALLOWED = {("POST", "/auth/password/change"), ("POST", "/auth/signout")}


def test_forced_change_blocks_every_other_public_route(core: Core, client: TestClient) -> None:
    """A password_expired session gets 403 password_change_required on every public API route
    (including ones features add later), except password change and sign-out."""
    make_user(core, password_expired=True)
    response = signin(client, "reeta")
    assert response.json()["status"] == "password_change_required"
    token = response.json()["session_token"]
    checked = 0

    native = TestClient(client.app, headers=bearer(token))  # Bearer alone, no cookie
    public = next(r for r in client.app.routes if isinstance(r, Mount) and r.path == "/api/v1")

    @public.app.get("/added-later-without-any-auth")
    def added_later() -> dict[str, str]:
        return {"leak": "a feature that forgot the check"}

    routes = _public_routes(client.app)
    for path, methods in routes:
        for method in methods - {"HEAD", "OPTIONS"}:
            if (method, path) in ALLOWED:
                continue
            for caller in (client, native):
                answer = caller.request(method, "/api/v1" + _fill(path), json={})
                assert answer.status_code == 403, (method, path, answer.text)
                assert answer.json()["error"]["code"] == "password_change_required", \
                    (method, path)
                checked += 1

    assert ("/added-later-without-any-auth", {"GET"}) in routes
    assert checked >= 2 * 5  # signin, GET and PATCH /me, the late route, and more
    changed = client.post("/api/v1/auth/password/change", json={
        "current_password": PASSWORD, "new_password": "a brand new passphrase"})
    assert changed.status_code == 200
    assert client.get("/api/v1/me").status_code == 200


def test_forced_change_session_can_sign_out(core: Core, client: TestClient) -> None:
    """Sign-out stays open to a session held by a forced change."""
    make_user(core, password_expired=True)
    token = signin(client, "reeta").json()["session_token"]

    assert client.post("/api/v1/auth/signout").status_code == 200
    assert client.get("/api/v1/me", headers=bearer(token)).status_code == 401


def test_old_password_triggers_a_forced_change(core: Core, client: TestClient) -> None:
    """password.max_age_days > 0: a password older than that must be changed at sign-in."""
    user_id = make_user(core)
    signin(client, "reeta")  # used once: no longer a temporary password
    client.cookies.clear()
    with core.db.write() as session:
        user = session.get(User, user_id)
        assert user is not None and user.password_changed_at is not None
        from datetime import timedelta

        user.password_changed_at -= timedelta(days=31)
    set_site(core, password__max_age_days=30)

    response = signin(client, "reeta")

    assert response.json()["status"] == "password_change_required"
    assert client.get("/api/v1/me").json()["error"]["code"] == "password_change_required"


def test_hash_is_upgraded_when_argon2_parameters_change(
        core: Core, client: TestClient, make_settings: Callable[..., Settings]) -> None:
    """Signing in under new argon2 parameters re-hashes the stored password with them."""
    user_id = make_user(core)
    before = stored(core, user_id).password_hash
    assert before is not None and "m=64,t=1" in before
    stronger = build_core(make_settings(argon2_memory_kib=128, argon2_time_cost=2))

    try:
        with TestClient(create_app(stronger.settings, core=stronger)) as other:
            assert signin(other, "reeta").status_code == 200
    finally:
        stronger.close()

    after = stored(core, user_id).password_hash
    assert after is not None and "m=128,t=2" in after
    assert signin(client, "reeta").status_code == 200


# -- bad input: one clear sentence, nothing changed ----------------------------------------------

def test_malformed_sign_in_bodies_get_one_sentence_and_count_nothing(core: Core,
                                                                      client: TestClient) -> None:
    """Whatever arrives instead of {"login", "password"}, the answer is 422 (413 when too
    large) with a code and a sentence, and no attempt is counted against anyone."""
    user_id = make_user(core)
    url = "/api/v1/auth/signin"
    as_json = {"content-type": "application/json"}
    cases = [
        (dict(content=b"", headers=as_json), 422, "A JSON body is required."),
        (dict(json=None), 422, "A JSON body is required."),
        (dict(content=b'{"login": "reeta",', headers=as_json), 422, "The body is not valid JSON."),
        (dict(content=b'{"login": "\xff", "password": "x"}', headers=as_json), 422,
         "The body is not valid JSON."),
        (dict(json=["reeta", "x"]), 422, "The body must be a JSON object."),
        (dict(data={"login": "reeta", "password": "x"}), 422, "The body must be a JSON object."),
        (dict(content=b'{"login": "reeta", "password": "x"}',
              headers={"content-type": "text/plain"}), 422, "The body must be a JSON object."),
        (dict(json={"login": "reeta"}), 422, "'password' is required."),
        (dict(json={"login": "reeta", "password": "x", "remember": True}), 422,
         "'remember' is not a field this endpoint accepts."),
        (dict(json={"login": 7, "password": "x"}), 422,
         "'login': Input should be a valid string."),
        (dict(json={"login": "reeta", "password": "x" * 5000}), 422,
         "'password': String should have at most 4096 characters."),
        (dict(content=b'{"login": "reeta", "password": "' + b"x" * 70_000 + b'"}',
              headers=as_json), 413, "The request body is too large."),
    ]
    for request, status, message in cases:
        response = client.post(url, **request)
        assert response.status_code == status, (request, response.text)
        error = response.json()["error"]
        assert error["message"] == message, request
        assert error["code"] == ("too_large" if status == 413 else "invalid")
    assert stored(core, user_id).failed_count == 0
    # a JSON subtype is JSON: the answer is about the password, not the body
    vendor = client.post(url, content=json.dumps({"login": "reeta", "password": "wrong"}),
                         headers={"content-type": "application/vnd.api+json; charset=utf-8"})
    assert vendor.status_code == 401
    assert stored(core, user_id).failed_count == 1


def test_api_errors_from_the_framework_have_a_code_and_a_message(client: TestClient,
                                                                 admin: TestClient) -> None:
    """A wrong method, an address that is nothing and a body that is not text answer in the
    API's error shape, on the public and the admin API alike."""
    wrong_method = client.get("/api/v1/auth/signin")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == {"code": "method_not_allowed",
                                            "message": "This method is not allowed here."}
    nothing = admin.get("/admin/api/v1/no-such-thing")
    assert nothing.status_code == 404
    assert nothing.json()["error"]["code"] == "not_found"
    unreadable = admin.post("/admin/api/v1/users", content=b'{"username": "\xff"}',
                            headers={"content-type": "application/json"})
    assert unreadable.status_code == 400
    assert unreadable.json()["error"] == {"code": "invalid",
                                          "message": "The body could not be read as JSON text."}
