"""What the benchmarks share (they run as scripts, so this sits beside them)."""

from __future__ import annotations

import argparse
import os
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def add_database_option(parser: argparse.ArgumentParser, default_postgres: str) -> None:
    """--database-url: a SQLAlchemy URL, or `sqlite` for a file in the run's own folder;
    GATEPASS_BENCH_DATABASE_URL sets the default."""
    parser.add_argument("--database-url",
                        default=os.environ.get("GATEPASS_BENCH_DATABASE_URL", default_postgres))


def database_url(option: str, var_dir: str) -> str:
    return f"sqlite:///{var_dir}/bench.db" if option == "sqlite" else option


def fresh_database(url: str) -> None:
    """A PostgreSQL URL's database dropped and created again, so every run starts empty
    (a SQLite URL names a new file in the run's own folder already)."""
    if not url.startswith("postgresql"):
        return
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        connection.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
    admin.dispose()
