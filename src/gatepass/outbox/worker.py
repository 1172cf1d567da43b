"""The outbox worker: claims due messages, hands them to their kind's deliverer, records outcomes.

Several workers (and `serve` processes with the inline worker) may run against one database.
A claim is a lease: `lease_owner` and `lease_until` are set in one short transaction
(PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED`; SQLite: the same statements under
`BEGIN IMMEDIATE`, which serialises writers). A worker killed mid-delivery leaves its leases to
expire, after which another worker delivers again: at least once, never lost.

Rows with a `target` (webhook endpoints) form one queue per target, in `seq` order. A target is
claimed only at its head (its lowest pending row, due and not leased), and then as a *run*: the
head and the rows after it, up to GATEPASS_OUTBOX_RUN_SIZE, under one lease. One task delivers
the run back to back, in order, and stops at the first message that is not sent; the rest are
handed back untouched, still in order. So each target has at most one delivery in flight and
sees its messages in order, other targets are not delayed, and a backlog costs one claim per
run instead of one per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, insert, or_, select, tuple_, union_all, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session
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
RUN_LEASE_SHARE = 0.5  # a run hands back what it has not reached once this much lease is spent
PREFETCH_SHARE = 0.5  # a target's next run is leased when this much of the current one is left
CLAIM_ROWS = 500  # ids per statement when leasing or handing back


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


@dataclass
class _Head:
    """A target's lowest pending row, as read when claiming."""

    id: str
    target: str
    due: datetime


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
        self.run_size = settings.outbox_run_size
        self.lease = timedelta(seconds=settings.outbox_lease_seconds)
        self.poll = settings.outbox_poll_seconds
        self.deliverers: dict[str, Deliverer] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._results: list[_Result] = []
        self._handed_back: list[str] = []  # ids of claimed rows a run did not reach
        self._run_ended = False  # a run (or single message) finished since the last flush
        self.attempted = 0  # delivery attempts made, for drain()
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
        before = self.attempted
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                got = await self._claim_some()
                if got == 0 and not (self._inflight or self._results or self._handed_back
                                     or self._writing):
                    break
                if got == 0:
                    await self._sleep(min(self.poll, 0.05))
        finally:
            await self._finish(recorder)
        return self.attempted - before

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
        runs = await asyncio.to_thread(self._claim, self._last_asked)
        if runs:
            log.debug("outbox.claimed", extra={"count": sum(map(len, runs)), "runs": len(runs),
                                               "owner": self.owner})
        for run in runs:
            task = asyncio.create_task(self._deliver(run))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(runs)

    def _claim(self, limit: int) -> list[list[_Job]]:
        """Lease up to `limit` claims, the longest-due first: rows without a target one by one,
        and for each target whose head is due, a run of up to `run_size` rows from its head.

        Selecting and leasing are separate statements on purpose: PostgreSQL may re-run an
        `IN (SELECT … LIMIT … SKIP LOCKED)` subquery inside an UPDATE and so exceed the limit.
        """
        now = utcnow()
        with self.core.db.write() as session:
            return self._lease(session, now, self._plan(session, now, limit))

    def _lease(self, session: Session, now: datetime, planned: list[list[str]]
               ) -> list[list[_Job]]:
        """Lease the planned runs' rows; a row that changed since it was read (sent, dead, or
        taken) ends its run there, and what follows it is handed back: it must not overtake."""
        wanted = [row_id for run in planned for row_id in run]
        rows: dict[str, Any] = {}
        for chunk in _chunks(wanted, CLAIM_ROWS):
            rows.update((row.id, row) for row in session.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id.in_(chunk), OUTBOX.c.status == "pending",
                       or_(OUTBOX.c.lease_until.is_(None), OUTBOX.c.lease_until < now))
                .values(lease_owner=self.owner, lease_until=now + self.lease,
                        attempts=OUTBOX.c.attempts + 1)
                .returning(OUTBOX.c.id, OUTBOX.c.kind, OUTBOX.c.payload, OUTBOX.c.target,
                           OUTBOX.c.seq, OUTBOX.c.attempts, OUTBOX.c.sensitive,
                           OUTBOX.c.created_at)))
        runs: list[list[_Job]] = []
        cut: list[str] = []
        for run in planned:
            leased = next((n for n, row_id in enumerate(run) if row_id not in rows), len(run))
            cut += [row_id for row_id in run[leased:] if row_id in rows]
            if leased:
                runs.append([_job(rows[row_id]) for row_id in run[:leased]])
        if cut:
            self._hand_back(session, cut)
        return runs

    def _plan(self, session: Session, now: datetime, limit: int) -> list[list[str]]:
        """The ids to lease, as runs in delivery order, the longest-due first."""
        kinds_ = list(self.deliverers)
        free = or_(OUTBOX.c.lease_until.is_(None), OUTBOX.c.lease_until < now)
        singles = session.execute(
            select(OUTBOX.c.id, OUTBOX.c.next_attempt_at)
            .where(OUTBOX.c.status == "pending", OUTBOX.c.target.is_(None),
                   OUTBOX.c.kind.in_(kinds_), OUTBOX.c.next_attempt_at <= now, free)
            .order_by(OUTBOX.c.next_attempt_at).limit(limit)
            .with_for_update(skip_locked=True)).all()
        heads = [_Head(row.id, row.target, row.next_attempt_at)
                 for row in session.execute(_heads_query())
                 if row.kind in self.deliverers and row.next_attempt_at <= now
                 and (row.lease_until is None or row.lease_until < now)]
        heads = sorted(heads, key=lambda head: head.due)[:limit]
        if heads and self.core.db.dialect == "postgresql":
            # Whoever locks a target's head owns its run for this transaction; others skip it.
            won = set(session.execute(
                select(OUTBOX.c.id)
                .where(OUTBOX.c.id.in_([head.id for head in heads]),
                       OUTBOX.c.status == "pending", free)
                .with_for_update(skip_locked=True)).scalars())
            heads = [head for head in heads if head.id in won]
        candidates = [(row.next_attempt_at, [row.id]) for row in singles]
        candidates += [(head.due, run) for head, run in self._runs(session, heads, now)]
        candidates.sort(key=lambda candidate: candidate[0])
        return [run for _, run in candidates[:limit]]

    def _runs(self, session: Session, heads: list[_Head],
              now: datetime) -> list[tuple[_Head, list[str]]]:
        """Each head with the rows that follow it in its target's queue, up to `run_size`,
        as far as they are due, unleased and of a kind this worker delivers."""
        if self.run_size == 1 or not heads:
            return [(head, [head.id]) for head in heads]
        queues = [select(OUTBOX.c.id, OUTBOX.c.target, OUTBOX.c.kind, OUTBOX.c.next_attempt_at,
                         OUTBOX.c.lease_until)
                  .where(OUTBOX.c.status == "pending", OUTBOX.c.target == head.target)
                  .order_by(OUTBOX.c.seq, OUTBOX.c.id).limit(self.run_size).subquery()
                  for head in heads]
        rows: dict[str, list[Any]] = {}
        for chunk in _chunks(queues, 100):  # SQLite allows 500 terms in one compound SELECT
            for row in session.execute(union_all(*(select(queue) for queue in chunk))):
                rows.setdefault(row.target, []).append(row)
        runs = []
        for head in heads:
            queue = rows.get(head.target, [])
            if not queue or queue[0].id != head.id:
                continue  # the queue moved since its head was read: next time
            runs.append((head, self._deliverable(queue, now)))
        return runs

    def _deliverable(self, queue: list[Any], now: datetime) -> list[str]:
        """The ids from the front of a target's queue that may go now: due, not leased, and of
        a kind this worker delivers. The first row that may not ends the run."""
        run = []
        for row in queue:
            if (row.kind not in self.deliverers or row.next_attempt_at > now
                    or (row.lease_until is not None and row.lease_until >= now)):
                break
            run.append(row.id)
        return run

    def _extend(self, last: Claimed) -> list[_Job]:
        """Lease the run that follows `last` in its target's queue. No walk over heads needed:
        this worker still holds the target's head (the run in flight), so no other worker
        claims the target meanwhile. Read first, outside any write transaction: most of the
        time there is nothing new, and SQLite's one write lock is left to the use cases."""
        with self.core.db.read() as session:
            queue = list(session.execute(
                select(OUTBOX.c.id, OUTBOX.c.kind, OUTBOX.c.next_attempt_at,
                       OUTBOX.c.lease_until)
                .where(OUTBOX.c.status == "pending", OUTBOX.c.target == last.target,
                       tuple_(OUTBOX.c.seq, OUTBOX.c.id) > tuple_(last.seq, last.id))
                .order_by(OUTBOX.c.seq, OUTBOX.c.id).limit(self.run_size)))
        now = utcnow()
        run = self._deliverable(queue, now)
        if not run:
            return []
        with self.core.db.write() as session:
            if self.core.db.dialect == "postgresql":
                # Never wait on a row another transaction holds (a claim that read this
                # target's head just as the run before was recorded): stop before it.
                locked = set(session.execute(
                    select(OUTBOX.c.id).where(OUTBOX.c.id.in_(run))
                    .with_for_update(skip_locked=True)).scalars())
                run = run[:next((n for n, row_id in enumerate(run) if row_id not in locked),
                                len(run))]
            runs = self._lease(session, now, [run])
        return runs[0] if runs else []

    def _hand_back(self, session: Session, ids: list[str]) -> None:
        """Release claimed rows that were not attempted: due again at once, attempt uncounted."""
        for chunk in _chunks(ids, CLAIM_ROWS):
            session.execute(update(OUTBOX)
                            .where(OUTBOX.c.id.in_(chunk), OUTBOX.c.status == "pending",
                                   OUTBOX.c.lease_owner == self.owner)
                            .values(lease_owner=None, lease_until=None,
                                    attempts=OUTBOX.c.attempts - 1))

    def _release(self) -> None:
        """Give back claims this worker will not finish, so others retry them at once."""
        with self.core.db.write() as session:
            session.execute(update(OUTBOX)
                            .where(OUTBOX.c.lease_owner == self.owner,
                                   OUTBOX.c.status == "pending")
                            .values(lease_owner=None, lease_until=None,
                                    attempts=OUTBOX.c.attempts - 1))

    # -- delivering -----------------------------------------------------------------------------

    async def _deliver(self, run: list[_Job]) -> None:
        """Deliver a run in order. Stop at the first message that is not sent (or that ended
        its target), on stop, or once half the lease is spent, and hand the rest back.

        While a run goes well, the target's next messages (those queued meanwhile) are leased
        before it ends, so a busy endpoint's messages flow on without a pause between runs,
        until half the first lease is spent; then the target goes back in line."""
        hand_back_at = time.monotonic() + self.lease.total_seconds() * RUN_LEASE_SHARE
        following: asyncio.Task[list[_Job]] | None = None
        first = run[0]
        try:
            while run:
                ahead = len(run) - max(1, int(len(run) * PREFETCH_SHARE))
                for n, job in enumerate(run):
                    if job is not first and (self._stopping.is_set()
                                             or time.monotonic() > hand_back_at):
                        await self._give_back(run[n:], following)
                        return
                    if (n == ahead and following is None and job.claimed.target is not None
                            and job.claimed.seq is not None and not self._stopping.is_set()
                            and time.monotonic() < hand_back_at):
                        following = asyncio.create_task(self._next_run(run[-1].claimed))
                    result = await self._attempt(job)
                    self._results.append(result)
                    self._have_results.set()
                    outcome = result.outcome
                    if outcome.status == "retry" or outcome.disable_target:
                        await self._give_back(run[n + 1:], following)
                        return
                run = await following if following is not None else []
                following = None
        finally:
            self._run_ended = True
            self._have_results.set()

    async def _next_run(self, last: Claimed) -> list[_Job]:
        try:
            run = await asyncio.to_thread(self._extend, last)
        except Exception:  # the database is away: the target goes back in line
            log.exception("outbox.claim_failed")
            return []
        if run:
            log.debug("outbox.claimed", extra={"count": len(run), "runs": 1, "owner": self.owner})
        return run

    async def _give_back(self, rest: list[_Job],
                         following: asyncio.Task[list[_Job]] | None) -> None:
        """Hand back the rest of a run, and the next run if it was already leased."""
        self._handed_back += [job.claimed.id for job in rest]
        if following is not None:
            self._handed_back += [job.claimed.id for job in await following]
        self._have_results.set()

    async def _attempt(self, job: _Job) -> _Result:
        self.attempted += 1
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
        return _Result(job, outcome, started, duration_ms)

    # -- recording ------------------------------------------------------------------------------

    def _take_results(self) -> tuple[list[_Result], list[str], bool]:
        taken = self._results, self._handed_back, self._run_ended
        self._results, self._handed_back, self._run_ended = [], [], False
        self._have_results.clear()
        return taken

    async def _record_loop(self) -> None:
        """Write finished deliveries in batches: one transaction for all that finished meanwhile
        (other targets' runs often end within the same few milliseconds)."""
        while True:
            await self._have_results.wait()
            if not self._closing and len(self._results) < FLUSH_SIZE:
                await asyncio.sleep(FLUSH_DELAY)  # gather what finishes meanwhile: one commit
            results, handed_back, run_ended = self._take_results()
            if results or handed_back:
                self._writing = True
                try:
                    await asyncio.to_thread(self._write_results, results, handed_back)
                except Exception:
                    log.exception("outbox.record_failed")
                    if not self._closing:  # keep them and try again; at worst leases expire
                        self._results[:0] = results
                        self._handed_back[:0] = handed_back
                        self._run_ended = self._run_ended or run_ended
                        self._have_results.set()
                        await asyncio.sleep(1)
                        continue
                finally:
                    self._writing = False
            if run_ended:
                self._wake.set()  # that target's next run may be claimed now
            if self._closing and not self._results and not self._handed_back:
                return

    def _write_results(self, results: list[_Result], handed_back: list[str] | None = None) -> None:
        if not results and not handed_back:
            return
        now = utcnow()
        max_attempts = self.core.settings.outbox_max_attempts
        base = self.core.settings.outbox_retry_base_seconds
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        sent: list[str] = []  # plainly sent: all alike, so one UPDATE … WHERE id IN (…)
        attempts: list[dict[str, Any]] = []
        finished: list[tuple[_Result, str]] = []
        for result in results:
            claimed, outcome = result.job.claimed, result.outcome
            made = claimed.attempts + 1
            status = outcome.status
            if status == "retry" and made >= max_attempts:
                status = "dead"
            attempts.append({"id": new_id(), "message_id": claimed.id,
                             "attempted_at": result.started, "outcome": outcome.status,
                             "duration_ms": result.duration_ms,
                             "status_code": outcome.status_code,
                             "detail": _clip(outcome.detail)})
            finished.append((result, status))
            if status == "sent" and not result.job.sensitive:
                sent.append(claimed.id)
                continue
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
        with self.core.db.write() as session:
            for chunk in _chunks(sent, CLAIM_ROWS):
                session.execute(update(OUTBOX)
                                .where(OUTBOX.c.id.in_(chunk), OUTBOX.c.status == "pending")
                                .values(status="sent", delivered_at=now, last_error=None,
                                        lease_owner=None, lease_until=None))
            for keys, rows in groups.items():
                values = {key[2:]: bindparam(key) for key in keys if key != "b_id"}
                session.execute(update(OUTBOX)
                                .where(OUTBOX.c.id == bindparam("b_id"),
                                       OUTBOX.c.status == "pending")
                                .values(**values), rows)
            if attempts:
                session.execute(insert(ATTEMPTS), attempts)
            if handed_back:
                self._hand_back(session, handed_back)
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


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _job(row: Row[Any]) -> _Job:
    return _Job(Claimed(id=row.id, kind=row.kind, payload=row.payload, target=row.target,
                        seq=row.seq, attempts=row.attempts - 1),
                created_at=row.created_at, sensitive=row.sensitive)


@cache
def _heads_query() -> Select[Any]:
    """Each target's lowest pending row (its head), whatever its due time or lease.

    The targets are found by a loose index scan of ix_outbox_queue, a recursive walk from one
    target to the next, so the cost grows with the number of targets, not with the length of
    their queues: an endpoint that has been down for a day costs no more than an idle one.
    """
    def first_after(previous: Any) -> Any:
        later = OUTBOX.alias("later")
        query = select(later.c.target).where(later.c.status == "pending")
        query = query.where(later.c.target.is_not(None) if previous is None
                            else later.c.target > previous)
        return query.order_by(later.c.target).limit(1).scalar_subquery()

    targets = select(first_after(None).label("target")).cte("targets", recursive=True)
    targets = targets.union_all(select(first_after(targets.c.target))
                                .where(targets.c.target.is_not(None)))
    queue = OUTBOX.alias("queue")
    head = (select(queue.c.id).where(queue.c.status == "pending",
                                     queue.c.target == targets.c.target)
            .order_by(queue.c.seq, queue.c.id).limit(1).correlate(targets).scalar_subquery())
    return (select(OUTBOX.c.id, OUTBOX.c.target, OUTBOX.c.kind, OUTBOX.c.next_attempt_at,
                   OUTBOX.c.lease_until)
            .where(OUTBOX.c.id.in_(select(head).where(targets.c.target.is_not(None)))))


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
