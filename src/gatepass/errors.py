"""Domain errors. Services raise them; routers alone turn them into HTTP answers.

Each carries a machine-readable `code` (CONTRACT §3, §4) and one human sentence.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any


def validation_reason(error: dict[str, Any]) -> str:
    """One of pydantic's validation errors as a clause for our sentences: its generic prefixes
    ("Value error, ", "value is not a valid email address: ") and its final stop gone."""
    message = str(error.get("msg", "is not valid"))
    for prefix in ("Value error, ", "value is not a valid email address: "):
        message = message.removeprefix(prefix)
    return message.rstrip(".")


class GatepassError(Exception):
    code = "error"
    message = "Something went wrong."

    def __init__(self, message: str | None = None, *, field: str | None = None,
                 **extra: Any) -> None:
        self.message = message or type(self).message
        self.field = field
        self.extra = extra
        super().__init__(self.message)


class InvalidInput(GatepassError):
    code = "invalid"
    message = "The request is not valid."


class TooLarge(GatepassError):
    code = "too_large"
    message = "The request body is too large."


class NotFound(GatepassError):
    code = "not_found"
    message = "Not found."


class Conflict(GatepassError):
    code = "conflict"
    message = "That conflicts with an existing record."


class Unauthenticated(GatepassError):
    code = "unauthenticated"
    message = "Sign in first."


class Forbidden(GatepassError):
    code = "forbidden"
    message = "You may not do that."


class InvalidCredentials(GatepassError):
    code = "invalid_credentials"
    message = "The username or password is incorrect."


class Locked(GatepassError):
    code = "locked"
    message = "Too many failed sign-ins. Try again later."

    def __init__(self, locked_until: datetime) -> None:
        super().__init__(locked_until=locked_until.isoformat())
        self.locked_until = locked_until


class LoginDisabled(GatepassError):
    code = "login_disabled"
    message = "Sign-in is disabled for this user."


class EmailNotVerified(GatepassError):
    code = "email_not_verified"
    message = "Verify your email address before signing in; we sent you a link."


class PasswordChangeRequired(GatepassError):
    code = "password_change_required"
    message = "You must change your password before you continue."


class WeakPassword(InvalidInput):
    code = "weak_password"
    message = "The password does not meet the password policy."


class InvalidToken(InvalidInput):
    code = "invalid_token"
    message = "This link is invalid or has expired."


class RegistrationClosed(GatepassError):
    code = "registration_closed"
    message = "Registration is closed."


class InvitationRequired(GatepassError):
    code = "invitation_required"
    message = "Registration needs an invitation code."


class UserRejected(GatepassError):
    code = "user_rejected"
    message = "This account cannot be created."


class InvitationInvalid(InvalidInput):
    code = "invitation_invalid"
    message = "This invitation code is not valid."


class RateLimited(GatepassError):
    code = "rate_limited"
    message = "Too many requests. Try again later."

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after=retry_after)
        self.retry_after = retry_after
