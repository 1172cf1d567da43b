"""User, account and role use cases. Each opens one transaction: the change, its event and
its mail are written together or not at all."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gatepass.auth import tokens
from gatepass.auth.models import OneTimeToken, UserSession
from gatepass.context import Context
from gatepass.db import lock_key, new_id, utcnow
from gatepass.errors import Conflict, InvalidInput, NotFound
from gatepass.events import service as events
from gatepass.mail.service import queue_mail
from gatepass.passwords import policy
from gatepass.users.models import Account, Role, User
from gatepass.users.schemas import PasswordReset, ProfileUpdate, UserCreate, UserUpdate
from gatepass.webhooks import service as webhooks  # also subscribes the webhook fan-out

if TYPE_CHECKING:
    from gatepass.core import Core

USERNAME_RE = re.compile(r"^[\w.@+-]{1,150}$")
PROFILE_FIELDS = ("first_name", "last_name", "phone")


def user_public(user: User) -> dict[str, Any]:
    """The CONTRACT's user object: never a hash, token or secret."""
    return public_view(user, [role.name for role in user.roles],
                       [(x.provider, x.subject) for x in user.external_identities])


def public_view(user: Any, roles: list[str], identities: list[tuple[str, str]]) -> dict[str, Any]:
    """`user_public` for anything carrying the user columns as attributes: an ORM `User` or
    a row from a query that selected them (the session lookup behind every signed-in call)."""
    return {
        "id": user.id,
        "username": user.username,
        "email": user.email,
        "email_verified": user.email_verified,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "phone": user.phone,
        "account_id": user.account_id,
        "roles": sorted(roles),
        "attributes": user.attributes or {},
        "login_enabled": user.login_enabled,
        "lockout_enabled": user.lockout_enabled,
        "locked_until": _iso(user.locked_until) if _is_locked(user) else None,
        "password_set": user.password_hash is not None,
        "password_expired": user.password_expired,
        "external_identities": [{"provider": provider, "subject": subject}
                                for provider, subject in identities],
        "created_at": _iso(user.created_at),
        "updated_at": _iso(user.updated_at),
        "last_sign_in_at": _iso(user.last_sign_in_at),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _is_locked(user: Any) -> bool:
    return user.locked_until is not None and user.locked_until > utcnow()


def casefold(value: str) -> str:
    return value.strip().casefold()


# -- lookups ------------------------------------------------------------------------------------

def get_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("There is no user with that id.")
    return user


def find_by_username(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username_key == casefold(username)))


def find_by_email(session: Session, email: str) -> list[User]:
    return list(session.scalars(select(User).where(User.email_key == casefold(email))
                                .order_by(User.created_at)))


def _resolve_roles(session: Session, names: list[str]) -> list[Role]:
    wanted = list(dict.fromkeys(names))
    found = {role.name: role for role in session.scalars(select(Role).where(Role.name.in_(wanted)))}
    missing = [name for name in wanted if name not in found]
    if missing:
        raise InvalidInput(f"There is no role called '{missing[0]}'.", field="roles")
    return [found[name] for name in wanted]


def _check_account(session: Session, account_id: str | None) -> None:
    if account_id is not None and session.get(Account, account_id) is None:
        raise InvalidInput("There is no account with that id.", field="account_id")


def _check_username(session: Session, username: str, *, except_id: str | None = None) -> str:
    username = username.strip()
    if not USERNAME_RE.match(username):
        raise InvalidInput("A username may hold letters, digits and . _ @ + - only.",
                           field="username")
    existing = find_by_username(session, username)
    if existing is not None and existing.id != except_id:
        raise Conflict("That username is taken.", field="username")
    return username


def _check_email(core: Core, session: Session, email: str, *, except_id: str | None = None) -> None:
    if not core.site["users.require_unique_email"]:
        return
    lock_key(session, "email:" + casefold(email))
    if any(user.id != except_id for user in find_by_email(session, email)):
        raise Conflict("A user with that email already exists.", field="email")


def derive_username(session: Session, email: str | None) -> str:
    """`ada@example.com` → `ada`, or `ada2`, `ada3`… when taken (case-insensitively)."""
    local = (email or "").split("@", 1)[0]
    base = re.sub(r"[^\w.+-]", "", local).strip(".") or "user"
    base = base[:140]
    lock_key(session, "username:" + casefold(base))
    taken = set(session.scalars(select(User.username_key).where(
        or_(User.username_key == casefold(base), User.username_key.like(casefold(base) + "%")))))
    if casefold(base) not in taken:
        return base
    number = 2
    while casefold(f"{base}{number}") in taken:
        number += 1
    return f"{base}{number}"


# -- creating users -----------------------------------------------------------------------------

@dataclass
class Created:
    user: User
    password: str | None  # only when generated: shown once


def create_user(core: Core, ctx: Context, data: UserCreate) -> Created:
    with core.db.write() as session:
        created = create_user_in(core, session, ctx, data)
        public = user_public(created.user)
        events.record(session, ctx, "user.created", {"user": public}, user_id=created.user.id)
        return created


def create_user_in(core: Core, session: Session, ctx: Context, data: UserCreate, *,
                   chosen_by_user: bool = False) -> Created:
    """Create a user inside the caller's transaction (registration and invitations reuse it).

    `chosen_by_user`: the password was typed by the user themselves (registration), so it is
    neither temporary nor expired.
    """
    if data.password is not None and data.generate_password:
        raise InvalidInput("Give a password or ask for a generated one, not both.",
                           field="generate_password")
    if data.send_password and not data.email:
        raise InvalidInput("An email address is needed to send the password.", field="email")
    if not data.email and not data.username:
        raise InvalidInput("Give an email or a username.", field="email")
    _check_account(session, data.account_id)
    roles = _resolve_roles(session, data.roles)
    if data.email:
        _check_email(core, session, data.email)
    username = (_check_username(session, data.username) if data.username
                else derive_username(session, data.email))

    generated = policy.generate(core.site["password.generated_length"],
                                min_length=core.site["password.min_length"]) \
        if data.generate_password else None
    password = generated or data.password
    if data.password is not None:
        policy.check(data.password, min_length=core.site["password.min_length"],
                     check_common=core.site["password.check_common"],
                     user_inputs=(username, data.email))
    admin_chosen = password is not None and not chosen_by_user
    expired = data.password_expired if data.password_expired is not None else admin_chosen
    attributes = dict(data.attributes)
    if ctx.triggered_by != "import":  # the blocking user.pre_create hook (docs: events)
        attributes.update(webhooks.pre_create_check(core, {
            "username": username, "email": data.email, "first_name": data.first_name,
            "last_name": data.last_name, "phone": data.phone, "account_id": data.account_id,
            "roles": list(data.roles), "attributes": attributes}, ctx))

    now = utcnow()
    user = User(
        id=new_id(), username=username, username_key=casefold(username), email=data.email,
        email_key=casefold(data.email) if data.email else None,
        email_verified=bool(data.email_verified) if data.email_verified is not None else False,
        first_name=data.first_name, last_name=data.last_name, phone=data.phone,
        account_id=data.account_id, attributes=attributes,
        login_enabled=data.login_enabled, lockout_enabled=data.lockout_enabled,
        password_hash=core.hasher.hash(password) if password else None,
        password_changed_at=now if password else None, password_expired=bool(expired),
        password_temporary=admin_chosen, security_stamp=new_id(), created_at=now, updated_at=now,
    )
    user.roles = roles
    user.external_identities = []
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict("That username is taken.", field="username") from None

    if data.send_password:
        send_credentials(core, session, user, password)
    return Created(user=user, password=generated)


def send_credentials(core: Core, session: Session, user: User, password: str | None) -> None:
    """Mail the password, or with no password a one-time set-password link (the safer way)."""
    assert_email(user)
    common = {"username": user.username, "first_name": user.first_name}
    if password is not None:
        queue_mail(session, core, "account_password", user.email or "",
                   {**common, "password": password, "password_expired": user.password_expired,
                    "lifetime_hours": core.site["password.temporary_lifetime_hours"]},
                   sensitive=True)
        return
    hours = core.site["tokens.set_password_lifetime_hours"]
    raw = tokens.issue(session, user, "set_password", timedelta(hours=hours))
    queue_mail(session, core, "account_set_password", user.email or "",
               {**common, "link": core.link(f"/password/set?token={raw}"),
                "lifetime_hours": hours}, sensitive=True)


def assert_email(user: User) -> None:
    if not user.email:
        raise InvalidInput("The user has no email address to send to.", field="send_password")


# -- changing users -----------------------------------------------------------------------------

def update_user(core: Core, ctx: Context, user_id: str, data: UserUpdate) -> User:
    changes = data.model_dump(exclude_unset=True)
    if not changes:
        raise InvalidInput("Give at least one field to change.")
    with core.db.write() as session:
        user = get_user(session, user_id)
        if "username" in changes:
            if changes["username"] is None:
                raise InvalidInput("A user must have a username.", field="username")
            user.username = _check_username(session, changes.pop("username"), except_id=user.id)
            user.username_key = casefold(user.username)
        if "email" in changes:
            email = changes.pop("email")
            if email is not None:
                _check_email(core, session, email, except_id=user.id)
            if casefold(email or "") != (user.email_key or ""):
                user.email_verified = False
            user.email, user.email_key = email, casefold(email) if email else None
        if "account_id" in changes:
            _check_account(session, changes["account_id"])
        if "roles" in changes:
            user.roles = _resolve_roles(session, changes.pop("roles") or [])
        if changes.get("attributes") is None:
            changes.pop("attributes", None)
        for flag in ("login_enabled", "lockout_enabled", "email_verified", "password_expired"):
            if flag in changes and changes[flag] is None:
                raise InvalidInput(f"'{flag}' must be true or false.", field=flag)
        if changes.get("login_enabled") is False:
            session.execute(delete(UserSession).where(UserSession.user_id == user.id))
        for key, value in changes.items():
            setattr(user, key, value)
        user.updated_at = utcnow()
        session.flush()
        events.record(session, ctx, "user.updated", {"user": user_public(user)}, user_id=user.id)
        return user


def update_profile(core: Core, ctx: Context, user_id: str, data: ProfileUpdate) -> User:
    changes = data.model_dump(exclude_unset=True)
    if not changes:
        raise InvalidInput("Give at least one field to change.")
    with core.db.write() as session:
        user = get_user(session, user_id)
        for key, value in changes.items():
            setattr(user, key, value.strip() if isinstance(value, str) else value)
        user.updated_at = utcnow()
        session.flush()
        events.record(session, ctx, "user.updated", {"user": user_public(user)}, user_id=user.id)
        return user


def delete_user(core: Core, ctx: Context, user_id: str) -> None:
    with core.db.write() as session:
        user = get_user(session, user_id)
        public = user_public(user)
        session.delete(user)
        session.flush()
        events.record(session, ctx, "user.deleted", {"user": public}, user_id=user_id)


def lock_user(core: Core, ctx: Context, user_id: str, *, seconds: int | None = None) -> User:
    with core.db.write() as session:
        user = get_user(session, user_id)
        duration = seconds or core.site["lockout.duration_seconds"]
        user.locked_until = utcnow() + timedelta(seconds=duration)
        user.updated_at = utcnow()
        session.execute(delete(UserSession).where(UserSession.user_id == user.id))
        session.flush()
        events.record(session, ctx, "user.locked",
                      {"user": user_public(user), "reason": "admin"}, user_id=user.id)
        return user


def unlock_user(core: Core, ctx: Context, user_id: str) -> User:
    with core.db.write() as session:
        user = get_user(session, user_id)
        user.locked_until = None
        user.failed_count = 0
        user.updated_at = utcnow()
        session.flush()
        events.record(session, ctx, "user.unlocked", {"user": user_public(user)}, user_id=user.id)
        return user


def revoke_sessions(core: Core, ctx: Context, user_id: str) -> int:
    with core.db.write() as session:
        get_user(session, user_id)
        result = session.execute(delete(UserSession).where(UserSession.user_id == user_id))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def rotate_credentials(session: Session, user: User, *, keep_session_id: str | None = None) -> None:
    """Credentials changed: a new security stamp kills every older session and one-time token."""
    user.security_stamp = new_id()
    sessions = delete(UserSession).where(UserSession.user_id == user.id)
    if keep_session_id is not None:
        sessions = sessions.where(UserSession.id != keep_session_id)
        session.execute(update(UserSession).where(UserSession.id == keep_session_id)
                        .values(security_stamp=user.security_stamp))
    session.execute(sessions)
    session.execute(update(OneTimeToken).where(OneTimeToken.user_id == user.id,
                                               OneTimeToken.used_at.is_(None))
                    .values(used_at=utcnow()))


def admin_reset_password(core: Core, ctx: Context, user_id: str, data: PasswordReset) -> Created:
    if data.password is not None and data.generate_password:
        raise InvalidInput("Give a password or ask for a generated one, not both.",
                           field="generate_password")
    with core.db.write() as session:
        user = get_user(session, user_id)
        if data.send_password:
            assert_email(user)
        generated = policy.generate(core.site["password.generated_length"],
                                    min_length=core.site["password.min_length"]) \
            if data.generate_password else None
        if data.password is not None:
            policy.check(data.password, min_length=core.site["password.min_length"],
                         check_common=core.site["password.check_common"],
                         user_inputs=(user.username, user.email))
        password = generated or data.password
        rotate_credentials(session, user)
        now = utcnow()
        if password is not None:
            user.password_hash = core.hasher.hash(password)
            user.password_changed_at = now
            user.password_temporary = True
            user.password_expired = data.password_expired if data.password_expired is not None \
                else True
        else:
            # No password: the old one stops working; the user sets one through a link.
            user.password_hash = None
            user.password_changed_at = None
            user.password_temporary = False
            user.password_expired = bool(data.password_expired)
        user.failed_count = 0
        user.locked_until = None
        user.updated_at = now
        session.flush()
        if data.send_password:
            send_credentials(core, session, user, password)
        events.record(session, ctx, "user.password_reset",
                      {"user": user_public(user), "method": "admin"}, user_id=user.id)
        return Created(user=user, password=generated)


# -- listing ------------------------------------------------------------------------------------

def list_users(core: Core, *, q: str | None = None, account_id: str | None = None,
               role: str | None = None, limit: int = 50,
               cursor: str | None = None) -> tuple[list[User], str | None]:
    if not 1 <= limit <= 500:
        raise InvalidInput("limit must be between 1 and 500.", field="limit")
    query = select(User).order_by(User.created_at, User.id).limit(limit + 1)
    if q:
        pattern = "%" + casefold(q).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") \
            + "%"
        query = query.where(or_(User.username_key.like(pattern, escape="\\"),
                                User.email_key.like(pattern, escape="\\"),
                                func.lower(User.first_name).like(pattern, escape="\\"),
                                func.lower(User.last_name).like(pattern, escape="\\")))
    if account_id:
        query = query.where(User.account_id == account_id)
    if role:
        query = query.where(User.roles.any(Role.name == role))
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(or_(User.created_at > created_at,
                                (User.created_at == created_at) & (User.id > last_id)))
    with core.db.read() as session:
        rows = list(session.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]) if more and rows else None
    return rows, next_cursor


def encode_cursor(row: Any) -> str:
    """A keyset cursor for any row ordered by (created_at, id)."""
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, last_id = json.loads(raw)
        return datetime.fromisoformat(created_at), str(last_id)
    except (ValueError, TypeError):
        raise InvalidInput("The cursor is not valid.", field="cursor") from None


# -- accounts and roles -------------------------------------------------------------------------

def create_account(core: Core, name: str) -> Account:
    name = name.strip()
    if not name:
        raise InvalidInput("An account needs a name.", field="name")
    with core.db.write() as session:
        if session.scalar(select(Account).where(Account.name == name)) is not None:
            raise Conflict("An account with that name exists.", field="name")
        account = Account(id=new_id(), name=name, created_at=utcnow())
        session.add(account)
        return account


def list_accounts(core: Core) -> list[Account]:
    with core.db.read() as session:
        return list(session.scalars(select(Account).order_by(Account.name)))


def create_role(core: Core, name: str, description: str | None = None) -> Role:
    name = name.strip()
    if not re.match(r"^[\w .:-]{1,100}$", name):
        raise InvalidInput("A role name may hold letters, digits, spaces and . _ : - only.",
                           field="name")
    with core.db.write() as session:
        if session.scalar(select(Role).where(Role.name == name)) is not None:
            raise Conflict("A role with that name exists.", field="name")
        role = Role(id=new_id(), name=name, description=description, created_at=utcnow())
        session.add(role)
        return role


def list_roles(core: Core) -> list[Role]:
    with core.db.read() as session:
        return list(session.scalars(select(Role).order_by(Role.name)))
