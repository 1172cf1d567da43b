"""Pages: /register (with ?invitation=CODE, also the Power Pages /register/?returnurl=…&invitation=…
link), /email/verify?token=… and /email/verify/resend. Same services as the public API."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from gatepass import errors
from gatepass.api.http import CoreDep, after_the_answer, client_ip, make_context, status_of
from gatepass.core import Core
from gatepass.ratelimit import service as ratelimit
from gatepass.registration import service
from gatepass.registration.schemas import Registration
from gatepass.web import csrf
from gatepass.web.routes import CsrfField, redirect, refuse_login_form, render, safe_next

router = APIRouter()

Text = Annotated[str, Form(max_length=320)]
Secret = Annotated[str, Form(max_length=4096)]


def _modes(core: Core) -> dict[str, bool]:
    enabled = bool(core.site["registration.enabled"])
    return {"enabled": enabled, "open": enabled and bool(core.site["registration.open"]),
            "invitation": enabled and bool(core.site["registration.invitation"])}


def _closed(request: Request, core: Core) -> Response:
    return render(request, core, "message.html", 403, heading="Registration is closed",
                  text="This portal does not take new registrations. If you have an account, "
                       "sign in.", link="/signin", link_text="Sign in")


def _form(request: Request, core: Core, status: int = 200, **values: Any) -> Response:
    modes = _modes(core)
    values.setdefault("form", {})
    response = render(request, core, "register.html", status, code_required=not modes["open"],
                      code_allowed=modes["invitation"], **values)
    if status == 429 and "retry_after" in values:
        response.headers["Retry-After"] = str(values["retry_after"])
    return response


@router.get("/register", response_class=HTMLResponse)
@router.get("/register/", response_class=HTMLResponse, include_in_schema=False)
def register_page(request: Request, core: CoreDep, invitation: str | None = None,
                  returnurl: str | None = None) -> Response:
    modes = _modes(core)
    if not modes["open"] and not modes["invitation"]:
        return _closed(request, core)
    return _form(request, core, form={"invitation_code": (invitation or "")[:200]},
                 next=safe_next(returnurl) if returnurl else "")


@router.post("/register", response_class=HTMLResponse)
@router.post("/register/", response_class=HTMLResponse, include_in_schema=False)
def register_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
                    email: Text = "", username: Annotated[str, Form(max_length=150)] = "",
                    first_name: Annotated[str, Form(max_length=150)] = "",
                    last_name: Annotated[str, Form(max_length=150)] = "",
                    password: Secret = "", confirm_password: Secret = "",
                    invitation_code: Annotated[str, Form(max_length=200)] = "",
                    next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    form = {"email": email, "username": username, "first_name": first_name,
            "last_name": last_name, "invitation_code": invitation_code}
    target = safe_next(next) if next else ""

    def again(message: str, status: int, field: str | None = None, **extra: Any) -> Response:
        return _form(request, core, status, error=message, form=form, field=field, next=target,
                     **extra)

    if not email.strip():
        return again("Enter your email address.", 422, "email")
    if password != confirm_password:
        return again("The two passwords do not match.", 422, "confirm_password")
    try:
        data = Registration(email=email.strip(), username=username.strip() or None,
                            password=password, first_name=first_name or None,
                            last_name=last_name or None,
                            invitation_code=invitation_code.strip() or None)
    except ValidationError:
        return again("Enter a valid email address, such as name@example.com.", 422, "email")
    try:
        ratelimit.check(core, "register", ip=client_ip(request), target=str(data.email))
        user = service.register(core, make_context(request, "portal"), data)
    except errors.RateLimited as exc:
        return again("Too many attempts from here. Wait a few minutes and try again.", 429,
                     retry_after=exc.retry_after)
    except errors.GatepassError as exc:
        return again(exc.message, status_of(exc), exc.field)
    if core.site["registration.require_email_verification"] and not user.email_verified:
        return render(request, core, "message.html", heading="Check your email",
                      text=f"We sent a link to {data.email}. Open it to confirm your address, "
                           "then sign in.", link="/email/verify/resend",
                      link_text="Send the link again")
    return redirect("/signin?notice=registered" + ("&next=" + quote(target) if target else ""))


# -- email verification -------------------------------------------------------------------------

@router.get("/email/verify", response_class=HTMLResponse)
def verify_page(request: Request, core: CoreDep, token: str = "") -> Response:
    return render(request, core, "email_verify.html", token=token[:200])


@router.post("/email/verify", response_class=HTMLResponse)
def verify_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
                  token: Annotated[str, Form(max_length=200)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    try:
        service.verify_email(core, make_context(request, "portal"), token)
    except errors.InvalidToken as exc:
        return render(request, core, "email_verify.html", 400, token="", error=exc.message,
                      expired=True)
    return redirect("/signin?notice=verified")


@router.get("/email/verify/resend", response_class=HTMLResponse)
def resend_page(request: Request, core: CoreDep) -> Response:
    return render(request, core, "email_verify_resend.html", login="")


@router.post("/email/verify/resend", response_class=HTMLResponse)
def resend_submit(request: Request, core: CoreDep, background: BackgroundTasks,
                  csrf_token: CsrfField, login: Text = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    login = login.strip()
    refused = refuse_login_form(request, core, "email_verify_resend.html", "verify_resend",
                                login)
    if refused is not None:
        return refused
    after_the_answer(background, service.resend_verification, core,
                     make_context(request, "portal"), login,
                     failure="resending a verification link failed")
    return render(request, core, "message.html", heading="Check your email",
                  text="If that account exists and its address is not confirmed yet, we sent "
                       "it a new link. It can take a minute to arrive.",
                  link="/signin", link_text="Back to sign in")
