"""Self-service registration and email verification (CONTRACT §4, §5).

`register` is the one use case behind `POST /api/v1/auth/register`, the /register page and
invitation redemption at sign-up. Where email verification is on, a taken email is not
revealed: the caller sees the same 201-shaped answer and the owner of the address gets a
"someone tried to register with your address" mail instead (docs/security.md).
"""

from __future__ import annotations

import importlib
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from gatepass.auth import tokens
from gatepass.context import Context
from gatepass.db import lock_key, new_id, utcnow
from gatepass.errors import (InvalidInput, InvalidToken, InvitationInvalid, InvitationRequired,
                             RegistrationClosed)
from gatepass.events import service as events
from gatepass.mail.service import queue_mail
from gatepass.passwords import policy
from gatepass.registration.schemas import Registration
from gatepass.users import service as users
from gatepass.users.models import User
from gatepass.users.schemas import UserCreate

if TYPE_CHECKING:
    from gatepass.core import Core


def check_open(core: Core, invitation_code: str | None) -> None:
    """Which kinds of registration the site settings allow; raises when this one is not."""
    if not core.site["registration.enabled"]:
        raise RegistrationClosed()
    by_invitation = core.site["registration.invitation"]
    if invitation_code:
        if by_invitation:
            return
        if not core.site["registration.open"]:
            raise RegistrationClosed()
        raise InvitationInvalid("This portal does not accept invitation codes; leave the code "
                                "empty to register.", field="invitation_code")
    if not core.site["registration.open"]:
        if by_invitation:
            raise InvitationRequired(field="invitation_code")
        raise RegistrationClosed()


def register(core: Core, ctx: Context, data: Registration) -> User:
    """Create a user who chose their own password; returns the user (or, for a taken email
    where verification is on, an unsaved look-alike so the answer reveals nothing)."""
    code = (data.invitation_code or "").strip() or None
    check_open(core, code)
    email = str(data.email)
    username = data.username.strip() if data.username else None
    try:
        policy.check(data.password, min_length=core.site["password.min_length"],
                     check_common=core.site["password.check_common"],
                     user_inputs=(username, email))
    except InvalidInput as exc:
        exc.field = "password"
        raise
    verify = bool(core.site["registration.require_email_verification"])
    created_ctx = ctx.but(triggered_by="invitation") if code else ctx

    with core.db.write() as session:
        # A single invitation bound to a pre-created contact completes THAT record (issue 6).
        from gatepass.invitations import service as invitations

        contact = invitations.find_bound_user(session, code) if code else None
        if contact is not None and contact.email_key == users.casefold(email):
            user = invitations.complete_contact(
                core, session, contact, data.password, username=username,
                first_name=_clean(data.first_name), last_name=_clean(data.last_name))
            _redeem(core, session, created_ctx, code or "", user)
            if verify and not user.email_verified:
                send_verification(core, session, user)
            events.record(session, created_ctx, "user.updated", {"user": users.user_public(user)},
                          user_id=user.id)
            return user
        if verify and core.site["users.require_unique_email"]:
            lock_key(session, "email:" + users.casefold(email))
            owners = users.find_by_email(session, email)
            if owners:
                if code:  # refused as for a free email, or the answer would tell them apart
                    invitations.check_code_in(session, code)
                return _taken(core, session, data, email, username, owners)
        created = users.create_user_in(core, session, ctx, UserCreate(
            email=email, username=username, password=data.password,
            first_name=_clean(data.first_name), last_name=_clean(data.last_name),
            email_verified=False), chosen_by_user=True)
        user = created.user
        if code:
            _redeem(core, session, created_ctx, code, user)
        if verify and not user.email_verified:
            send_verification(core, session, user)
        session.flush()
        events.record(session, created_ctx, "user.created", {"user": users.user_public(user)},
                      user_id=user.id)
        return user


def _redeem(core: Core, session: Session, ctx: Context, code: str, user: User) -> None:
    try:
        invitations = importlib.import_module("gatepass.invitations.service")
    except ImportError:
        raise InvitationInvalid(field="invitation_code") from None
    redeem_in = getattr(invitations, "redeem_in", None)
    if redeem_in is None:
        raise InvitationInvalid(field="invitation_code")
    redeem_in(core, session, ctx, code, user, method="register")
    session.flush()


def _taken(core: Core, session: Session, data: Registration, email: str, username: str | None,
           owners: list[User]) -> User:
    """The email belongs to someone: tell them by mail, and answer as if we had registered."""
    if username:
        users._check_username(session, username)  # a taken username is a 409 either way
    else:
        username = users.derive_username(session, email)
    core.hasher.hash(data.password)  # the same work as a real registration
    queue_mail(session, core, "registration_attempt", email,
               {"usernames": [owner.username for owner in owners],
                "forgot_url": core.link("/password/forgot")})
    now = utcnow()
    ghost = User(id=new_id(), username=username, username_key=users.casefold(username),
                 email=email, email_key=users.casefold(email), email_verified=False,
                 first_name=_clean(data.first_name), last_name=_clean(data.last_name),
                 phone=None, account_id=None, attributes={}, login_enabled=True,
                 lockout_enabled=True, failed_count=0, locked_until=None,
                 password_hash="x", password_changed_at=now, password_expired=False,
                 password_temporary=False, security_stamp=new_id(), created_at=now,
                 updated_at=now, last_sign_in_at=None)
    ghost.roles = []
    ghost.external_identities = []
    return ghost


def _clean(value: str | None) -> str | None:
    return value.strip() or None if value else None


# -- email verification -------------------------------------------------------------------------

def send_verification(core: Core, session: Session, user: User) -> None:
    """Mail a one-time link that proves the user reads mail at their address."""
    if not user.email:
        return
    hours = core.site["tokens.verify_lifetime_hours"]
    raw = tokens.issue(session, user, "verify_email", timedelta(hours=hours),
                       data={"email": user.email_key or users.casefold(user.email)})
    queue_mail(session, core, "email_verify", user.email,
               {"username": user.username, "first_name": user.first_name,
                "link": core.link(f"/email/verify?token={raw}"), "lifetime_hours": hours},
               sensitive=True)


def verify_email(core: Core, ctx: Context, raw: str) -> User:
    with core.db.write() as session:
        user, token = tokens.consume(session, "verify_email", raw)
        if (token.data or {}).get("email") != user.email_key:
            raise InvalidToken(field="token")  # the address changed since the link was sent
        user.email_verified = True
        user.updated_at = utcnow()
        session.flush()
        events.record(session, ctx.but(actor_type="user", actor_id=user.id),
                      "user.email_verified", {"user": users.user_public(user)}, user_id=user.id)
        return user


def resend_verification(core: Core, ctx: Context, login: str) -> None:
    """Mail a fresh link to the unverified user(s) `login` names; silent when nobody matches."""
    login = login.strip()
    if not login or len(login) > 320:
        return
    with core.db.write() as session:
        for user in users_for_login(session, login):
            if user.email and not user.email_verified:
                send_verification(core, session, user)


def users_for_login(session: Session, login: str) -> list[User]:
    """A username names exactly one user; otherwise an email names everyone who has it."""
    user = users.find_by_username(session, login)
    if user is not None:
        return [user]
    if "@" in login:
        return users.find_by_email(session, login)
    return []
