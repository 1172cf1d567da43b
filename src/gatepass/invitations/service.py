"""Invitation use cases: create (one, many, a group), redeem, revoke, resend, list.

A redemption takes its place under the cap with one conditional UPDATE inside the caller's
transaction, never by reading the count and writing it back: however many requests race for
the last place, the database lets exactly one of them have it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, insert, or_, select, update
from sqlalchemy.orm import Session

from gatepass.auth import tokens
from gatepass.context import Context
from gatepass.db import new_id, utcnow
from gatepass.errors import Conflict, GatepassError, InvalidInput, InvitationInvalid, NotFound
from gatepass.events import service as events
from gatepass.invitations.models import Invitation, InvitationRedemption
from gatepass.invitations.schemas import InvitationCreate, Invitee
from gatepass.mail.service import queue_mail
from gatepass.users.models import Account, Role, User
from gatepass.users.service import casefold, decode_cursor, encode_cursor, user_public

if TYPE_CHECKING:
    from gatepass.core import Core

STATUSES = ("active", "redeemed", "expired", "revoked")
METHODS = ("register", "existing_account", "external_login")
CHUNK = 500  # rows per IN (...) lookup and per progress step


# -- what callers see ---------------------------------------------------------------------------

def status_of(invitation: Invitation | InvitationRow, now: datetime | None = None) -> str:
    """`expired` is computed: an active invitation past its expiry."""
    if invitation.status == "active" and invitation.expires_at <= (now or utcnow()):
        return "expired"
    return invitation.status


def redeem_url(core: Core, code: str) -> str:
    return core.link(f"/register?invitation={code}")


def invitation_public(invitation: Invitation | InvitationRow, now: datetime | None = None) -> dict[str, Any]:
    """An invitation as the API shows it: never the code or its hash."""
    attributes = invitation.attributes or {}
    return {
        "id": invitation.id, "type": invitation.type, "status": status_of(invitation, now),
        "email": invitation.email, "first_name": attributes.get("first_name"),
        "last_name": attributes.get("last_name"), "user_id": invitation.user_id,
        "max_redemptions": invitation.max_redemptions,
        "redemption_count": invitation.redemption_count,
        "expires_at": invitation.expires_at.isoformat(), "inviter_id": invitation.inviter_id,
        "account_id": invitation.account_id, "roles": list(invitation.roles or []),
        "send_email": invitation.send_email, "on_redeem_email": invitation.on_redeem_email,
        "created_at": invitation.created_at.isoformat(),
        "revoked_at": invitation.revoked_at.isoformat() if invitation.revoked_at else None,
    }


@dataclass
class InvitationRow:
    """A new invitation as plain values: bulk creation inserts thousands without the ORM."""

    id: str
    type: str
    code_hash: str
    email: str | None
    user_id: str | None
    max_redemptions: int | None
    redemption_count: int
    expires_at: datetime
    inviter_id: str | None
    account_id: str | None
    roles: list[str]
    status: str
    send_email: bool
    on_redeem_email: bool
    attributes: dict[str, Any]
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass
class Issued:
    invitation: Invitation | InvitationRow
    code: str  # shown once, then only its hash exists

    def public(self, core: Core) -> dict[str, Any]:
        return {**invitation_public(self.invitation), "code": self.code,
                "redeem_url": redeem_url(core, self.code)}


@dataclass
class Failure:
    index: int  # 0-based position among the invitees (a CSV's data row number - 1)
    email: str | None
    error: str

    def public(self) -> dict[str, Any]:
        return {"index": self.index, "email": self.email, "error": self.error}


@dataclass
class Outcome:
    issued: list[Issued] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    mails: int = 0
    dry_run: bool = False


class _DryRun(Exception):
    """Raised inside the transaction to roll a dry run back after every check ran."""


# -- creating -----------------------------------------------------------------------------------

@dataclass
class _Target:
    index: int
    email: str | None
    user: User | None = None  # bound contact (single) or a user_ids entry
    first_name: str | None = None
    last_name: str | None = None
    account_id: str | None = None
    roles: list[str] = field(default_factory=list)


def create_invitations(core: Core, ctx: Context, data: InvitationCreate, *,
                       dry_run: bool = False,
                       progress: Callable[[int], None] | None = None) -> Outcome:
    """Create one invitation per invitee (`single`) or one shared code (`group`).

    Checks of the whole request (inviter, account, roles, expiry) raise; a problem with one
    invitee of several skips only that invitee and is reported in `failed`.
    """
    now = utcnow()
    if data.type == "single" and data.max_redemptions not in (None, 1):
        raise InvalidInput("A single invitation is used once; use a group invitation for more.",
                           field="max_redemptions")
    count = len(data.emails) + len(data.user_ids) + len(data.invitees)
    if data.type == "single" and count == 0:
        raise InvalidInput("A single invitation needs an invitee: give emails or user_ids.",
                           field="emails")
    expires_at = data.expires_at or now + timedelta(days=core.site["invitation.default_expiry_days"])
    if expires_at.tzinfo is None:
        raise InvalidInput("expires_at needs a time zone, e.g. 2030-01-31T12:00:00Z.",
                           field="expires_at")
    if expires_at <= now:
        raise InvalidInput("expires_at must be in the future.", field="expires_at")

    outcome = Outcome(dry_run=dry_run)
    try:
        with core.db.write() as session:
            inviter = _inviter(session, data.inviter_id)
            accounts = _Accounts(session)
            account_id = accounts.resolve(data.account_id, field="account_id")
            known_roles = _known_roles(session, [data.roles] + [i.roles or [] for i in data.invitees])
            _check_roles(data.roles, known_roles, field="roles")
            targets, failed = _targets(core, session, data, accounts, known_roles)
            outcome.failed = failed
            if count == 1 and failed:
                raise InvalidInput(failed[0].error, field="emails")
            common = dict(expires_at=expires_at, inviter_id=inviter.id if inviter else None,
                          send_email=data.send_email, on_redeem_email=data.on_redeem_email,
                          created_at=now, status="active", redemption_count=0)
            mail = _Mailer(core, session, inviter, expires_at, enabled=data.send_email)
            if data.type == "group":
                code = tokens.new_secret()
                invitation = Invitation(
                    id=new_id(), type="group", code_hash=tokens.digest(code), email=None,
                    user_id=None, max_redemptions=data.max_redemptions, account_id=account_id,
                    roles=list(dict.fromkeys(data.roles)), attributes={}, **common)
                session.add(invitation)
                session.flush()
                events.record(session, ctx, "invitation.created",
                              {"invitation": invitation_public(invitation, now)})
                outcome.issued.append(Issued(invitation, code))
                for target in targets:
                    if target.email:
                        outcome.mails += mail.send(target, code)
                if progress:
                    progress(count or 1)
            else:
                for start in range(0, len(targets), CHUNK):
                    chunk = targets[start:start + CHUNK]
                    batch: list[Issued] = []
                    for target in chunk:
                        code = tokens.new_secret()
                        attributes = {k: v for k, v in (("first_name", target.first_name),
                                                         ("last_name", target.last_name)) if v}
                        row = InvitationRow(
                            id=new_id(), type="single", code_hash=tokens.digest(code),
                            email=target.email, user_id=target.user.id if target.user else None,
                            max_redemptions=1, account_id=target.account_id or account_id,
                            roles=list(dict.fromkeys([*data.roles, *target.roles])),
                            attributes=attributes, **common)
                        batch.append(Issued(row, code))
                        if target.email:
                            outcome.mails += mail.send(target, code)
                    # One batched INSERT for the chunk, without the ORM's per-object work.
                    session.execute(insert(Invitation),
                                    [dataclasses.asdict(issued.invitation) for issued in batch])
                    events.record_many(session, ctx, "invitation.created", [
                        ({"invitation": invitation_public(issued.invitation, now)}, None)
                        for issued in batch])
                    outcome.issued.extend(batch)
                    if progress:
                        progress(len(chunk))
                if progress and outcome.failed:
                    progress(len(outcome.failed))
            if dry_run:
                raise _DryRun()
    except _DryRun:
        pass
    return outcome


def _inviter(session: Session, inviter_id: str | None) -> User | None:
    if inviter_id is None:
        return None
    inviter = session.get(User, inviter_id)
    if inviter is None:
        raise InvalidInput("There is no user with the inviter_id given.", field="inviter_id")
    return inviter


class _Accounts:
    """Accounts named by id or by name (a CSV is easier to write with names)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.cache: dict[str, str | None] = {}

    def resolve(self, value: str | None, *, field: str) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if value not in self.cache:
            found = self.session.scalar(select(Account.id).where(
                or_(Account.id == value, Account.name == value)))
            self.cache[value] = found
        if self.cache[value] is None:
            raise InvalidInput(f"There is no account '{value}'.", field=field)
        return self.cache[value]


def _known_roles(session: Session, lists: Iterable[list[str]]) -> set[str]:
    wanted = {name for names in lists for name in names}
    if not wanted:
        return set()
    found: set[str] = set()
    names = sorted(wanted)
    for start in range(0, len(names), CHUNK):
        found.update(session.scalars(select(Role.name).where(Role.name.in_(names[start:start + CHUNK]))))
    return found


def _check_roles(names: list[str], known: set[str], *, field: str) -> None:
    for name in names:
        if name not in known:
            raise InvalidInput(f"There is no role called '{name}'.", field=field)


def _is_contact(user: User) -> bool:
    """A pre-created contact: a user who cannot sign in yet (no password, no external login)."""
    return user.password_hash is None and not user.external_identities


def _targets(core: Core, session: Session, data: InvitationCreate, accounts: _Accounts,
             known_roles: set[str]) -> tuple[list[_Target], list[Failure]]:
    """Everyone the request invites, each checked; the ones that fail are set aside."""
    targets: list[_Target] = []
    failed: list[Failure] = []
    index = 0
    rows: list[tuple[int, Invitee | str]] = []
    for email in data.emails:
        rows.append((index, str(email)))
        index += 1
    for invitee in data.invitees:
        rows.append((index, invitee))
        index += 1

    # Contacts to bind, found with one query per chunk rather than one per invitee.
    contacts: dict[str, User] = {}
    if data.type == "single":
        keys = sorted({casefold(str(r.email if isinstance(r, Invitee) else r)) for _, r in rows})
        for start in range(0, len(keys), CHUNK):
            for user in session.scalars(select(User).where(
                    User.email_key.in_(keys[start:start + CHUNK]), User.password_hash.is_(None))
                    .order_by(User.created_at)):
                if _is_contact(user):
                    contacts.setdefault(user.email_key or "", user)

    seen: set[str] = set()
    for position, row in rows:
        invitee = row if isinstance(row, Invitee) else Invitee(email=row)
        email = str(invitee.email)
        key = casefold(email)
        try:
            if key in seen:
                raise InvalidInput(f"{email} is invited twice in this request.")
            seen.add(key)
            roles = list(invitee.roles or [])
            _check_roles(roles, known_roles, field="roles")
            targets.append(_Target(
                index=position, email=email, user=contacts.get(key),
                first_name=invitee.first_name, last_name=invitee.last_name,
                account_id=accounts.resolve(invitee.account_id, field="account_id"), roles=roles))
        except GatepassError as exc:
            failed.append(Failure(position, email, exc.message))

    ids = list(dict.fromkeys(data.user_ids))
    found: dict[str, User] = {}
    for start in range(0, len(ids), CHUNK):
        found.update({u.id: u for u in session.scalars(
            select(User).where(User.id.in_(ids[start:start + CHUNK])))})
    for user_id in data.user_ids:
        position, index = index, index + 1
        user = found.get(user_id)
        if user is None:
            failed.append(Failure(position, None, f"There is no user with the id '{user_id}'."))
            continue
        if data.send_email and not user.email:
            failed.append(Failure(position, None,
                                  "That user has no email address to send the invitation to."))
            continue
        key = user.email_key or ""
        if key and key in seen:
            failed.append(Failure(position, user.email, f"{user.email} is invited twice."))
            continue
        seen.add(key)
        targets.append(_Target(index=position, email=user.email, user=user,
                               first_name=user.first_name, last_name=user.last_name))
    return targets, failed


def _display_name(user: User | None) -> str | None:
    if user is None:
        return None
    name = " ".join(part for part in (user.first_name, user.last_name) if part)
    return name or user.username


class _Mailer:
    def __init__(self, core: Core, session: Session, inviter: User | None, expires_at: datetime,
                 *, enabled: bool) -> None:
        self.core, self.session, self.enabled = core, session, enabled
        self.inviter = _display_name(inviter)
        self.expires = expires_at.strftime("%d %B %Y")

    def send(self, target: _Target, code: str) -> int:
        if not self.enabled or not target.email:
            return 0
        queue_mail(self.session, self.core, "invitation", target.email,
                   {"inviter_name": self.inviter, "first_name": target.first_name,
                    "link": redeem_url(self.core, code), "code": code,
                    "expires": self.expires}, sensitive=True)
        return 1


# -- redeeming ----------------------------------------------------------------------------------

def _by_code(session: Session, code: str) -> Invitation | None:
    if not code or len(code) > 200:
        return None
    return session.scalar(select(Invitation).where(Invitation.code_hash == tokens.digest(code)))


def check_code(core: Core, code: str) -> Invitation:
    """A code that could be redeemed now (for showing a page); raises InvitationInvalid."""
    with core.db.read() as session:
        return check_code_in(session, code)


def check_code_in(session: Session, code: str) -> Invitation:
    """`check_code` inside the caller's transaction."""
    invitation = _by_code(session, code.strip())
    if invitation is None or status_of(invitation) != "active" or (
            invitation.max_redemptions is not None
            and invitation.redemption_count >= invitation.max_redemptions):
        raise InvitationInvalid(field="invitation_code")
    return invitation


def find_bound_user(session: Session, code: str) -> User | None:
    """The pre-created contact a single invitation completes, so registration fills in THAT
    record instead of creating a second user with the same email. None for any other code."""
    invitation = _by_code(session, (code or "").strip())
    if invitation is None or invitation.type != "single" or invitation.user_id is None \
            or status_of(invitation) != "active":
        return None
    user = session.get(User, invitation.user_id)
    return user if user is not None and _is_contact(user) else None


def complete_contact(core: Core, session: Session, contact: User, password: str, *,
                     username: str | None = None, first_name: str | None = None,
                     last_name: str | None = None) -> User:
    """Registration with a code bound to a pre-created contact fills in THAT record (its
    password, and a username or names the person chose) instead of creating a duplicate."""
    if username and casefold(username) != contact.username_key:
        from gatepass.users.service import _check_username

        contact.username = _check_username(session, username, except_id=contact.id)
        contact.username_key = casefold(contact.username)
    now = utcnow()
    contact.password_hash = core.hasher.hash(password)
    contact.password_changed_at = now
    contact.password_expired = False
    contact.password_temporary = False
    contact.security_stamp = new_id()
    contact.first_name = contact.first_name or first_name
    contact.last_name = contact.last_name or last_name
    contact.updated_at = now
    session.flush()
    return contact


def redeem_in(core: Core, session: Session, ctx: Context, code: str, user: User,
              method: str) -> Invitation:
    """Redeem `code` for `user` inside the caller's transaction.

    Takes a place with one conditional UPDATE (the cap holds under any concurrency); unknown,
    expired, revoked and used-up codes all raise the same InvitationInvalid. Applies the
    invitation's account and roles, records the redemption and `invitation.redeemed`, and
    queues the thank-you mail when the invitation asks for it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown redemption method {method!r}")
    code = (code or "").strip()
    if not code or len(code) > 200:
        raise InvitationInvalid(field="invitation_code")
    code_hash = tokens.digest(code)
    session.flush()  # the user row must exist before the redemption row points at it
    already = session.scalar(
        select(InvitationRedemption.id).join(Invitation,
                                             Invitation.id == InvitationRedemption.invitation_id)
        .where(Invitation.code_hash == code_hash, InvitationRedemption.user_id == user.id))
    if already is not None:
        raise InvitationInvalid(field="invitation_code")
    now = utcnow()
    taken = session.execute(
        update(Invitation)
        .where(Invitation.code_hash == code_hash, Invitation.status == "active",
               Invitation.expires_at > now,
               or_(Invitation.max_redemptions.is_(None),
                   Invitation.redemption_count < Invitation.max_redemptions))
        .values(redemption_count=Invitation.redemption_count + 1,
                status=case((and_(Invitation.max_redemptions.is_not(None),
                                  Invitation.redemption_count + 1 >= Invitation.max_redemptions),
                             "redeemed"), else_=Invitation.status))
        .execution_options(synchronize_session=False))
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise InvitationInvalid(field="invitation_code")
    invitation = session.scalar(select(Invitation).where(Invitation.code_hash == code_hash)
                                .execution_options(populate_existing=True))
    if invitation is None:  # deleted between the two statements: cannot happen in one txn
        raise InvitationInvalid(field="invitation_code")

    if invitation.account_id is not None:
        user.account_id = invitation.account_id
    if invitation.roles:
        have = {role.name for role in user.roles}
        wanted = [name for name in invitation.roles if name not in have]
        if wanted:
            user.roles = [*user.roles, *session.scalars(select(Role).where(Role.name.in_(wanted)))]
    if invitation.email and not user.email:
        user.email, user.email_key = invitation.email, casefold(invitation.email)
    user.updated_at = now
    session.add(InvitationRedemption(id=new_id(), invitation_id=invitation.id, user_id=user.id,
                                     method=method, redeemed_at=now))
    session.flush()
    events.record(session, ctx, "invitation.redeemed",
                  {"invitation": invitation_public(invitation, now), "user": user_public(user),
                   "method": method}, user_id=user.id)
    if invitation.on_redeem_email and user.email:
        inviter = session.get(User, invitation.inviter_id) if invitation.inviter_id else None
        queue_mail(session, core, "invitation_thanks", user.email,
                   {"first_name": user.first_name, "username": user.username,
                    "inviter_name": _display_name(inviter)})
    return invitation


def redeem_existing(core: Core, ctx: Context, user_id: str, code: str) -> Invitation:
    """"I have an existing account": the signed-in user redeems a code."""
    with core.db.write() as session:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound("There is no user with that id.")
        return redeem_in(core, session, ctx.but(triggered_by="invitation"), code, user,
                         "existing_account")


# -- managing -----------------------------------------------------------------------------------

def get_invitation(session: Session, invitation_id: str) -> Invitation:
    invitation = session.get(Invitation, invitation_id)
    if invitation is None:
        raise NotFound("There is no invitation with that id.")
    return invitation


def detail(core: Core, invitation_id: str) -> dict[str, Any]:
    with core.db.read() as session:
        invitation = get_invitation(session, invitation_id)
        rows = session.scalars(select(InvitationRedemption)
                               .where(InvitationRedemption.invitation_id == invitation.id)
                               .order_by(InvitationRedemption.redeemed_at))
        return {**invitation_public(invitation), "redemptions": [
            {"id": r.id, "user_id": r.user_id, "method": r.method,
             "redeemed_at": r.redeemed_at.isoformat()} for r in rows]}


def revoke(core: Core, ctx: Context, invitation_id: str) -> Invitation:
    with core.db.write() as session:
        invitation = get_invitation(session, invitation_id)
        if invitation.status == "revoked":
            return invitation
        if invitation.status == "redeemed":
            raise Conflict("This invitation is already used up; there is nothing to revoke.")
        # Conditional: a redemption racing with the revocation either lands first or not at all.
        now = utcnow()
        session.execute(update(Invitation).where(Invitation.id == invitation.id,
                                                 Invitation.status == "active")
                        .values(status="revoked", revoked_at=now)
                        .execution_options(synchronize_session=False))
        session.refresh(invitation)
        if invitation.status != "revoked":
            raise Conflict("This invitation was used up just now; there is nothing to revoke.")
        events.record(session, ctx, "invitation.revoked",
                      {"invitation": invitation_public(invitation, now)})
        return invitation


def resend(core: Core, ctx: Context, invitation_id: str) -> Issued:
    """A new code for a single invitation (the old one stops working), mailed to the invitee.
    An expired invitation gets a fresh expiry of `invitation.default_expiry_days`."""
    with core.db.write() as session:
        invitation = get_invitation(session, invitation_id)
        if invitation.type != "single":
            raise InvalidInput("Only a single invitation can be resent; a group shares its code.")
        if invitation.status != "active":
            raise Conflict(f"This invitation is {invitation.status}; it cannot be resent.")
        if not invitation.email:
            raise InvalidInput("This invitation has no email address to send to.")
        now = utcnow()
        code = tokens.new_secret()
        invitation.code_hash = tokens.digest(code)
        if invitation.expires_at <= now:
            invitation.expires_at = now + timedelta(days=core.site["invitation.default_expiry_days"])
        invitation.send_email = True
        inviter = session.get(User, invitation.inviter_id) if invitation.inviter_id else None
        attributes = invitation.attributes or {}
        _Mailer(core, session, inviter, invitation.expires_at, enabled=True).send(
            _Target(index=0, email=invitation.email, first_name=attributes.get("first_name")),
            code)
        session.flush()
        return Issued(invitation, code)


def list_invitations(core: Core, *, status: str | None = None, limit: int = 100,
                     cursor: str | None = None) -> tuple[list[Invitation], str | None]:
    if status is not None and status not in STATUSES:
        raise InvalidInput("status must be one of active, redeemed, expired, revoked.",
                           field="status")
    if not 1 <= limit <= 500:
        raise InvalidInput("limit must be between 1 and 500.", field="limit")
    now = utcnow()
    query = select(Invitation).order_by(Invitation.created_at, Invitation.id).limit(limit + 1)
    if status == "active":
        query = query.where(Invitation.status == "active", Invitation.expires_at > now)
    elif status == "expired":
        query = query.where(Invitation.status == "active", Invitation.expires_at <= now)
    elif status is not None:
        query = query.where(Invitation.status == status)
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(or_(Invitation.created_at > created_at,
                                and_(Invitation.created_at == created_at,
                                     Invitation.id > last_id)))
    with core.db.read() as session:
        rows = list(session.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more and rows:
        next_cursor = encode_cursor(rows[-1])
    return rows, next_cursor


