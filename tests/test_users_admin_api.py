"""The admin API for users, accounts, roles and settings (CONTRACT §3)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi.testclient import TestClient

from gatepass.auth import service as auth
from gatepass.core import Core


def test_create_user_returns_the_contract_user_object(admin: TestClient) -> None:
    response = admin.post("/admin/api/v1/users", json={
        "email": "Ada@Example.com", "first_name": "Ada", "password": "analytical engine 1843",
        "attributes": {"department": "math"}})

    assert response.status_code == 201
    user = response.json()["user"]
    assert user["username"] == "Ada"
    assert user["email"] == "Ada@example.com"  # the domain is normalised, the local part kept
    assert user["attributes"] == {"department": "math"}
    assert user["password_set"] is True
    assert user["password_expired"] is True  # the admin chose it
    assert "password" not in response.json()  # only a generated one is returned
    assert set(user) == {
        "id", "username", "email", "email_verified", "first_name", "last_name", "phone",
        "account_id", "roles", "attributes", "login_enabled", "lockout_enabled", "locked_until",
        "password_set", "password_expired", "external_identities", "created_at", "updated_at",
        "last_sign_in_at"}


def test_username_is_unique_case_insensitively(admin: TestClient) -> None:
    admin.post("/admin/api/v1/users", json={"username": "Reeta", "email": "r@example.com"})

    response = admin.post("/admin/api/v1/users", json={"username": "reeta",
                                                       "email": "other@example.com"})

    assert response.status_code == 409
    assert response.json()["error"]["field"] == "username"


def test_duplicate_email_conflicts_unless_unique_email_is_off(admin: TestClient) -> None:
    admin.post("/admin/api/v1/users", json={"username": "reeta", "email": "team@example.com"})

    refused = admin.post("/admin/api/v1/users", json={"username": "abhishek",
                                                      "email": "TEAM@example.com"})
    admin.patch("/admin/api/v1/settings", json={"users.require_unique_email": False})
    allowed = admin.post("/admin/api/v1/users", json={"username": "abhishek",
                                                      "email": "team@example.com"})

    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "conflict"
    assert allowed.status_code == 201


def test_bad_input_is_one_clear_error_and_writes_nothing(admin: TestClient) -> None:
    cases = [
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@example.com", "roles": ["no-such-role"]}, "roles"),
        ({"email": "a@example.com", "account_id": "missing"}, "account_id"),
        ({"email": "a@example.com", "password": "short"}, "password"),
        ({"email": "a@example.com", "password": "password123"}, "password"),
        ({"email": "a@example.com", "surprise": 1}, "surprise"),
    ]
    for body, field in cases:
        response = admin.post("/admin/api/v1/users", json=body)

        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["field"] == field
        assert error["code"] and error["message"].endswith(".")

    assert admin.get("/admin/api/v1/users").json()["items"] == []


def test_bodies_over_a_mebibyte_are_refused_except_an_import(admin: TestClient,
                                                            client: TestClient) -> None:
    """A body over 1 MiB gets 413 too_large in the API's error shape, whether it says its
    length or not, on the admin and the public API, and writes nothing; an import streams,
    so its body may be any size."""
    huge = b'{"email": "' + b"a" * (1024 * 1024) + b'@example.com"}'

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(huge), 65536):
            yield huge[start:start + 65536]

    for caller, path in ((admin, "/admin/api/v1/users"), (client, "/api/v1/auth/register"),
                         (client, "/api/v1/auth/password/forgot")):
        for content in (huge, chunked()):
            response = caller.post(path, content=content,
                                   headers={"content-type": "application/json"})
            assert response.status_code == 413, (path, response.text)
            assert response.json()["error"] == {
                "code": "too_large", "message": "The request body is too large: at most 1 MiB."}
    assert admin.get("/admin/api/v1/users").json()["items"] == []

    lines = b"".join(json.dumps({"username": f"user{n}", "email": f"user{n}@example.com",
                                 "first_name": "F" * 100, "last_name": "L" * 50}).encode()
                     + b"\n" for n in range(6000))
    assert len(lines) > 1024 * 1024
    imported = admin.post("/admin/api/v1/users/import", content=lines,
                          headers={"content-type": "application/x-ndjson"})
    assert imported.status_code == 200, imported.text
    assert imported.json() == {"created": 6000, "updated": 0, "failed": []}


def test_list_filters_and_paginates_with_a_cursor(admin: TestClient) -> None:
    account = admin.post("/admin/api/v1/accounts", json={"name": "Contoso"}).json()["account"]
    admin.post("/admin/api/v1/roles", json={"name": "Partner"})
    for number in range(7):
        admin.post("/admin/api/v1/users", json={
            "email": f"user{number}@example.com",
            "account_id": account["id"] if number % 2 == 0 else None,
            "roles": ["Partner"] if number < 3 else []})

    seen: list[str] = []
    cursor = None
    while True:
        page = admin.get("/admin/api/v1/users", params={"limit": 3, **(
            {"cursor": cursor} if cursor else {})}).json()
        seen += [user["username"] for user in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == [f"user{n}" for n in range(7)]
    in_account = admin.get("/admin/api/v1/users", params={"account_id": account["id"]}).json()
    assert [u["username"] for u in in_account["items"]] == ["user0", "user2", "user4", "user6"]
    partners = admin.get("/admin/api/v1/users", params={"role": "Partner"}).json()
    assert [u["username"] for u in partners["items"]] == ["user0", "user1", "user2"]
    found = admin.get("/admin/api/v1/users", params={"q": "USER5"}).json()
    assert [u["username"] for u in found["items"]] == ["user5"]
    assert admin.get("/admin/api/v1/users", params={"cursor": "garbage!"}).status_code == 422


def test_patch_and_delete_user(admin: TestClient) -> None:
    admin.post("/admin/api/v1/roles", json={"name": "Member"})
    user = admin.post("/admin/api/v1/users", json={"email": "p@example.com"}).json()["user"]

    patched = admin.patch(f"/admin/api/v1/users/{user['id']}",
                          json={"first_name": "Pat", "roles": ["Member"]})
    deleted = admin.delete(f"/admin/api/v1/users/{user['id']}")

    assert patched.json()["user"]["first_name"] == "Pat"
    assert patched.json()["user"]["roles"] == ["Member"]
    assert deleted.status_code == 204
    missing = admin.get(f"/admin/api/v1/users/{user['id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_missing_or_wrong_key_is_401_and_missing_scope_is_403(client: TestClient,
                                                                core: Core) -> None:
    _, read_only = auth.create_api_key(core, "reader", ["read"])

    no_key = client.get("/admin/api/v1/users")
    bad_key = client.get("/admin/api/v1/users", headers={"Authorization": "Bearer gp_nope"})
    can_read = client.get("/admin/api/v1/users",
                          headers={"Authorization": f"Bearer {read_only}"})
    cannot_write = client.post("/admin/api/v1/users", json={"email": "x@example.com"},
                               headers={"Authorization": f"Bearer {read_only}"})
    cannot_settings = client.patch("/admin/api/v1/settings", json={"login.by_email": False},
                                   headers={"Authorization": f"Bearer {read_only}"})

    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "unauthenticated"
    assert bad_key.status_code == 401
    assert can_read.status_code == 200
    assert cannot_write.status_code == 403 and cannot_write.json()["error"]["code"] == "forbidden"
    assert cannot_settings.status_code == 403


def test_settings_patch_validates_every_key_before_writing(admin: TestClient) -> None:
    before = admin.get("/admin/api/v1/settings").json()["settings"]

    unknown = admin.patch("/admin/api/v1/settings",
                          json={"lockout.max_failed_attempts": 3, "no.such": True})
    wrong_type = admin.patch("/admin/api/v1/settings", json={"registration.open": "maybe"})
    ok = admin.patch("/admin/api/v1/settings", json={"lockout.max_failed_attempts": 3})

    assert before["lockout.max_failed_attempts"] == 5
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "no.such"
    assert wrong_type.status_code == 422
    assert wrong_type.json()["error"]["field"] == "registration.open"
    assert ok.json()["settings"]["lockout.max_failed_attempts"] == 3
    assert admin.get("/admin/api/v1/settings").json()["settings"]["registration.open"] is True


def test_openapi_document_is_served(client: TestClient) -> None:
    document = client.get("/admin/api/v1/openapi.json").json()

    assert "/users" in document["paths"]
    assert "/settings" in document["paths"]
