"""The "I have an existing account" page: a signed-in user redeems an invitation code."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from gatepass import errors
from gatepass.api.http import CoreDep, make_context
from gatepass.auth import service as auth
from gatepass.invitations import service
from gatepass.web import csrf
from gatepass.web.routes import CsrfField, current, page_guard, redirect, render

router = APIRouter()


def _guard(request: Request, core: CoreDep, code: str) -> auth.Authenticated | Response:
    """Signed out: sign in, then come back here with the code still filled in."""
    if current(request, core) is None:
        back = "/invitations/redeem" + (f"?invitation={quote(code)}" if code else "")
        return redirect("/signin?next=" + quote(back, safe=""))
    return page_guard(request, core)


@router.get("/invitations/redeem", response_class=HTMLResponse)
def redeem_page(request: Request, core: CoreDep, invitation: str = "") -> Response:
    code = invitation.strip()[:200]
    found = _guard(request, core, code)
    if isinstance(found, Response):
        return found
    return render(request, core, "invitations_redeem.html", code=code, done=False)


@router.post("/invitations/redeem", response_class=HTMLResponse)
def redeem_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
                  code: Annotated[str, Form(max_length=200)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    found = _guard(request, core, code.strip())
    if isinstance(found, Response):
        return found
    if not code.strip():
        return render(request, core, "invitations_redeem.html", 422, code="",
                      error="Enter the invitation code from your invitation.", done=False)
    try:
        service.redeem_existing(core, make_context(request, "portal", "user", found.user_id),
                                found.user_id, code.strip())
    except errors.InvitationInvalid as exc:
        return render(request, core, "invitations_redeem.html", 400, code=code.strip(),
                      error=exc.message + " Check the code, or ask for a new invitation.",
                      done=False)
    return render(request, core, "invitations_redeem.html", code="", done=True,
                  notice="Invitation accepted: your account now has its access.")
