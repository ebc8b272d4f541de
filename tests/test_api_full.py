"""The REST API of DESIGN §4 as clients use it: keys and scopes, events made and changed by
API (their mail checked in the capturing smarthost), filters and pagination, bulk attendees
and their limits, the error shape, the public invite endpoints' rate limits and CORS."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import httpx
import pytest
from icalendar import Calendar
from sqlalchemy import select, update

from ciserver import config as config_mod
from ciserver import relay
from ciserver.itip import content as content_mod
from ciserver.services import apikeys, events, subscriptions
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import ApiKey, OutboxItem, Subscription
from ciserver.web import api
from ciserver.web.app import create_app

from .conftest import DOMAIN, ORGANIZER, Sink, make_config

START = datetime(2027, 5, 1, 18, 0, tzinfo=UTC)
OTHER = "coach@nba.example"

Factory = Callable[..., Awaitable[tuple[Services, httpx.AsyncClient]]]


@pytest.fixture
async def make_api(tmp_path: Path, db_url: str, sink: Sink) -> AsyncIterator[Factory]:
    """Open the service and its app with [web] settings of the test's choosing."""
    opened: list[tuple[Services, httpx.AsyncClient]] = []

    async def factory(**web: object) -> tuple[Services, httpx.AsyncClient]:
        cfg = make_config(tmp_path, db_url, sink, **({"web": web} if web else {}))
        svc = Services.open(cfg)
        await db.ensure_schema(svc.engine, cfg.database_url)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                   base_url="http://testserver")
        opened.append((svc, client))
        return svc, client

    yield factory
    for svc, client in opened:
        await client.aclose()
        await svc.close()


@pytest.fixture
async def setup(make_api: Factory) -> tuple[Services, httpx.AsyncClient]:
    return await make_api()


async def key_for(svc: Services, **scope: Any) -> dict[str, str]:
    _, key = await apikeys.create(svc, **scope)
    return {"Authorization": f"Bearer {key}"}


async def make_event(svc: Services, organizer: str = ORGANIZER, summary: str = "Game",
                     start: datetime = START, location: str = "") -> str:
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(svc, session, organizer=organizer,
                                            organizer_name="Org", summary=summary,
                                            start=start, end=start + timedelta(hours=2),
                                            location=location)
        return event.public_id


async def subscribe(svc: Services, event_id: str, *emails: str) -> None:
    async with svc.sessions.begin() as session:
        event = await events.find(session, event_id)
        for e in emails:
            await subscriptions.invite(svc, session, event, e)


def vevent(msg: Any) -> Any:
    return Calendar.from_ical(msg.calendar()).walk("VEVENT")[0]


def links(r: httpx.Response) -> dict[str, str]:
    """rel -> URL of an RFC 8288 Link header."""
    return {rel: url for url, rel in re.findall(r'<([^>]+)>;\s*rel="([^"]+)"',
                                                 r.headers.get("link", ""))}


# --------------------------------------------------------------------------------------------
# Events made and changed by API


async def test_api_event_invites_go_out_in_the_organizers_name_from_our_addresses(
        setup: tuple[Services, httpx.AsyncClient], sink: Sink) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    r = await client.post("/api/v1/events", headers=org, json={
        "summary": "Knicks vs Celtics", "start": "2027-03-04T19:30:00",
        "end": "2027-03-04T22:00:00", "timezone": "America/New_York",
        "location": "Madison Square Garden", "organizer_name": "Zach Lowe"})
    assert r.status_code == 201, r.text
    ev = r.json()
    assert ev["organizer"] == ORGANIZER and ev["organizer_name"] == "Zach Lowe"
    assert ev["page_url"] == f"https://{DOMAIN}/e/{ev['id']}" and ev["sequence"] == 0
    r = await client.post(f"/api/v1/events/{ev['id']}/attendees", headers=org,
                          json=[{"email": "fan@example.com", "name": "Fan"}])
    assert r.status_code == 202 and r.json() == {"count": 1, "already": 0}
    await relay.Relay(svc).drain()
    [msg] = sink.wait(1)
    name, address = parseaddr(msg.message["From"])
    assert name == "Zach Lowe"  # the organizer's name ...
    assert address.endswith(f"@{DOMAIN}") and address.startswith("rsvp+")  # ... our address
    assert msg.mail_from.endswith(f"@{DOMAIN}") and ORGANIZER not in msg.mail_from
    assert msg.rcpt_tos == ["fan@example.com"]
    v = vevent(msg)
    organizer = v["ORGANIZER"]
    assert organizer.params["CN"] == "Zach Lowe" and str(organizer).lower() == f"mailto:{address}"
    assert str(v["UID"]) == ev["invite_uid"] and str(v["SUMMARY"]) == "Knicks vs Celtics"
    assert v.start.astimezone(UTC) == datetime(2027, 3, 5, 0, 30, tzinfo=UTC)


async def test_who_may_create_events(setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    body = {"summary": "S", "start": "2027-01-01T10:00:00Z", "end": "2027-01-01T11:00:00Z"}
    r = await client.post("/api/v1/events", headers=await key_for(svc, domain="team.example"),
                          json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    admin = await key_for(svc, admin=True)
    r = await client.post("/api/v1/events", headers=admin, json=body)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("organizer:")
    r = await client.post("/api/v1/events", headers=admin, json={**body, "organizer": OTHER})
    assert r.status_code == 201 and r.json()["organizer"] == OTHER
    org = await key_for(svc, organizer=ORGANIZER)
    r = await client.post("/api/v1/events", headers=org, json={**body, "organizer": OTHER})
    assert r.status_code == 403
    r = await client.post("/api/v1/events", headers=org,
                          json={**body, "organizer": ORGANIZER.upper()})
    assert r.status_code == 201 and r.json()["organizer"] == ORGANIZER
    # naive times need a zone; unknown zones, timestamps and absurd years are refused
    for bad in ({"start": "2027-01-01T10:00:00", "end": "2027-01-01T11:00:00"},
                {"timezone": "Mars/Olympus"}, {"start": 1798797600},
                {"start": "0001-01-01T00:00:00+01:00"}, {"end": "2026-12-31T00:00:00Z"},
                {"summary": "nul\x00byte"}, {"colour": "red"}):
        r = await client.post("/api/v1/events", headers=org, json={**body, **bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid"


async def test_patch_and_delete_fan_out_like_calendar_edits(
        setup: tuple[Services, httpx.AsyncClient], sink: Sink) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    eid = await make_event(svc, summary="Opener")
    await subscribe(svc, eid, "a@example.com", "b@example.com", "gone@example.com")
    async with svc.sessions.begin() as session:
        sub = (await session.execute(select(Subscription).where(
            Subscription.email == "gone@example.com"))).scalar_one()
        await subscriptions.stop(svc, session, sub, "unsubscribed")
    await relay.Relay(svc).drain()
    assert sorted(m.rcpt_tos[0] for m in sink.wait(2)) == ["a@example.com", "b@example.com"]
    sink.clear()

    # a change customers see: everyone active gets the new version, SEQUENCE 1
    r = await client.patch(f"/api/v1/events/{eid}", headers=org,
                           json={"summary": "Opener (moved)", "start": "2027-05-02T18:00:00Z"})
    assert r.status_code == 200 and r.json()["sequence"] == 1
    assert r.json()["end"].startswith("2027-05-02T20:00:00")  # the duration is kept
    await relay.Relay(svc).drain()
    got = sink.wait(2)
    assert sorted(m.rcpt_tos[0] for m in got) == ["a@example.com", "b@example.com"]
    for m in got:
        v = vevent(m)
        assert int(v["SEQUENCE"]) == 1 and str(v["SUMMARY"]) == "Opener (moved)"
        assert str(Calendar.from_ical(m.calendar())["METHOD"]) == "REQUEST"
    sink.clear()

    # no visible change: no new version, no mail
    r = await client.patch(f"/api/v1/events/{eid}", headers=org, json={"summary": "Opener (moved)"})
    assert r.status_code == 200 and r.json()["sequence"] == 1
    await relay.Relay(svc).drain()
    assert sink.invites() == []

    # cancel: METHOD:CANCEL to everyone active; a second DELETE changes nothing
    r = await client.delete(f"/api/v1/events/{eid}", headers=org)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["sequence"] == 2
    await relay.Relay(svc).drain()
    got = sink.wait(2)
    assert {str(Calendar.from_ical(m.calendar())["METHOD"]) for m in got} == {"CANCEL"}
    assert {int(vevent(m)["SEQUENCE"]) for m in got} == {2}
    sink.clear()
    r = await client.delete(f"/api/v1/events/{eid}", headers=org)
    assert r.status_code == 200 and r.json()["sequence"] == 2
    await relay.Relay(svc).drain()
    assert sink.invites() == []
    r = await client.patch(f"/api/v1/events/{eid}", headers=org, json={"summary": "Back"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


# --------------------------------------------------------------------------------------------
# Keys and scopes


async def test_scopes_organizer_domain_admin(setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    mine = await make_event(svc, summary="Mine")
    theirs = await make_event(svc, organizer=OTHER, summary="Theirs")
    await subscribe(svc, theirs, "x@example.com")
    org = await key_for(svc, organizer=ORGANIZER)
    dom = await key_for(svc, domain="nba.example")
    admin = await key_for(svc, admin=True)

    # organizer: its events only; others are "not found", even to write
    r = await client.get("/api/v1/events", headers=org)
    assert [e["id"] for e in r.json()] == [mine] and r.headers["x-total-count"] == "1"
    r = await client.get("/api/v1/events", headers=org, params={"organizer": OTHER})
    assert r.json() == [] and r.headers["x-total-count"] == "0"
    for method, path in (("GET", f"/api/v1/events/{theirs}"),
                         ("GET", f"/api/v1/events/{theirs}/attendees"),
                         ("PATCH", f"/api/v1/events/{theirs}"),
                         ("DELETE", f"/api/v1/events/{theirs}")):
        r = await client.request(method, path, headers=org,
                                 json={"summary": "x"} if method == "PATCH" else None)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path)

    # domain owner: reads its domain (events, attendees, reports), changes nothing
    r = await client.get("/api/v1/events", headers=dom)
    assert [e["id"] for e in r.json()] == [theirs]
    assert (await client.get(f"/api/v1/events/{theirs}", headers=dom)).status_code == 200
    r = await client.get(f"/api/v1/events/{theirs}/attendees", headers=dom)
    assert [a["email"] for a in r.json()] == ["x@example.com"]
    r = await client.get(f"/api/v1/events/{theirs}/report.csv", headers=dom)
    assert r.status_code == 200 and "x@example.com" in r.text
    assert (await client.get(f"/api/v1/events/{mine}", headers=dom)).status_code == 404
    for method, path, body in (
            ("PATCH", f"/api/v1/events/{theirs}", {"summary": "x"}),
            ("DELETE", f"/api/v1/events/{theirs}", None),
            ("POST", f"/api/v1/events/{theirs}/attendees", [{"email": "y@example.com"}])):
        r = await client.request(method, path, headers=dom, json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, path)

    # admin: everything
    r = await client.get("/api/v1/events", headers=admin)
    assert r.headers["x-total-count"] == "2"
    r = await client.get("/api/v1/events", headers=admin, params={"organizer": OTHER})
    assert [e["id"] for e in r.json()] == [theirs]
    r = await client.patch(f"/api/v1/events/{theirs}", headers=admin, json={"location": "Here"})
    assert r.status_code == 200 and r.json()["location"] == "Here"
    r = await client.post(f"/api/v1/events/{mine}/attendees", headers=admin,
                          json=[{"email": "z@example.com"}])
    assert r.status_code == 202
    r = await client.delete(f"/api/v1/events/{theirs}", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


async def test_keys_are_hashed_and_last_use_is_written_once_a_minute(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    now = [datetime(2027, 1, 1, 12, 0, tzinfo=UTC)]
    svc.clock = lambda: now[0]
    row, key = await apikeys.create(svc, organizer=ORGANIZER)
    auth = {"Authorization": f"Bearer {key}"}

    async def stored() -> ApiKey:
        async with svc.sessions() as session:
            found = await session.get(ApiKey, row.id)
            assert found is not None
            return found

    kept = await stored()
    assert key not in (kept.key_hash, kept.prefix) and kept.prefix == key[:12]
    assert kept.last_used_at is None
    assert (await client.get("/api/v1/events", headers=auth)).status_code == 200
    assert (await stored()).last_used_at == now[0]
    first = now[0]
    now[0] += timedelta(seconds=30)
    assert (await client.get("/api/v1/events", headers=auth)).status_code == 200
    assert (await stored()).last_used_at == first  # not written again within the minute
    now[0] += timedelta(seconds=31)
    assert (await client.get("/api/v1/events", headers=auth)).status_code == 200
    assert (await stored()).last_used_at == now[0]
    # a revoked key is refused, and so are malformed ones
    assert await apikeys.revoke(svc, row.prefix)
    for value in (f"Bearer {key}", "Bearer", "Basic abc", f"Bearer {key}x",
                  "Bearer cis_" + "a" * 500):
        r = await client.get("/api/v1/events", headers={"Authorization": value})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "unauthorized"


def test_apikey_cli_list_json_and_revoke(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "ciserver", "-c", str(config), *args],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    cli("db", "upgrade")
    key = cli("apikey", "create", "--domain", "nba.example", "--label", "stats").splitlines()[-1]
    [listed] = json.loads(cli("apikey", "list", "--json"))
    assert listed["prefix"] == key[:12] and listed["scope"] == "domain"
    assert listed["domain"] == "nba.example" and listed["label"] == "stats"
    assert listed["last_used_at"] is None and listed["revoked_at"] is None
    assert key not in cli("apikey", "list", "--json")

    async def use() -> int:
        svc = Services.open(config_mod.load(config, {}))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                         base_url="http://t") as c:
                r = await c.get("/api/v1/events", headers={"Authorization": f"Bearer {key}"})
                return r.status_code
        finally:
            await svc.close()

    assert asyncio.run(use()) == 200
    [listed] = json.loads(cli("apikey", "list", "--json"))
    assert listed["last_used_at"] is not None
    assert "never" not in cli("apikey", "list")
    cli("apikey", "revoke", key[:12])
    [listed] = json.loads(cli("apikey", "list", "--json"))
    assert listed["revoked_at"] is not None
    assert asyncio.run(use()) == 401


# --------------------------------------------------------------------------------------------
# Filters and pagination


async def test_event_filters_pagination_and_links(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    ids = []
    for n in range(7):  # two events share each start time: the order is start, then creation
        ids.append(await make_event(svc, summary=f"Knicks game {n}" if n % 2 else f"Nets {n}",
                                    start=START + timedelta(days=n // 2),
                                    location="Madison Square Garden" if n < 3 else "Barclays"))
    ids.append(await make_event(svc, summary="100% fun_day", start=START + timedelta(days=9)))
    await make_event(svc, organizer=OTHER, summary="Knicks elsewhere")
    async with svc.sessions.begin() as session:
        await events.cancel(svc, session, await events.find(session, ids[1]), origin="api")

    async def listing(**params: Any) -> tuple[list[str], httpx.Response]:
        r = await client.get("/api/v1/events", headers=org, params=params)
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()], r

    got, r = await listing()
    assert got == ids and r.headers["x-total-count"] == "8" and "link" not in r.headers
    # pages: a stable order, the total, and Link rel=next / prev keeping the filters
    got, r = await listing(limit=3)
    assert got == ids[:3] and r.headers["x-total-count"] == "8"
    assert set(links(r)) == {"next"}
    seen, url = list(got), links(r)["next"]
    while url:
        assert url.startswith(f"https://{DOMAIN}/api/v1/events?")
        page = await client.get(url.replace(f"https://{DOMAIN}", ""), headers=org)
        seen += [e["id"] for e in page.json()]
        assert "prev" in links(page)
        url = links(page).get("next", "")
    assert seen == ids
    got, r = await listing(status="confirmed", limit=2, offset=2)
    assert got == [ids[3], ids[4]] and r.headers["x-total-count"] == "7"
    nxt = links(r)["next"]
    assert "status=confirmed" in nxt and "offset=4" in nxt and "limit=2" in nxt
    assert "offset=0" in links(r)["prev"]
    assert (await listing(status="cancelled"))[0] == [ids[1]]
    # start dates: from (at or after) and to (before); a date alone is midnight UTC
    got, _ = await listing(**{"from": "2027-05-02", "to": "2027-05-03T18:00:00Z"})
    assert got == ids[2:4]
    got, _ = await listing(**{"from": "2027-05-02T19:00:00+01:00"})
    assert got == ids[2:]
    # text in the summary or the location, any case; % and _ are literal
    assert (await listing(q="knicks"))[0] == [ids[1], ids[3], ids[5]]
    assert (await listing(q="GARDEN"))[0] == ids[:3]
    assert (await listing(q="100%"))[0] == [ids[7]]
    assert (await listing(q="n_ts"))[0] == []
    # the filters together
    got, r = await listing(q="knicks", status="confirmed", **{"from": "2027-05-02"})
    assert got == [ids[3], ids[5]] and r.headers["x-total-count"] == "2"
    # wrong filters are errors, not everything
    for params in ({"status": "maybe"}, {"from": "yesterday"}, {"to": "1798797600"},
                   {"limit": 0}, {"limit": 1001}, {"offset": -1}, {"stauts": "confirmed"},
                   {"q": "x" * 201}):
        r = await client.get("/api/v1/events", headers=org, params=params)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", params


async def test_attendee_filters_and_pagination(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    eid = await make_event(svc)
    people = {"y1": "ACCEPTED", "n1": "DECLINED", "m1": "TENTATIVE", "y2": "ACCEPTED",
              "q1": "NEEDS-ACTION", "q2": "NEEDS-ACTION", "b1": "ACCEPTED", "u1": "NEEDS-ACTION"}
    await subscribe(svc, eid, *(f"{p}@example.com" for p in people))
    async with svc.sessions.begin() as session:
        for p, partstat in people.items():
            await session.execute(update(Subscription).where(
                Subscription.email == f"{p}@example.com").values(
                    partstat=partstat, status={"b": "bounced", "u": "unsubscribed"}.get(
                        p[0], "active")))
    emails = [f"{p}@example.com" for p in people]

    async def listing(**params: Any) -> tuple[list[str], httpx.Response]:
        r = await client.get(f"/api/v1/events/{eid}/attendees", headers=org, params=params)
        assert r.status_code == 200, r.text
        return [a["email"] for a in r.json()], r

    got, r = await listing()
    assert got == emails and r.headers["x-total-count"] == "8"
    assert [a["rsvp"] for a in r.json()] == ["Y", "N", "M", "Y", None, None, "Y", None]
    assert set(r.json()[0]) >= {"email", "name", "rsvp", "partstat", "responded_at", "status"}
    assert (await listing(rsvp="Y"))[0] == ["y1@example.com", "y2@example.com", "b1@example.com"]
    assert (await listing(rsvp="N"))[0] == ["n1@example.com"]
    assert (await listing(rsvp="M"))[0] == ["m1@example.com"]
    assert (await listing(rsvp="none"))[0] == ["q1@example.com", "q2@example.com",
                                               "u1@example.com"]
    assert (await listing(status="bounced"))[0] == ["b1@example.com"]
    assert (await listing(status="unsubscribed"))[0] == ["u1@example.com"]
    got, r = await listing(status="active", rsvp="Y")
    assert got == ["y1@example.com", "y2@example.com"] and r.headers["x-total-count"] == "2"
    got, r = await listing(limit=3, offset=3)
    assert got == emails[3:6] and r.headers["x-total-count"] == "8"
    assert "offset=6" in links(r)["next"] and "offset=0" in links(r)["prev"]
    got, r = await listing(limit=3, offset=6)
    assert got == emails[6:] and "next" not in links(r)
    for params in ({"rsvp": "yes"}, {"status": "gone"}, {"limit": 0}, {"page": 2}):
        r = await client.get(f"/api/v1/events/{eid}/attendees", headers=org, params=params)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", params


# --------------------------------------------------------------------------------------------
# Bulk attendees


async def test_bulk_attendees_shape_and_limits(make_api: Factory, sink: Sink,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    svc, client = await make_api(max_body_size=4096)
    org = await key_for(svc, organizer=ORGANIZER)
    _, key = await apikeys.create(svc, organizer=ORGANIZER)
    eid = await make_event(svc)
    url = f"/api/v1/events/{eid}/attendees"
    await subscribe(svc, eid, "old@example.com")

    r = await client.post(url, headers={"Authorization": f"Bearer {key}"}, json=[
        {"email": "a@example.com", "name": "A"}, {"email": "old@example.com"},
        {"email": "A@Example.com"}])
    assert r.status_code == 202 and r.json() == {"count": 1, "already": 2}
    async with svc.sessions() as session:
        sub = (await session.execute(select(Subscription).where(
            Subscription.email == "a@example.com"))).scalar_one()
    assert sub.source == "api" and sub.origin == f"api key {key[:12]}"
    r = await client.post(url, headers={**org, "Content-Type": "text/csv"},
                          content="\ufeffName,Email\nBee,b@example.com\n,c@example.com\n")
    assert r.status_code == 202 and r.json() == {"count": 2, "already": 0}
    r = await client.post(url, headers=org, files={"file": ("f.csv", b"d@example.com,D\n")})
    assert r.status_code == 202 and r.json() == {"count": 1, "already": 0}

    monkeypatch.setattr(api, "MAX_BULK", 3)
    many = [{"email": f"m{i}@example.com"} for i in range(4)]
    r = await client.post(url, headers=org, json=many)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = await client.post(url, headers={**org, "Content-Type": "text/csv"},
                          content="\n".join(m["email"] for m in many))
    assert r.status_code == 413
    for kwargs, status in (
            ({"json": []}, 422), ({"json": {"email": "x@example.com"}}, 422),
            ({"json": [{"name": "no address"}]}, 422),
            ({"json": [{"email": "ok@example.com"}, {"email": "bad"}]}, 422),
            ({"files": {"other": ("f.csv", b"e@example.com\n")}}, 422),
            ({"content": b"e@example.com", "headers": {"Content-Type": "text/plain"}}, 415),
            ({"content": b"<x/>", "headers": {"Content-Type": "application/xml"}}, 415),
            ({"content": b"[{", "headers": {"Content-Type": "application/json"}}, 400),
            ({"content": b"x" * 5000, "headers": {"Content-Type": "text/csv"}}, 413)):
        headers = {**org, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        r = await client.post(url, headers=headers, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert set(r.json()) == {"error"} and set(r.json()["error"]) >= {"code", "message"}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(10):
            yield b"e@example.com\n" * 40

    r = await client.post(url, headers={**org, "Content-Type": "text/csv"}, content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    # nothing of the refused requests was written
    r = await client.get(url, headers=org)
    assert sorted(a["email"] for a in r.json()) == [
        "a@example.com", "b@example.com", "c@example.com", "d@example.com", "old@example.com"]


# --------------------------------------------------------------------------------------------
# The error shape


async def test_errors_are_json_of_one_shape(setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)

    def shaped(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        body: dict[str, Any] = r.json()
        assert body["error"]["code"] == code and body["error"]["message"]
        return body

    shaped(await client.get("/api/v1/nothing-here", headers=org), 404, "not_found")
    shaped(await client.get("/api/nope"), 404, "not_found")
    r = await client.put("/api/v1/events", headers=org, json={})
    shaped(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, POST"
    r = await client.post("/api/v1/events/abc", headers=org)
    shaped(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "DELETE, GET, PATCH"
    shaped(await client.post("/api/v1/events", headers=org, data={"summary": "x"}), 415,
           "unsupported_media_type")
    shaped(await client.patch("/api/v1/events/abc", headers={**org, "Content-Type": "text/plain"},
                              content=b"x"), 415, "unsupported_media_type")
    shaped(await client.post("/api/v1/events", headers={**org, "Content-Type": "application/json"},
                             content=b"{nope"), 400, "bad_request")
    body = shaped(await client.post("/api/v1/events", headers=org, json={"summary": ""}), 422,
                  "invalid")
    fields = {d["field"] for d in body["error"]["details"]}
    assert {"summary", "start", "end"} <= fields
    shaped(await client.get("/api/v1/events?limit=x", headers=org), 422, "invalid")
    shaped(await client.get("/api/v1/events"), 401, "unauthorized")
    shaped(await client.post("/api/v1/events", headers={**org, "Content-Length": "99999999"},
                             content=b"{}"), 413, "too_large")
    # pages keep their own (HTML / text) errors
    r = await client.get("/no-such-page")
    assert r.status_code == 404 and not r.headers["content-type"].startswith("application/json")


# --------------------------------------------------------------------------------------------
# Public invite endpoints: rate limits, honeypot, CORS


async def test_public_rate_limits_per_ip_address_and_event(make_api: Factory) -> None:
    # per event: 3 a minute, whoever asks
    svc, client = await make_api(rate_limit=100, rate_limit_per_address=100,
                                 rate_limit_per_event=3)
    a, b = await make_event(svc), await make_event(svc, summary="B")
    codes = [(await client.post(f"/api/v1/events/{a}/invites",
                                json={"email": f"f{i}@example.com"})).status_code
             for i in range(4)]
    assert codes == [202, 202, 202, 429]
    r = await client.post("/api/v1/invites", json={"email": "g@example.com", "events": [b, a]})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # a is spent
    assert r.json()["error"]["code"] == "rate_limited"
    r = await client.post(f"/api/v1/events/{b}/invites", json={"email": "h@example.com"})
    assert r.status_code == 202  # b is not

    # per address: 2 an hour for one recipient, across events
    svc, client = await make_api(rate_limit=100, rate_limit_per_address=2,
                                 rate_limit_per_event=100)
    ids = [await make_event(svc, summary=f"E{i}") for i in range(3)]
    codes = [(await client.post(f"/api/v1/events/{e}/invites",
                                json={"email": "Victim@example.com"})).status_code for e in ids]
    assert codes == [202, 202, 429]
    r = await client.post(f"/api/v1/events/{ids[2]}/invites", json={"email": "other@example.com"})
    assert r.status_code == 202

    # +tags reach the same mailbox: they share its allowance
    codes = [(await client.post(f"/api/v1/events/{e}/invites",
                                json={"email": f"Flood+{i}@example.com"})).status_code
             for i, e in enumerate(ids)]
    assert codes == [202, 202, 429]

    # invites per mailbox per day, all events together: one request for many events spends
    # as many; a request that would go over is refused whole
    svc, client = await make_api(rate_limit=100, rate_limit_per_address=100,
                                 rate_limit_per_event=100, rate_limit_invites_per_address=5)
    ids = [await make_event(svc, summary=f"G{i}") for i in range(4)]
    r = await client.post("/api/v1/invites", json={"email": "fan@example.com", "events": ids})
    assert r.status_code == 202
    r = await client.post("/api/v1/invites", json={"email": "fan+x@example.com",
                                                   "events": ids[:2]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    r = await client.post(f"/api/v1/events/{ids[0]}/invites", json={"email": "fan+y@example.com"})
    assert r.status_code == 202  # the fifth
    r = await client.post(f"/api/v1/events/{ids[1]}/invites", json={"email": "FAN@example.com"})
    assert r.status_code == 429
    r = await client.post("/api/v1/invites", json={"email": "g@example.com",
                                                   "events": [f"x{i}" for i in range(101)]})
    assert r.status_code == 422  # at most 100 events in one request

    # per IP: 2 a minute
    svc, client = await make_api(rate_limit=2, rate_limit_per_address=100,
                                 rate_limit_per_event=100)
    e = await make_event(svc)
    codes = [(await client.post(f"/api/v1/events/{e}/invites",
                                json={"email": f"p{i}@example.com"})).status_code
             for i in range(3)]
    assert codes == [202, 202, 429]


async def test_malformed_form_bodies_are_400_not_500(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    eid = await make_event(svc)
    for url in (f"/api/v1/events/{eid}/invites", "/api/v1/invites"):
        r = await client.post(url, content=b"x",
                              headers={"Content-Type": "multipart/form-data"})  # no boundary
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_request"
        assert r.headers["access-control-allow-origin"] == "*"


async def test_a_streamed_body_over_the_limit_is_413_on_the_public_routes(
        make_api: Factory) -> None:
    svc, client = await make_api(max_body_size=1000)
    eid = await make_event(svc)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        yield b'{"email": "fan@example.com", "name": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    r = await client.post(f"/api/v1/events/{eid}/invites", content=chunks(),
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


async def test_client_ip_behind_a_chain_of_trusted_proxies(make_api: Factory) -> None:
    # The ASGI test client's peer is 127.0.0.1: the outer proxy; 10.0.0.2 is an inner one.
    svc, client = await make_api(rate_limit=1, rate_limit_per_address=100,
                                 rate_limit_per_event=100,
                                 trusted_proxies='["127.0.0.1", "10.0.0.2"]')
    e = await make_event(svc)

    async def ask(n: int, forwarded: str) -> int:
        r = await client.post(f"/api/v1/events/{e}/invites", json={"email": f"c{n}@example.com"},
                              headers={"X-Forwarded-For": forwarded})
        return r.status_code

    assert await ask(1, "198.51.100.7, 10.0.0.2") == 202
    # what the client put in front is not believed: still 198.51.100.7
    assert await ask(2, "203.0.113.9, 198.51.100.7, 10.0.0.2") == 429
    assert await ask(3, "192.0.2.44, 10.0.0.2") == 202  # another client


async def test_public_endpoints_honeypot_origin_and_bodies(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    eid = await make_event(svc)
    url = f"/api/v1/events/{eid}/invites"
    r = await client.post(url, data={"email": "bot@example.com", "website": "http://spam"})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    r = await client.post(url, json={"email": "fan@example.com", "name": "Fan"},
                          headers={"Origin": "https://shop.example"})
    assert r.status_code == 202
    r = await client.post(url, content=b"email=x@example.com", headers={"Content-Type":
                                                                        "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = await client.post(url, json={"email": "x\x00@example.com"})
    assert r.status_code == 422
    r = await client.post("/api/v1/invites", json={"email": "m@example.com", "events": []})
    assert r.status_code == 422
    attendees = (await client.get(f"/api/v1/events/{eid}/attendees", headers=org)).json()
    assert [a["email"] for a in attendees] == ["fan@example.com"]  # not the bot
    async with svc.sessions() as session:
        sub = (await session.execute(select(Subscription))).scalar_one()
    assert sub.origin == "button https://shop.example"


async def test_cors_only_on_the_public_invite_endpoints(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    eid = await make_event(svc)
    site = {"Origin": "https://fans.example"}
    for path in (f"/api/v1/events/{eid}/invites", "/api/v1/invites"):
        r = await client.options(path, headers={
            **site, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 204 and r.content == b""
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.headers["access-control-allow-methods"] == "POST, OPTIONS"
        assert r.headers["access-control-allow-headers"] == "Content-Type"
        assert "access-control-allow-credentials" not in r.headers
    r = await client.post(f"/api/v1/events/{eid}/invites", headers=site,
                          json={"email": "cors@example.com"})
    assert r.status_code == 202 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    r = await client.post("/api/v1/invites", headers=site, json={"email": "bad"})
    assert r.status_code == 422 and r.headers["access-control-allow-origin"] == "*"
    # nothing else: keyed routes, their preflights, pages
    for method, path in (("GET", "/api/v1/events"), ("OPTIONS", "/api/v1/events"),
                         ("GET", f"/api/v1/events/{eid}"),
                         ("POST", f"/api/v1/events/{eid}/attendees"),
                         ("OPTIONS", f"/api/v1/events/{eid}/attendees"),
                         ("GET", f"/api/v1/events/{eid}/invites"),
                         ("GET", f"/e/{eid}"), ("GET", "/healthz"), ("GET", "/openapi.json")):
        r = await client.request(method, path, headers={
            **site, **org, "Access-Control-Request-Method": "POST"},
            json=[{"email": "k@example.com"}] if method == "POST" else None)
        assert not any(h.startswith("access-control-") for h in r.headers), (method, path)


async def test_concurrent_public_invites_are_committed_together_with_the_same_answers(
        setup: tuple[Services, httpx.AsyncClient], sink: Sink) -> None:
    """Requests arriving together go into one transaction (services/signups.py; by hand on
    SQLite): each still gets the answer it would get alone, and the invites go out."""
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    a, b = await make_event(svc, summary="A"), await make_event(svc, summary="B")
    closed = await make_event(svc, summary="Closed")
    async with svc.sessions.begin() as session:
        await events.cancel(svc, session, await events.find(session, closed), origin="api")
    await subscribe(svc, a, "old@example.com", "stopped@example.com")
    async with svc.sessions.begin() as session:
        sub = (await session.execute(select(Subscription).where(
            Subscription.email == "stopped@example.com"))).scalar_one()
        await subscriptions.stop(svc, session, sub, "unsubscribed")
    await relay.Relay(svc).drain()
    sink.clear()

    def one(event_id: str, email: str) -> Awaitable[httpx.Response]:
        return client.post(f"/api/v1/events/{event_id}/invites", json={"email": email})

    calls = [one(a, f"new{i}@example.com") for i in range(20)]
    calls += [one(a, "twice@example.com"), one(a, "TWICE@example.com"),
              one(a, "old@example.com"), one(a, "stopped@example.com"),
              one("nosuchevent", "x@example.com"), one(closed, "y@example.com"),
              client.post("/api/v1/invites", json={"email": "multi@example.com",
                                                   "events": [b, a]}),
              client.post("/api/v1/invites", json={"email": "half@example.com",
                                                   "events": [a, closed]})]
    got = await asyncio.gather(*calls)
    codes = [r.status_code for r in got]
    assert codes == [202] * 24 + [404, 409, 202, 409], [r.text for r in got]
    statuses = [r.json()["status"] for r in got if r.status_code == 202]
    assert statuses[:20] == ["queued"] * 20
    assert sorted(statuses[20:22]) == ["already_subscribed", "queued"]  # one of the pair
    assert statuses[22:] == ["already_subscribed", "queued", "queued"]  # stopped: again
    assert got[26].json()["events"] == [b, a]
    assert got[24].json()["error"]["code"] == "not_found"
    assert got[25].json()["error"]["code"] == "conflict"

    attendees = {x["email"]: x for x in (await client.get(
        f"/api/v1/events/{a}/attendees", headers=org)).json()}
    assert len(attendees) == 20 + 4  # the new ones, twice, old, stopped, multi; not half
    assert attendees["stopped@example.com"]["status"] == "active"
    assert all(x["rsvp"] is None and x["status"] == "active" for x in attendees.values())
    assert [x["email"] for x in (await client.get(
        f"/api/v1/events/{b}/attendees", headers=org)).json()] == ["multi@example.com"]
    async with svc.sessions() as session:
        subs = (await session.execute(select(Subscription).where(
            Subscription.email == "new3@example.com"))).scalar_one()
    assert subs.source == "page" and subs.created_at.tzinfo is not None
    assert subs.domain == "example.com" and subs.partstat == "NEEDS-ACTION"

    await relay.Relay(svc).drain()
    sent = sink.wait(24)
    rcpts = sorted((m.rcpt_tos[0], str(vevent(m)["UID"]).split("@")[0]) for m in sent)
    assert len(rcpts) == 24 and len(set(rcpts)) == 24  # one invite each, none twice
    assert ("multi@example.com", a) in rcpts and ("multi@example.com", b) in rcpts
    assert ("old@example.com", a) not in rcpts and ("stopped@example.com", a) in rcpts
    assert {event for _, event in rcpts} == {a, b}


async def test_co_organizers_sharing_a_calendar_uid_each_see_their_own_event(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    ids: dict[str, str] = {}
    for who in (ORGANIZER, "amy@nba.example"):
        async with svc.sessions.begin() as session:
            event = await events.create(
                svc, session, organizer=who, organizer_name="", organizer_uid="shared-uid",
                content=content_mod.new_content(summary=who, start=START,
                                                end=START + timedelta(hours=1)),
                origin="mail")
            ids[who] = event.public_id
    for scope, owner in (({"organizer": ORGANIZER}, ORGANIZER),
                         ({"organizer": "amy@nba.example"}, "amy@nba.example"),
                         ({"domain": "nba.example"}, "amy@nba.example")):
        auth = await key_for(svc, **scope)
        r = await client.get("/api/v1/events/shared-uid", headers=auth)
        assert r.status_code == 200 and r.json()["id"] == ids[owner], scope
        r = await client.get("/api/v1/events/shared-uid/report.csv", headers=auth)
        assert r.status_code == 200
        other = next(v for k, v in ids.items() if k != owner)
        assert (await client.get(f"/api/v1/events/{other}", headers=auth)).status_code == 404


async def test_an_event_named_twice_is_one_sign_up(make_api: Factory) -> None:
    """"abc" and "ABC" (or an id and its UID) name one event: one subscription, one invite,
    one hit on the event's rate limit, the event once in the answer."""
    svc, client = await make_api(rate_limit=100, rate_limit_per_address=100,
                                 rate_limit_per_event=2)
    a = await make_event(svc)
    async with svc.sessions() as session:
        uid = (await events.find(session, a)).uid
    r = await client.post("/api/v1/invites", json={"email": "fan@example.com",
                                                   "events": [a, a.upper(), uid]})
    assert r.status_code == 202 and r.json() == {"status": "queued", "events": [a]}, r.text
    async with svc.sessions() as session:
        subs = (await session.execute(select(Subscription))).scalars().all()
        invites = (await session.execute(select(OutboxItem))).scalars().all()
    assert [s.email for s in subs] == ["fan@example.com"] and len(invites) == 1
    codes = [(await client.post(f"/api/v1/events/{a}/invites",
                                json={"email": f"f{i}@example.com"})).status_code
             for i in range(2)]
    assert codes == [202, 429]  # the first request counted once


async def test_null_name_and_unknown_report_parameters(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    a = await make_event(svc)
    r = await client.post(f"/api/v1/events/{a}/invites",
                          json={"email": "nul@example.com", "name": None})
    assert r.status_code == 202, r.text
    r = await client.post(f"/api/v1/events/{a}/attendees", headers=org,
                          json=[{"email": "bulk@example.com", "name": None}])
    assert r.status_code == 202, r.text
    # paging is by ?cursor=; ?offset= would silently give the first page again
    r = await client.get(f"/api/v1/events/{a}/report.json", headers=org,
                         params={"offset": 50})
    assert r.status_code == 422 and "cursor" in r.json()["error"]["message"], r.text
    assert (await client.get(f"/api/v1/events/{a}/report.json", headers=org)).status_code == 200


async def test_our_own_addresses_are_not_customers(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    a = await make_event(svc)
    for addr in (f"create@{DOMAIN}", f"RSVP+x@{DOMAIN.upper()}"):
        r = await client.post(f"/api/v1/events/{a}/invites", json={"email": addr})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_email", r.text
        assert "address of this server" in r.json()["error"]["message"]
        r = await client.post(f"/api/v1/events/{a}/attendees", headers=org,
                              json=[{"email": "ok@example.com"}, {"email": addr}])
        assert r.status_code == 422, r.text
    assert (await client.get(f"/api/v1/events/{a}/attendees", headers=org)).json() == []


async def test_csv_uploads_in_their_own_character_set_and_header_names(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    """A spreadsheet's CSV as Windows, Excel or a European Excel saves it: the character set
    by BOM, declared charset, else UTF-8, else Windows-1252; the usual header names; "," ";"
    or tab; errors naming the line."""
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    url = f"/api/v1/events/{await make_event(svc)}/attendees"

    async def post(body: bytes, ctype: str = "text/csv") -> httpx.Response:
        return await client.post(url, headers={**org, "Content-Type": ctype}, content=body)

    text = "email,name\n{}@example.com,Jos\u00e9 \u2019\u20ac\n"
    for i, (body, ctype) in enumerate((
            (text.format("c0").encode("cp1252"), "text/csv; charset=windows-1252"),
            (text.format("c1").encode("cp1252"), "text/csv; charset=ISO-8859-1"),
            (text.format("c2").encode("cp1252"), "text/csv"),  # undeclared, not UTF-8
            (text.format("c3").encode("cp1252"), "text/csv; charset=utf-8"),  # mislabelled
            (text.format("c4").encode("utf-16"), "text/csv"),  # BOM (LE here)
            (b"\xfe\xff" + text.format("c5").encode("utf-16-be"), "text/csv"),
            (b"\xef\xbb\xbf" + text.format("c6").encode("utf-8"), "text/csv"),
            (text.format("c7").encode("utf-16-le"), "text/csv"))):  # no BOM: plainly UTF-16
        r = await post(body, ctype)
        assert r.status_code == 202 and r.json()["count"] == 1, (i, r.text)
    r = await client.post(url, headers=org, files={"file": (
        "f.csv", text.format("c8").encode("cp1252"), "text/csv")})
    assert r.status_code == 202, r.text
    for body, count in (
            (b"Email Address,First Name,Last Name\nh1@example.com,Ann,Lee\n", 1),
            (b"First Name;Last Name;E-Mail\nBob;Ray;h2@example.com\n", 1),
            (b"Full Name\tMAIL\nCy Dee\th3@example.com\n", 1),
            (b'name,email\n"Lee, Ann",h4@example.com\n', 1),
            (b"h5@example.com;Five\nh6@example.com;Six\n", 2)):  # no header, ";"
        r = await post(body)
        assert r.status_code == 202 and r.json()["count"] == count, (body, r.text)
    r = await client.get(url + "?limit=100", headers=org)
    names = {a["email"]: a["name"] for a in r.json()}
    for i in range(9):
        assert names[f"c{i}@example.com"] == "Jos\u00e9 \u2019\u20ac", (i, names)
    assert (names["h1@example.com"], names["h2@example.com"], names["h3@example.com"],
            names["h4@example.com"], names["h5@example.com"]) == (
        "Ann Lee", "Bob Ray", "Cy Dee", "Lee, Ann", "Five")
    # refusals: clear, with the line
    for body, ctype, message in (
            (b"email,name\nok@example.com,A\n\nnot-an-address,B\n", "text/csv",
             "line 4: 'not-an-address' is not a valid email address"),
            (b"Name,Phone\nAnn,123\n", "text/csv", "line 1: the header row has no email column"),
            (b"a@example.com\n", "text/csv; charset=klingon", "unknown character set"),
            (b"\xff\xfe\x00", "text/csv", "byte order mark but is not valid UTF-16")):
        r = await post(body, ctype)
        assert r.status_code == 422, (body, r.text)
        assert message in r.json()["error"]["message"], (body, r.text)


async def test_a_local_time_the_clocks_skip_is_refused(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    org = await key_for(svc, organizer=ORGANIZER)
    body = {"summary": "Spring forward", "start": "2027-03-14T02:30:00",
            "end": "2027-03-14T03:30:00", "timezone": "America/New_York"}
    r = await client.post("/api/v1/events", headers=org, json=body)
    assert r.status_code == 422, r.text
    assert "02:30 does not exist on 2027-03-14 in America/New_York" in r.json()["error"][
        "message"]
    # the hour that happens twice (fall back) is a real time: taken, as its first pass
    r = await client.post("/api/v1/events", headers=org, json={
        **body, "start": "2027-11-07T01:30:00", "end": "2027-11-07T03:00:00"})
    assert r.status_code == 201 and r.json()["start"].startswith("2027-11-07T05:30:00"), r.text


async def test_an_event_that_is_over_takes_no_sign_ups(
        setup: tuple[Services, httpx.AsyncClient]) -> None:
    svc, client = setup
    past = await make_event(svc, summary="Last season", start=datetime(2020, 5, 1, tzinfo=UTC))
    coming = await make_event(svc, summary="Next game")
    r = await client.post(f"/api/v1/events/{past}/invites", json={"email": "late@example.com"})
    assert r.status_code == 409 and r.json()["error"]["message"] == f"event {past} is over"
    r = await client.post("/api/v1/invites", json={"email": "late@example.com",
                                                   "events": [coming, past]})
    assert r.status_code == 409, r.text
    r = await client.post(f"/api/v1/events/{coming}/invites", json={"email": "ok@example.com"})
    assert r.status_code == 202, r.text
    page = await client.get(f"/e/{past}")
    assert page.status_code == 200 and "This event is over." in page.text
    assert 'id="invite-form"' not in page.text
    r = await client.post(f"/e/{past}", data={"email": "late@example.com",
                                              "events": past})
    assert r.status_code == 409 and "This event is over." in r.text
    async with svc.sessions() as session:
        emails = (await session.execute(select(Subscription.email))).scalars().all()
    assert emails == ["ok@example.com"]
