"""Invitation routes: the admin API (CONTRACT §3), `/api/v1/invitations/redeem` (§4) and the
`/invitations/redeem` page (§6). Installed through `gatepass.extensions`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request

from gatepass.api.http import AdminCtx, CoreDep, Current, require_scope, user_context
from gatepass.core import Core
from gatepass.invitations import service
from gatepass.invitations.schemas import InvitationCreate, RedeemIn
from gatepass.users.service import get_user, user_public

admin_router = APIRouter()
public_router = APIRouter()

INVITATIONS = require_scope("invitations")


@admin_router.post("/invitations", status_code=201, dependencies=[INVITATIONS])
def create_invitations(core: CoreDep, ctx: AdminCtx, data: InvitationCreate) -> dict[str, Any]:
    outcome = service.create_invitations(core, ctx, data)
    body: dict[str, Any] = {"invitations": [issued.public(core) for issued in outcome.issued]}
    if outcome.failed:
        body["failed"] = [failure.public() for failure in outcome.failed]
    return body


@admin_router.get("/invitations", dependencies=[INVITATIONS])
def list_invitations(core: CoreDep, status: str | None = Query(default=None, max_length=20),
                     limit: int = Query(default=100, ge=1, le=500),
                     cursor: str | None = Query(default=None, max_length=500)) -> dict[str, Any]:
    rows, next_cursor = service.list_invitations(core, status=status, limit=limit, cursor=cursor)
    return {"items": [service.invitation_public(row) for row in rows], "next_cursor": next_cursor}


@admin_router.get("/invitations/{invitation_id}", dependencies=[INVITATIONS])
def get_invitation(core: CoreDep, invitation_id: str) -> dict[str, Any]:
    return {"invitation": service.detail(core, invitation_id)}


@admin_router.post("/invitations/{invitation_id}/revoke", dependencies=[INVITATIONS])
def revoke_invitation(core: CoreDep, ctx: AdminCtx, invitation_id: str) -> dict[str, Any]:
    return {"invitation": service.invitation_public(service.revoke(core, ctx, invitation_id))}


@admin_router.post("/invitations/{invitation_id}/resend", dependencies=[INVITATIONS])
def resend_invitation(core: CoreDep, ctx: AdminCtx, invitation_id: str) -> dict[str, Any]:
    return {"invitation": service.resend(core, ctx, invitation_id).public(core)}


@public_router.post("/invitations/redeem")
def redeem(request: Request, core: CoreDep, found: Current, data: RedeemIn) -> dict[str, Any]:
    invitation = service.redeem_existing(core, user_context(request, found), found.user_id,
                                         data.code)
    with core.db.read() as session:
        user = get_user(session, found.user_id)
        return {"invitation": service.invitation_public(invitation), "user": user_public(user)}


def install(app: FastAPI, admin: FastAPI, public: FastAPI, core: Core) -> None:
    from gatepass.web.invitations import router as web_router

    admin.include_router(admin_router)
    public.include_router(public_router)
    app.include_router(web_router)
