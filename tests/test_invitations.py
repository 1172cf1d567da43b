"""Invitations through the admin API, the public API and the services (CONTRACT §3, §4)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient

from gatepass.context import CLI
from gatepass.core import Core
from gatepass.invitations import service
from gatepass.invitations.models import Invitation
from gatepass.outbox.models import OutboxMessage
from gatepass.users.models import User

API = "/admin/api/v1"


def invite(admin: TestClient, **body: Any) -> dict[str, Any]:
    response = admin.post(f"{API}/invitations", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def mails(core: Core, template: str = "invitation") -> list[dict[str, Any]]:
    with core.db.read() as session:
        rows = session.scalars(sa.select(OutboxMessage).order_by(OutboxMessage.created_at))
        return [r.payload for r in rows if r.payload.get("template") == template]


def signed_in(client: TestClient, core: Core, admin: TestClient, username: str) -> str:
    admin.post(f"{API}/users", json={"username": username, "email": f"{username}@example.com",
                                     "password": "a long enough passphrase",
                                     "password_expired": False})
    response = client.post("/api/v1/auth/signin",
                           json={"login": username, "password": "a long enough passphrase"})
    assert response.status_code == 200, response.text
    return str(response.json()["session_token"])


def test_single_invitation_returns_the_code_once_and_stores_only_its_hash(
        admin: TestClient, core: Core) -> None:
    """The code is ≥128 bits, URL-safe, in a redeem_url under the public URL, never stored."""
    body = invite(admin, type="single", emails=["ada@example.com"])

    [item] = body["invitations"]
    assert item["type"] == "single" and item["status"] == "active"
    assert item["max_redemptions"] == 1 and item["redemption_count"] == 0
    assert len(item["code"]) >= 43 and item["code"].replace("-", "").replace("_", "").isalnum()
    assert item["redeem_url"] == f"http://portal.example.test/register?invitation={item['code']}"
    expires = datetime.fromisoformat(item["expires_at"])
    assert timedelta(days=13) < expires - datetime.now(timezone.utc) <= timedelta(days=14)
    shown = admin.get(f"{API}/invitations/{item['id']}").json()["invitation"]
    assert "code" not in shown and item["code"] not in str(shown)
    with core.db.read() as session:
        row = session.get(Invitation, item["id"])
        assert row is not None and item["code"] not in row.code_hash


def test_invitation_mail_names_the_inviter_the_site_and_the_link(
        admin: TestClient, core: Core) -> None:
    """The mail carries the inviter's name, the site name and the redeem link."""
    inviter = admin.post(f"{API}/users", json={"email": "grace@example.com", "first_name": "Grace",
                                               "last_name": "Hopper"}).json()["user"]

    body = invite(admin, type="single", emails=["ada@example.com"], inviter_id=inviter["id"])

    [mail] = mails(core)
    assert mail["to"] == "ada@example.com"
    assert "Grace Hopper" in mail["subject"] and "Gatepass" in mail["subject"]
    assert body["invitations"][0]["redeem_url"] in mail["text"]
    assert body["invitations"][0]["redeem_url"] in mail["html"]


def test_send_email_false_queues_nothing(admin: TestClient, core: Core) -> None:
    """The code can go out by other channels (SMS, print): then no mail is sent."""
    invite(admin, type="single", emails=["ada@example.com"], send_email=False)

    assert mails(core) == []


def test_group_invitation_mails_the_same_code_to_every_address(
        admin: TestClient, core: Core) -> None:
    body = invite(admin, type="group", max_redemptions=100,
                  emails=["a@example.com", "b@example.com"])

    [item] = body["invitations"]
    assert item["type"] == "group" and item["max_redemptions"] == 100
    sent = mails(core)
    assert [m["to"] for m in sent] == ["a@example.com", "b@example.com"]
    assert all(item["redeem_url"] in m["text"] for m in sent)


def test_bad_input_is_one_clear_error_and_writes_nothing(admin: TestClient, core: Core) -> None:
    cases = [
        ({"type": "single"}, "emails"),
        ({"type": "single", "emails": ["nope"]}, "emails"),
        ({"type": "single", "emails": ["a@example.com"], "roles": ["ghost"]}, "roles"),
        ({"type": "single", "emails": ["a@example.com"], "account_id": "ghost"}, "account_id"),
        ({"type": "single", "emails": ["a@example.com"], "inviter_id": "ghost"}, "inviter_id"),
        ({"type": "single", "emails": ["a@example.com"], "expires_at": "2001-01-01T00:00:00Z"},
         "expires_at"),
        ({"type": "group", "max_redemptions": 0}, "max_redemptions"),
        ({"type": "single", "user_ids": ["ghost"]}, "emails"),
    ]
    for body, field in cases:
        response = admin.post(f"{API}/invitations", json=body)

        assert response.status_code == 422, (body, response.text)
        error = response.json()["error"]
        assert error["field"] == field and error["message"].endswith("."), error
    assert admin.get(f"{API}/invitations").json()["items"] == []
    assert mails(core) == []


def test_a_list_skips_only_the_rows_that_fail(admin: TestClient) -> None:
    """Bulk through the API: per-row errors are reported; the other rows are invited."""
    admin.post(f"{API}/roles", json={"name": "partner"})
    body = invite(admin, type="single", invitees=[
        {"email": "a@example.com", "first_name": "Ann", "roles": ["partner"]},
        {"email": "b@example.com", "roles": ["ghost"]},
        {"email": "A@example.com"}])

    assert [i["email"] for i in body["invitations"]] == ["a@example.com"]
    assert body["invitations"][0]["roles"] == ["partner"]
    assert body["invitations"][0]["first_name"] == "Ann"
    assert [(f["index"], f["email"]) for f in body["failed"]] == [
        (1, "b@example.com"), (2, "A@example.com")]
    assert "ghost" in body["failed"][0]["error"]


def test_single_invitation_binds_to_a_contact_without_credentials(admin: TestClient) -> None:
    """A user with that email and no password is the contact the invitation completes."""
    contact = admin.post(f"{API}/users", json={"email": "ada@example.com"}).json()["user"]
    admin.post(f"{API}/users", json={"email": "bob@example.com", "password": "long passphrase 42"})

    body = invite(admin, type="single", emails=["ada@example.com", "bob@example.com"])

    bound = {i["email"]: i["user_id"] for i in body["invitations"]}
    assert bound == {"ada@example.com": contact["id"], "bob@example.com": None}


def test_existing_account_redemption_applies_account_and_roles(
        admin: TestClient, client: TestClient, core: Core) -> None:
    """"I have an existing account": the signed-in user gets the account and roles, once."""
    account = admin.post(f"{API}/accounts", json={"name": "Contoso"}).json()["account"]
    admin.post(f"{API}/roles", json={"name": "partner"})
    code = invite(admin, type="group", account_id=account["id"], roles=["partner"],
                  on_redeem_email=True)["invitations"][0]["code"]
    token = signed_in(client, core, admin, "ada")
    headers = {"Authorization": f"Bearer {token}"}

    response = client.post("/api/v1/invitations/redeem", json={"code": code}, headers=headers)
    again = client.post("/api/v1/invitations/redeem", json={"code": code}, headers=headers)

    assert response.status_code == 200, response.text
    user = response.json()["user"]
    assert user["account_id"] == account["id"] and user["roles"] == ["partner"]
    assert again.status_code == 400 and again.json()["error"]["code"] == "invitation_invalid"
    item = response.json()["invitation"]
    shown = admin.get(f"{API}/invitations/{item['id']}").json()["invitation"]
    assert shown["redemption_count"] == 1
    assert [(r["user_id"], r["method"]) for r in shown["redemptions"]] == [
        (user["id"], "existing_account")]
    assert [m["to"] for m in mails(core, "invitation_thanks")] == ["ada@example.com"]
    events = admin.get(f"{API}/events", params={"type": "invitation.redeemed"})
    if events.status_code == 200:  # the events API is another feature's
        assert len(events.json()["items"]) == 1


def test_redeem_needs_a_signed_in_user(client: TestClient, admin: TestClient) -> None:
    code = invite(admin, type="group")["invitations"][0]["code"]

    response = client.post("/api/v1/invitations/redeem", json={"code": code})

    assert response.status_code == 401


def test_unknown_expired_revoked_and_used_up_codes_answer_the_same(
        admin: TestClient, client: TestClient, core: Core) -> None:
    """One code, one message: the answer does not reveal why a code is refused."""
    expired = invite(admin, type="group", send_email=False)["invitations"][0]
    with core.db.write() as session:
        session.execute(sa.update(Invitation).where(Invitation.id == expired["id"])
                        .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    revoked = invite(admin, type="group")["invitations"][0]
    assert admin.post(f"{API}/invitations/{revoked['id']}/revoke").json()[
        "invitation"]["status"] == "revoked"
    used = invite(admin, type="group", max_redemptions=1)["invitations"][0]
    first = signed_in(client, core, admin, "first")
    assert client.post("/api/v1/invitations/redeem", json={"code": used["code"]},
                       headers={"Authorization": f"Bearer {first}"}).status_code == 200
    token = signed_in(client, core, admin, "second")

    bodies = []
    for code in ["x" * 43, expired["code"], revoked["code"], used["code"]]:
        response = client.post("/api/v1/invitations/redeem", json={"code": code},
                               headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 400
        bodies.append(response.json())

    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["error"]["code"] == "invitation_invalid"
    statuses = {s: [i["id"] for i in admin.get(f"{API}/invitations", params={"status": s})
                    .json()["items"]] for s in service.STATUSES}
    assert statuses == {"active": [], "expired": [expired["id"]], "revoked": [revoked["id"]],
                        "redeemed": [used["id"]]}


def test_resend_issues_a_new_code_and_the_old_one_dies(
        admin: TestClient, client: TestClient, core: Core) -> None:
    old = invite(admin, type="single", emails=["ada@example.com"])["invitations"][0]

    response = admin.post(f"{API}/invitations/{old['id']}/resend")

    assert response.status_code == 200
    new = response.json()["invitation"]
    assert new["id"] == old["id"] and new["code"] != old["code"]
    assert [m["to"] for m in mails(core)] == ["ada@example.com", "ada@example.com"]
    assert new["redeem_url"] in mails(core)[1]["text"]
    token = signed_in(client, core, admin, "ada")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/v1/invitations/redeem", json={"code": old["code"]},
                       headers=headers).status_code == 400
    assert client.post("/api/v1/invitations/redeem", json={"code": new["code"]},
                       headers=headers).status_code == 200


def test_scope_invitations_is_required(client: TestClient, core: Core) -> None:
    from gatepass.auth import service as auth

    _, users_key = auth.create_api_key(core, "users only", ["users"])
    _, invite_key = auth.create_api_key(core, "inviter", ["invitations"])

    refused = client.post(f"{API}/invitations", json={"type": "group"},
                          headers={"Authorization": f"Bearer {users_key}"})
    allowed = client.post(f"{API}/invitations", json={"type": "group"},
                          headers={"Authorization": f"Bearer {invite_key}"})

    assert refused.status_code == 403 and allowed.status_code == 201


def test_redeem_in_binds_a_contact_and_caps_a_single_invitation(core: Core) -> None:
    """The service registration calls: a single invitation is a group of one."""
    from gatepass.invitations.schemas import InvitationCreate

    with core.db.write() as session:
        contact = User(username="ada", username_key="ada", email="ada@example.com",
                       email_key="ada@example.com")
        session.add(contact)
    issued = service.create_invitations(
        core, CLI, InvitationCreate(type="single", emails=["ada@example.com"])).issued[0]

    with core.db.read() as session:
        bound = service.find_bound_user(session, issued.code)
    with core.db.write() as session:
        user = session.get(User, contact.id)
        assert user is not None
        service.redeem_in(core, session, CLI, issued.code, user, "register")

    assert bound is not None and bound.id == contact.id
    with core.db.read() as session:
        assert service.find_bound_user(session, issued.code) is None
        row = session.get(Invitation, issued.invitation.id)
        assert row is not None and row.status == "redeemed" and row.redemption_count == 1


def register(client: TestClient, email: str, code: str | None, **extra: Any) -> Any:
    body = {"email": email, "password": "a long enough passphrase", **extra}
    if code is not None:
        body["invitation_code"] = code
    return client.post("/api/v1/auth/register", json=body)


def test_registration_with_a_code_gets_the_account_and_roles(
        admin: TestClient, client: TestClient, core: Core) -> None:
    from conftest import set_site

    set_site(core, registration__open=False)
    account = admin.post(f"{API}/accounts", json={"name": "Fabrikam"}).json()["account"]
    admin.post(f"{API}/roles", json={"name": "beta"})
    item = invite(admin, type="group", account_id=account["id"], roles=["beta"])["invitations"][0]

    without = register(client, "walkin@example.com", None)
    response = register(client, "ada@example.com", item["code"])

    assert without.status_code == 403 and without.json()["error"]["code"] == "invitation_required"
    assert response.status_code == 201, response.text
    user = response.json()["user"]
    assert user["account_id"] == account["id"] and user["roles"] == ["beta"]
    shown = admin.get(f"{API}/invitations/{item['id']}").json()["invitation"]
    assert [(r["user_id"], r["method"]) for r in shown["redemptions"]] == [(user["id"], "register")]


def test_registration_completes_the_bound_contact_instead_of_a_duplicate(
        admin: TestClient, client: TestClient) -> None:
    """An existing contact is validated by an invitation code: still one user afterwards."""
    contact = admin.post(f"{API}/users", json={"email": "ada@example.com",
                                               "first_name": "Ada"}).json()["user"]
    item = invite(admin, type="single", emails=["ada@example.com"])["invitations"][0]

    response = register(client, "ada@example.com", item["code"], username="ada.l")

    assert response.status_code == 201, response.text
    assert response.json()["user"]["id"] == contact["id"]
    users = admin.get(f"{API}/users", params={"q": "ada@example.com"}).json()["items"]
    assert [(u["id"], u["username"], u["password_set"]) for u in users] == [
        (contact["id"], "ada.l", True)]
    signin = client.post("/api/v1/auth/signin", json={"login": "ada.l",
                                                      "password": "a long enough passphrase"})
    assert signin.status_code == 200


def test_registration_refuses_expired_codes_and_codes_when_invitations_are_off(
        admin: TestClient, client: TestClient, core: Core) -> None:
    from conftest import set_site

    item = invite(admin, type="group")["invitations"][0]
    with core.db.write() as session:
        session.execute(sa.update(Invitation).where(Invitation.id == item["id"])
                        .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    fresh = invite(admin, type="group")["invitations"][0]

    expired = register(client, "a@example.com", item["code"])
    set_site(core, registration__invitation=False, registration__open=False)
    refused = register(client, "b@example.com", fresh["code"])

    assert expired.status_code == 400 and expired.json()["error"]["code"] == "invitation_invalid"
    assert refused.status_code == 403
    assert admin.get(f"{API}/users").json()["items"] == []
