"""The `gatepass` console script, run as a user runs it: a subprocess with its own env and cwd."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from gatepass.app import create_app
from gatepass.settings import Settings

from conftest import free_port

GATEPASS = str(Path(sys.executable).with_name("gatepass"))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("GATEPASS_")}
    values.update({
        "GATEPASS_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'gatepass.db'}",
        "GATEPASS_VAR_DIR": str(tmp_path / "var"),
        "GATEPASS_ARGON2_MEMORY_KIB": "64", "GATEPASS_ARGON2_TIME_COST": "1",
    })
    return values


def gatepass(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEPASS, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_migrate_api_key_users_and_settings(env: dict[str, str], tmp_path: Path) -> None:
    """migrate, api-key create, users create and settings get/set work from a fresh directory."""
    migrated = gatepass(env, tmp_path, "migrate")
    key = gatepass(env, tmp_path, "api-key", "create", "--name", "ci", "--scope", "users")
    created = gatepass(env, tmp_path, "users", "create", "--email", "ada@example.com",
                       "--password", "analytical engine 1843", "--no-password-expired")
    changed = gatepass(env, tmp_path, "settings", "set", "lockout.max_failed_attempts", "7")
    shown = gatepass(env, tmp_path, "settings", "get", "lockout.max_failed_attempts")
    listing = gatepass(env, tmp_path, "settings", "get")

    assert migrated.returncode == 0, migrated.stderr
    assert key.returncode == 0, key.stderr
    raw = key.stdout.strip().splitlines()[-1]
    assert raw.startswith("gp_") and " " not in raw
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["username"] == "ada"
    assert changed.returncode == 0 and shown.stdout.strip() == "7"
    assert "login.by_email = true" in listing.stdout
    with TestClient(create_app(Settings(database_url=env["GATEPASS_DATABASE_URL"],
                                        var_dir=tmp_path / "var"))) as api:
        users = api.get("/admin/api/v1/users", headers={"Authorization": f"Bearer {raw}"})
    assert users.status_code == 200
    assert [u["email"] for u in users.json()["items"]] == ["ada@example.com"]
    assert (tmp_path / "var" / "gatepass.db").exists()
    assert "analytical engine" not in created.stdout + created.stderr


def test_bad_input_is_one_sentence_on_stderr(env: dict[str, str], tmp_path: Path) -> None:
    """Bad values exit 1 with one sentence on stderr and no traceback."""
    unknown = gatepass(env, tmp_path, "settings", "set", "no.such.key", "1")
    wrong_type = gatepass(env, tmp_path, "settings", "set", "login.by_email", "maybe")
    weak = gatepass(env, tmp_path, "users", "create", "--email", "a@example.com",
                    "--password", "password")
    bad_scope = gatepass(env, tmp_path, "api-key", "create", "--name", "x", "--scope", "root")
    bad_env = gatepass({**env, "GATEPASS_WORKER": "nope"}, tmp_path, "migrate")
    bad_email = gatepass(env, tmp_path, "users", "create", "--email", "not-an-address")
    bad_invitee = gatepass(env, tmp_path, "invite", "--email", "not-an-address")

    for result in (unknown, wrong_type, weak, bad_scope, bad_env, bad_email, bad_invitee):
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith((".", ").")), result.stderr
        assert "Traceback" not in result.stderr
    assert "no.such.key" in unknown.stderr
    assert "login.by_email" in wrong_type.stderr
    assert "GATEPASS_WORKER" in bad_env.stderr
    assert bad_email.stderr.strip() == \
        "--email: An email address must have an @-sign."
    assert bad_invitee.stderr.strip().startswith("--emails") and \
        bad_invitee.stderr.strip().endswith("@-sign.")


def test_a_database_failing_midway_is_one_sentence_on_stderr(env: dict[str, str],
                                                              tmp_path: Path) -> None:
    """A statement the database refuses (here a trigger's) exits 1 with one sentence naming
    the database and its reason, never a traceback, and writes nothing."""
    assert gatepass(env, tmp_path, "migrate").returncode == 0
    database = sqlite3.connect(tmp_path / "var" / "gatepass.db")
    with database:
        database.execute("CREATE TRIGGER refuse BEFORE INSERT ON site_settings "
                         "BEGIN SELECT RAISE(ABORT, 'settings are frozen'); END")

    result = gatepass(env, tmp_path, "settings", "set", "lockout.max_failed_attempts", "7")

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "settings are frozen" in lines[0] and "gatepass.db" in lines[0]
    assert database.execute("SELECT count(*) FROM site_settings").fetchone() == (0,)


def test_serve_prints_the_bootstrap_key_once_and_answers(env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """The first `gatepass serve` prints an admin key that works; a restart prints none."""
    port = free_port()

    def serve() -> list[str]:
        process = subprocess.Popen([GATEPASS, "serve", "--port", str(port)], env=env,
                                   cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and process.poll() is None
                    time.sleep(0.1)
            assert health.json() == {"status": "ok"}
            keys = [line.strip() for line in lines if line.strip().startswith("gp_")]
            for key in keys:
                users = httpx.get(f"http://127.0.0.1:{port}/admin/api/v1/users",
                                  headers={"Authorization": f"Bearer {key}"})
                assert users.status_code == 200
            return keys
        finally:
            process.terminate()
            process.wait(timeout=15)
            reader.join(timeout=5)

    first = serve()
    second = serve()

    assert len(first) == 1
    assert second == []


def test_serve_believes_x_forwarded_for_only_when_told_to(env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """A client on 127.0.0.1 forging X-Forwarded-For is recorded as itself; with
    GATEPASS_TRUST_PROXY_HEADERS=true (behind a proxy) the forwarded address is recorded."""
    created = gatepass(env, tmp_path, "users", "create", "--username", "ada",
                       "--password", "a long enough passphrase")
    assert created.returncode == 0, created.stderr

    def signed_in_from(extra_env: dict[str, str]) -> str:
        port = free_port()
        process = subprocess.Popen([GATEPASS, "serve", "--port", str(port)],
                                   env={**env, **extra_env}, cwd=tmp_path,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and process.poll() is None
                    time.sleep(0.1)
            answer = httpx.post(f"http://127.0.0.1:{port}/api/v1/auth/signin",
                                json={"login": "ada", "password": "a long enough passphrase"},
                                headers={"X-Forwarded-For": "203.0.113.9"})
            assert answer.status_code == 200, answer.text
        finally:
            process.terminate()
            process.wait(timeout=15)
        events = sqlite3.connect(tmp_path / "var" / "gatepass.db").execute(
            "SELECT context FROM events WHERE type = 'user.signed_in' ORDER BY seq DESC LIMIT 1")
        return str(json.loads(events.fetchone()[0])["ip_address"])

    assert signed_in_from({}) == "127.0.0.1"
    assert signed_in_from({"GATEPASS_TRUST_PROXY_HEADERS": "true"}) == "203.0.113.9"
