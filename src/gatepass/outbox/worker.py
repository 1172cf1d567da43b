"""The outbox worker: claims due messages, hands them to their kind's deliverer, records outcomes.

Several workers (and `serve` processes with the inline worker) may run against one database.
A claim is a lease: `lease_owner` and `lease_until` are set in one short transaction
(PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED`; SQLite: the same statements under
`BEGIN IMMEDIATE`, which serialises writers). A worker killed mid-delivery leaves its leases to
expire, after which another worker delivers again: at least once, never lost.

Rows with a `target` (webhook endpoints) are claimed only at the head of their target's queue
(lowest pending `seq`) and while no other row of the target is leased, so each target has at
most one delivery in flight and sees its messages in order; other targets are not delayed.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import import_module
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.sql import Select

from gatepass.db import new_id, utcnow
from gatepass.outbox import kinds
from gatepass.outbox.kinds import Claimed, Deliverer, Outcome
from gatepass.outbox.models import OutboxAttempt, OutboxMessage

if TYPE_CHECKING:
    from gatepass.core import Core

log = logging.getLogger("gatepass.outbox")

OUTBOX = OutboxMessage.__table__
ATTEMPTS = OutboxAttempt.__table__
BACKOFF_CAP = 6 * 3600.0  # seconds: no wait between two attempts is longer than this
KEPT_WHEN_SCRUBBED = ("template", "from", "to", "subject")
GRACE_SECONDS = 30.0  # on stop, how long in-flight deliveries may finish
FLUSH_DELAY = 0.02  # seconds: outcomes are committed in batches, at most this much later
FLUSH_SIZE = 200


def backoff(attempts: int, base: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: doubling from `base`, ±20 % jitter.

    With the default base of 10 s and 15 attempts, retries spread over about 23 hours.
    """
    delay = min(base * 2 ** max(attempts - 1, 0), BACKOFF_CAP)
    return delay * (rng or random).uniform(0.8, 1.2)


def scrubbed(payload: dict[str, Any]) -> dict[str, Any]:
    """What stays of a sensitive message once it is sent or dead: who, what kind, which subject."""
    kept = {key: payload[key] for key in KEPT_WHEN_SCRUBBED if key in payload}
    return {**kept, "scrubbed": True}


def load_deliverers() -> None:
    """Import every module that registers a deliverer (mail here, webhooks via HOOK_MODULES)."""
    from gatepass import extensions

    import_module("gatepass.mail.smtp")
    for name in extensions.HOOK_MODULES:
        try:
            import_module(name)
        except Exception:  # one broken feature must not stop mail
            log.exception("outbox.hook_import_failed", extra={"module": name})


@dataclass
class _Job:
    claimed: Claimed
    created_at: datetime
    sensitive: bool


@dataclass
class _Result:
    job: _Job
    outcome: Outcome
    started: datetime
    duration_ms: int


class Worker:
    """One process's delivery loop. `start()`/`stop()` for a host app; `run()` until told."""

    def __init__(self, core: Core, *, owner: str | None = None) -> None:
        settings = core.settings
        self.core = core
        self.owner = (owner or f"{socket.gethostname()[:40]}:{os.getpid()}:"
                      f"{secrets.token_hex(4)}")[:64]
        self.concurrency = settings.outbox_concurrency
        self.batch = max(1, min(self.concurrency, 100))
        self.min_claim = max(1, self.concurrency // 4)
        self.lease = timedelta(seconds=settings.outbox_lease_seconds)
        self.poll = settings.outbox_poll_seconds
        self.deliverers: dict[str, Deliverer] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._results: list[_Result] = []
        self._have_results = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._writing = False
        self._rng = random.Random()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="gatepass-outbox-worker")

    def request_stop(self) -> None:
        """Stop claiming; `run()` returns once in-flight deliveries are recorded."""
        self._stopping.set()
        self._wake.set()

    async def stop(self) -> None:
        self.request_stop()
        if self._task is not None:
            await self._task
            self._task = None

    async def run(self) -> None:
        """Deliver until `stop()`; then let in-flight deliveries finish and release the rest."""
        self._open_deliverers()
        recorder = asyncio.create_task(self._record_loop())
        log.info("outbox.worker_started", extra={"owner": self.owner,
                                                 "kinds": sorted(self.deliverers)})
        try:
            while not self._stopping.is_set():
                try:
                    claimed = await self._claim_some()
                except Exception:  # the database is away: keep trying, never die quietly
                    log.exception("outbox.claim_failed")
                    await self._sleep(max(self.poll, 2.0))
                    continue
                if claimed and claimed == self._last_asked and self._free() > 0:
                    continue  # more may be due right now
                await self._sleep()
        finally:
            await self._finish(recorder)

    async def drain(self, timeout: float = 30.0) -> int:
        """Deliver everything due now (and what falls due meanwhile), then return how many
        attempts were made. For tests and one-shot runs."""
        self._open_deliverers()
        recorder = asyncio.create_task(self._record_loop())
        done = 0
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                got = await self._claim_some()
                done += got
                if got == 0 and not (self._inflight or self._results or self._writing):
                    break
                if got == 0:
                    await self._sleep(min(self.poll, 0.05))
        finally:
            await self._finish(recorder)
        return done

    def _open_deliverers(self) -> None:
        if self.deliverers:
            return
        load_deliverers()
        self.deliverers = {kind: factory(self.core) for kind, factory in kinds.DELIVERERS.items()}

    async def _finish(self, recorder: asyncio.Task[None]) -> None:
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._closing = True
        self._have_results.set()
        await recorder
        try:
            await asyncio.to_thread(self._release)
        except Exception:  # the leases expire instead
            log.exception("outbox.release_failed")
        for deliverer in self.deliverers.values():
            try:
                await deliverer.close()
            except Exception:
                log.exception("outbox.deliverer_close_failed")
        self.deliverers = {}

    def _free(self) -> int:
        return self.concurrency - len(self._inflight)

    async def _sleep(self, seconds: float | None = None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds or self.poll)
        except asyncio.TimeoutError:
            pass

    # -- claiming -------------------------------------------------------------------------------

    _last_asked = 0

    async def _claim_some(self) -> int:
        free = self._free()
        if free <= 0 or not self.deliverers or (self._inflight and free < self.min_claim):
            self._last_asked = -1  # claim in batches: fewer, larger transactions
            return 0
        self._last_asked = min(free, self.batch)
        jobs = await asyncio.to_thread(self._claim, self._last_asked)
        if jobs:
            log.debug("outbox.claimed", extra={"count": len(jobs), "owner": self.owner})
        for job in jobs:
            task = asyncio.create_task(self._deliver(job))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(jobs)

    def _due(self, now: datetime) -> Select[Any]:
        earlier = OUTBOX.alias("earlier")
        ahead = exists().where(
            earlier.c.target == OUTBOX.c.target, earlier.c.status == "pending",
            or_(func.coalesce(earlier.c.seq, 0) < func.coalesce(OUTBOX.c.seq, 0),
                and_(func.coalesce(earlier.c.seq, 0) == func.coalesce(OUTBOX.c.seq, 0),
                     earlier.c.id < OUTBOX.c.id)))
        return (select(OUTBOX.c.id)
                .where(OUTBOX.c.status == "pending", OUTBOX.c.kind.in_(list(self.deliverers)),
                       OUTBOX.c.next_attempt_at <= now,
                       or_(OUTBOX.c.lease_until.is_(None), OUTBOX.c.lease_until < now),
                       or_(OUTBOX.c.target.is_(None), ~ahead)))

    def _claim(self, limit: int) -> list[_Job]:
        """Lease up to `limit` due rows that no other worker holds.

        Two statements on purpose: PostgreSQL may re-run an `IN (SELECT … LIMIT … SKIP LOCKED)`
        subquery inside an UPDATE and so exceed the limit.
        """
        now = utcnow()
        due = (self._due(now).order_by(OUTBOX.c.next_attempt_at).limit(limit)
               .with_for_update(skip_locked=True))
        with self.core.db.write() as session:
            ids = session.execute(due).scalars().all()
            if not ids:
                return []
            rows = session.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id.in_(ids), OUTBOX.c.status == "pending",
                       or_(OUTBOX.c.lease_until.is_(None), OUTBOX.c.lease_until < now))
                .values(lease_owner=self.owner, lease_until=now + self.lease,
                        attempts=OUTBOX.c.attempts + 1)
                .returning(OUTBOX.c.id, OUTBOX.c.kind, OUTBOX.c.payload, OUTBOX.c.target,
                           OUTBOX.c.seq, OUTBOX.c.attempts, OUTBOX.c.sensitive,
                           OUTBOX.c.created_at)).all()
        return [_Job(Claimed(id=row.id, kind=row.kind, payload=row.payload, target=row.target,
                             seq=row.seq, attempts=row.attempts - 1),
                     created_at=row.created_at, sensitive=row.sensitive) for row in rows]

    def _release(self) -> None:
        """Give back claims this worker will not finish, so others retry them at once."""
        with self.core.db.write() as session:
            session.execute(update(OUTBOX)
                            .where(OUTBOX.c.lease_owner == self.owner,
                                   OUTBOX.c.status == "pending")
                            .values(lease_owner=None, lease_until=None,
                                    attempts=OUTBOX.c.attempts - 1))

    # -- delivering -----------------------------------------------------------------------------

    async def _deliver(self, job: _Job) -> None:
        started = utcnow()
        clock = time.perf_counter()
        try:
            outcome = await self.deliverers[job.claimed.kind].deliver(job.claimed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a deliverer bug must not lose the message: retry it later
            log.exception("outbox.deliverer_error", extra={"message_id": job.claimed.id,
                                                           "kind": job.claimed.kind})
            outcome = Outcome("retry", detail=f"{type(exc).__name__} in the deliverer")
        duration_ms = int((time.perf_counter() - clock) * 1000)
        self._results.append(_Result(job, outcome, started, duration_ms))
        self._have_results.set()

    # -- recording ------------------------------------------------------------------------------

    def _take_results(self) -> list[_Result]:
        results, self._results = self._results, []
        self._have_results.clear()
        return results

    async def _record_loop(self) -> None:
        """Write finished deliveries in batches: one transaction for all that finished meanwhile."""
        while True:
            await self._have_results.wait()
            if not self._closing and len(self._results) < FLUSH_SIZE:
                await asyncio.sleep(FLUSH_DELAY)  # gather what finishes meanwhile: one commit
            results = self._take_results()
            if results:
                self._writing = True
                try:
                    await asyncio.to_thread(self._write_results, results)
                except Exception:
                    log.exception("outbox.record_failed")
                    if not self._closing:  # keep them and try again; at worst leases expire
                        self._results[:0] = results
                        self._have_results.set()
                        await asyncio.sleep(1)
                finally:
                    self._writing = False
                self._wake.set()  # a target's next message may be due now
            if self._closing and not self._results:
                return

    def _write_results(self, results: list[_Result]) -> None:
        if not results:
            return
        now = utcnow()
        max_attempts = self.core.settings.outbox_max_attempts
        base = self.core.settings.outbox_retry_base_seconds
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        attempts: list[dict[str, Any]] = []
        finished: list[tuple[_Result, str]] = []
        for result in results:
            claimed, outcome = result.job.claimed, result.outcome
            made = claimed.attempts + 1
            status = outcome.status
            if status == "retry" and made >= max_attempts:
                status = "dead"
            row: dict[str, Any] = {"b_id": claimed.id,
                                   "b_status": "pending" if status == "retry" else status,
                                   "b_lease_owner": None, "b_lease_until": None}
            if status == "sent":
                row["b_delivered_at"] = now
                row["b_last_error"] = None
            else:
                row["b_last_error"] = _clip(outcome.detail)
            if status == "retry":
                delay = (outcome.retry_after if outcome.retry_after is not None
                         else backoff(made, base, self._rng))
                row["b_next_attempt_at"] = now + timedelta(seconds=max(delay, 0.0))
            if status != "retry" and result.job.sensitive:
                row["b_payload"] = scrubbed(claimed.payload)
            groups.setdefault(tuple(sorted(row)), []).append(row)
            attempts.append({"id": new_id(), "message_id": claimed.id,
                             "attempted_at": result.started, "outcome": outcome.status,
                             "duration_ms": result.duration_ms,
                             "status_code": outcome.status_code,
                             "detail": _clip(outcome.detail)})
            finished.append((result, status))
        with self.core.db.write() as session:
            for keys, rows in groups.items():
                values = {key[2:]: bindparam(key) for key in keys if key != "b_id"}
                session.execute(update(OUTBOX)
                                .where(OUTBOX.c.id == bindparam("b_id"),
                                       OUTBOX.c.status == "pending")
                                .values(**values), rows)
            session.execute(insert(ATTEMPTS), attempts)
        for result, status in finished:
            self._observe(result, status, now)

    def _observe(self, result: _Result, status: str, now: datetime) -> None:
        claimed = result.job.claimed
        metrics = self.core.metrics
        metrics.deliveries.labels(claimed.kind, result.outcome.status).inc()
        if status == "sent":
            latency = (now - result.job.created_at).total_seconds()
            metrics.delivery_latency.labels(claimed.kind).observe(max(latency, 0.0))
        elif status == "dead":
            if result.outcome.status != "dead":
                metrics.deliveries.labels(claimed.kind, "dead").inc()
            log.warning(f"{claimed.kind}.failed", extra={
                "message_id": claimed.id, "kind": claimed.kind,
                "template": claimed.payload.get("template"), "attempts": claimed.attempts + 1,
                "status_code": result.outcome.status_code,
                "reason": _clip(result.outcome.detail, 300)})


def _clip(text: str | None, limit: int = 1000) -> str | None:
    return None if text is None else text[:limit]


def register_depth_gauge(core: Core) -> None:
    """`gatepass_outbox_depth{kind,status}`: pending and dead messages, read at scrape time."""
    if getattr(core, "_outbox_gauge", False):
        return

    def read() -> dict[tuple[str, ...], float]:
        with core.db.read() as session:
            rows = session.execute(
                select(OUTBOX.c.kind, OUTBOX.c.status, func.count())
                .where(OUTBOX.c.status.in_(("pending", "dead")))
                .group_by(OUTBOX.c.kind, OUTBOX.c.status)).all()
        values: dict[tuple[str, ...], float] = {("mail", "pending"): 0.0, ("mail", "dead"): 0.0}
        values.update({(kind, status): float(count) for kind, status, count in rows})
        return values

    core.metrics.gauge("gatepass_outbox_depth", "Outbox messages waiting (pending) or given up "
                       "(dead), by kind", ["kind", "status"], read)
    core._outbox_gauge = True  # type: ignore[attr-defined]


def deliver_pending(core: Core, timeout: float = 30.0) -> int:
    """Run one worker until nothing is due; returns the attempts made.

    For tests and scripts whose settings say `GATEPASS_WORKER=external`. Runs on a thread of
    its own, so it also works where this thread already has an event loop.
    """
    async def main() -> int:
        return await Worker(core).drain(timeout)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="drain") as pool:
        return pool.submit(asyncio.run, main()).result()
