"""Public API (CONTRACT §4) for custom and native front ends; pages use the same services."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from gatepass.api.http import (SESSION_COOKIE, CoreDep, Current, CurrentAnyState, client_ip,
                               crash_response, current_ready, error_response, forced_change_guard,
                               json_body, make_context, session_token, user_context)
from gatepass.auth import service as auth
from gatepass.core import Core
from gatepass.errors import GatepassError
from gatepass.ratelimit import service as ratelimit
from gatepass.users import service as users
from gatepass.users.schemas import ProfileUpdate

router = APIRouter()


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    login: str = Field(max_length=320)
    password: str = Field(max_length=4096)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    current_password: str = Field(max_length=4096)
    new_password: str = Field(max_length=4096)


def set_session_cookie(core: Core, response: Response, token: str) -> None:
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax",
                        secure=core.settings.secure_cookies, path="/",
                        max_age=int(core.site["session.lifetime_hours"]) * 3600)


def clear_session_cookie(core: Core, response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                           secure=core.settings.secure_cookies)


@router.post("/auth/signin")
def signin(request: Request, core: CoreDep, data: SignIn) -> JSONResponse:
    return _signin(request, core, data)


# Longest valid body: a 4,096-character password of JSON escapes (12 bytes for a character
# outside the BMP), a 320-character login likewise, and the keys.
SIGNIN_BODY_LIMIT = 64 * 1024


async def signin_route(request: Request) -> Response:
    """POST /api/v1/auth/signin. Every visitor signs in, so `create_app` serves this, like
    /me, as a plain route of the outer app ahead of the API mount: FastAPI's dependency
    solving and body handling cost a fifth of a sign-in's own work. The answers are the
    FastAPI route's (`signin` above, kept for the OpenAPI document), the forced-change guard
    included."""
    core: Core = request.app.state.core
    try:
        await forced_change_guard(request)
        data = await json_body(request, SignIn, limit=SIGNIN_BODY_LIMIT)
        return await run_in_threadpool(_signin, request, core, data)
    except GatepassError as exc:  # answered here: the outer app's handlers render pages
        return error_response(exc)
    except Exception as exc:
        return crash_response(request, exc)


def _signin(request: Request, core: Core, data: SignIn) -> JSONResponse:
    ratelimit.check(core, "signin", ip=client_ip(request), target=data.login)
    result = auth.signin(core, make_context(request, "portal"), data.login, data.password)
    body = {"status": "password_change_required" if result.password_change_required else "ok",
            "session_token": result.token, "user": result.user}
    response = JSONResponse(body)
    set_session_cookie(core, response, result.token)
    return response


@router.post("/auth/signout")
def signout(request: Request, core: CoreDep) -> JSONResponse:
    auth.signout(core, session_token(request))
    response = JSONResponse({})
    clear_session_cookie(core, response)
    return response


@router.get("/me")
async def me(request: Request) -> JSONResponse:
    """Who is signed in. Front ends ask on every page, so `create_app` serves this as a plain
    route of the outer app, ahead of the API mount and FastAPI's dependency machinery (which
    cost more than the session lookup); this FastAPI route stays for the OpenAPI document."""
    try:
        found = await current_ready(request)
    except GatepassError as exc:  # answered here: the outer app's handlers render pages
        return error_response(exc)
    except Exception as exc:
        return crash_response(request, exc)
    return JSONResponse({"user": found.user})


@router.patch("/me")
def update_me(request: Request, core: CoreDep, found: Current,
              data: ProfileUpdate) -> dict[str, Any]:
    user = users.update_profile(core, user_context(request, found), found.user_id, data)
    return {"user": users.user_public(user)}


@router.post("/auth/password/change")
def change_password(request: Request, core: CoreDep, found: CurrentAnyState,
                    data: PasswordChange) -> dict[str, Any]:
    user = auth.change_password(core, user_context(request, found), found.user_id,
                                found.session_id, data.current_password, data.new_password)
    return {"user": users.user_public(user)}
