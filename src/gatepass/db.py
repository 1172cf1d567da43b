"""Engine, sessions and the column types every model shares."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections import namedtuple
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import (JSON, DateTime, Dialect, Engine, Executable, MetaData, String,
                        create_engine, event, text)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC, hands back timezone-aware datetimes on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
        str: String(255),
    }


BUSY_TIMEOUT_MS = 30_000


def begin_immediate(driver: Any) -> None:
    """BEGIN IMMEDIATE on a pysqlite connection: take SQLite's write lock, waiting up to
    BUSY_TIMEOUT_MS for it.

    SQLite's own busy handler waits in growing sleeps (1, 2, 5, 10 … 100 ms), so a writer that
    finds the lock taken often sleeps long after it was freed, while writers that keep
    arriving take it first: behind a busy writer (an import, a burst of events) a webhook
    worker or a sign-in could wait a second. Here the BEGIN fails at once when the lock is
    taken (busy_timeout 0 for that statement alone) and is retried every 0.2-2 ms. Other
    statements keep the full busy timeout: in WAL mode they rarely wait, and then briefly."""
    driver.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.0002
        while True:
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 1.5, 0.002)
    finally:
        driver.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
            max_overflow=40, **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN itself, so writes can BEGIN IMMEDIATE:
            # a deferred transaction that reads and then writes can fail with "database is
            # locked" without waiting; an immediate one queues behind the writer instead.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # Straight to the driver: SQLAlchemy tracks no transaction state of pysqlite's
            # here, and its execution machinery would cost more than the BEGIN itself.
            driver = connection.connection.driver_connection
            if connection.get_execution_options().get("sqlite_begin") == "IMMEDIATE":
                begin_immediate(driver)
            else:
                driver.execute("BEGIN DEFERRED")

        return engine
    return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True, **kwargs)


class Database:
    """One engine and two kinds of transaction: `write()` for use cases, `read()` for queries."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.is_local = self.dialect == "sqlite"  # a file in this process, not a server
        self._loop_connections: dict[int, Any] = {}  # by event loop thread
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(bind=writer, expire_on_commit=False, autoflush=True)
        self._read = sessionmaker(bind=self.engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One use case, one transaction: commit on success, roll back on any exception."""
        from gatepass.events.service import log_committed, write_pending

        session = self._write()
        try:
            yield session
            write_pending(session)  # the events go last: see events.service.SEQ_LOCK
            session.commit()
            log_committed(session)
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def read(self) -> Iterator[Session]:
        session = self._read()
        try:
            yield session
        finally:
            session.close()  # ends the transaction; loaded objects stay readable

    def prepared(self, statement: Executable) -> Prepared:
        return prepared(self.engine.dialect, statement)

    @staticmethod
    def dbapi(session: Session) -> Any:
        """The DBAPI connection under `session`'s transaction, for `Prepared` statements that
        must commit or roll back with the session's other work."""
        return session.connection().connection.driver_connection

    @contextmanager
    def raw_write(self) -> Iterator[Any]:
        """A DBAPI connection in a write transaction (BEGIN IMMEDIATE on SQLite, as `write`),
        committed on success, for use cases made of `Prepared` statements alone."""
        connection = self.engine.raw_connection()
        try:
            if self.dialect == "sqlite":
                begin_immediate(connection.driver_connection)
            yield connection
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            connection.close()

    @contextmanager
    def raw(self, *, on_loop: bool = False) -> Iterator[Any]:
        """A pooled DBAPI connection for `Prepared` reads, each statement its own transaction
        (no BEGIN and ROLLBACK round trips to a server around a single read).

        `on_loop`: the caller is the event loop, which reads a local database one statement at a
        time; it keeps one connection for good instead of a pool check-out per request."""
        if on_loop and self.is_local:
            kept = self._loop_connections.get(threading.get_ident())
            if kept is None:
                kept = self._loop_connections[threading.get_ident()] = \
                    self.engine.raw_connection()
            yield kept
            return
        connection = self.engine.raw_connection()
        driver = connection.driver_connection
        try:
            if not self.is_local:
                driver.autocommit = True
            yield connection
        finally:
            if not self.is_local and not driver.closed:
                driver.autocommit = False
            connection.close()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        for kept in self._loop_connections.values():
            kept.close()
        self._loop_connections.clear()
        self.engine.dispose()


class Prepared:
    """A statement compiled once for one database and run straight on a DBAPI connection.

    For the few statements every visitor causes (the session lookup, sign-in): SQLAlchemy's
    per-execution machinery costs many times such a statement. The column types' own
    processors encode the parameters and decode the rows, so values are what the ORM would
    hand back (aware datetimes, booleans, parsed JSON). Every bound parameter must be given:
    column defaults and `onupdate` are not applied here.
    """

    def __init__(self, dialect: Dialect, statement: Executable,
                 columns: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=columns)
        self.sql = str(compiled)
        self._positional = bool(dialect.positional)
        names = list(compiled.positiontup or ()) if self._positional else list(compiled.binds)
        self._params = [(name, compiled.binds[name].value,
                         compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                        for name in names]
        returned = list(getattr(statement, "exported_columns", ()))  # selected or RETURNING
        self._decoders = [column.type.dialect_impl(dialect).result_processor(dialect, None)
                          for column in returned]
        self._row = namedtuple("Row", [column.key for column in returned])  # type: ignore[misc]

    def _encode(self, params: dict[str, Any]) -> Any:
        values = []
        for name, literal, encode in self._params:
            value = params[name] if name in params else literal
            values.append(value if encode is None or value is None else encode(value))
        return values if self._positional \
            else dict(zip((name for name, _, _ in self._params), values))

    def _run(self, connection: Any, params: dict[str, Any]) -> Any:
        cursor = connection.cursor()
        cursor.execute(self.sql, self._encode(params))
        return cursor

    def execute_many(self, connection: Any, rows: Sequence[dict[str, Any]]) -> None:
        """Run an INSERT or UPDATE once per row of parameters (the driver's executemany)."""
        cursor = connection.cursor()
        try:
            cursor.executemany(self.sql, [self._encode(row) for row in rows])
        finally:
            cursor.close()

    def fetch(self, connection: Any, **params: Any) -> list[Any]:
        cursor = self._run(connection, params)
        try:
            rows = cursor.fetchall()
        finally:
            cursor.close()
        decoders = self._decoders
        return [self._row(*[value if decode is None or value is None else decode(value)
                            for decode, value in zip(decoders, row)]) for row in rows]

    def execute(self, connection: Any, **params: Any) -> int:
        """Run an INSERT or UPDATE; the number of rows it touched."""
        cursor = self._run(connection, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()


_PREPARED: WeakKeyDictionary[Dialect, dict[int, Prepared]] = WeakKeyDictionary()


def prepared(dialect: Dialect, statement: Executable,
             columns: Sequence[str] | None = None) -> Prepared:
    """`statement` compiled for `dialect`, once (such statements are module constants).
    `columns` names the columns an INSERT gives; the others take their server defaults."""
    known = _PREPARED.setdefault(dialect, {})
    found = known.get(id(statement))
    if found is None:
        found = known[id(statement)] = Prepared(dialect, statement, columns)
    return found


def lock_key(session: Session, key: str) -> None:
    """Serialise transactions that touch the same natural key (e.g. an email address).

    SQLite already serialises writers with BEGIN IMMEDIATE; PostgreSQL takes a
    transaction-scoped advisory lock.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
