"""`POST /admin/api/v1/users/import` and `GET /admin/api/v1/users/export` (CONTRACT §3).

The import reads the body as it arrives and writes a batch whenever one is full, so a body of
any number of lines is held in memory one batch at a time.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from gatepass.api.http import AdminCtx, CoreDep, require_scope
from gatepass.auth.models import ApiKey
from gatepass.core import Core
from gatepass.errors import Forbidden
from gatepass.importer import export
from gatepass.importer.service import BATCH_SIZE, Importer, check_upsert

router = APIRouter()

USERS = require_scope("users")
MAX_LINE = 1_000_000  # bytes; a longer line fails on its own and the rest still import

_NDJSON_BODY = {"requestBody": {"required": True, "content": {"application/x-ndjson": {
    "schema": {"type": "string", "description": "One JSON user object a line."}}}}}


# Streams any size (the API apps' 1 MiB body limit is for bodies parsed whole).
@router.post("/users/import", dependencies=[USERS], openapi_extra=_NDJSON_BODY,
             max_body_size=2**50)
async def import_users(request: Request, core: CoreDep, ctx: AdminCtx,
                       upsert: str | None = Query(default=None, max_length=20)
                       ) -> dict[str, Any]:
    """JSON Lines, one user a line → {created, updated, failed: [{line, error}]}."""
    check_upsert(upsert)
    importer = await run_in_threadpool(Importer, core, ctx.but(triggered_by="import"),
                                       upsert=upsert)
    pending: list[bytes] = []
    first = 1  # the line number of pending[0]
    number = 0
    buffer = b""
    skipping = False  # inside a line that was too long
    async for chunk in request.stream():
        buffer += chunk
        if b"\n" not in buffer:
            if len(buffer) > MAX_LINE and not skipping:
                importer.add_error(number + 1, "The line is longer than 1 MB.")
                skipping = True
            if skipping:
                buffer = b""
            continue
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            number += 1
            if skipping:
                skipping = False
                pending.append(b"")
                continue
            if len(line) > MAX_LINE:
                importer.add_error(number, "The line is longer than 1 MB.")
                line = b""
            pending.append(line)
        if len(pending) >= BATCH_SIZE:
            await run_in_threadpool(importer.add_json_lines, pending, first)
            first += len(pending)
            pending = []
    if buffer and not skipping:
        pending.append(buffer)
    summary = await run_in_threadpool(_finish, importer, pending, first)
    return summary.as_dict()


def _finish(importer: Importer, pending: list[bytes], first: int) -> Any:
    importer.add_json_lines(pending, first)
    return importer.finish()


@router.get("/users/export", dependencies=[USERS])
def export_users(request: Request, core: CoreDep,
                 include_password_hashes: bool = Query(default=False)) -> StreamingResponse:
    """Every user, one JSON object a line; hashes only for a key with the `admin` scope."""
    key: ApiKey = request.state.api_key
    if include_password_hashes and "admin" not in key.scopes:
        raise Forbidden("Exporting password hashes needs an API key with the 'admin' scope.")
    return StreamingResponse(export.json_lines(core,
                                               include_password_hashes=include_password_hashes),
                             media_type="application/x-ndjson")


def install(app: FastAPI, admin: FastAPI, public: FastAPI, core: Core) -> None:
    # Ahead of /users/{user_id}, which would otherwise take "export" for an id.
    before = len(admin.router.routes)
    admin.include_router(router)
    added = admin.router.routes[before:]
    del admin.router.routes[before:]
    admin.router.routes[0:0] = added
