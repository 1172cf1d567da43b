"""Sign-in, sessions, lockout, password change and admin API keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from gatepass.auth import tokens
from gatepass.auth.models import ApiKey, LoginFailure, UserSession
from gatepass.context import Context
from gatepass.db import new_id, utcnow
from gatepass.errors import (EmailNotVerified, InvalidCredentials, InvalidInput, Locked,
                             LoginDisabled)
from gatepass.events import service as events
from gatepass.mail.service import queue_mail
from gatepass.passwords import policy
from gatepass.users.models import User
from gatepass.users.service import casefold, find_by_email, find_by_username, rotate_credentials, \
    user_public

if TYPE_CHECKING:
    from gatepass.core import Core

SCOPES = ("admin", "users", "invitations", "webhooks", "settings", "read")
MAX_LOGIN_LENGTH = 320
MAX_PASSWORD_INPUT = policy.MAX_LENGTH


@dataclass
class SignedIn:
    user: User
    token: str
    session_id: str
    password_change_required: bool


def password_change_required(core: Core, user: User) -> bool:
    """Expired by an admin, by the generator, or by age (password.max_age_days)."""
    if user.password_expired:
        return True
    max_age = core.site["password.max_age_days"]
    return bool(max_age and user.password_changed_at is not None
                and user.password_changed_at < utcnow() - timedelta(days=max_age))


# -- lockout ------------------------------------------------------------------------------------
#
# An attempt is *reserved* with one conditional UPDATE before the password is checked, so
# however many requests race, at most `max_failed_attempts` of them ever get to verify a
# password before the lock: the reservation that reaches the maximum sets the lock at once,
# and a correct password lifts it again.

def _reserve_attempt(session: Session, table: type[User] | type[LoginFailure], where: object,
                     maximum: int, duration: timedelta) -> bool:
    now = utcnow()
    lock_over = table.locked_until.is_not(None) & (table.locked_until <= now)
    new_count = case((lock_over, 1), else_=table.failed_count + 1)
    result = session.execute(
        update(table)
        .where(where)  # type: ignore[arg-type]
        .where(((table.locked_until.is_(None)) & (table.failed_count < maximum)) | lock_over)
        .values(failed_count=new_count,
                locked_until=case((new_count >= maximum, now + duration), else_=None))
        .execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _locked_until(session: Session, table: type[User] | type[LoginFailure],
                  where: object) -> datetime:
    value = session.scalar(select(table.locked_until).where(where))  # type: ignore[arg-type]
    return value or utcnow()


def _phantom_attempt(core: Core, login: str) -> None:
    """Count failures for a login that matches nobody exactly as for a real user."""
    key = tokens.keyed_digest(core.secret_key, "login:" + casefold(login))
    maximum = core.site["lockout.max_failed_attempts"]
    duration = timedelta(seconds=core.site["lockout.duration_seconds"])
    with core.db.write() as session:
        # INSERT … ON CONFLICT DO NOTHING: parallel first attempts for one login never collide.
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(LoginFailure)
                        .values(login_hash=key, failed_count=0, updated_at=utcnow())
                        .on_conflict_do_nothing(index_elements=["login_hash"]))
        where = LoginFailure.login_hash == key
        if not _reserve_attempt(session, LoginFailure, where, maximum, duration):
            locked_until = _locked_until(session, LoginFailure, where)
            raise Locked(locked_until)
    core.hasher.verify(None, "x" * 16)
    raise InvalidCredentials()


# -- sign-in ------------------------------------------------------------------------------------

def find_login(core: Core, session: Session, login: str) -> User | None:
    user = find_by_username(session, login)
    if user is None and "@" in login and core.site["login.by_email"]:
        matches = find_by_email(session, login)
        if len(matches) == 1:  # a shared email is no login: it names no one user
            user = matches[0]
    return user


def signin(core: Core, ctx: Context, login: str, password: str) -> SignedIn:
    if not login or len(login) > MAX_LOGIN_LENGTH or not password \
            or len(password) > MAX_PASSWORD_INPUT:
        core.metrics.signins.labels("invalid_credentials").inc()
        raise InvalidCredentials()
    maximum = core.site["lockout.max_failed_attempts"]
    duration = timedelta(seconds=core.site["lockout.duration_seconds"])

    with core.db.write() as session:
        user = find_login(core, session, login)
        if user is None:
            user_id = None
        else:
            user_id = user.id
            if not user.lockout_enabled and user.locked_until is not None \
                    and user.locked_until > utcnow():  # an admin's lock holds regardless
                core.metrics.signins.labels("locked").inc()
                raise Locked(user.locked_until)
            if user.lockout_enabled and not _reserve_attempt(
                    session, User, User.id == user.id, maximum, duration):
                locked_until = _locked_until(session, User, User.id == user.id)
                core.metrics.signins.labels("locked").inc()
                raise Locked(locked_until)
            stored_hash = user.password_hash
    if user_id is None:
        try:
            _phantom_attempt(core, login)
        except (Locked, InvalidCredentials) as exc:
            core.metrics.signins.labels(exc.code).inc()
            raise

    verification = core.hasher.verify(stored_hash, password)
    # Re-hash outside the transaction: no write lock is held while argon2 runs.
    new_hash = core.hasher.hash(password) if verification.ok and verification.needs_rehash \
        else None

    # A refusal is raised only after the transaction commits, so the failure count, its
    # events and a reset count are kept whatever the answer.
    refusal: InvalidCredentials | LoginDisabled | EmailNotVerified | None = None
    with core.db.write() as session:
        user = session.get(User, user_id)
        if user is None:  # deleted meanwhile
            raise InvalidCredentials()
        temporary_dead = user.password_temporary and user.password_changed_at is not None and \
            user.password_changed_at < utcnow() - timedelta(
                hours=core.site["password.temporary_lifetime_hours"])
        if not verification.ok or temporary_dead or user.password_hash != stored_hash:
            _record_failure(core, session, ctx, user, maximum)
            refusal = InvalidCredentials()
        else:
            # The password is right: from here on, answers may say who this is.
            user.failed_count = 0
            user.locked_until = None
            if not user.login_enabled:
                refusal = LoginDisabled()
            elif core.site["registration.require_email_verification"] and \
                    not user.email_verified:
                refusal = EmailNotVerified()
            else:
                signed_in = _complete_signin(core, session, ctx, user, new_hash)
    if refusal is not None:
        core.metrics.signins.labels(refusal.code).inc()
        raise refusal
    return signed_in


def _complete_signin(core: Core, session: Session, ctx: Context, user: User,
                     new_hash: str | None) -> SignedIn:
    if new_hash is not None:
        user.password_hash = new_hash
    user.last_sign_in_at = utcnow()
    user.password_temporary = False  # used: it no longer dies of old age
    raw, user_session = _open_session(core, session, ctx, user)
    must_change = password_change_required(core, user)
    session.flush()
    events.record(session, ctx, "user.signed_in",
                  {"user": user_public(user), "method": "password",
                   "password_change_required": must_change}, user_id=user.id)
    core.metrics.signins.labels("password_change_required" if must_change else "ok").inc()
    return SignedIn(user=user, token=raw, session_id=user_session.id,
                    password_change_required=must_change)


def _record_failure(core: Core, session: Session, ctx: Context, user: User, maximum: int) -> None:
    # The attempt was counted when it was reserved; a lock set by it is now for real.
    session.refresh(user)
    events.record(session, ctx, "user.sign_in_failed",
                  {"user": user_public(user), "failed_count": user.failed_count},
                  user_id=user.id)
    if user.lockout_enabled and user.failed_count >= maximum and user.locked_until is not None:
        events.record(session, ctx, "user.locked",
                      {"user": user_public(user), "reason": "failed_sign_ins"}, user_id=user.id)


def _open_session(core: Core, session: Session, ctx: Context,
                  user: User) -> tuple[str, UserSession]:
    raw = tokens.new_secret()
    now = utcnow()
    row = UserSession(id=new_id(), token_hash=tokens.digest(raw), user_id=user.id,
                      security_stamp=user.security_stamp, created_at=now,
                      expires_at=now + timedelta(hours=core.site["session.lifetime_hours"]),
                      ip_address=ctx.ip_address, user_agent=(ctx.user_agent or "")[:500] or None)
    session.add(row)
    return raw, row


def open_session(core: Core, session: Session, ctx: Context, user: User) -> tuple[str, str]:
    """For sign-in paths other than a password (external login): returns (token, session id)."""
    raw, row = _open_session(core, session, ctx, user)
    return raw, row.id


@dataclass
class Authenticated:
    user: User
    session_id: str
    password_change_required: bool


def authenticate(core: Core, raw: str | None) -> Authenticated | None:
    """The user behind a session token, if the session is alive and its stamp is current."""
    if not raw or len(raw) > 200:
        return None
    now = utcnow()
    with core.db.read() as session:
        row = session.execute(
            select(UserSession, User).join(User, User.id == UserSession.user_id)
            .where(UserSession.token_hash == tokens.digest(raw))).first()
        if row is None:
            return None
        user_session, user = row
        if user_session.expires_at <= now or user_session.security_stamp != user.security_stamp \
                or not user.login_enabled:
            return None
        return Authenticated(user=user, session_id=user_session.id,
                             password_change_required=password_change_required(core, user))


def signout(core: Core, raw: str | None) -> None:
    if not raw:
        return
    with core.db.write() as session:
        session.execute(delete(UserSession).where(UserSession.token_hash == tokens.digest(raw)))


# -- passwords ----------------------------------------------------------------------------------

def change_password(core: Core, ctx: Context, user_id: str, session_id: str | None,
                    current: str, new: str) -> User:
    """Change one's own password: other sessions die, this one lives on with the new stamp."""
    with core.db.read() as session:
        user = session.get(User, user_id)
        if user is None:
            raise InvalidCredentials()
        stored = user.password_hash
        username, email = user.username, user.email
    if not current or len(current) > MAX_PASSWORD_INPUT or \
            not core.hasher.verify(stored, current).ok:
        raise InvalidCredentials("The current password is incorrect.", field="current_password")
    if new == current:
        raise InvalidInput("Choose a password different from the current one.",
                           field="new_password")
    check_new_password(core, new, username, email)
    new_hash = core.hasher.hash(new)
    with core.db.write() as session:
        user = session.get(User, user_id)
        if user is None or user.password_hash != stored:
            raise InvalidCredentials("The current password is incorrect.",
                                     field="current_password")
        set_password(core, session, ctx, user, new_hash, keep_session_id=session_id,
                     event="user.password_changed", how="changed by you")
        return user


def check_new_password(core: Core, password: str, username: str | None,
                       email: str | None) -> None:
    try:
        policy.check(password, min_length=core.site["password.min_length"],
                     check_common=core.site["password.check_common"],
                     user_inputs=(username, email))
    except InvalidInput as exc:
        exc.field = "new_password"
        raise


def set_password(core: Core, session: Session, ctx: Context, user: User, new_hash: str, *,
                 keep_session_id: str | None, event: str, how: str) -> None:
    """Store a password the user chose; used by change, reset and set-password links."""
    rotate_credentials(session, user, keep_session_id=keep_session_id)
    now = utcnow()
    user.password_hash = new_hash
    user.password_changed_at = now
    user.password_expired = False
    user.password_temporary = False
    user.failed_count = 0
    user.locked_until = None
    user.updated_at = now
    session.flush()
    if user.email:
        queue_mail(session, core, "password_changed", user.email,
                   {"username": user.username, "how": how,
                    "forgot_url": core.link("/password/forgot")})
    events.record(session, ctx, event, {"user": user_public(user)}, user_id=user.id)


# -- admin API keys -----------------------------------------------------------------------------

def create_api_key(core: Core, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    name = name.strip()
    if not name:
        raise InvalidInput("An API key needs a name.", field="name")
    scopes = list(dict.fromkeys(scopes or ["admin"]))
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown:
        raise InvalidInput(f"There is no scope called '{unknown[0]}'; use one of "
                           f"{', '.join(SCOPES)}.", field="scope")
    raw = "gp_" + tokens.new_secret()
    with core.db.write() as session:
        key = ApiKey(id=new_id(), name=name, prefix=raw[:10], token_hash=tokens.digest(raw),
                     scopes=scopes, created_at=utcnow())
        session.add(key)
    return key, raw


def count_api_keys(core: Core) -> int:
    with core.db.read() as session:
        return len(list(session.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)))))


def authenticate_api_key(core: Core, raw: str | None) -> ApiKey | None:
    if not raw or not raw.startswith("gp_") or len(raw) > 200:
        return None
    with core.db.read() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.token_hash == tokens.digest(raw)))
    if key is None or key.revoked_at is not None:
        return None
    return key
