"""CSRF protection for every form: a signed double-submit token.

The browser holds a random value in an HttpOnly cookie; each form carries an HMAC of it made
with the secret key. A cross-site page can neither read the cookie nor forge the HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request, Response

from gatepass.errors import Forbidden

COOKIE = "gatepass_csrf"


class CsrfFailed(Forbidden):  # 403, as a refused cross-site request
    code = "csrf_failed"
    message = "This form has expired. Reload the page and try again."


def _sign(secret: str, value: str) -> str:
    return hmac.new(secret.encode(), ("csrf:" + value).encode(), hashlib.sha256).hexdigest()


def token_for(request: Request, secret: str) -> str:
    """The form token for this browser; creates the cookie value on first use."""
    value = request.cookies.get(COOKIE) or getattr(request.state, "csrf_new", None)
    if not value or len(value) > 100:
        value = secrets.token_urlsafe(32)
        request.state.csrf_new = value
    return _sign(secret, value)


def persist(request: Request, response: Response, secure: bool) -> None:
    value = getattr(request.state, "csrf_new", None)
    if value:
        response.set_cookie(COOKIE, value, httponly=True, samesite="lax", secure=secure, path="/")


def verify(request: Request, secret: str, submitted: str | None) -> None:
    value = request.cookies.get(COOKIE)
    if not value or not submitted or not hmac.compare_digest(_sign(secret, value), submitted):
        raise CsrfFailed()
