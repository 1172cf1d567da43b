"""External sign-in with OpenID Connect against a real provider (oidc-provider-mock on localhost).

The provider issues real codes and RS256-signed ID tokens from its own JWKS. Claims set on one
of its users are copied into that user's ID token over the standard ones, which is how these
tests make it issue a token for another audience or with another nonce.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from oidc_provider_mock import run_server_in_thread

from conftest import LiveServer, free_port, set_site
from gatepass.core import Core
from gatepass.events.models import Event
from gatepass.external import providers
from gatepass.external.service import STATE_COOKIE
from gatepass.users.models import ExternalIdentity, User

API = "/admin/api/v1"
PASSWORD = "a long enough passphrase"


@pytest.fixture(scope="module")
def idp() -> Iterator[str]:
    """A real OpenID provider on a free localhost port; its issuer URL."""
    with run_server_in_thread(port=free_port(), require_nonce=True) as server:
        yield f"http://localhost:{server.server_port}"


def add_provider(core: Core, idp: str, slug: str = "mock", **options: Any) -> None:
    providers.add_provider(core, slug, client_id="gatepass-" + slug, client_secret="s3cret",
                           issuer=idp, display_name="Mock ID", **options)


def set_claims(idp: str, sub: str, **claims: Any) -> None:
    httpx.put(f"{idp}/users/{sub}", json=claims, timeout=10).raise_for_status()


def at_provider(client: TestClient, start: str, sub: str) -> str:
    """Start at Gatepass, approve as `sub` at the provider; the callback path to follow."""
    response = client.get(start, follow_redirects=False)
    assert response.status_code == 303, response.text
    authorize = response.headers["location"]
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"] and query["state"]
    approved = httpx.post(authorize, data={"sub": sub}, follow_redirects=False, timeout=10)
    assert approved.status_code == 302, approved.text
    back = urlsplit(approved.headers["location"])
    return f"{back.path}?{back.query}"


def sign_in_with(client: TestClient, sub: str, start: str = "/signin/external/mock",
                 ) -> httpx.Response:
    return client.get(at_provider(client, start, sub), follow_redirects=False)


def count(core: Core, model: Any) -> int:
    with core.db.read() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def events_of(core: Core, type_: str) -> list[Event]:
    with core.db.read() as session:
        return list(session.scalars(sa.select(Event).where(Event.type == type_)
                                    .order_by(Event.seq)))


def user_by_email(core: Core, email: str) -> User:
    with core.db.read() as session:
        user = session.scalar(sa.select(User).where(User.email_key == email.casefold()))
        assert user is not None
        return user


def me_response(client: TestClient) -> httpx.Response:
    """GET /api/v1/me by session cookie (the `admin` fixture adds a Bearer key)."""
    key = client.headers.pop("Authorization", None)
    try:
        return client.get("/api/v1/me")
    finally:
        if key is not None:
            client.headers["Authorization"] = key


def me(client: TestClient) -> dict[str, Any]:
    response = me_response(client)
    assert response.status_code == 200, response.text
    return dict(response.json()["user"])


def create_user(admin: TestClient, **body: Any) -> dict[str, Any]:
    response = admin.post(f"{API}/users", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json()["user"])


# -- sign-in and registration -------------------------------------------------------------------

def test_a_new_external_user_registers_and_a_returning_one_signs_in(
        client: TestClient, core: Core, idp: str) -> None:
    """First visit creates the user keyed by (issuer, sub); the second signs the same user in."""
    add_provider(core, idp)
    set_claims(idp, "new-1", email="grace@example.com", email_verified=True,
               given_name="Grace", family_name="Hopper")

    first = sign_in_with(client, "new-1")

    assert first.status_code == 303 and first.headers["location"] == "/profile"
    assert me(client)["email"] == "grace@example.com"
    user = user_by_email(core, "grace@example.com")
    assert user.email_verified and user.first_name == "Grace" and user.password_hash is None
    assert [(x.issuer, x.subject, x.provider) for x in user.external_identities] == \
        [(idp, "new-1", "mock")]
    [created] = events_of(core, "user.created")
    assert created.context["triggered_by"] == "external_login"

    client.cookies.clear()
    again = sign_in_with(client, "new-1")

    assert again.status_code == 303
    assert me(client)["id"] == user.id
    assert count(core, User) == 1
    signed = events_of(core, "user.signed_in")
    assert [e.payload["method"] for e in signed] == ["external", "external"]


def test_the_signin_page_shows_a_button_per_enabled_provider(
        client: TestClient, core: Core, idp: str) -> None:
    """Each enabled provider has a button that starts its round trip."""
    add_provider(core, idp)

    page = client.get("/signin").text

    assert 'href="/signin/external/mock"' in page and "Mock ID" in page


def test_registration_closed_refuses_an_unknown_external_user(
        client: TestClient, core: Core, idp: str) -> None:
    """With registration.open off and no invitation, an unknown identity gets no account."""
    add_provider(core, idp)
    set_site(core, registration__open=False)
    set_claims(idp, "closed-1", email="closed@example.com", email_verified=True)

    response = sign_in_with(client, "closed-1")

    assert response.status_code == 403
    assert "needs an invitation" in response.text
    assert count(core, User) == 0 and STATE_COOKIE not in client.cookies


# -- tampering ----------------------------------------------------------------------------------

def test_a_wrong_state_is_refused_and_nothing_is_created(
        client: TestClient, core: Core, idp: str) -> None:
    """A callback whose state does not match the browser's cookie is refused."""
    add_provider(core, idp)
    callback = at_provider(client, "/signin/external/mock", "state-1")
    path, _, query = callback.partition("?")
    params = parse_qs(query)

    response = client.get(path, params={"code": params["code"][0], "state": "forged"},
                          follow_redirects=False)

    assert response.status_code == 400 and "not started in this browser" in response.text
    assert count(core, User) == 0 and "gatepass_session" not in client.cookies


def test_a_callback_in_another_browser_is_refused(
        client: TestClient, core: Core, idp: str) -> None:
    """Without the state cookie (login CSRF: a link sent to a victim), nothing happens."""
    add_provider(core, idp)
    callback = at_provider(client, "/signin/external/mock", "csrf-1")
    client.cookies.clear()

    response = client.get(callback, follow_redirects=False)

    assert response.status_code == 400 and count(core, User) == 0


def test_a_replayed_code_is_refused(client: TestClient, core: Core, idp: str) -> None:
    """The provider accepts a code once; replaying the whole callback signs nobody in."""
    add_provider(core, idp)
    set_claims(idp, "replay-1", email="replay@example.com", email_verified=True)
    callback = at_provider(client, "/signin/external/mock", "replay-1")
    sealed = client.cookies[STATE_COOKIE]
    assert client.get(callback, follow_redirects=False).status_code == 303
    sessions_before = len(events_of(core, "user.signed_in"))
    client.cookies.clear()
    client.cookies.set(STATE_COOKIE, sealed, path="/signin/external")

    replay = client.get(callback, follow_redirects=False)

    assert replay.status_code == 400 and "already used" in replay.text
    assert "gatepass_session" not in client.cookies
    assert len(events_of(core, "user.signed_in")) == sessions_before and count(core, User) == 1


def test_an_id_token_with_a_wrong_nonce_is_refused(
        client: TestClient, core: Core, idp: str) -> None:
    """The ID token must carry the nonce this browser sent."""
    add_provider(core, idp)
    set_claims(idp, "nonce-1", email="nonce@example.com", email_verified=True, nonce="other")

    response = sign_in_with(client, "nonce-1")

    assert response.status_code == 400 and "does not belong to this sign-in" in response.text
    assert count(core, User) == 0


def test_an_id_token_for_another_audience_is_refused(
        client: TestClient, core: Core, idp: str) -> None:
    """An ID token minted for another application does not sign anyone in here."""
    add_provider(core, idp)
    set_claims(idp, "aud-1", email="aud@example.com", email_verified=True,
               aud="someone-else")

    response = sign_in_with(client, "aud-1")

    assert response.status_code == 400 and "another application" in response.text
    assert count(core, User) == 0


def test_an_id_token_from_another_issuer_is_refused(
        client: TestClient, core: Core, idp: str) -> None:
    """`iss` must be the provider's issuer."""
    add_provider(core, idp)
    set_claims(idp, "iss-1", email="iss@example.com", iss="https://evil.example")

    response = sign_in_with(client, "iss-1")

    assert response.status_code == 400 and "issued by someone else" in response.text
    assert count(core, User) == 0


def test_a_provider_error_shows_a_clear_page(client: TestClient, core: Core, idp: str) -> None:
    """The provider's error (the user said no) comes back as a sentence, not a crash."""
    add_provider(core, idp)
    authorize = client.get("/signin/external/mock", follow_redirects=False).headers["location"]
    denied = httpx.post(authorize, data={"action": "deny"}, follow_redirects=False, timeout=10)
    assert "error=access_denied" in denied.headers["location"]
    state = parse_qs(urlsplit(authorize).query)["state"][0]

    response = client.get("/signin/external/mock/callback",
                          params={"error": "access_denied", "state": state},
                          follow_redirects=False)

    assert response.status_code == 400 and "did not sign you in (access_denied)" in response.text
    assert count(core, User) == 0


# -- email mapping and duplicates ---------------------------------------------------------------

def test_email_mapping_off_does_not_take_over_an_existing_user(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """Same verified email, mapping off: refused with a way forward, no identity linked."""
    add_provider(core, idp)
    create_user(admin, email="ada@example.com", password=PASSWORD, password_expired=False)
    set_claims(idp, "map-off", email="ada@example.com", email_verified=True)

    response = sign_in_with(client, "map-off")

    assert response.status_code == 409 and "already exists" in response.text
    assert "link Mock ID from your profile" in response.text
    assert count(core, ExternalIdentity) == 0 and count(core, User) == 1


def test_email_mapping_on_links_a_verified_email_to_the_existing_user(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """allow_contact_mapping_with_email + email_verified: the existing user signs in."""
    add_provider(core, idp, allow_contact_mapping_with_email=True)
    ada = create_user(admin, email="ada@example.com", password=PASSWORD, password_expired=False)
    set_claims(idp, "map-on", email="ADA@example.com", email_verified=True)

    response = sign_in_with(client, "map-on")

    assert response.status_code == 303
    user = me(client)
    assert user["id"] == ada["id"]
    assert user["external_identities"] == [{"provider": "mock", "subject": "map-on"}]
    assert count(core, User) == 1


def test_email_mapping_on_ignores_an_unverified_email(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """Without email_verified from the provider, an email never links accounts."""
    add_provider(core, idp, allow_contact_mapping_with_email=True)
    create_user(admin, email="ada@example.com", password=PASSWORD, password_expired=False)
    set_claims(idp, "map-unverified", email="ada@example.com", email_verified=False)

    response = sign_in_with(client, "map-unverified")

    assert response.status_code == 409 and count(core, ExternalIdentity) == 0


def test_shared_emails_allowed_make_a_second_user(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """With users.require_unique_email off and mapping off, the identity gets its own user."""
    add_provider(core, idp)
    set_site(core, users__require_unique_email=False)
    first = create_user(admin, email="ada@example.com", password=PASSWORD)
    set_claims(idp, "dup-1", email="ada@example.com", email_verified=True)

    response = sign_in_with(client, "dup-1")

    assert response.status_code == 303
    assert me(client)["id"] != first["id"]
    assert count(core, User) == 2


# -- account state ------------------------------------------------------------------------------

def test_a_disabled_or_locked_user_cannot_sign_in_externally(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """login_enabled and locks hold on this path too."""
    add_provider(core, idp)
    set_claims(idp, "state-user", email="dis@example.com", email_verified=True)
    assert sign_in_with(client, "state-user").status_code == 303
    user_id = me(client)["id"]
    client.cookies.clear()
    admin.patch(f"{API}/users/{user_id}", json={"login_enabled": False})

    disabled = sign_in_with(client, "state-user")

    assert disabled.status_code == 403 and "disabled" in disabled.text
    assert "gatepass_session" not in client.cookies
    admin.patch(f"{API}/users/{user_id}", json={"login_enabled": True})
    assert admin.post(f"{API}/users/{user_id}/lock").status_code == 200

    locked = sign_in_with(client, "state-user")

    assert locked.status_code == 423 and "gatepass_session" not in client.cookies


def test_a_forced_password_change_still_comes_first(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """A user with an expired password who signs in externally lands on /password/change."""
    add_provider(core, idp, allow_contact_mapping_with_email=True)
    create_user(admin, email="forced@example.com", password=PASSWORD, password_expired=True)
    set_claims(idp, "forced-1", email="forced@example.com", email_verified=True)

    response = sign_in_with(client, "forced-1")

    assert response.status_code == 303 and response.headers["location"] == "/password/change"
    assert me_response(client).status_code == 403


# -- invitations --------------------------------------------------------------------------------

def test_an_invitation_redeemed_externally_completes_the_invited_contact(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """The pre-created contact gets the identity, the account and the roles; no duplicate."""
    add_provider(core, idp)
    set_site(core, registration__open=False)
    account = admin.post(f"{API}/accounts", json={"name": "Contoso"}).json()
    account_id = account.get("id") or account["account"]["id"]
    admin.post(f"{API}/roles", json={"name": "partner"})
    contact = create_user(admin, email="invitee@example.com")
    body = admin.post(f"{API}/invitations", json={
        "type": "single", "user_ids": [contact["id"]], "account_id": account_id,
        "roles": ["partner"], "send_email": False}).json()
    code = body["invitations"][0]["code"]
    set_claims(idp, "invitee-1", email="someone.else@example.org", email_verified=True)

    response = sign_in_with(client, "invitee-1", f"/signin/external/mock?invitation={code}")

    assert response.status_code == 303, response.text
    user = me(client)
    assert user["id"] == contact["id"] and user["account_id"] == account_id
    assert user["roles"] == ["partner"]
    assert user["external_identities"] == [{"provider": "mock", "subject": "invitee-1"}]
    assert count(core, User) == 1
    [redeemed] = events_of(core, "invitation.redeemed")
    assert redeemed.payload["method"] == "external_login"
    # The contact was created once, by the admin; completing it is an update, as on the
    # local registration path.
    assert [e.user_id for e in events_of(core, "user.created")] == [contact["id"]]
    [completed] = [e for e in events_of(core, "user.updated")
                   if e.context["triggered_by"] == "external_login"]
    assert completed.user_id == contact["id"]
    assert completed.payload["user"]["external_identities"] == user["external_identities"]


def test_a_group_invitation_lets_an_external_user_register_when_registration_is_closed(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """The code carried through the round trip opens registration and applies the roles."""
    add_provider(core, idp)
    set_site(core, registration__open=False)
    admin.post(f"{API}/roles", json={"name": "member"})
    body = admin.post(f"{API}/invitations", json={
        "type": "group", "max_redemptions": 5, "roles": ["member"], "send_email": False}).json()
    code = body["invitations"][0]["code"]
    set_claims(idp, "group-1", email="grouped@example.com", email_verified=True)

    response = sign_in_with(client, "group-1", f"/signin/external/mock?invitation={code}")

    assert response.status_code == 303, response.text
    assert me(client)["roles"] == ["member"]
    assert len(events_of(core, "invitation.redeemed")) == 1


def test_an_invalid_invitation_creates_nobody(
        client: TestClient, core: Core, idp: str) -> None:
    """A wrong code refuses the registration and leaves no user behind."""
    add_provider(core, idp)
    set_site(core, registration__open=False)
    set_claims(idp, "badcode-1", email="bad@example.com", email_verified=True)

    response = sign_in_with(client, "badcode-1", "/signin/external/mock?invitation=nope")

    assert response.status_code == 400 and count(core, User) == 0


# -- the account page ---------------------------------------------------------------------------

def signin_with_password(client: TestClient, login: str) -> None:
    response = client.post("/api/v1/auth/signin", json={"login": login, "password": PASSWORD})
    assert response.status_code == 200, response.text


def csrf_of(client: TestClient, path: str) -> str:
    page = client.get(path).text
    return page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def test_a_signed_in_user_links_and_unlinks_an_identity(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """Link from /profile/identities through the provider, then remove it again."""
    add_provider(core, idp)
    create_user(admin, username="linker", email="linker@example.com", password=PASSWORD,
                password_expired=False)
    signin_with_password(client, "linker")
    token = csrf_of(client, "/profile/identities")
    started = client.post("/profile/identities/link",
                          data={"csrf_token": token, "provider": "mock"}, follow_redirects=False)
    assert started.status_code == 303
    approved = httpx.post(started.headers["location"], data={"sub": "link-1"},
                          follow_redirects=False, timeout=10)
    back = urlsplit(approved.headers["location"])

    linked = client.get(f"{back.path}?{back.query}", follow_redirects=False)

    assert linked.headers["location"] == "/profile/identities?notice=linked"
    page = client.get(linked.headers["location"]).text
    assert "Mock ID" in page and "was linked" in page
    identity_id = user_by_email(core, "linker@example.com").external_identities[0].id

    removed = client.post(f"/profile/identities/{identity_id}/unlink",
                          data={"csrf_token": token}, follow_redirects=False)

    assert removed.status_code == 303
    assert user_by_email(core, "linker@example.com").external_identities == []


def test_the_last_way_to_sign_in_cannot_be_removed(
        client: TestClient, core: Core, idp: str) -> None:
    """No password and one identity: unlinking is refused with a clear message."""
    add_provider(core, idp)
    set_claims(idp, "only-1", email="only@example.com", email_verified=True)
    assert sign_in_with(client, "only-1").status_code == 303
    token = csrf_of(client, "/profile/identities")
    identity_id = user_by_email(core, "only@example.com").external_identities[0].id

    response = client.post(f"/profile/identities/{identity_id}/unlink",
                           data={"csrf_token": token}, follow_redirects=False)

    assert response.status_code == 403 and "only way to sign in" in response.text
    assert len(user_by_email(core, "only@example.com").external_identities) == 1


def test_an_identity_linked_to_someone_else_cannot_be_linked_again(
        client: TestClient, admin: TestClient, core: Core, idp: str) -> None:
    """(issuer, sub) belongs to one user only."""
    add_provider(core, idp)
    set_claims(idp, "taken-1", email="first@example.com", email_verified=True)
    assert sign_in_with(client, "taken-1").status_code == 303
    client.cookies.clear()
    create_user(admin, username="second", email="second@example.com", password=PASSWORD,
                password_expired=False)
    signin_with_password(client, "second")
    token = csrf_of(client, "/profile/identities")
    started = client.post("/profile/identities/link",
                          data={"csrf_token": token, "provider": "mock"}, follow_redirects=False)
    approved = httpx.post(started.headers["location"], data={"sub": "taken-1"},
                          follow_redirects=False, timeout=10)
    back = urlsplit(approved.headers["location"])

    response = client.get(f"{back.path}?{back.query}", follow_redirects=False)

    assert response.status_code == 409 and "already linked to another user" in response.text
    assert count(core, ExternalIdentity) == 1


def test_the_client_secret_is_stored_encrypted(core: Core, idp: str) -> None:
    """A database dump does not show the client secret."""
    add_provider(core, idp)

    with core.db.read() as session:
        stored = session.scalar(sa.text("SELECT client_secret FROM external_providers"))

    assert stored and "s3cret" not in stored
    assert providers.load(core, "mock").client_secret == "s3cret"


# -- the real browser ---------------------------------------------------------------------------

@pytest.mark.browser
def test_browser_signin_through_the_provider(live_server: LiveServer, page: Any,
                                             idp: str) -> None:
    """/signin → provider button → the provider's form → back at Gatepass, signed in."""
    add_provider(live_server.core, idp)
    set_claims(idp, "browser-1", email="browser@example.com", email_verified=True,
               given_name="Bea")
    page.route("https://cdn.jsdelivr.net/**", lambda route: route.abort())  # offline CSS

    page.goto(live_server.url + "/signin")
    page.get_by_role("link", name="Mock ID").click()
    page.wait_for_url(f"{idp}/oauth2/authorize*")
    page.fill("input[name=sub]", "browser-1")
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(live_server.url + "/profile")

    assert page.locator("#email").inner_text().startswith("browser@example.com")


@pytest.mark.browser
def test_browser_invited_contact_registers_through_the_provider(
        live_server: LiveServer, live_admin: httpx.Client, page: Any, idp: str) -> None:
    """/register?invitation=CODE → provider button → back signed in as the invited contact,
    with the invitation's account and roles."""
    add_provider(live_server.core, idp)
    set_site(live_server.core, registration__open=False)
    account = live_admin.post("/accounts", json={"name": "Fabrikam"}).json()
    account_id = account.get("id") or account["account"]["id"]
    live_admin.post("/roles", json={"name": "supplier"})
    contact = live_admin.post("/users", json={"email": "invited@example.com"}).json()["user"]
    code = live_admin.post("/invitations", json={
        "type": "single", "user_ids": [contact["id"]], "account_id": account_id,
        "roles": ["supplier"], "send_email": False}).json()["invitations"][0]["code"]
    set_claims(idp, "browser-invitee", email="invited@example.com", email_verified=True)
    page.route("https://cdn.jsdelivr.net/**", lambda route: route.abort())

    page.goto(f"{live_server.url}/register/?returnurl=%2f&invitation={code}")
    page.get_by_role("link", name="Mock ID").click()
    page.wait_for_url(f"{idp}/oauth2/authorize*")
    page.fill("input[name=sub]", "browser-invitee")
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(live_server.url + "/profile")

    assert page.locator("#roles").inner_text() == "supplier"
    user = live_admin.get(f"/users/{contact['id']}").json()["user"]
    assert user["account_id"] == account_id
    assert user["external_identities"] == [{"provider": "mock", "subject": "browser-invitee"}]
    assert len(live_admin.get("/users").json()["items"]) == 1
