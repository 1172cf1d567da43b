"""Outbox wiring for the web process: the depth gauge, and the inline worker.

With `GATEPASS_WORKER=inline` (the default) each `serve` process delivers in the background;
with `external` only `gatepass worker` processes do.
"""

from __future__ import annotations

from typing import Any

from gatepass.core import Core
from gatepass.outbox.worker import Worker, register_depth_gauge


def install(app: Any, admin: Any, public: Any, core: Core) -> None:
    register_depth_gauge(core)
    if core.settings.worker != "inline":
        return
    holder: dict[str, Worker] = {}

    async def start() -> None:
        holder["worker"] = Worker(core)
        await holder["worker"].start()

    async def stop() -> None:
        worker = holder.pop("worker", None)
        if worker is not None:
            await worker.stop()

    app.state.on_start.append(start)
    app.state.on_stop.append(stop)
