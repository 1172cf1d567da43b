"""Who caused a change, carried from the edge (HTTP, CLI) into every use case and event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TriggeredBy = Literal["admin_api", "portal", "invitation", "external_login", "cli", "import",
                      "system"]


@dataclass(frozen=True)
class Context:
    triggered_by: TriggeredBy
    actor_type: str | None = None  # "api_key" | "user" | "cli" | "system"
    actor_id: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_event_context(self) -> dict[str, Any]:
        actor = {"type": self.actor_type, "id": self.actor_id} if self.actor_type else None
        return {"triggered_by": self.triggered_by, "actor": actor,
                "ip_address": self.ip_address, "user_agent": self.user_agent}

    def but(self, **changes: Any) -> Context:
        values = {**self.__dict__, **changes}
        return Context(**values)


CLI = Context(triggered_by="cli", actor_type="cli", actor_id="cli")
SYSTEM = Context(triggered_by="system", actor_type="system")
