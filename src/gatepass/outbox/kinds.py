"""What the outbox worker needs from each kind of message it delivers (mail, webhook).

A feature registers a factory for its kind; the worker builds one deliverer per process and
calls `deliver` for each claimed message. Rows of kind "webhook" carry the endpoint id in
`target` and the event's `seq`: the worker keeps at most one delivery per target in flight and
delivers a target's messages in `seq` order, so one slow receiver never delays the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from gatepass.core import Core


@dataclass(frozen=True)
class Outcome:
    status: Literal["sent", "retry", "dead"]
    detail: str | None = None  # server reply or response excerpt; never a message body
    status_code: int | None = None
    retry_after: float | None = None  # seconds; overrides the backoff when the peer asked
    disable_target: bool = False  # e.g. a webhook endpoint answered 410 Gone


@dataclass(frozen=True)
class Claimed:
    id: str
    kind: str
    payload: dict[str, Any]
    target: str | None
    seq: int | None
    attempts: int  # attempts made before this one


class Deliverer(Protocol):
    async def deliver(self, message: Claimed) -> Outcome: ...

    async def close(self) -> None: ...


DELIVERERS: dict[str, Callable[[Core], Deliverer]] = {}


def register(kind: str, factory: Callable[[Core], Deliverer]) -> None:
    DELIVERERS[kind] = factory
