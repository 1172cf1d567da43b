"""Site settings (CONTRACT §5): typed defaults in code, overrides in the database."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gatepass.db import Database
from gatepass.errors import InvalidInput
from gatepass.sitesettings.models import SiteSetting

DEFAULTS: dict[str, Any] = {
    "registration.enabled": True,
    "registration.open": True,
    "registration.invitation": True,
    "registration.require_email_verification": False,
    "login.by_email": True,
    "users.require_unique_email": True,
    "lockout.max_failed_attempts": 5,
    "lockout.duration_seconds": 300,
    "password.min_length": 8,
    "password.check_common": True,
    "password.max_age_days": 0,
    "password.generated_length": 16,
    "password.temporary_lifetime_hours": 72,
    "tokens.set_password_lifetime_hours": 72,
    "tokens.reset_lifetime_minutes": 60,
    "tokens.verify_lifetime_hours": 48,
    "invitation.default_expiry_days": 14,
    "session.lifetime_hours": 24,
    "webhooks.allow_insecure_urls": False,
    "hooks.pre_create_url": "",  # empty: no user.pre_create hook
    "hooks.pre_create_fail_open": False,
    "ratelimit.enabled": True,
    "site.name": "Gatepass",
}

# Lower bounds for integers; a value below makes no sense (a 0-attempt lockout locks everyone).
MINIMUMS: dict[str, int] = {
    "lockout.max_failed_attempts": 1,
    "lockout.duration_seconds": 1,
    "password.min_length": 1,
    "password.max_age_days": 0,
    "password.generated_length": 8,
    "password.temporary_lifetime_hours": 1,
    "tokens.set_password_lifetime_hours": 1,
    "tokens.reset_lifetime_minutes": 1,
    "tokens.verify_lifetime_hours": 1,
    "invitation.default_expiry_days": 1,
    "session.lifetime_hours": 1,
}
MAXIMUMS: dict[str, int] = {"password.generated_length": 128, "password.min_length": 128}

CACHE_SECONDS = 2.0  # other processes see a change within this long


def coerce(key: str, value: Any) -> Any:
    """Check one value against its default's type; raise InvalidInput naming the key."""
    if key not in DEFAULTS:
        raise InvalidInput(f"There is no setting called '{key}'.", field=key)
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "on", "off"):
            return value.lower() in ("true", "1", "on")
        if not isinstance(value, bool):
            raise InvalidInput(f"The setting '{key}' must be true or false.", field=key)
        return value
    if isinstance(default, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"The setting '{key}' must be a whole number.", field=key)
        if value < MINIMUMS.get(key, 0):
            raise InvalidInput(
                f"The setting '{key}' must be at least {MINIMUMS.get(key, 0)}.", field=key)
        if key in MAXIMUMS and value > MAXIMUMS[key]:
            raise InvalidInput(f"The setting '{key}' must be at most {MAXIMUMS[key]}.", field=key)
        return value
    if not isinstance(value, str) or (not value.strip() and default != ""):
        raise InvalidInput(f"The setting '{key}' must be a non-empty string.", field=key)
    return value


class SiteSettings:
    """Cached reads of the site settings for one process."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._values: dict[str, Any] | None = None
        self._loaded_at = 0.0

    def all(self) -> dict[str, Any]:
        now = time.monotonic()
        values = self._values
        if values is not None and now - self._loaded_at < CACHE_SECONDS:
            return values
        with self._lock, self._db.read() as session:
            stored = {row.key: row.value for row in session.scalars(select(SiteSetting))}
        values = {**DEFAULTS, **{k: v for k, v in stored.items() if k in DEFAULTS}}
        self._values, self._loaded_at = values, now
        return values

    def get(self, key: str) -> Any:
        return self.all()[key]

    def __getitem__(self, key: str) -> Any:
        return self.all()[key]

    def invalidate(self) -> None:
        self._values = None

    def update(self, session: Session, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate every change first, then write them all; nothing is written on a bad one."""
        if not changes:
            raise InvalidInput("Give at least one setting to change.")
        checked = {key: coerce(key, value) for key, value in changes.items()}
        for key, value in checked.items():
            row = session.get(SiteSetting, key)
            if row is None:
                session.add(SiteSetting(key=key, value=value))
            else:
                row.value = value
        session.flush()
        self.invalidate()
        return checked
