"""Redemption caps hold under concurrency: one conditional UPDATE, never read-then-write."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import sqlalchemy as sa

from gatepass.users.models import User
from conftest import LiveServer, set_site

RACERS = 40


def race(url: str, bodies: list[dict[str, str]], path: str = "/api/v1/auth/register",
         tokens: list[str] | None = None) -> list[int]:
    def one(index: int) -> int:
        headers = {"Authorization": f"Bearer {tokens[index]}"} if tokens else {}
        with httpx.Client(base_url=url, timeout=60) as client:
            return client.post(path, json=bodies[index], headers=headers).status_code

    with ThreadPoolExecutor(max_workers=RACERS) as pool:
        return list(pool.map(one, range(len(bodies))))


def count_users(live_server: LiveServer) -> int:
    with live_server.core.db.read() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(User)) or 0)


def test_forty_registrations_race_for_ten_places(live_server: LiveServer,
                                                 live_admin: httpx.Client) -> None:
    """A group invitation capped at 10: exactly 10 users, count 10, the rest 400, no 5xx."""
    set_site(live_server.core, ratelimit__enabled=False, registration__open=False)
    item = live_admin.post("/invitations", json={"type": "group", "max_redemptions": 10}).json()[
        "invitations"][0]
    bodies = [{"email": f"racer{i}@example.com", "password": "a long enough passphrase",
               "invitation_code": item["code"]} for i in range(RACERS)]

    statuses = race(live_server.url, bodies)

    assert sorted(set(statuses)) == [201, 400], statuses
    assert statuses.count(201) == 10
    assert count_users(live_server) == 10
    shown = live_admin.get(f"/invitations/{item['id']}").json()["invitation"]
    assert shown["redemption_count"] == 10 and shown["status"] == "redeemed"
    assert len(shown["redemptions"]) == 10


def test_forty_redemptions_of_a_single_invitation_admit_one(live_server: LiveServer,
                                                            live_admin: httpx.Client) -> None:
    """A single invitation is a group of one: of 40 racing existing accounts, one wins."""
    set_site(live_server.core, ratelimit__enabled=False)
    tokens = []
    for i in range(RACERS):
        live_admin.post("/users", json={"username": f"racer{i}", "password": "a long passphrase 1",
                                        "password_expired": False})
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        for i in range(RACERS):
            tokens.append(client.post("/api/v1/auth/signin", json={
                "login": f"racer{i}", "password": "a long passphrase 1"}).json()["session_token"])
    item = live_admin.post("/invitations", json={"type": "single", "emails": ["one@example.com"],
                                                 "send_email": False}).json()["invitations"][0]

    statuses = race(live_server.url, [{"code": item["code"]}] * RACERS,
                    path="/api/v1/invitations/redeem", tokens=tokens)

    assert statuses.count(200) == 1 and statuses.count(400) == RACERS - 1, statuses
    shown = live_admin.get(f"/invitations/{item['id']}").json()["invitation"]
    assert shown["redemption_count"] == 1 and len(shown["redemptions"]) == 1
