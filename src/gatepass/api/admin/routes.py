"""Admin API (CONTRACT §3): thin routes over the user, account, role and settings use cases."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from gatepass.api.http import AdminCtx, CoreDep, require_scope
from gatepass.errors import InvalidInput
from gatepass.users import service as users
from gatepass.users.schemas import PasswordReset, UserCreate, UserUpdate

router = APIRouter()

USERS = require_scope("users")
SETTINGS = require_scope("settings")


class AccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=255)


class RoleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    description: str | None = Field(default=None, max_length=2000)


def _created(created: users.Created) -> dict[str, Any]:
    body: dict[str, Any] = {"user": users.user_public(created.user)}
    if created.password is not None:
        body["password"] = created.password
    return body


@router.post("/users", status_code=201, dependencies=[USERS])
def create_user(core: CoreDep, ctx: AdminCtx, data: UserCreate) -> dict[str, Any]:
    return _created(users.create_user(core, ctx, data))


@router.get("/users", dependencies=[USERS])
def list_users(core: CoreDep, q: str | None = Query(default=None, max_length=200),
               account_id: str | None = Query(default=None, max_length=36),
               role: str | None = Query(default=None, max_length=100),
               limit: int = Query(default=50, ge=1, le=500),
               cursor: str | None = Query(default=None, max_length=500)) -> dict[str, Any]:
    rows, next_cursor = users.list_users(core, q=q, account_id=account_id, role=role,
                                         limit=limit, cursor=cursor)
    return {"items": [users.user_public(user) for user in rows], "next_cursor": next_cursor}


@router.get("/users/{user_id}", dependencies=[USERS])
def get_user(core: CoreDep, user_id: str) -> dict[str, Any]:
    with core.db.read() as session:
        return {"user": users.user_public(users.get_user(session, user_id))}


@router.patch("/users/{user_id}", dependencies=[USERS])
def update_user(core: CoreDep, ctx: AdminCtx, user_id: str, data: UserUpdate) -> dict[str, Any]:
    return {"user": users.user_public(users.update_user(core, ctx, user_id, data))}


@router.delete("/users/{user_id}", status_code=204, dependencies=[USERS])
def delete_user(core: CoreDep, ctx: AdminCtx, user_id: str) -> Response:
    users.delete_user(core, ctx, user_id)
    return Response(status_code=204)


@router.post("/users/{user_id}/reset-password", dependencies=[USERS])
def reset_password(core: CoreDep, ctx: AdminCtx, user_id: str,
                   data: PasswordReset | None = Body(default=None)) -> dict[str, Any]:
    return _created(users.admin_reset_password(core, ctx, user_id, data or PasswordReset()))


@router.post("/users/{user_id}/lock", dependencies=[USERS])
def lock_user(core: CoreDep, ctx: AdminCtx, user_id: str) -> dict[str, Any]:
    return {"user": users.user_public(users.lock_user(core, ctx, user_id))}


@router.post("/users/{user_id}/unlock", dependencies=[USERS])
def unlock_user(core: CoreDep, ctx: AdminCtx, user_id: str) -> dict[str, Any]:
    return {"user": users.user_public(users.unlock_user(core, ctx, user_id))}


@router.post("/users/{user_id}/sessions/revoke", dependencies=[USERS])
def revoke_sessions(core: CoreDep, ctx: AdminCtx, user_id: str) -> dict[str, Any]:
    return {"revoked": users.revoke_sessions(core, ctx, user_id)}


@router.post("/accounts", status_code=201, dependencies=[USERS])
def create_account(core: CoreDep, data: AccountIn) -> dict[str, Any]:
    account = users.create_account(core, data.name)
    return {"account": {"id": account.id, "name": account.name,
                        "created_at": account.created_at.isoformat()}}


@router.get("/accounts", dependencies=[USERS])
def list_accounts(core: CoreDep) -> dict[str, Any]:
    return {"items": [{"id": a.id, "name": a.name, "created_at": a.created_at.isoformat()}
                      for a in users.list_accounts(core)]}


@router.post("/roles", status_code=201, dependencies=[USERS])
def create_role(core: CoreDep, data: RoleIn) -> dict[str, Any]:
    role = users.create_role(core, data.name, data.description)
    return {"role": {"id": role.id, "name": role.name, "description": role.description}}


@router.get("/roles", dependencies=[USERS])
def list_roles(core: CoreDep) -> dict[str, Any]:
    return {"items": [{"id": r.id, "name": r.name, "description": r.description}
                      for r in users.list_roles(core)]}


@router.get("/settings", dependencies=[SETTINGS])
def get_settings(core: CoreDep) -> dict[str, Any]:
    core.site.invalidate()
    return {"settings": core.site.all()}


@router.patch("/settings", dependencies=[SETTINGS])
def patch_settings(core: CoreDep, changes: dict[str, Any] = Body(...)) -> dict[str, Any]:
    if not isinstance(changes, dict):
        raise InvalidInput("The body must be a JSON object of settings.")
    with core.db.write() as session:
        core.site.update(session, changes)
    core.site.invalidate()
    return {"settings": core.site.all()}
