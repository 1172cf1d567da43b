"""Pages: /password/forgot and /password/reset?token=…; same services as the public API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import HTMLResponse, Response

from gatepass import errors
from gatepass.api.http import CoreDep, after_the_answer, make_context
from gatepass.core import Core
from gatepass.recovery import service
from gatepass.web import csrf
from gatepass.web.routes import CsrfField, redirect, refuse_login_form, render

router = APIRouter()

Secret = Annotated[str, Form(max_length=4096)]


def _invalid_link(request: Request, core: Core) -> Response:
    return render(request, core, "message.html", 400, heading="This link does not work",
                  text="This password reset link is invalid, was already used or has expired. "
                       "Ask for a new one.", link="/password/forgot", link_text="Reset password")


@router.get("/password/forgot", response_class=HTMLResponse)
def forgot_page(request: Request, core: CoreDep) -> Response:
    return render(request, core, "password_forgot.html", login="")


@router.post("/password/forgot", response_class=HTMLResponse)
def forgot_submit(request: Request, core: CoreDep, background: BackgroundTasks,
                  csrf_token: CsrfField,
                  login: Annotated[str, Form(max_length=320)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    login = login.strip()
    refused = refuse_login_form(request, core, "password_forgot.html", "forgot", login)
    if refused is not None:
        return refused
    after_the_answer(background, service.request_reset, core, make_context(request, "portal"),
                     login, failure="a password reset request failed")
    return render(request, core, "message.html", heading="Check your email",
                  text="If that username or email address belongs to an account, we sent a "
                       "password reset link to its email address. Where several users share "
                       "one address, each gets their own link naming their username. It can "
                       "take a minute to arrive.", link="/signin", link_text="Back to sign in")


@router.get("/password/reset", response_class=HTMLResponse)
def reset_page(request: Request, core: CoreDep, token: str = "") -> Response:
    user = service.user_for_token(core, token[:200])
    if user is None:
        return _invalid_link(request, core)
    return render(request, core, "password_reset.html", token=token, username=user.username)


@router.post("/password/reset", response_class=HTMLResponse)
def reset_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
                 token: Annotated[str, Form(max_length=200)] = "",
                 new_password: Secret = "", confirm_password: Secret = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    user = service.user_for_token(core, token)
    if user is None:
        return _invalid_link(request, core)
    if new_password != confirm_password:
        return render(request, core, "password_reset.html", 422, token=token,
                      username=user.username, error="The two passwords do not match.")
    try:
        service.reset_password(core, make_context(request, "portal"), token, new_password)
    except errors.InvalidToken:
        return _invalid_link(request, core)
    except errors.InvalidInput as exc:
        return render(request, core, "password_reset.html", 422, token=token,
                      username=user.username, error=exc.message)
    return redirect("/signin?notice=reset")
