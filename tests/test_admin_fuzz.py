"""Schemathesis fuzzes the admin API from its own OpenAPI document: no input gives a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from gatepass.app import create_app
from gatepass.auth import service as auth
from gatepass.core import Core

MAX_EXAMPLES = 20  # per operation: bounded, so the suite stays fast


@schemathesis.serializer("application/x-ndjson", "application/jsonl")
def _json_lines(_ctx: Any, value: Any) -> bytes:
    """Import bodies are JSON Lines: one generated object (or anything) a line."""
    import json

    rows = value if isinstance(value, list) else [value]
    return "\n".join(json.dumps(row) for row in rows).encode()


@pytest.fixture
def backend() -> str:
    """The server-error hunt runs on SQLite; the API tests cover PostgreSQL."""
    return "sqlite"


def test_no_input_makes_the_admin_api_fail(core: Core) -> None:
    """Every operation of /admin/api/v1/openapi.json, with generated paths, queries and bodies,
    answers below 500."""
    app = create_app(core.settings, core=core)
    _, raw = auth.create_api_key(core, "fuzz", ["admin"])
    schema = schemathesis.openapi.from_asgi("/admin/api/v1/openapi.json", app)
    headers = {"Authorization": f"Bearer {raw}"}
    failures: list[str] = []
    operations = 0

    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            response = case.call(headers=headers)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} "
                                f"{case.as_curl_command()}")

        fuzz()

    assert operations >= 15
    assert failures == []
