"""Admin API for webhooks and the audit log (CONTRACT §3): thin routes over the service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from gatepass.api.http import AdminCtx, CoreDep, require_scope
from gatepass.core import Core
from gatepass.events import service as events
from gatepass.webhooks import service as webhooks

router = APIRouter()

WEBHOOKS = require_scope("webhooks")  # GETs are open to `read` keys too


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2000)
    events: list[str] = Field(max_length=webhooks.MAX_SUBSCRIPTIONS)
    description: str | None = Field(default=None, max_length=webhooks.MAX_DESCRIPTION)


@router.post("/webhooks", status_code=201, dependencies=[WEBHOOKS])
def create_webhook(core: CoreDep, ctx: AdminCtx, data: WebhookIn) -> dict[str, Any]:
    created = webhooks.create_webhook(core, ctx, data.url, data.events, data.description)
    return {**webhooks.webhook_public(created.webhook), "secret": created.secret}


@router.get("/webhooks", dependencies=[WEBHOOKS])
def list_webhooks(core: CoreDep) -> dict[str, Any]:
    return {"items": [webhooks.webhook_public(w) for w in webhooks.list_webhooks(core)]}


@router.get("/webhooks/{webhook_id}", dependencies=[WEBHOOKS])
def get_webhook(core: CoreDep, webhook_id: str) -> dict[str, Any]:
    with core.db.read() as session:
        return {"webhook": webhooks.webhook_public(webhooks.get_webhook(session, webhook_id))}


@router.delete("/webhooks/{webhook_id}", status_code=204, dependencies=[WEBHOOKS])
def delete_webhook(core: CoreDep, ctx: AdminCtx, webhook_id: str) -> Response:
    webhooks.delete_webhook(core, ctx, webhook_id)
    return Response(status_code=204)


@router.get("/webhooks/{webhook_id}/deliveries", dependencies=[WEBHOOKS])
def list_deliveries(core: CoreDep, webhook_id: str,
                    limit: int = Query(default=100, ge=1, le=1000)) -> dict[str, Any]:
    return {"items": webhooks.list_deliveries(core, webhook_id, limit=limit)}


@router.get("/events", dependencies=[WEBHOOKS])
def list_events(core: CoreDep, type: str | None = Query(default=None, max_length=64),
                user_id: str | None = Query(default=None, max_length=36),
                after: int | None = Query(default=None, ge=0),
                limit: int = Query(default=100, ge=1, le=1000)) -> dict[str, Any]:
    """The audit log oldest first; poll with `after` = the last `seq` you have seen."""
    rows, more = webhooks.list_events(core, type_=type, user_id=user_id, after=after,
                                      limit=limit)
    next_after = rows[-1].seq if rows else after
    return {"items": [events.as_body(row) for row in rows], "next_after": next_after,
            "has_more": more}


def install(app: FastAPI, admin: FastAPI, public: FastAPI, core: Core) -> None:
    admin.include_router(router)
