"""External sign-in use cases: start a round trip to a provider, finish it, link and unlink.

The round trip's secrets (state, nonce, PKCE verifier) and intent (sign in, link, an invitation
code) travel in a short-lived cookie signed with the secret key, bound to the browser that
started it. A finished round trip resolves to a user in one transaction:

1. an identity with this (issuer, subject) is known → that user signs in;
2. linking from the profile → the identity joins the signed-in user;
3. an invitation bound to a pre-created contact → the contact gets the identity;
4. the provider asserts a verified email, the provider allows mapping by email, and exactly
   one user has it → that user gets the identity;
5. otherwise a new user registers, under the same rules as local registration.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gatepass.auth import service as auth
from gatepass.context import Context
from gatepass.db import new_id, utcnow
from gatepass.errors import (Conflict, EmailNotVerified, Forbidden, InvitationInvalid,
                             InvitationRequired, Locked, LoginDisabled, NotFound,
                             RegistrationClosed)
from gatepass.events import service as events
from gatepass.external import oidc, providers
from gatepass.external.oidc import ExternalLoginFailed
from gatepass.users import service as users
from gatepass.users.models import ExternalIdentity, User
from gatepass.users.schemas import UserCreate

if TYPE_CHECKING:
    from gatepass.core import Core

STATE_COOKIE = "gatepass_oidc"
STATE_COOKIE_PATH = "/signin/external"
STATE_LIFETIME = 600  # seconds a round trip to the provider may take
MODES = ("signin", "link")

STARTED_ELSEWHERE = ("This sign-in was not started in this browser, or it took too long. "
                     "Start again from the sign-in page.")


# -- the round trip's cookie --------------------------------------------------------------------

@dataclass(frozen=True)
class Pending:
    slug: str
    state: str
    nonce: str
    verifier: str
    mode: str
    expires: int
    invitation: str | None = None
    user_id: str | None = None
    next: str = "/profile"


def _mac(secret_key: str, body: str) -> str:
    return hmac.new(secret_key.encode(), ("external-state:" + body).encode(),
                    hashlib.sha256).hexdigest()


def seal(secret_key: str, pending: Pending) -> str:
    body = base64.urlsafe_b64encode(json.dumps(asdict(pending)).encode()).decode().rstrip("=")
    return body + "." + _mac(secret_key, body)


def unseal(secret_key: str, value: str | None) -> Pending:
    if not value or len(value) > 4000 or "." not in value:
        raise ExternalLoginFailed(STARTED_ELSEWHERE)
    body, _, mac = value.rpartition(".")
    if not hmac.compare_digest(_mac(secret_key, body), mac):
        raise ExternalLoginFailed(STARTED_ELSEWHERE)
    try:
        pending = Pending(**json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))
    except (ValueError, TypeError):
        raise ExternalLoginFailed(STARTED_ELSEWHERE) from None
    if pending.expires < time.time():
        raise ExternalLoginFailed(STARTED_ELSEWHERE)
    return pending


def redirect_uri(core: Core, slug: str) -> str:
    """What to register at the provider: always under GATEPASS_PUBLIC_URL."""
    return core.link(f"/signin/external/{slug}/callback")


# -- starting -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Started:
    url: str  # where to send the browser
    cookie: str  # the sealed Pending, for STATE_COOKIE


def start(core: Core, slug: str, *, mode: str = "signin", invitation: str | None = None,
          user_id: str | None = None, next: str = "/profile") -> Started:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "link" and not user_id:
        raise ValueError("linking needs the signed-in user")
    provider = providers.load(core, slug)
    invitation = (invitation or "").strip()[:200] or None
    pending = Pending(slug=provider.slug, state=secrets.token_urlsafe(32),
                      nonce=secrets.token_urlsafe(32), verifier=secrets.token_urlsafe(48),
                      mode=mode, expires=int(time.time()) + STATE_LIFETIME,
                      invitation=invitation, user_id=user_id, next=next)
    url = oidc.authorization_url(provider, redirect_uri(core, provider.slug),
                                 state=pending.state, nonce=pending.nonce,
                                 code_verifier=pending.verifier)
    return Started(url=url, cookie=seal(core.secret_key, pending))


# -- finishing ----------------------------------------------------------------------------------

@dataclass
class Finished:
    kind: str  # signed_in | linked | created_unverified
    user: User
    provider: str
    next: str = "/profile"
    token: str | None = None
    password_change_required: bool = False


def finish(core: Core, ctx: Context, slug: str, *, cookie: str | None,
           params: dict[str, str], current_user_id: str | None = None) -> Finished:
    """The provider sent the browser back: check everything, then resolve to a user."""
    pending = unseal(core.secret_key, cookie)
    state = params.get("state") or ""
    if pending.slug != slug or not hmac.compare_digest(pending.state.encode(), state.encode()):
        raise ExternalLoginFailed(STARTED_ELSEWHERE)
    if params.get("error"):
        error = "".join(c for c in params["error"][:60] if c.isalnum() or c in "_-")
        raise ExternalLoginFailed(f"The provider did not sign you in ({error}). "
                                  "Start again from the sign-in page.")
    code = params.get("code")
    if not code or len(code) > 2000:
        raise ExternalLoginFailed("The provider sent no authorization code. "
                                  "Start again from the sign-in page.")
    if pending.mode == "link" and current_user_id != pending.user_id:
        raise ExternalLoginFailed("Your session changed while you were at the provider. "
                                  "Sign in again, then link the account from your profile.")
    provider = providers.load(core, slug)
    identity = oidc.complete(provider, redirect_uri(core, slug), code=code,
                             nonce=pending.nonce, code_verifier=pending.verifier)
    ctx = ctx.but(triggered_by="external_login")
    with core.db.write() as session:
        return _resolve(core, session, ctx, provider, identity, pending)


def _resolve(core: Core, session: Session, ctx: Context, provider: providers.ProviderConfig,
             identity: oidc.Identity, pending: Pending) -> Finished:
    known = session.scalar(select(ExternalIdentity).where(
        ExternalIdentity.issuer == identity.issuer, ExternalIdentity.subject == identity.subject))
    label = provider.display_name

    if pending.mode == "link":
        user = users.get_user(session, pending.user_id or "")
        if known is not None and known.user_id != user.id:
            raise Conflict(f"This {label} account is already linked to another user.")
        if known is None:
            _attach(session, ctx, user, provider, identity, how="linked")
        return Finished("linked", user, provider.slug, next="/profile/identities")

    if known is not None:
        user = users.get_user(session, known.user_id)
        if pending.invitation:
            _redeem(core, session, ctx, pending.invitation, user)
        return _sign_in(core, session, ctx, user, provider, pending)

    contact = _bound_contact(session, pending.invitation)
    if contact is not None:
        _check_registration(core, pending.invitation, label)
        _attach(session, ctx, contact, provider, identity, how=None)
        _fill_profile(contact, identity)
        _redeem(core, session, ctx, pending.invitation or "", contact)
        session.flush()
        events.record(session, ctx, "user.updated", {"user": users.user_public(contact)},
                      user_id=contact.id)  # created by the admin; completed now
        return _sign_in(core, session, ctx, contact, provider, pending, new=True)

    if identity.email and identity.email_verified and provider.allow_email_mapping:
        matches = users.find_by_email(session, identity.email)
        if len(matches) == 1:
            user = matches[0]
            _attach(session, ctx, user, provider, identity, how="mapped_by_email")
            if pending.invitation:
                _redeem(core, session, ctx, pending.invitation, user)
            return _sign_in(core, session, ctx, user, provider, pending)

    _check_registration(core, pending.invitation, label)
    user = _register(core, session, ctx, provider, identity)
    if pending.invitation:
        _redeem(core, session, ctx, pending.invitation, user)
    session.flush()
    events.record(session, ctx, "user.created",
                  {"user": users.user_public(user), "provider": provider.slug},
                  user_id=user.id)
    return _sign_in(core, session, ctx, user, provider, pending, new=True)


def _attach(session: Session, ctx: Context, user: User, provider: providers.ProviderConfig,
            identity: oidc.Identity, *, how: str | None) -> None:
    user.external_identities.append(ExternalIdentity(
        id=new_id(), user_id=user.id, provider=provider.slug, issuer=identity.issuer,
        subject=identity.subject, created_at=utcnow()))
    user.updated_at = utcnow()
    session.flush()
    if how is not None:
        events.record(session, ctx, "user.updated",
                      {"user": users.user_public(user), "change": "external_identity_" + how,
                       "provider": provider.slug}, user_id=user.id)


def _fill_profile(user: User, identity: oidc.Identity) -> None:
    user.first_name = user.first_name or identity.given_name
    user.last_name = user.last_name or identity.family_name
    if identity.email and identity.email_verified and \
            users.casefold(identity.email) == (user.email_key or ""):
        user.email_verified = True


def _check_registration(core: Core, code: str | None, label: str) -> None:
    """Local registration's rules, with messages that say why this sign-in has no account."""
    try:
        registration = importlib.import_module("gatepass.registration.service")
        registration.check_open(core, code)
        return
    except ImportError:
        pass
    except RegistrationClosed:
        raise RegistrationClosed(f"There is no account for this {label} sign-in, and "
                                 "registration is closed.") from None
    except InvitationRequired:
        raise InvitationRequired(f"There is no account for this {label} sign-in yet. "
                                 "Registration needs an invitation: open the link in your "
                                 f"invitation, then choose {label}.") from None
    if not core.site["registration.enabled"]:
        raise RegistrationClosed(f"There is no account for this {label} sign-in, and "
                                 "registration is closed.")
    if not code and not core.site["registration.open"]:
        raise InvitationRequired(f"There is no account for this {label} sign-in yet. "
                                 "Registration needs an invitation.")


def _bound_contact(session: Session, code: str | None) -> User | None:
    if not code:
        return None
    try:
        invitations = importlib.import_module("gatepass.invitations.service")
    except ImportError:
        return None
    finder = getattr(invitations, "find_bound_user", None)
    return finder(session, code) if finder else None


def _redeem(core: Core, session: Session, ctx: Context, code: str, user: User) -> None:
    try:
        invitations = importlib.import_module("gatepass.invitations.service")
    except ImportError:
        raise InvitationInvalid() from None
    invitations.redeem_in(core, session, ctx, code, user, "external_login")
    session.flush()


def _register(core: Core, session: Session, ctx: Context, provider: providers.ProviderConfig,
              identity: oidc.Identity) -> User:
    username = None
    if identity.preferred_username and users.USERNAME_RE.match(identity.preferred_username) \
            and "@" not in identity.preferred_username \
            and users.find_by_username(session, identity.preferred_username) is None:
        username = identity.preferred_username
    email = identity.email
    if email is None and username is None:
        username = users.derive_username(session, f"{provider.slug}-user@x")
    try:
        created = users.create_user_in(core, session, ctx, UserCreate(
            email=email, username=username, first_name=identity.given_name,
            last_name=identity.family_name,
            email_verified=bool(email and identity.email_verified)))
    except Conflict as exc:
        if exc.field == "email":
            raise Conflict(f"A user with the email {email} already exists. Sign in with your "
                           f"password, then link {provider.display_name} from your profile.",
                           field="email") from None
        raise
    user = created.user
    _attach(session, ctx, user, provider, identity, how=None)
    return user


def _sign_in(core: Core, session: Session, ctx: Context, user: User,
             provider: providers.ProviderConfig, pending: Pending, *,
             new: bool = False) -> Finished:
    """The same gates as a password sign-in: disabled, locked, unverified email."""
    if not user.login_enabled:
        core.metrics.signins.labels("login_disabled").inc()
        raise LoginDisabled()
    if user.locked_until is not None and user.locked_until > utcnow():
        core.metrics.signins.labels("locked").inc()
        raise Locked(user.locked_until)
    if core.site["registration.require_email_verification"] and not user.email_verified:
        if new:  # registered: keep the account, sign in once the address is verified
            _send_verification(core, session, user)
            return Finished("created_unverified", user, provider.slug)
        core.metrics.signins.labels("email_not_verified").inc()
        raise EmailNotVerified()
    raw, _ = auth.open_session(core, session, ctx, user)
    user.last_sign_in_at = utcnow()
    # A forced change needs a password to change; a user with none signs in with the provider.
    must_change = user.password_hash is not None and auth.password_change_required(core, user)
    session.flush()
    events.record(session, ctx, "user.signed_in",
                  {"user": users.user_public(user), "method": "external",
                   "provider": provider.slug, "password_change_required": must_change},
                  user_id=user.id)
    core.metrics.signins.labels("password_change_required" if must_change else "ok").inc()
    return Finished("signed_in", user, provider.slug, next=pending.next, token=raw,
                    password_change_required=must_change)


def _send_verification(core: Core, session: Session, user: User) -> None:
    try:
        registration = importlib.import_module("gatepass.registration.service")
    except ImportError:
        return
    registration.send_verification(core, session, user)


# -- the account page ---------------------------------------------------------------------------

def identities_of(core: Core, user_id: str) -> list[dict[str, Any]]:
    with core.db.read() as session:
        rows = session.scalars(select(ExternalIdentity).where(ExternalIdentity.user_id == user_id)
                               .order_by(ExternalIdentity.created_at))
        return [{"id": row.id, "provider": row.provider, "issuer": row.issuer,
                 "created_at": row.created_at} for row in rows]


def unlink(core: Core, ctx: Context, user_id: str, identity_id: str) -> User:
    """Remove one external identity; never the last way the user can sign in."""
    with core.db.write() as session:
        user = users.get_user(session, user_id)
        identity = next((x for x in user.external_identities if x.id == identity_id), None)
        if identity is None:
            raise NotFound("That sign-in method is not linked to your account.")
        if user.password_hash is None and len(user.external_identities) <= 1:
            raise Forbidden("This is your only way to sign in. Set a password or link another "
                            "provider before you remove it.")
        user.external_identities.remove(identity)
        user.updated_at = utcnow()
        session.flush()
        events.record(session, ctx, "user.updated",
                      {"user": users.user_public(user),
                       "change": "external_identity_unlinked", "provider": identity.provider},
                      user_id=user.id)
        return user
