"""`POST /api/v1/auth/password/set` and the `/password/set?token=…` page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gatepass import errors
from gatepass.accounts import service
from gatepass.api.http import CoreDep, make_context
from gatepass.core import Core
from gatepass.users import service as users
from gatepass.web import csrf
from gatepass.web.routes import CsrfField, redirect, render

api = APIRouter()
pages = APIRouter()

INVALID_LINK = ("This link is invalid or has expired. Ask for a new one with "
                "“Forgot your password?”, or ask the person who created your account.")


class PasswordSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=200)
    new_password: str = Field(max_length=4096)


@api.post("/auth/password/set")
def set_password(request: Request, core: CoreDep, data: PasswordSet) -> dict[str, Any]:
    user = service.set_password_with_token(core, make_context(request, "portal"), data.token,
                                           data.new_password)
    return {"user": users.user_public(user)}


def _form(request: Request, core: Core, username: str, token: str, status: int = 200,
          error: str | None = None) -> Response:
    return render(request, core, "password_set.html", status, username=username, token=token,
                  error=error, min_length=core.site["password.min_length"])


def _invalid(request: Request, core: Core) -> Response:
    return render(request, core, "password_set.html", 400, error=INVALID_LINK, username=None,
                  token="", min_length=0)


@pages.get("/password/set")
def set_page(request: Request, core: CoreDep, token: str = "") -> Response:
    username = service.username_for_link(core, token)
    if username is None:
        return _invalid(request, core)
    return _form(request, core, username, token)


@pages.post("/password/set")
def set_submit(request: Request, core: CoreDep, csrf_token: CsrfField,
               token: Annotated[str, Form(max_length=200)] = "",
               new_password: Annotated[str, Form(max_length=4096)] = "",
               confirm_password: Annotated[str, Form(max_length=4096)] = "") -> Response:
    csrf.verify(request, core.secret_key, csrf_token)
    username = service.username_for_link(core, token)
    if username is None:
        return _invalid(request, core)
    if new_password != confirm_password:
        return _form(request, core, username, token, 422, "The two passwords do not match.")
    try:
        service.set_password_with_token(core, make_context(request, "portal"), token,
                                        new_password)
    except errors.InvalidToken:
        return _invalid(request, core)
    except errors.InvalidInput as exc:
        return _form(request, core, username, token, 422, exc.message)
    return redirect("/signin?notice=set")


def install(app: FastAPI, admin: FastAPI, public: FastAPI, core: Core) -> None:
    public.include_router(api)
    app.include_router(pages)
