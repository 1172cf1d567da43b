"""Migrations: `gatepass migrate` builds exactly the schema the models describe."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gatepass.models import Base


def test_migrations_build_the_schema_the_models_describe(database_url: str) -> None:
    """Upgraded to every head, SQLite and PostgreSQL differ from the models in nothing:
    no missing or extra table, column or index."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})

            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()

    assert differences == []
