"""The database layer's promises that no feature test pins down on its own."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from gatepass.db import Database


def test_a_waiting_sqlite_writer_gets_the_lock_as_soon_as_it_is_free(tmp_path: Path) -> None:
    """SQLite's own busy handler sleeps in growing steps (… 25, 50, 100 ms), so a writer
    queued behind a long transaction used to start up to 100 ms after the lock was free.
    Gatepass's writers retry within milliseconds, through the ORM and the plain path alike."""
    db = Database(f"sqlite:///{tmp_path}/busy.db")
    try:
        with db.raw_write() as connection:
            connection.cursor().execute("CREATE TABLE marks (who TEXT, at REAL)")

        for open_writer in ("raw", "session"):
            held = threading.Event()
            released_at = 0.0

            def hold_the_lock() -> None:
                nonlocal released_at
                with db.raw_write():
                    held.set()
                    time.sleep(0.24)  # SQLite's own handler would wake at 328 ms
                    released_at = time.monotonic()

            holder = threading.Thread(target=hold_the_lock)
            holder.start()
            held.wait()
            if open_writer == "raw":
                with db.raw_write() as connection:
                    got_it_at = time.monotonic()
            else:
                with db.write() as session:
                    db.dbapi(session)  # the session begins (BEGIN IMMEDIATE) here
                    got_it_at = time.monotonic()
            holder.join()

            assert got_it_at >= released_at
            assert got_it_at - released_at < 0.04, (open_writer, got_it_at - released_at)
    finally:
        db.dispose()
