"""One import line (a JSON object, or a CSV row) → a validated `Record`, or a `LineError`.

Everything a line can get wrong is found here, in Python, before any row reaches the
database: the batch insert then only meets conflicts with rows it could not see (other
lines of the same batch are checked by the service, the database by one query per batch).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

from gatepass.users.service import USERNAME_RE, casefold

HASH_FORMATS = ("argon2", "bcrypt", "pbkdf2_sha256", "aspnet_identity")
ASPNET_PREFIX = "aspnet:"  # how an ASP.NET Identity hash is stored: its base64 names nothing
ROLE_RE = re.compile(r"^[\w .:-]{1,100}$")
ID_RE = re.compile(r"^[0-9A-Za-z-]{1,36}$")

# Fields of the public user object that an export writes and an import ignores.
READ_ONLY = frozenset({"password_set", "updated_at"})
TEXT_LIMITS = {"first_name": 150, "last_name": 150, "phone": 50}
BOOLEANS = ("email_verified", "login_enabled", "lockout_enabled", "password_expired")
FIELDS = frozenset({
    "id", "username", "email", "first_name", "last_name", "phone", "account_id", "account",
    "roles", "attributes", "password_hash", "password_hash_format", "password_changed_at",
    "failed_count", "locked_until", "external_identities", "created_at", "last_sign_in_at",
    "security_stamp", *BOOLEANS,
}) | READ_ONLY


class LineError(ValueError):
    """One sentence saying what is wrong with one line."""


@dataclass(slots=True)
class Identity:
    provider: str
    issuer: str | None
    subject: str


@dataclass(slots=True)
class Record:
    line: int
    given: frozenset[str]  # the fields the line set (an upsert changes only these)
    id: str | None = None
    username: str | None = None
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    phone: str | None = None
    account_id: str | None = None
    account: str | None = None
    roles: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    password_hash: str | None = None  # as stored: formats that do not name themselves prefixed
    password_changed_at: datetime | None = None
    password_expired: bool = False
    failed_count: int = 0
    locked_until: datetime | None = None
    email_verified: bool = False
    login_enabled: bool = True
    lockout_enabled: bool = True
    external_identities: list[Identity] = field(default_factory=list)
    created_at: datetime | None = None
    last_sign_in_at: datetime | None = None
    security_stamp: str | None = None

    # Casefolded, set with username and email by to_record: the import asks for each a few
    # times a line.
    username_key: str | None = field(default=None, init=False)
    email_key: str | None = field(default=None, init=False)


# -- lines --------------------------------------------------------------------------------------

def parse_json_line(line_number: int, raw: bytes | str) -> Record:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise LineError("The line is not valid JSON.") from None
    if not isinstance(data, dict):
        raise LineError("The line must be a JSON object.")
    return to_record(line_number, data)


def parse_csv_row(line_number: int, row: dict[str, str | None]) -> Record:
    """A CSV row: empty cells are absent; roles are `;`-separated; JSON in structured cells."""
    data: dict[str, Any] = {}
    for name, value in row.items():
        if name is None:
            raise LineError("The row has more cells than the header has columns.")
        name = name.strip()
        if value is None or value.strip() == "":
            continue
        value = value.strip()
        if name == "roles":
            data[name] = [part.strip() for part in value.split(";") if part.strip()]
        elif name in ("attributes", "external_identities"):
            try:
                data[name] = json.loads(value)
            except ValueError:
                raise LineError(f"'{name}' must hold JSON.") from None
        elif name == "failed_count":
            data[name] = _csv_int(name, value)
        elif name in BOOLEANS:
            data[name] = parse_bool(name, value)
        else:
            data[name] = value
    return to_record(line_number, data)


def to_record(line_number: int, data: dict[str, Any]) -> Record:
    unknown = [name for name in data if name not in FIELDS]
    if unknown:
        raise LineError(f"'{unknown[0]}' is not a field an import line accepts.")
    data = {k: v for k, v in data.items() if v is not None and k not in READ_ONLY}
    record = Record(line=line_number, given=frozenset(data))

    if "id" in data:
        record.id = _id("id", data["id"])
    if "username" in data:
        username = _text("username", data["username"]).strip()
        if not USERNAME_RE.match(username):
            raise LineError("'username': a username may hold letters, digits and . _ @ + - only.")
        record.username, record.username_key = username, casefold(username)
    if "email" in data:
        record.email = parse_email(_text("email", data["email"]))
        record.email_key = casefold(record.email)
    if record.username is None and record.email is None:
        raise LineError("Give an email or a username.")
    for name, limit in TEXT_LIMITS.items():
        if name in data:
            value = _text(name, data[name]).strip()
            if len(value) > limit:
                raise LineError(f"'{name}' is longer than {limit} characters.")
            setattr(record, name, value or None)
    if "account_id" in data:
        record.account_id = _id("account_id", data["account_id"])
    if "account" in data:
        name = _text("account", data["account"]).strip()
        if not name or len(name) > 255:
            raise LineError("'account' must be a name of 1 to 255 characters.")
        record.account = name
    if "roles" in data:
        roles = data["roles"]
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise LineError("'roles' must be a list of role names.")
        for role in roles:
            if not ROLE_RE.match(role.strip()):
                raise LineError(f"'roles': '{role}' is not a valid role name (letters, digits, "
                                "spaces and . _ : - only).")
        record.roles = list(dict.fromkeys(role.strip() for role in roles))
    if "attributes" in data:
        if not isinstance(data["attributes"], dict):
            raise LineError("'attributes' must be a JSON object.")
        record.attributes = data["attributes"]
    for name in BOOLEANS:
        if name in data:
            setattr(record, name, parse_bool(name, data[name]))
    if "failed_count" in data:
        count = data["failed_count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1_000_000:
            raise LineError("'failed_count' must be a whole number from 0.")
        record.failed_count = count
    for name in ("locked_until", "created_at", "last_sign_in_at", "password_changed_at"):
        if name in data:
            setattr(record, name, parse_datetime(name, data[name]))
    if "password_hash_format" in data and "password_hash" not in data:
        raise LineError("'password_hash_format' was given without a 'password_hash'.")
    if "password_hash" in data:
        record.password_hash = normalize_hash(
            _text("password_hash", data["password_hash"]),
            _text("password_hash_format", data["password_hash_format"])
            if "password_hash_format" in data else None)
    if "security_stamp" in data:
        stamp = _text("security_stamp", data["security_stamp"]).strip()
        if not 1 <= len(stamp) <= 64:
            raise LineError("'security_stamp' must be 1 to 64 characters.")
        record.security_stamp = stamp
    if "external_identities" in data:
        record.external_identities = _identities(data["external_identities"])
    return record


# -- values -------------------------------------------------------------------------------------

def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise LineError(f"'{name}' must be text.")
    if "\x00" in value:  # PostgreSQL refuses it, and would fail the line's whole batch
        raise LineError(f"'{name}' holds a NUL character.")
    return value


def _id(name: str, value: Any) -> str:
    value = _text(name, value).strip()
    if not ID_RE.match(value):
        raise LineError(f"'{name}' must be an id of up to 36 letters, digits and dashes.")
    return value.lower()


def _csv_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LineError(f"'{name}' must be a whole number from 0.") from None


# Plain ASCII addresses, which email-validator accepts and normalises by lower-casing the
# domain: checked here in a microsecond instead of its 40. Anything else goes to it.
_PLAIN_EMAIL = re.compile(
    r"^[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,63}))$")
_SPECIAL_TLDS = frozenset({"arpa", "invalid", "local", "localhost", "onion", "test"})


def parse_email(value: str) -> str:
    """The same normalisation as the admin API (pydantic's EmailStr)."""
    value = value.strip()
    if len(value) > 320:
        raise LineError("'email' is longer than 320 characters.")
    plain = _PLAIN_EMAIL.match(value)
    if plain and len(value) <= 254 and value.index("@") <= 64 and "--" not in plain[1] \
            and plain[2].lower() not in _SPECIAL_TLDS:
        local, _, domain = value.partition("@")
        return local + "@" + domain.lower()
    try:
        return validate_email(value)[1]
    except PydanticCustomError:
        raise LineError(f"'email': '{value}' is not a valid email address.") from None


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes", "y"):
            return True
        if lowered in ("false", "0", "no", "n", ""):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise LineError(f"'{name}' must be true or false.")


_US_FORMATS = ("%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %I:%M %p", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M",
               "%m/%d/%Y")


def parse_datetime(name: str, value: Any) -> datetime:
    """ISO 8601 (a time without a zone is UTC), or the M/D/YYYY h:mm AM of a Dataverse export."""
    text = _text(name, value).strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        for fmt in _US_FORMATS:
            try:
                parsed = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        else:
            raise LineError(f"'{name}' must be an ISO 8601 date and time.") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _identities(value: Any) -> list[Identity]:
    if not isinstance(value, list):
        raise LineError("'external_identities' must be a list of {provider, subject} objects.")
    found: list[Identity] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("provider"), str) \
                or not isinstance(item.get("subject"), str) \
                or not isinstance(item.get("issuer", ""), str) \
                or set(item) - {"provider", "issuer", "subject"}:
            raise LineError("'external_identities' must be a list of {provider, issuer?, subject} "
                            "objects.")
        provider = _text("external_identities", item["provider"]).strip()
        subject = _text("external_identities", item["subject"]).strip()
        issuer = _text("external_identities", item.get("issuer") or "").strip() or None
        if not provider or not subject or len(provider) > 100 or len(subject) > 255 \
                or len(issuer or "") > 500:
            raise LineError("'external_identities': provider (up to 100 characters) and subject "
                            "(up to 255) are required.")
        found.append(Identity(provider=provider, issuer=issuer, subject=subject))
    return found


# -- password hashes ----------------------------------------------------------------------------

_BCRYPT_RE = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_DJANGO_RE = re.compile(r"^pbkdf2_sha256\$\d+\$[^$]+\$[A-Za-z0-9+/=]+$")


def hash_format(stored: str) -> str:
    """The format of a stored hash, as an export names it."""
    if stored.startswith("$argon2"):
        return "argon2"
    if stored.startswith("$2"):
        return "bcrypt"
    if stored.startswith("pbkdf2_sha256$"):
        return "pbkdf2_sha256"
    if stored.startswith(ASPNET_PREFIX):
        return "aspnet_identity"
    return "unknown"


def exported_hash(stored: str) -> str:
    """The hash as the system that made it wrote it (the ASP.NET storage prefix removed)."""
    return stored.removeprefix(ASPNET_PREFIX)


def detect_format(value: str) -> str | None:
    if value.startswith("$argon2"):
        return "argon2"
    if value.startswith(("$2a$", "$2b$", "$2y$")):
        return "bcrypt"
    if value.startswith("pbkdf2_sha256$"):
        return "pbkdf2_sha256"
    if value.startswith(ASPNET_PREFIX):
        return "aspnet_identity"
    return None


def normalize_hash(value: str, fmt: str | None) -> str:
    """Check a hash has its format's shape and return it as stored; never re-hashed."""
    value = value.strip()
    if not value:
        raise LineError("'password_hash' is empty.")
    if fmt is not None and fmt not in HASH_FORMATS:
        raise LineError(f"'password_hash_format' must be one of {', '.join(HASH_FORMATS)}.")
    detected = detect_format(value)
    if fmt is None:
        if detected is None:
            raise LineError("The password hash does not name its format; give "
                            "'password_hash_format' (aspnet_identity hashes never name it).")
        fmt = detected
    elif detected is not None and detected != fmt:
        raise LineError(f"The password hash looks like {detected}, not {fmt}.")
    if fmt == "argon2":
        if not re.match(r"^\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$"
                        r"[A-Za-z0-9+/]+$", value):
            raise LineError("The argon2 hash is not a PHC string like $argon2id$v=19$m=…$….")
        return value
    if fmt == "bcrypt":
        if not _BCRYPT_RE.match(value):
            raise LineError("The bcrypt hash is not 60 characters starting $2a$, $2b$ or $2y$.")
        return value
    if fmt == "pbkdf2_sha256":
        if not _DJANGO_RE.match(value):
            raise LineError("The pbkdf2_sha256 hash is not Django's "
                            "pbkdf2_sha256$iterations$salt$hash.")
        return value
    encoded = value.removeprefix(ASPNET_PREFIX)
    if not aspnet_shape_ok(encoded):
        raise LineError("The aspnet_identity hash is not the base64 of an ASP.NET Identity v2 or "
                        "v3 password hash.")
    return ASPNET_PREFIX + encoded


def aspnet_shape_ok(encoded: str) -> bool:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        return False
    if raw[:1] == b"\x00":
        return len(raw) == 49
    if raw[:1] == b"\x01" and len(raw) >= 13:
        prf = int.from_bytes(raw[1:5], "big")
        salt_length = int.from_bytes(raw[9:13], "big")
        return prf in (0, 1, 2) and salt_length >= 16 and len(raw) >= 13 + salt_length + 16
    return False
