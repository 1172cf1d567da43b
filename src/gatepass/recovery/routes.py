"""Public API for forgot and reset password, and the hook that installs it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, BackgroundTasks, Request
from pydantic import BaseModel, ConfigDict, Field

from gatepass.api.http import CoreDep, after_the_answer, client_ip, make_context
from gatepass.ratelimit import service as ratelimit
from gatepass.recovery import service
from gatepass.registration.schemas import LoginBody
from gatepass.users.service import user_public

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gatepass.core import Core


router = APIRouter()


class ResetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=200)
    new_password: str = Field(max_length=4096)


@router.post("/auth/password/forgot", status_code=202)
def forgot(request: Request, core: CoreDep, data: LoginBody,
           background: BackgroundTasks) -> dict[str, Any]:
    ratelimit.check(core, "forgot", ip=client_ip(request), target=data.login)
    after_the_answer(background, service.request_reset, core, make_context(request, "portal"),
                     data.login, failure="a password reset request failed")
    return {}


@router.post("/auth/password/reset")
def reset(request: Request, core: CoreDep, data: ResetBody) -> dict[str, Any]:
    user = service.reset_password(core, make_context(request, "portal"), data.token,
                                  data.new_password)
    return {"user": user_public(user)}


def install(app: FastAPI, admin: FastAPI, public: FastAPI, core: Core) -> None:
    from gatepass.web import recovery as pages

    public.include_router(router)
    app.include_router(pages.router)
