"""Operations (CONTRACT §8): health, Prometheus metrics, JSON logs without secrets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from gatepass.app import create_app
from gatepass.auth.models import UserSession
from gatepass.context import CLI
from gatepass.core import Core, build_core
from gatepass.logs import JsonFormatter
from gatepass.settings import Settings
from gatepass.users import service as users
from gatepass.users.schemas import UserCreate

from conftest import free_port

PASSWORD = "correct horse battery staple"


def test_healthz_answers_ok(client: TestClient) -> None:
    """/healthz says ok while the database answers."""
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_healthz_is_503_when_the_database_is_gone(tmp_path: Path) -> None:
    """With no database to answer (a PostgreSQL URL to a closed port), /healthz says 503."""
    settings = Settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
                        var_dir=tmp_path, secret_key="k" * 40, worker="external")
    core = build_core(settings)

    with TestClient(create_app(settings, core=core), raise_server_exceptions=False) as client:
        response = client.get("/healthz")

    assert response.status_code == 503
    assert response.json()["status"] != "ok"


def test_metrics_count_requests_signins_and_hash_time(core: Core, client: TestClient) -> None:
    """/metrics shows requests by route and status, sign-ins by outcome and hash timings."""
    users.create_user(core, CLI, UserCreate(username="reeta", password=PASSWORD,
                                            password_expired=False))
    client.post("/api/v1/auth/signin", json={"login": "reeta", "password": PASSWORD})
    client.post("/api/v1/auth/signin", json={"login": "reeta", "password": "wrong password"})
    client.get("/api/v1/me")

    text = client.get("/metrics").text

    assert 'route="/api/v1/auth/signin",status="200"' in text
    assert 'route="/api/v1/auth/signin",status="401"' in text
    assert 'route="/api/v1/me",status="200"' in text
    assert 'gatepass_signins_total{outcome="ok"} 1.0' in text
    assert 'gatepass_signins_total{outcome="invalid_credentials"} 1.0' in text
    assert "gatepass_password_hash_seconds_count" in text


def test_a_database_failure_on_me_or_sign_in_is_a_counted_json_500(
        core: Core, client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """/me and sign-in are answered ahead of the framework's error middleware: when the
    database fails under them they still answer the API's JSON 500, with the security
    headers, counted in /metrics and logged."""
    users.create_user(core, CLI, UserCreate(username="reeta", password=PASSWORD,
                                            password_expired=False))
    token = client.post("/api/v1/auth/signin",
                        json={"login": "reeta", "password": PASSWORD}).json()["session_token"]
    sessions = UserSession.__table__
    with core.db.engine.begin() as connection:
        connection.execute(text("DROP TABLE sessions"))
    core.db.dispose()  # no connection keeps a statement prepared against the old table
    try:
        answers = [client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}),
                   client.post("/api/v1/auth/signin",
                               json={"login": "reeta", "password": PASSWORD})]
    finally:  # the other tests share this database
        sessions.create(core.db.engine)
        core.db.dispose()

    for response in answers:
        assert response.status_code == 500
        assert response.json() == {"error": {"code": "internal",
                                             "message": "Something went wrong on our side."}}
        assert response.headers["x-content-type-options"] == "nosniff"
    text_ = client.get("/metrics").text
    assert 'route="/api/v1/me",status="500"' in text_
    assert 'route="/api/v1/auth/signin",status="500"' in text_
    assert sum("unhandled error" in record.getMessage() for record in caplog.records) == 2


def test_logs_are_json_lines_without_secrets(core: Core, client: TestClient,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Every log line is one JSON object, and no password or token appears in any of them."""
    caplog.set_level(logging.DEBUG)
    users.create_user(core, CLI, UserCreate(username="reeta", password=PASSWORD,
                                            password_expired=False))
    signed = client.post("/api/v1/auth/signin", json={"login": "reeta", "password": PASSWORD})
    token = signed.json()["session_token"]
    client.post("/api/v1/auth/signin", json={"login": "reeta", "password": "hunter2 wrong"})
    client.post("/api/v1/auth/password/change", json={
        "current_password": PASSWORD, "new_password": "a brand new passphrase"})

    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]

    assert lines, "the sign-in and password change should have logged events"
    for line in lines:
        assert "\n" not in line
        assert isinstance(json.loads(line), dict)
        for secret in (PASSWORD, "hunter2 wrong", "a brand new passphrase", token):
            assert secret not in line
