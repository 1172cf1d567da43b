"""Public API for registration and email verification, and the hook that installs it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, BackgroundTasks, Request

from gatepass.api.http import CoreDep, after_the_answer, client_ip, make_context
from gatepass.ratelimit import service as ratelimit
from gatepass.registration import service
from gatepass.registration.schemas import LoginBody, Registration, TokenBody
from gatepass.users.service import user_public

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gatepass.core import Core


router = APIRouter()


@router.post("/auth/register", status_code=201)
def register(request: Request, core: CoreDep, data: Registration) -> dict[str, Any]:
    ratelimit.check(core, "register", ip=client_ip(request), target=str(data.email))
    user = service.register(core, make_context(request, "portal"), data)
    return {"user": user_public(user)}


@router.post("/auth/email/verify")
def verify_email(request: Request, core: CoreDep, data: TokenBody) -> dict[str, Any]:
    user = service.verify_email(core, make_context(request, "portal"), data.token)
    return {"user": user_public(user)}


@router.post("/auth/email/verify/resend", status_code=202)
def resend(request: Request, core: CoreDep, data: LoginBody,
           background: BackgroundTasks) -> dict[str, Any]:
    ratelimit.check(core, "verify_resend", ip=client_ip(request), target=data.login)
    after_the_answer(background, service.resend_verification, core,
                     make_context(request, "portal"), data.login,
                     failure="resending a verification link failed")
    return {}


def install(app: FastAPI, admin: FastAPI, public: FastAPI, core: Core) -> None:
    from gatepass.web import registration as pages

    public.include_router(router)
    app.include_router(pages.router)
