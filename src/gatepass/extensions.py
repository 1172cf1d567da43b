"""Features that add routes, pages or background work register here.

Each module named below defines `install(app, admin, public, core)`: `app` is the main app
(pages), `admin` the /admin/api/v1 app, `public` the /api/v1 app. Background work goes into
`app.state.on_start` / `app.state.on_stop` (lists of async callables).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

HOOK_MODULES: list[str] = [
    "gatepass.external.routes",
    "gatepass.importer.routes",
    "gatepass.invitations.routes",
    "gatepass.accounts.routes",
    "gatepass.webhooks.routes",
    "gatepass.outbox.hook",
    "gatepass.registration.routes",
    "gatepass.recovery.routes",
]


def hooks() -> list[Any]:
    return [import_module(name).install for name in HOOK_MODULES]
